"""The command line as users meet it: a non-editable install run from another directory, and bad input as one
line with exit code 2. (Subprocesses cost ~10 s of imports each, so there are only these.)"""

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
def test_default_command_runs_the_demo_from_an_installed_copy(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(installed, tmp_path)
    where = subprocess.run([sys.executable, "-c", "import xmx.config as c; print(c.config_dir())"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(installed)), where  # the wheel's own configs, not the checkout's
    proc = subprocess.run([sys.executable, "-m", "xmx.run"], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SYNTHETIC DEMO" in proc.stdout + proc.stderr
    results = sorted(elsewhere.glob("outputs/demo/multiruns/*/*/results.json"))
    methods = {json.loads(p.read_text())["method"] for p in results}
    assert methods == {"zeroshot", "linear_probe"}


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_code_2(installed, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "xmx.run", "data=synthetic", "data.name=no_such_set"],
                          cwd=tmp_path, env=_env(installed, tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    err_lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(err_lines) == 1 and "unknown dataset 'no_such_set'; valid choices:" in err_lines[0]
    assert "Traceback" not in proc.stderr
