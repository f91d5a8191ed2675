"""Stale data never passes as new (issue 12, items 2 and 3): feature keys and job ids hold the bytes of the images,
and ``data.unreadable=skip`` leaves unreadable images out on every path, counted in results.json."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line_error
from xmx.backbones.clip import CLIPBackbone
from xmx.data import fingerprint as fp
from xmx.errors import XmxError
from xmx.features.extract import extract_image_features
from xmx.run import run

FAST = dict(num_workers=0, progress=False, precision="fp32")


def _jpeg(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def replace_keeping_size_and_mtime(path: Path) -> None:
    """Other valid JPEG bytes at ``path``, padded to the old size, the old mtime put back: only the bytes differ."""
    st = path.stat()
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (3, 250, 7)).save(buf, "JPEG", quality=30)
    new = buf.getvalue()
    assert len(new) <= st.st_size
    path.write_bytes(new + b"\0" * (st.st_size - len(new)))  # decoders stop at the end-of-image marker
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


# ---------------------------------------------------------------------------------------------- fingerprints
def test_fingerprint_sees_bytes_not_places_and_caches_the_hashes(tmp_path, monkeypatch):
    a = tmp_path / "a"
    (a / "x").mkdir(parents=True)
    rel = [f"x/{i}.jpg" for i in range(4)]
    for i, r in enumerate(rel):
        (a / r).write_bytes(_jpeg(i))
    cache = tmp_path / "cache"
    first = fp.fingerprint_files(a, rel, cache_dir=cache)
    assert first["files"] == 4 and first["bytes"] == sum((a / r).stat().st_size for r in rel)
    assert len(list(cache.glob("*.json"))) == 1  # the content digest, cached for this exact file state
    b = tmp_path / "b"
    shutil.copytree(a, b)  # another copy, mtimes preserved: same bytes, same content digest
    assert fp.fingerprint_files(b, rel, cache_dir=cache)["digest"] == first["digest"]
    stat_before = fp.fingerprint_files(b, rel, mode="stat")["digest"]
    replace_keeping_size_and_mtime(b / rel[2])
    changed = fp.fingerprint_files(b, rel, cache_dir=cache)
    assert changed["digest"] != first["digest"]
    # size + mtime alone cannot see that change: why content is the default
    assert fp.fingerprint_files(b, rel, mode="stat")["digest"] == stat_before
    # a second process (empty memo) hashes nothing: the digest comes from the cache
    fp._MEMO.clear()
    monkeypatch.setattr(fp, "_sha256_file", lambda p: (_ for _ in ()).throw(AssertionError("re-hashed")))
    assert fp.fingerprint_files(a, rel, cache_dir=cache)["digest"] == first["digest"]
    one_line_error(lambda: fp.fingerprint_files(a, rel, mode="mtime"), "data.fingerprint='mtime'", "content", "stat")


# ---------------------------------------------------------------------------------- unreadable in extraction
@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return CLIPBackbone("xmx-tiny", None)


@pytest.mark.parametrize("decode", ["pil", "tensor"])
def test_extraction_skips_unreadable_files_or_names_them(backbone, tmp_path, decode, one_thread):
    rel = []
    for i in range(5):
        (tmp_path / f"{i}.jpg").write_bytes(_jpeg(i))
        rel.append(f"{i}.jpg")
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff not a jpeg at all")
    (tmp_path / "cut.jpg").write_bytes(_jpeg(9)[:40])  # truncated inside the header
    files = rel[:2] + ["garbage.jpg"] + rel[2:4] + ["cut.jpg"] + rel[4:]
    msg = one_line_error(lambda: extract_image_features(backbone, files, tmp_path, decode=decode, batch_size=4,
                                                        **FAST), "garbage.jpg", "data.unreadable=skip")
    assert msg.startswith("cannot read image")
    skipped: list = []
    feats = extract_image_features(backbone, files, tmp_path, decode=decode, batch_size=4, unreadable="skip",
                                   skipped=skipped, **FAST)
    assert [i for i, _ in skipped] == [2, 5] and "garbage.jpg" in skipped[0][1] and "cut.jpg" in skipped[1][1]
    good = extract_image_features(backbone, rel, tmp_path, decode=decode, batch_size=4, **FAST)
    keep = [0, 1, 3, 4, 6]
    assert torch.allclose(feats[:, keep], good, atol=1e-5)  # the others are exactly what they are without them
    assert feats[:, [2, 5]].abs().sum() == 0
    with pytest.raises(XmxError, match=r"data\.unreadable='ignore'; valid choices: error, skip"):
        extract_image_features(backbone, rel, tmp_path, unreadable="ignore", **FAST)


# ------------------------------------------------------------------------------------------------- runs
def _synthetic_copy(xmx_cache: Path, make_cfg, dest: Path) -> Path:
    from xmx.data.synthetic import ensure
    ensure(Path(xmx_cache) / "data")  # generated once per session
    shutil.copytree(Path(xmx_cache) / "data" / "synthetic", dest / "synthetic")  # copy2: mtimes preserved
    return dest


def test_changed_copy_is_a_new_job_with_new_features(make_cfg, xmx_cache, tmp_path, caplog, one_thread):
    logs = tmp_path / "logs"
    common = ["method=zeroshot", "seed=3", f"paths.log_dir={logs}", f"paths.feature_dir={tmp_path / 'store'}"]
    copy = _synthetic_copy(xmx_cache, make_cfg, tmp_path / "copy")
    a = run(make_cfg(common, output_dir=logs / "a"))
    # the same bytes under another root: the same job, complete -> skipped
    same = run(make_cfg(common + [f"data.root={copy}"], output_dir=logs / "b"))
    assert same["job_id"] == a["job_id"] and not (logs / "b" / "results.json").exists()
    # one test image rewritten with its size and mtime kept: another job, and the test features are recomputed
    test_item = json.loads((logs / "a" / "results.json").read_text())  # the data record names the sets
    assert test_item["data"]["content"]["files"] == sum(s["n"] for s in test_item["data"]["splits"].values())
    split = json.loads((copy / "synthetic" / "split_zhou_Synthetic.json").read_text())
    replace_keeping_size_and_mtime(copy / "synthetic" / "images" / split["test"][5][0])
    caplog.clear()
    with caplog.at_level("INFO", logger="xmx.datamodules.clip"):
        c = run(make_cfg(common + [f"data.root={copy}"], output_dir=logs / "c"))
    assert c["job_id"] != a["job_id"] and (logs / "c" / "results.json").is_file()
    assert c["data"]["root"] == str(copy) and c["data"]["content"]["digest"] != a["data"]["content"]["digest"]
    assert c["data"]["content"]["sets"]["train"] == a["data"]["content"]["sets"]["train"]
    outcomes = {m.split(": ")[1].split(" (")[0]: m.split()[2].rstrip(":") for m in caplog.messages
                if m.startswith("feature store ") and "synthetic/" in m}
    assert outcomes == {"synthetic/train": "hit", "synthetic/val": "hit", "synthetic/test": "miss"}, outcomes


def test_unreadable_skip_in_a_feature_run_is_counted_and_error_names_the_file(make_cfg, xmx_cache, tmp_path,
                                                                             one_thread):
    common = ["method=zeroshot", "seed=4", f"paths.feature_dir={tmp_path / 'store'}"]
    copy = _synthetic_copy(xmx_cache, make_cfg, tmp_path / "copy")
    ref = run(make_cfg(common + [f"data.root={copy}"], output_dir=tmp_path / "ref"))
    subset = json.loads((tmp_path / "ref" / "subset.json").read_text())
    split = json.loads((copy / "synthetic" / "split_zhou_Synthetic.json").read_text())
    broken = [subset["train"][0][0], f"synthetic/images/{split['test'][0][0]}"]
    for rel in broken:
        (copy / rel).write_bytes(b"\xff\xd8\xff truncated")
    res = run(make_cfg(common + [f"data.root={copy}", "data.unreadable=skip"], output_dir=tmp_path / "skip"))
    un = res["data"]["unreadable"]
    assert un["policy"] == "skip" and un["skipped"] == 2 and un["by_set"] == {"train": 1, "test": 1}
    assert sorted(un["files"]) == sorted(broken)
    for s in ("train", "test"):
        assert res["data"]["splits"][s]["n"] == ref["data"]["splits"][s]["n"] - 1
    assert res["data"]["splits"]["val"]["n"] == ref["data"]["splits"]["val"]["n"]
    # the entries remember what was skipped: an `error` run on the same bytes stops, naming the file
    one_line_error(lambda: run(make_cfg(common + [f"data.root={copy}"], output_dir=tmp_path / "err")),
                   "cannot read image", broken[0].rsplit("/", 1)[1], "data.unreadable=skip")
    assert not (tmp_path / "err" / "results.json").exists()


def test_invalid_unreadable_policy_is_refused_before_the_encoder_is_built(make_cfg, monkeypatch):
    def no_backbone(*a, **k):
        raise AssertionError("the backbone was built before the data config was checked")
    monkeypatch.setattr(CLIPBackbone, "__init__", no_backbone)
    one_line_error(lambda: run(make_cfg(["data.unreadable=ignore"])), "data.unreadable='ignore'", "error, skip")
    one_line_error(lambda: run(make_cfg(["data.fingerprint=fast"])), "data.fingerprint='fast'", "content")


def test_image_batches_leave_unreadable_files_out_and_count_them(make_cfg, xmx_cache, tmp_path, backbone):
    from xmx.datamodules.clip import CLIPDataModule
    copy = _synthetic_copy(xmx_cache, make_cfg, tmp_path / "copy")
    split = json.loads((copy / "synthetic" / "split_zhou_Synthetic.json").read_text())
    bad = f"synthetic/images/{split['test'][3][0]}"
    (copy / bad).write_bytes(b"not an image")
    dm = CLIPDataModule("synthetic", str(copy), backbone, shots=2, inputs="images", unreadable="skip",
                        num_workers=0, eval_batch_size=500)
    dm.setup("fit")
    assert dm.skipped == {"test": [bad]} and len(dm.eval_sets[0].items) == len(split["test"]) - 1
    _, y = next(iter(dm.test_dataloader()[0]))
    assert len(y) == len(split["test"]) - 1
    assert dm.data_record()["unreadable"]["skipped"] == 1


def test_the_retrieval_index_skips_unreadable_images_too(backbone, tmp_path, one_thread):
    from xmx.features import FeatureStore
    from xmx.features.extract import embed_image_folder
    folder = tmp_path / "coco"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.jpg").write_bytes(_jpeg(i))
    (folder / "2.jpg").write_bytes(b"\xff\xd8\xff broken")
    store = FeatureStore(tmp_path / "store")
    kw = dict(num_workers=0, progress=False, precision="fp32")
    one_line_error(lambda: embed_image_folder(store, backbone, folder, **kw), "2.jpg", "data.unreadable=skip")
    skipped: list = []
    feats, names = embed_image_folder(store, backbone, folder, unreadable="skip", skipped=skipped, **kw)
    assert names == ["0.jpg", "1.jpg", "3.jpg"] and skipped == ["2.jpg"] and feats.shape[0] == 3
    again: list = []
    feats2, names2 = embed_image_folder(store, backbone, folder, unreadable="skip", skipped=again, **kw)
    assert store.last_outcome == "hit" and names2 == names and again == ["2.jpg"] and torch.equal(feats, feats2)
    one_line_error(lambda: embed_image_folder(store, backbone, folder, **kw), "2.jpg", "no decoder reads it")
