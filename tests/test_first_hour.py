"""What a newcomer meets in the first hour (issue: a first hour without surprises): CPU threads that never
oversubscribe, a command line that answers without loading torch, ``init_from`` that says what it loaded, files
readable by collaborators, GPU-free defaults for the language presets, the backbone in ``xmx.features list``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tiny_trainable import OVERRIDES as TINY
from xmx import utils
from xmx.config import config_dir, plan_run_threads
from xmx.features import __main__ as features_cli
from xmx.features.store import FeatureStore
from xmx.run import run

REPO = Path(__file__).resolve().parents[1]


# ---- threads -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads,workers,cores,expected", [
    ("auto", 2, 2, (1, 2)),   # two decoding workers on two cores: one intra-op thread
    ("auto", 0, 2, (2, 0)),   # no workers: every core
    ("auto", 8, 2, (1, 2)),   # more workers than cores: capped
    ("auto", 2, 16, (8, 2)),
    (2, 2, 2, (2, 1)),        # an explicit thread count wins; the workers shrink to fit it
    (64, 0, 4, (4, 0)),       # never more threads than cores
])
def test_thread_plan_never_oversubscribes(threads, workers, cores, expected, monkeypatch):
    monkeypatch.setattr(utils, "_USER_OMP", None)
    t, w = utils.plan_threads(threads, workers, cores)
    assert (t, w) == expected and t * max(w, 1) <= cores


def test_usable_cores_follow_affinity_and_the_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert utils.usable_cores(tmp_path) == 4  # no cgroup files: the affinity mask
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert utils.usable_cores(tmp_path) == 4  # no quota
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert utils.usable_cores(tmp_path) == 2  # 2.5 CPUs of quota: 2 threads
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert utils.usable_cores(tmp_path) == 1


def test_a_run_sets_threads_from_its_cores_and_workers(make_cfg, monkeypatch):
    n = torch.get_num_threads()
    monkeypatch.setattr(utils, "usable_cores", lambda *a: 4)
    monkeypatch.setattr(utils, "_USER_OMP", None)
    for k in utils._THREAD_ENV:
        monkeypatch.setenv(k, "99")
    try:
        cfg = make_cfg(["data.num_workers=2", "features.num_workers=6"])
        threads = plan_run_threads(cfg)
        utils.apply_threads(threads)
        assert threads == 1 and cfg.features.num_workers == 4 and cfg.data.num_workers == 2  # 4 workers x 1
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        cfg = make_cfg(["data.num_workers=0", "features.num_workers=0"])
        assert plan_run_threads(cfg) == 4
    finally:
        torch.set_num_threads(n)


def test_long_loops_say_where_they_are(caplog):
    clock = iter([0.0, 3.0, 12.0, 13.0, 25.0])
    beat = utils.Heartbeat("search", total=100, every_s=10.0)
    beat._clock = lambda: next(clock)
    beat.t0 = beat._last = beat._clock()
    with caplog.at_level(logging.INFO, logger="xmx"):
        for done in (10, 40, 50, 80):  # at 3 s, 12 s, 13 s, 25 s
            beat(done)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["search: 40/100 (12s, ~18s left)", "search: 80/100 (25s, ~6s left)"]


# ---- a command line that answers before torch ----------------------------------------------------------------------
def test_help_config_errors_and_cfg_answer_without_importing_torch(tmp_path):
    script = f"""
import sys
from hydra.core.global_hydra import GlobalHydra
import xmx.run as r
for argv in (["--help"], ["--cfg", "job"], ["experiment=no_such"], ["shots=0"], ["method.lrr=1"], ["data.name=nope"]):
    sys.argv = ["xmx.run", *argv, "paths.log_dir={tmp_path}"]
    try:
        r.main()
        code = 0
    except SystemExit as e:
        code = e.code
    GlobalHydra.instance().clear()
    print("EXIT", argv[0], code, file=sys.stderr)
