"""Interrupted work is not lost: ``last.ckpt`` is written on a schedule independent of validation (every epoch end and
every ``callbacks.resume.every_minutes`` inside an epoch), atomically, and a run resumed from it (in the middle of an
epoch too) ends with the numbers of the uninterrupted run. Every trained family is killed (SIGINT, SIGKILL) and
resumed in a subprocess (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny_trainable
from tiny_trainable import OVERRIDES as TINY
from xmx.errors import XmxError
from xmx.methods.base import ResumeCheckpoint
from xmx.run import run


class Stop(Exception):
    pass


def _logits(folder: Path) -> torch.Tensor:
    return load_file(folder / "predictions.safetensors")["test/logits"]


@pytest.mark.parametrize("every", [None, 1e-9])
def test_stopped_mid_epoch_resumes_to_the_same_numbers(make_cfg, tmp_path, monkeypatch, every):
    """every=1e-9: a timed save after every batch, the run stops in the middle of epoch 2 and resumes from the batch
    after the last one saved; every=None: epoch ends only, it resumes from the end of epoch 1 (the batches of epoch 2
    it had done are redone)."""
    args = [*TINY, "method.batch_size=8", "method.epochs=3", "trainer.check_val_every_n_epoch=3",
            f"callbacks.resume.every_minutes={'null' if every is None else every}",
            "logger=none", "callbacks.rich_progress_bar=null", f"paths.log_dir={tmp_path / 'logs'}"]
    ref = run(make_cfg(args, output_dir=tmp_path / "ref"))
    step = tiny_trainable.TinyTrainable.training_step

    def stop_mid_epoch_1(self, batch, i):
        if self.current_epoch == 1 and i == 2:
            raise Stop()
        return step(self, batch, i)

    with monkeypatch.context() as m:
        m.setattr(tiny_trainable.TinyTrainable, "training_step", stop_mid_epoch_1)
        with pytest.raises(Stop):
            run(make_cfg(args, output_dir=tmp_path / "logs" / "run"))
    last = torch.load(tmp_path / "logs" / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # validation runs only at the end (check_val_every_n_epoch=3), yet a resume point exists
    assert last["epoch"] == (1 if every else 0)
    if every:
        assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches_done": 2}]
    assert not list((tmp_path / "logs" / "run" / "checkpoints").glob(".*tmp"))  # no temporary file left
    res = run(make_cfg(args, output_dir=tmp_path / "logs" / "run"))
    assert res["resumed"] is True and res["metrics"] == ref["metrics"]
    assert torch.equal(_logits(tmp_path / "logs" / "run"), _logits(tmp_path / "ref"))


@pytest.mark.parametrize("bad", [0, -1, "soon", True])
def test_every_minutes_must_be_positive(bad, tmp_path):
    with pytest.raises(XmxError, match="callbacks.resume.every_minutes"):
        ResumeCheckpoint(tmp_path, every_minutes=bad)
