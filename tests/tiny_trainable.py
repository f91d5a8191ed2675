"""A test-only trainable method (importable as ``tiny_trainable`` because pytest puts tests/ on sys.path; subprocesses
get it through PYTHONPATH): a dropout + linear head on frozen features, SGD, several epochs. Dropout makes training
draw from the global RNG, so resumed-equals-uninterrupted also checks the RNG state restored from last.ckpt."""

from __future__ import annotations

import time
from contextlib import contextmanager

import lightning as L
import pytest
import torch
from torch import nn

from xmx.methods.base import XmxModule

OVERRIDES = ["method=zeroshot", "method._target_=tiny_trainable.TinyTrainable", "method.name=tiny_trainable",
             "method.batch_size=32", "+method.epochs=4", "+method.lr=0.5", "+method.step_sleep=0.0", "+method.dropout=0.3"]


class TinyTrainable(XmxModule):
    def __init__(self, lr: float = 0.5, step_sleep: float = 0.0, dropout: float = 0.3, **kwargs):
        super().__init__(**kwargs)
        self.lr, self.step_sleep, self.dropout = lr, step_sleep, dropout

    def build(self, dm) -> None:
        W = dm.text_classifier(dm.classnames)  # [C,N]
        self.head = nn.Linear(W.shape[0], W.shape[1])
        with torch.no_grad():  # deterministic start (the zero-shot classifier): the same in every process
            self.head.weight.copy_(W.T)
            self.head.bias.zero_()
        self.drop = nn.Dropout(self.dropout)

    def training_step(self, batch, batch_idx):
        if self.step_sleep:
            time.sleep(self.step_sleep)
        x, y = batch
        loss = nn.functional.cross_entropy(self.head(self.drop(x)), y)
        self.log("train/loss", loss)
        return loss

    def logits(self, x, eval_set):
        return self.head(x)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)}


class SlowSteps(L.Callback):
    """Sleeps ``$XMX_TEST_STEP_SLEEP`` seconds after every training batch (unset: not at all), so a test can kill a
    subprocess in the middle of training; the config (hence the job id) is the same with and without the sleep."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import os
        time.sleep(float(os.environ.get("XMX_TEST_STEP_SLEEP") or 0))


class Stop(Exception):
    """The interruption ``interrupted_at_epoch`` raises."""


@contextmanager
def interrupted_at_epoch(monkeypatch, method_cls, epoch: int = 2):
    """A run of ``method_cls`` inside the block stops (raises :class:`Stop`) as epoch ``epoch`` starts: an
    interruption between epochs, after last.ckpt of the epoch before was written. The block must raise it."""
    def stop(self):
        if self.current_epoch == epoch:
            raise Stop()

    with monkeypatch.context() as m:
        m.setattr(method_cls, "on_train_epoch_start", stop, raising=False)
        with pytest.raises(Stop):
            yield
