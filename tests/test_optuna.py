"""An Optuna study through `hparams_search=` runs trials, stores them in sqlite, and a second command continues the
same study rather than starting a new one (one subprocess per invocation: the sweeper runs only from the CLI)."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest


@pytest.mark.slow
def test_study_runs_and_continues(tmp_path, xmx_cache):
    env = dict(os.environ, XMX_CACHE=str(xmx_cache), XMX_LOG_DIR=str(tmp_path / "logs"), HF_HUB_OFFLINE="1",
               WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "xmx.run", "-m", "experiment=mma_16shot", "hparams_search=mma_optuna",
           "backbone=tiny", "data=synthetic", "shots=2", "method.epochs=1", "hydra.sweeper.n_trials=1",
           "callbacks.rich_progress_bar=null", "logger=none"]
    for _ in range(2):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Best value" in proc.stdout + proc.stderr
    db = tmp_path / "logs" / "optuna" / "mma_synthetic_2shot_seed1.db"
    study = optuna.load_study(study_name="mma_synthetic_2shot_seed1", storage=f"sqlite:///{db}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 2  # 1 + 1: the second command continued the study (a fresh one would hold 1)
    assert all(0.0 <= t.params["method.lam"] <= 1.0 and 1e-4 <= t.params["method.optimizer.lr"] <= 5e-2
               for t in done)
    assert all(0.0 <= t.value <= 100.0 for t in done)  # the jobs returned val/acc
