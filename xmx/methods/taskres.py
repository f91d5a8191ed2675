"""TaskRes — task residual on the text classifier (Yu et al., "Task Residual for Tuning Vision-Language Models",
CVPR'23; released code ``geekyutao/TaskRes``, ``trainers/taskres.py``).

The equations, as in the authors' code::

    t_k     = mean over templates of the *raw* text embeddings of class k     [C]   (the "base", frozen; not normed)
    x_k     = a learnable residual, initialised at 0                           [C]
    w_k     = norm(t_k + alpha · x_k)                                          ("TaskRes-Text": t + a * x)
    logits  = exp(logit_scale) · norm(f) · W                                   f the image features, W = [w_k]

With ``alpha = 0`` (or ``x = 0``) the classifier is ``norm(t_k)``: zero-shot CLIP (for one template exactly the
classifier of docs/methods/shared.md#zero-shot-classifier). Only ``x`` is trained, with cross-entropy on mini-batches
of 256 cached augmented views.

Recipe (the release's Dassl configs and ``train_regular.sh``): Adam, weight decay 5e-4 (Dassl's default), lr 2e-3
(ImageNet 2e-4), one warm-up epoch at a constant 1e-5 then cosine annealing over ``epochs`` (Dassl's
ConstantWarmupScheduler: epoch e >= 1 runs at ``lr·(1 + cos(pi·e/epochs))/2``), 100 epochs for 1/2/4 shots and 200
for 8/16; ``alpha = 0.5`` (Flowers102: 1.0). Dassl tests the model of the **last** epoch (no validation): the
presets set ``callbacks.model_checkpoint.monitor: null`` so that xmx does the same; the default callbacks instead
restore the best validation epoch, and results.json says which.

Eval sets with classes never trained on (base-to-new ``test_new``) use ``x = 0`` for them: the zero-shot base.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmx.errors import XmxError
from xmx.methods.base import XmxModule, class_columns

log = logging.getLogger(__name__)

__all__ = ["TaskResHead", "TaskResMethod", "warmup_cosine"]


class TaskResHead(nn.Module):
    """``W = norm(t + alpha·x)`` over the training classes; ``base`` [C,K] raw, ``residual`` [C,K] trainable."""

    def __init__(self, base: Tensor, alpha: float):
        super().__init__()
        self.alpha = float(alpha)
        self.register_buffer("base", base.detach().float().clone(), persistent=False)
        self.residual = nn.Parameter(torch.zeros_like(self.base))

    def classifier(self) -> Tensor:
        return F.normalize(self.base + self.alpha * self.residual, dim=0)          # [C,K]

    def forward(self, feats: Tensor, logit_scale: float) -> Tensor:
        return math.exp(logit_scale) * F.normalize(feats.float(), dim=-1) @ self.classifier()


def warmup_cosine(epoch: int, epochs: int, lr: float, warmup_epochs: int = 1, warmup_lr: float = 1e-5) -> float:
    """Dassl's constant warm-up + cosine, as a multiplier of ``lr`` for ``epoch`` (0-based)."""
    if epoch < warmup_epochs:
        return warmup_lr / lr
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


class TaskResMethod(XmxModule):
    """TaskRes trained through Lightning on cached features (mini-batches, ``view_sampling: random``)."""

    def __init__(self, alpha: float = 0.5, warmup_epochs: int = 1, warmup_lr: float = 1e-5,
                 epochs_by_shots: dict | None = None, lr_by_dataset: dict | None = None,
                 alpha_by_dataset: dict | None = None, **kwargs):
        """``epochs_by_shots`` / ``lr_by_dataset`` / ``alpha_by_dataset``: the release's tables; the config
        resolves ``epochs``, ``optimizer.lr`` and ``alpha`` from them (kept here for results.json)."""
        super().__init__(**kwargs)
        self.tables = {"epochs_by_shots": dict(epochs_by_shots or {}), "lr_by_dataset": dict(lr_by_dataset or {}),
                       "alpha_by_dataset": dict(alpha_by_dataset or {})}
        if not float(alpha) >= 0:
            raise XmxError(f"method.alpha={alpha} must be >= 0 (the residual scale; 0 is zero-shot CLIP)")
        if int(warmup_epochs) < 0 or not float(warmup_lr) > 0:
            raise XmxError("method.warmup_epochs must be >= 0 and method.warmup_lr > 0")
        self.alpha, self.warmup_epochs, self.warmup_lr = float(alpha), int(warmup_epochs), float(warmup_lr)
        self.logit_scale: float | None = None
        self._bases: dict[str, str] = {}
        self._cols: dict[str, tuple[str, Tensor | None]] = {}

    def build(self, dm) -> None:
        K = len(dm.classnames)
        base = dm.text_classifier(list(dm.classnames), list(dm.templates), normalize=False)   # [C,K] raw
        if not bool(torch.isfinite(base).all()):
            raise XmxError("taskres: the text base contains NaN or inf; clear its feature-store entry")
        self.head = TaskResHead(base, self.alpha)
        self.logit_scale = float(dm.logit_scale)
        for s in [dm.val_set, *dm.eval_sets]:
            kind, cols = class_columns(s, K) if s.train_index else ("new", None)
            self._cols[s.name] = (kind, cols)
            if kind == "new":
                attr = "base_" + s.name.replace(".", "_")
                self.register_buffer(attr, dm.text_classifier(list(s.classnames), list(s.templates or dm.templates),
                                                              normalize=False).float(), persistent=False)
                self._bases[s.name] = attr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.head(self.image_features(x).float(), self.logit_scale), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def logits(self, x, eval_set):
        f = self.image_features(x).float()
        kind, cols = self._cols[eval_set.name]
        if kind == "new":
            W = F.normalize(getattr(self, self._bases[eval_set.name]), dim=0)
            return math.exp(self.logit_scale) * F.normalize(f, dim=-1) @ W
        out = self.head(f, self.logit_scale)
        return out if cols is None else out[:, cols.to(out.device)]

    def configure_optimizers(self):
        opt = self.optimizer_factory(params=[self.head.residual])
        lr = opt.param_groups[0]["lr"]
        epochs = int(self.trainer.max_epochs)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda e: warmup_cosine(e, epochs, lr, self.warmup_epochs, self.warmup_lr))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def extra_results(self) -> dict:
        cb = getattr(getattr(self, "_trainer", None), "checkpoint_callback", None)
        monitor = getattr(cb, "monitor", None)
        return {"alpha": self.alpha, "logit_scale": self.logit_scale, "warmup_epochs": self.warmup_epochs, **self.tables,
                "warmup_lr": self.warmup_lr,
                **self.training_record("val/acc (best checkpoint restored)" if monitor else
                                       "last epoch (the release: Dassl tests the final model)")}
