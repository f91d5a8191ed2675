"""CLIP-Adapter (Gao et al.), visual branch only; docs/methods/mma.md#clip-adapter.

    A(v)  = ReLU(Linear_{C/4→C}(ReLU(Linear_{C→C/4}(v))))      # no biases [code]
    v'    = norm(ratio·A(v) + (1−ratio)·v)                     # ratio = 0.2; v are the raw image features
    logit = exp(logit_scale)·v'·W (+ logit_bias)               # W [C, N]: the frozen zero-shot classifier

`logit_scale` and `logit_bias` are the backbone's own (the bias only for sigmoid-loss models such as SigLIP; it shifts
every class alike, so cross-entropy and accuracy are unchanged, but the logits are the model's). Training keeps the
authors' softmax cross-entropy on every backbone.

Below the math: `ClipAdapterMethod`, on the shared feature-adapter training loop `AdapterMethod`
(`xmx/methods/_training.py`, which MMA uses too).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xmx.errors import XmxError
from xmx.methods._training import AdapterMethod


class ClipAdapter(nn.Module):
    """`v' = norm(ratio·A(v) + (1−ratio)·v)`; `fc` is the bottleneck MLP `A` (C → C/reduction → C, no biases)."""

    def __init__(self, dim: int, reduction: int = 4, ratio: float = 0.2):
        super().__init__()
        if dim <= 0 or reduction <= 0 or dim % reduction:
            raise XmxError(f"CLIP-Adapter: dim {dim} is not divisible by reduction {reduction}; pick a reduction "
                           f"dividing the CLIP width")
        if not 0.0 <= ratio <= 1.0:
            raise XmxError(f"CLIP-Adapter: ratio={ratio} is outside [0, 1]; the residual ratio must be a fraction "
                           f"(default 0.2)")
        self.dim, self.ratio = dim, float(ratio)
        self.check_finite = True  # NaN/inf check of every input (a device sync); off once a caller validated them
        self.fc = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(),
            nn.Linear(dim // reduction, dim, bias=False), nn.ReLU(),
        )

    def _check_image(self, image_feats: torch.Tensor) -> None:
        if image_feats.ndim != 2 or image_feats.shape[-1] != self.dim:
            raise XmxError(f"CLIP-Adapter: image features have shape {tuple(image_feats.shape)} but the adapter "
                           f"expects [B, {self.dim}]; build it with the backbone's embed_dim")
        if self.check_finite and not bool(torch.isfinite(image_feats).all()):
            raise XmxError("CLIP-Adapter: image features contain NaN or inf; recompute or clear the cached features")

    def forward(self, image_feats: torch.Tensor) -> torch.Tensor:
        """Adapted, normalised image features `v' [B, C]` from raw (or normalised) features `v [B, C]`."""
        self._check_image(image_feats)
        v = image_feats  # [B, C]
        return F.normalize(self.ratio * self.fc(v) + (1 - self.ratio) * v, dim=-1)  # [B, C]

    def logits(self, image_feats: torch.Tensor, W: torch.Tensor, logit_scale, logit_bias=None) -> torch.Tensor:
        """`exp(logit_scale)·v'·W (+ logit_bias)` → [B, N]; `W [C, N]` is the normalised zero-shot classifier."""
        if W.ndim != 2 or W.shape[0] != self.dim:
            raise XmxError(f"CLIP-Adapter: classifier W has shape {tuple(W.shape)} but must be [{self.dim}, N] "
                           f"(embed_dim × classes); pass the text classifier, not its transpose")
        if W.shape[1] == 0:
            raise XmxError("CLIP-Adapter: the class list is empty (W has N=0 columns); give at least one class name")
        if self.check_finite and not bool(torch.isfinite(W).all()):
            raise XmxError("CLIP-Adapter: classifier W contains NaN or inf; recompute the text classifier")
        v_ad = self(image_feats)  # [B, C]
        scale = torch.as_tensor(logit_scale, dtype=v_ad.dtype, device=v_ad.device).exp()
        out = scale * v_ad @ W  # [B, N]
        return out if logit_bias is None else out + logit_bias


# ==================================================================================================== LightningModules
class ConstantWarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """The learning-rate schedule of CoOp's trainer configs (Dassl), which the CLIP-Adapter release trains with:
    ``warmup_epochs`` at the constant ``warmup_lr``, then cosine annealing over ``T_max`` epochs counted from 0 (the
    warm-up epochs are the cosine's first steps, Dassl's ``WARMUP_RECOUNT``), stepped once per epoch:
    ``lr(e) = warmup_lr`` for ``e < warmup_epochs``, else ``base_lr·(1 + cos(π·e/T_max))/2``."""

    def __init__(self, optimizer, T_max: int, warmup_epochs: int = 1, warmup_lr: float = 1e-5):
        if int(T_max) < 1 or int(warmup_epochs) < 0 or not float(warmup_lr) >= 0:
            raise XmxError(f"ConstantWarmupCosine: T_max={T_max} must be >= 1, warmup_epochs={warmup_epochs} >= 0 and "
                           f"warmup_lr={warmup_lr} >= 0 (method.scheduler)")
        self.T_max, self.warmup_epochs, self.warmup_lr = int(T_max), int(warmup_epochs), float(warmup_lr)
        factors = []
        for g in optimizer.param_groups:
            base = float(g.get("initial_lr", g["lr"]))
            factors.append(lambda e, base=base: (self.warmup_lr / base if e < self.warmup_epochs and base > 0 else
                                                 0.5 * (1.0 + math.cos(math.pi * min(e, self.T_max) / self.T_max))))
        super().__init__(optimizer, factors)


class ClipAdapterMethod(AdapterMethod):
    """CLIP-Adapter (docs/methods/mma.md#clip-adapter) trained with MMA's recipe
    (docs/methods/mma.md#training-recipe): `v' = norm(ratio·A(v) + (1−ratio)·v)`,
    `logits = exp(logit_scale)·v'·W` with each label set's frozen zero-shot `W`."""

    label = "CLIP-Adapter"

    def __init__(self, reduction: int = 4, ratio: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(ratio) <= 1.0:  # fail before any features are extracted
            raise XmxError(f"CLIP-Adapter: ratio={ratio} is outside [0, 1]; the residual ratio must be a fraction "
                           f"(default 0.2)")
        self.reduction, self.ratio = int(reduction), float(ratio)

    def make_adapter(self, dim: int) -> nn.Module:
        return ClipAdapter(dim, reduction=self.reduction, ratio=self.ratio)

    def adapter_logits(self, feats, W):
        return self.adapter.logits(feats, W, self.logit_scale, self.logit_bias)  # [B, N]

    def extra_results(self) -> dict:
        return {**super().extra_results(), "reduction": self.reduction, "ratio": self.ratio}