print("HEAVY", sorted(m for m in ("torch", "lightning", "open_clip") if m in sys.modules), file=sys.stderr)
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    err = proc.stderr
    assert "EXIT --help 0" in err and "EXIT --cfg 0" in err, err[-2000:]
    assert "EXIT experiment=no_such 2" in err and "EXIT shots=0 2" in err and "EXIT method.lrr=1 2" in err, err
    assert "EXIT data.name=nope 2" in err and "unknown dataset 'nope'" in err, err[-2000:]
    assert "HEAVY []" in err, err[-2000:]  # none of them imported torch, Lightning or open_clip
    assert "xmx: cross-modal adapters" in proc.stdout and "experiment: clip_adapter_16shot" in proc.stdout
    assert "seed: 1" in proc.stdout  # --cfg job printed the config


# ---- init_from says what it loaded --------------------------------------------------------------------------------
def test_init_from_says_what_it_loaded_and_uses_it(make_cfg, tmp_path, caplog, one_thread):
    w = torch.zeros(10, 32)
    b = torch.zeros(10)
    b[3] = 1e4  # every image goes to class 3: the loaded bias, not the zero-shot start, decides
    torch.save({"state_dict": {"head.weight": w, "head.bias": b, "other.weight": torch.zeros(1)}},
               tmp_path / "head.ckpt")
    with caplog.at_level(logging.WARNING):
        res = run(make_cfg([*TINY, "train=false", f"init_from={tmp_path / 'head.ckpt'}"]))
    rec = res["init_from"]
    assert rec["loaded"] == 2 and rec["skipped"] == ["other.weight"] and rec["checkpoint"].endswith("head.ckpt")
    assert res["metrics"]["test/acc"] == pytest.approx(10.0)  # 20 of 200 test images are class 3
    assert any("loaded 2 tensors (head.bias, head.weight)" in r.getMessage() for r in caplog.records)


def test_checkpoints_say_which_method_wrote_them(make_cfg, tmp_path, one_thread):
    one_epoch = [o if not o.startswith("+method.epochs=") else "+method.epochs=1" for o in TINY]
    run(make_cfg(one_epoch, output_dir=tmp_path / "a"))
    ck = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ck["xmx_method"] == {"name": "tiny_trainable", "family": "tiny_trainable",
                                "class": "tiny_trainable.TinyTrainable"}


# ---- files for collaborators ---------------------------------------------------------------------------------------
def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        utils.atomic_write_text(tmp_path / "r.json", "{}")
        assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600
        store = FeatureStore(tmp_path / "store")
        store.get_or_compute("image_features", {"dataset": "x"}, lambda: {"features": torch.zeros(2, 3)})
        entries = list((tmp_path / "store").glob("*/*.safetensors"))
        assert entries and all(p.stat().st_mode & 0o777 == 0o644 for p in entries)
        os.umask(0o077)
        utils.atomic_write_text(tmp_path / "private.json", "{}")
        assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_features_list_names_the_backbone(tmp_path, capsys):
    store = FeatureStore(tmp_path)
    key = {"dataset": "dtd", "split": "test", "backbone": {"name": "clip_rn50", "arch": "RN50",
                                                           "sha256": "3f2a9c1e" + "0" * 56, "random_init": False}}
    store.get_or_compute("image_features", key, lambda: {"features": torch.zeros(2, 3)})
    store.get_or_compute("image_features", {**key, "backbone": {"name": "tiny", "random_init": True}},
                         lambda: {"features": torch.zeros(2, 3)})
    assert features_cli.main(["list", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "clip_rn50 3f2a9c1e" in out and "tiny random-init" in out and "dtd/test" in out


# ---- presets that run anywhere -------------------------------------------------------------------------------------
def test_language_presets_use_the_gpu_only_when_there_is_one():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for name in ("xadapter_color", "xadapter_glue", "xadapter_texpert_wiki", "xadapter_vexpert_coco"):
            cfg = compose("config", overrides=[f"experiment={name}"])
            assert cfg.trainer.accelerator == "auto", name
    GlobalHydra.instance().clear()
