"""The feature store: hits, misses, key sensitivity, corruption, concurrency, crashes and a full disk."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

import xmx.features.store as store_mod
from xmx.errors import XmxError
from xmx.features.store import FeatureStore, tensors_checksum

KIND = "image_features"
BASE_KEY = {"backbone": "ViT-B-16", "weights_sha256": "ab" * 32, "preset": "tip", "noise_std": 0.0,
            "dataset": "oxford_pets", "split": "train", "subset": "cd" * 32, "views": 10, "seed": 1,
            "output": "image_features_raw", "precision": "fp16"}


class Counter:
    def __init__(self, value=None):
        self.calls = 0
        self.value = value if value is not None else {"features": torch.randn(3, 5, 8), "labels": torch.arange(5)}

    def __call__(self):
        self.calls += 1
        return self.value


def test_miss_then_hit_returns_the_same_tensors(tmp_path):
    store, compute = FeatureStore(tmp_path), Counter()
    a = store.get_or_compute(KIND, BASE_KEY, compute)
    assert store.last_outcome == "miss" and compute.calls == 1
    b = store.get_or_compute(KIND, dict(reversed(list(BASE_KEY.items()))), compute)  # key order is irrelevant
    assert store.last_outcome == "hit" and compute.calls == 1
    for name in ("features", "labels"):
        assert torch.equal(a[name], compute.value[name]) and torch.equal(b[name], compute.value[name])
    assert store.stats == {"hit": 1, "miss": 1, "rebuilt": 0}


@pytest.mark.parametrize("field,value", [
    ("backbone", "RN50"), ("weights_sha256", "ef" * 32), ("preset", "coop"), ("noise_std", 0.1),
    ("dataset", "dtd"), ("split", "val"), ("subset", "00" * 32), ("views", 1), ("seed", 2),
    ("output", "text_features"), ("precision", "fp32")])
def test_every_key_component_changes_the_entry(tmp_path, field, value):
    store, compute = FeatureStore(tmp_path), Counter()
    store.get_or_compute(KIND, BASE_KEY, compute)
    store.get_or_compute(KIND, {**BASE_KEY, field: value}, compute)
    assert store.last_outcome == "miss" and compute.calls == 2
    store.get_or_compute(KIND, BASE_KEY, compute)
    assert store.last_outcome == "hit" and compute.calls == 2
    assert len(store.entries()) == 2


def test_kind_is_part_of_the_key(tmp_path):
    store, compute = FeatureStore(tmp_path), Counter()
    store.get_or_compute(KIND, BASE_KEY, compute)
    store.get_or_compute("text_features", BASE_KEY, compute)
    assert compute.calls == 2


def test_second_store_instance_reuses_the_file(tmp_path):
    compute = Counter()
    FeatureStore(tmp_path).get_or_compute(KIND, BASE_KEY, compute)
    other = FeatureStore(tmp_path)
    out = other.get_or_compute(KIND, BASE_KEY, compute)
    assert compute.calls == 1 and other.last_outcome == "hit"
    assert torch.equal(out["features"], compute.value["features"])


def test_file_carries_key_checksum_version_and_time(tmp_path):
    store, compute = FeatureStore(tmp_path), Counter()
    store.get_or_compute(KIND, BASE_KEY, compute)
    (entry,) = store.entries()
    assert entry.kind == KIND and entry.key == BASE_KEY and entry.size == entry.path.stat().st_size
    assert entry.xmx_version and abs((datetime.now(timezone.utc) - entry.created).total_seconds()) < 120
    from safetensors import safe_open
    with safe_open(entry.path, framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["xmx.key"]) == {"kind": KIND, "key": BASE_KEY}
    assert meta["xmx.checksum"] == tensors_checksum(compute.value)


def _corrupt_truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 17])


def _corrupt_flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # inside the tensor data: the header still parses, only the checksum can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_flip_byte], ids=["truncated", "altered"])
def test_corrupt_file_is_detected_logged_once_and_rebuilt(tmp_path, caplog, corrupt):
    store, compute = FeatureStore(tmp_path), Counter()
    store.get_or_compute(KIND, BASE_KEY, compute)
    path = store.path_for(KIND, BASE_KEY)
    corrupt(path)
    assert store.load(KIND, BASE_KEY) is None  # never used
    with caplog.at_level(logging.INFO, logger="xmx.features.store"):
        out = store.get_or_compute(KIND, BASE_KEY, compute)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "corrupt" in warnings[0].getMessage() and "\n" not in warnings[0].getMessage()
    assert store.last_outcome == "rebuilt" and compute.calls == 2
    assert torch.equal(out["features"], compute.value["features"])
    assert FeatureStore(tmp_path).get_or_compute(KIND, BASE_KEY, compute) is not None and compute.calls == 2


def test_file_under_another_keys_name_is_not_used(tmp_path):
    store = FeatureStore(tmp_path)
    store.get_or_compute(KIND, BASE_KEY, Counter())
    other = {**BASE_KEY, "seed": 7}
    os.replace(store.path_for(KIND, BASE_KEY), store.path_for(KIND, other))
    compute = Counter()
    store.get_or_compute(KIND, other, compute)
    assert store.last_outcome == "rebuilt" and compute.calls == 1


def test_verify_all_reports_and_removes_bad_entries(tmp_path):
    store = FeatureStore(tmp_path)
    store.get_or_compute(KIND, BASE_KEY, Counter())
    store.get_or_compute(KIND, {**BASE_KEY, "seed": 2}, Counter())
    assert store.verify_all() == []
    bad = store.path_for(KIND, BASE_KEY)
    _corrupt_flip_byte(bad)
    problems = store.verify_all(remove=True)
    assert [p for p, _ in problems] == [bad] and "checksum" in problems[0][1]
    assert not bad.exists() and len(store.entries()) == 1


def test_prune_removes_entries_not_used_since(tmp_path):
    store = FeatureStore(tmp_path)
    store.get_or_compute(KIND, BASE_KEY, Counter())
    store.get_or_compute(KIND, {**BASE_KEY, "seed": 2}, Counter())
    old = store.path_for(KIND, BASE_KEY)
    week_ago = time.time() - 7 * 86400
    os.utime(old.with_name(old.name.replace(".safetensors", ".used")), (week_ago, week_ago))
    stale_tmp = old.parent / f".{old.name}.xyz.tmp"
    stale_tmp.write_bytes(b"partial")
    os.utime(stale_tmp, (week_ago, week_ago))
    removed = store.prune(datetime.now(timezone.utc) - timedelta(days=1))
    assert removed == [old] and not old.exists() and not stale_tmp.exists()
    assert [e.key["seed"] for e in store.entries()] == [2]
    compute = Counter()
    store.get_or_compute(KIND, BASE_KEY, compute)  # a hit refreshes last use, a pruned entry is recomputed
    assert compute.calls == 1


def test_bad_keys_and_results_raise_one_line_errors(tmp_path):
    store = FeatureStore(tmp_path)
    with pytest.raises(XmxError, match="not plain JSON"):
        store.get_or_compute(KIND, {"x": torch.zeros(1)}, Counter())
    with pytest.raises(XmxError, match="not plain JSON"):
        store.get_or_compute(KIND, {"x": float("nan")}, Counter())
    with pytest.raises(XmxError, match="kind"):
        store.get_or_compute("../escape", BASE_KEY, Counter())
    with pytest.raises(XmxError, match="dict of tensors"):
        store.get_or_compute(KIND, BASE_KEY, lambda: torch.zeros(3))
    assert store.entries() == []


def test_failing_compute_leaves_nothing_and_is_retried(tmp_path):
    store = FeatureStore(tmp_path)

    def boom():
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        store.get_or_compute(KIND, BASE_KEY, boom)
    assert store.entries() == [] and not store.path_for(KIND, BASE_KEY).exists()
    compute = Counter()
    store.get_or_compute(KIND, BASE_KEY, compute)
    assert compute.calls == 1 and store.last_outcome == "miss"


def test_unwritable_root_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(XmxError, match="not writable"):
        FeatureStore(tmp_path / "file" / "store").get_or_compute(KIND, BASE_KEY, Counter())


def test_disk_full_leaves_nothing_accepted(tmp_path, monkeypatch):
    store = FeatureStore(tmp_path)
    real_save = store_mod.save_file

    def full_disk(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # part of the bytes made it to disk, then the device filled up
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "save_file", full_disk)
    with pytest.raises(XmxError, match="disk full"):
        store.get_or_compute(KIND, BASE_KEY, Counter())
    path = store.path_for(KIND, BASE_KEY)
    assert not path.exists() and list(path.parent.glob("*.tmp")) == []
    monkeypatch.setattr(store_mod, "save_file", real_save)
    compute = Counter()
    store.get_or_compute(KIND, BASE_KEY, compute)
    assert store.last_outcome == "miss" and compute.calls == 1


# ---- several processes --------------------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import hashlib, json, os, sys, time
    from pathlib import Path
    root, tag, sync = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    key = json.loads(sys.argv[4])
    import torch
    import xmx.features.store as sm

    def compute():
        with open(sync / "computes", "a") as f:
            f.write(f"{os.getpid()}\\n")
        if tag == "kill-compute":
            (sync / "computing").touch()
            time.sleep(600)
        time.sleep(0.5)  # keep the others waiting on the lock
        return {"features": torch.arange(400_000, dtype=torch.float32).view(1000, 400) * 0.5}

    if tag == "kill-write":
        real = sm.save_file
        def slow_save(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 3)  # a third of the file is on disk ...
            (sync / "writing").touch()
            time.sleep(600)  # ... when the process is killed
        sm.save_file = slow_save
    (sync / f"ready-{os.getpid()}").touch()
    while not (sync / "go").exists():
        time.sleep(0.005)
    out = sm.FeatureStore(root).get_or_compute("image_features", key, compute)["features"]
    path = sm.FeatureStore(root).path_for("image_features", key)
    print(json.dumps({"file_sha": hashlib.sha256(path.read_bytes()).hexdigest(), "sum": float(out.sum())}))
""")


