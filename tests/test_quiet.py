"""A user sees each message once, and only those that matter: a run's terminal output has no Lightning INFO line
twice, no litlogger advert, no "modules in eval mode" or deprecation warning, no open_clip chatter; a second identical
run (both jobs skipped, as a second ``make run``) prints the finished run's numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "xmx.run", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout + p.stderr


@pytest.mark.slow
def test_each_message_once_and_a_skipped_run_shows_its_numbers(tmp_path, xmx_cache):
    args = ["experiment=clip_adapter_16shot", "backbone=tiny", "data=synthetic", "method.epochs=2",
            f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={xmx_cache}"]
    out = _run(args)
    for noise in ("litlogger", "in eval mode", "LeafSpec", "is deprecated", "Parsing model identifier",
                  "weights_only` was not set", "INFO: "):
        assert noise not in out, noise
    messages = Counter(line.split("] - ", 1)[1] for line in out.splitlines() if "] - " in line)
    assert not [m for m, n in messages.items() if n > 1 and "feature store" not in m], messages
    assert "GPU available" in out and "test/acc" in out

    again = _run(args)
    assert "skip: job" in again and "test/acc" in again and "results:" in again


def test_an_unreachable_hub_is_one_probe_then_offline(monkeypatch, make_cfg, caplog):
    import logging

    import xmx.preflight as pf
    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(pf, "hub_reachable", lambda timeout=3.0: calls.append(1) or False)
    pf.check_hub(make_cfg(["backbone=tiny"]))  # random init: nothing to download, no probe
    assert calls == [] and "HF_HUB_OFFLINE" not in os.environ
    with caplog.at_level(logging.WARNING, logger="xmx"):
        pf.check_hub(make_cfg(["backbone=clip_vit_b16"]))
    assert calls == [1] and os.environ["HF_HUB_OFFLINE"] == "1"
    assert [r.getMessage() for r in caplog.records] == [
        "the Hugging Face Hub is unreachable: working offline (cached weights only; set HF_HUB_OFFLINE=1 to skip "
        "this check)"]
    pf.check_hub(make_cfg(["backbone=clip_vit_b16"]))  # already offline: no second probe
    assert calls == [1]


def test_the_probe_is_short_without_a_network(monkeypatch):
    import time

    import xmx.preflight as pf
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    t0 = time.monotonic()
    assert pf.hub_reachable(timeout=1.0) is False
    assert time.monotonic() - t0 < 2.0
