"""The command line as users meet it: a non-editable install run from another directory, and bad input as one
line with exit code 2. (A run's subprocess costs seconds of torch imports, so there are only these; the bad-input
table is tests/test_bad_input.py, in-process.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """xmx installed non-editably (a built wheel's files, no source tree) into a fresh target folder."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True, text=True)
    return target


def _env(installed, tmp_path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(installed), XMX_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1",
               WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    return env


@pytest.mark.slow
def test_the_demo_runs_from_an_installed_copy_in_another_folder(installed, tmp_path):
    """The installed wheel (its own configs, no source tree) runs the demo's first job from elsewhere. The demo's
    linear probe is tested in-process (tests/test_run.py); here the cost is imports + a zero-shot run."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(installed, tmp_path)
    where = subprocess.run([sys.executable, "-c", "import xmx.config as c; print(c.config_dir())"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(installed)), where  # the wheel's own configs, not the checkout's
    proc = subprocess.run([sys.executable, "-m", "xmx.run", "experiment=demo", "hydra.mode=RUN", "method=zeroshot",
                           "callbacks.rich_progress_bar=null"], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SYNTHETIC DEMO" in proc.stdout + proc.stderr
    results = [json.loads(p.read_text()) for p in elsewhere.glob("outputs/demo/runs/*/results.json")]
    assert [r["method"] for r in results] == ["zeroshot"] and results[0]["dataset"] == "synthetic"


def test_no_arguments_means_the_demo_multirun(monkeypatch):
    """``python -m xmx.run`` with no arguments is ``experiment=demo``: zero-shot and the linear probe on the
    synthetic set (composed here; the installed copy runs its first job above)."""
    import xmx.run as xrun
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    seen = {}
    monkeypatch.setattr(sys, "argv", ["xmx.run"])
    monkeypatch.setattr(xrun, "_hydra_main", lambda: seen.setdefault("argv", list(sys.argv)))
    xrun.main()
    assert seen["argv"] == ["xmx.run", "experiment=demo"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=demo"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params.method == "zeroshot,linear_probe"
    assert cfg.data.name == "synthetic" and cfg.backbone.name == "tiny" and cfg.trainer.accelerator == "cpu"


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_code_2(installed, tmp_path):
    for args, needle in [(["shots=0"], "shots=0: must be at least 1"),
                         (["experiment=no_such"], "unknown experiment 'no_such'")]:
        proc = subprocess.run([sys.executable, "-m", "xmx.run", *args], cwd=tmp_path, env=_env(installed, tmp_path),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        err_lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
        assert len(err_lines) == 1 and needle in err_lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