def _spawn(tmp_path: Path, tag: str, n: int = 1):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    sync = tmp_path / "sync"
    sync.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "store"), tag, str(sync),
                               json.dumps(BASE_KEY)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(n)]
    deadline = time.time() + 120
    while len(list(sync.glob("ready-*"))) < n:
        assert time.time() < deadline and all(p.poll() is None for p in procs), \
            [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.02)
    (sync / "go").touch()
    return procs, sync


def _wait_for(path: Path, procs, timeout=60):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)


@pytest.mark.slow
def test_four_processes_one_compute_same_bytes_no_partial_file(tmp_path):
    procs, sync = _spawn(tmp_path, "concurrent", n=4)
    path = FeatureStore(tmp_path / "store").path_for(KIND, BASE_KEY)
    seen = set()  # inodes checked: an entry file is never modified in place, only replaced
    while any(p.poll() is None for p in procs):  # whenever the entry is visible it is complete and valid
        try:
            with open(path, "rb") as f:
                ino = os.fstat(f.fileno()).st_ino
                if ino not in seen:
                    assert tensors_checksum(st_load(f.read())) == _meta(path)["xmx.checksum"]
                    seen.add(ino)
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    results = []
    for p in procs:
        out, err = p.communicate()
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len((sync / "computes").read_text().split()) == 1  # exactly one extraction
    assert len({r["file_sha"] for r in results}) == 1 and len({r["sum"] for r in results}) == 1
    assert results[0]["sum"] == float((torch.arange(400_000, dtype=torch.float32) * 0.5).sum())
    assert len(seen) == 1 and list(path.parent.glob("*.tmp")) == []


def _meta(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return f.metadata()


@pytest.mark.slow
@pytest.mark.parametrize("tag,marker", [("kill-compute", "computing"), ("kill-write", "writing")])
def test_sigkill_midway_leaves_nothing_accepted(tmp_path, tag, marker):
    (proc,), sync = _spawn(tmp_path, tag)
    _wait_for(sync / marker, [proc])
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    store = FeatureStore(tmp_path / "store", lock_timeout=30)  # the kernel released the dead process's lock
    path = store.path_for(KIND, BASE_KEY)
    assert not path.exists() and store.load(KIND, BASE_KEY) is None and store.entries() == []
    if tag == "kill-write":
        assert len(list(path.parent.glob(".*.tmp"))) == 1  # the partial temp file is there, but never read
    compute = Counter({"features": torch.ones(4)})
    out = store.get_or_compute(KIND, BASE_KEY, compute)
    assert compute.calls == 1 and store.last_outcome == "miss" and torch.equal(out["features"], torch.ones(4))
    assert list(path.parent.glob(".*.tmp")) == []  # cleaned up by the next writer of that key
