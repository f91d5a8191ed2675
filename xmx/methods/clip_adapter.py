"""CLIP-Adapter (Gao et al.), visual branch only; spec `methods.md` §1.

    A(v)  = ReLU(Linear_{C/4→C}(ReLU(Linear_{C→C/4}(v))))      # no biases [code]
    v'    = norm(ratio·A(v) + (1−ratio)·v)                     # ratio = 0.2; v are the raw image features
    logit = exp(logit_scale)·v'·W (+ logit_bias)               # W [C, N]: the frozen zero-shot classifier

`logit_scale` and `logit_bias` are the backbone's own (the bias only for sigmoid-loss models such as SigLIP; it shifts
every class alike, so cross-entropy and accuracy are unchanged, but the logits are the model's). Training keeps the
authors' softmax cross-entropy on every backbone.

Below the math: `AdapterMethod`, the LightningModule shared by the feature adapters trained with cross-entropy on
cached features (CLIP-Adapter here, MMA in `mma.py`), and `ClipAdapterMethod`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from xmx.errors import XmxError
from xmx.methods.base import XmxModule

log = logging.getLogger(__name__)


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
class AdapterMethod(XmxModule):
    """A small adapter trained with cross-entropy over the training classes, on top of frozen CLIP features.

    ``build(dm)`` computes the zero-shot text classifier `W [C, N]` of every label set once — the training classes,
    the validation set and each eval set with its *own* classes and templates (base-to-new: ``test_new`` has the new
    classes only) — and keeps them as non-persistent buffers (they follow the module to its device and are never
    written into checkpoints: only the adapter's weights are). The backbone's ``logit_scale`` (and ``logit_bias``,
    SigLIP) are read from ``dm`` and stay frozen. Subclasses implement ``make_adapter(dim)`` and ``adapter_logits(feats [B, C], W [C, N]) -> [B, N]``.

    The recipe (optimizer partial, batch size, epochs) comes from the method config; early stopping and the
    best-checkpoint restore come from the ``callbacks`` group (``callbacks=early_stopping``)."""

    label = "adapter"  # the method's name in error messages

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._text_buffers: dict[str, str] = {}
        self.logit_scale: float | None = None
        self.logit_bias: float | None = None

    # ---- construction -----------------------------------------------------------------------------------------
    def make_adapter(self, dim: int) -> nn.Module:
        raise NotImplementedError

    def adapter_logits(self, feats: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def build(self, dm) -> None:
        dim = int(dm.backbone.embed_dim)
        label_sets = [("train", dm.classnames, dm.templates), *((s.name, s.classnames, s.templates)
                                                                 for s in [dm.val_set, *dm.eval_sets])]
        for name, classnames, _ in label_sets:
            if not classnames:
                raise XmxError(f"{self.label}: the class list of {name!r} is empty; every label set needs at least one "
                               "class (check protocol.base_ratio / the dataset's class names)")
        if dm.inputs == "features":  # every cached tensor is validated once here (not per batch)
            self._check_features(dm.train_features, dim, "training")
            for s in [dm.val_set, *dm.eval_sets]:
                self._check_features(dm.features_of(s), dim, repr(s.name))
        self.adapter = self.make_adapter(dim)
        self.logit_scale = float(dm.logit_scale)  # the backbone's own, frozen (log of the multiplier)
        bias = getattr(dm, "logit_bias", None)
        self.logit_bias = None if bias is None else float(bias)  # SigLIP's learned bias, frozen
        for name, classnames, templates in label_sets:
            W = dm.text_classifier(list(classnames), list(templates or dm.templates)).detach().float()  # [C, N]
            if W.shape[0] != dim:
                raise XmxError(f"{self.label}: the text classifier of {name!r} has width {W.shape[0]} but the backbone's "
                               f"embed_dim is {dim}; clear the stale text entries of the feature store")
            if not bool(torch.isfinite(W).all()):
                raise XmxError(f"{self.label}: the text classifier of {name!r} contains NaN or inf; clear its "
                               "feature-store entry and recompute it")
            attr = "text_" + name.replace(".", "_")
            self.register_buffer(attr, W.clone(), persistent=False)
            self._text_buffers[name] = attr
        # cached features and text were validated above, once: no per-batch NaN check (a device sync per step);
        # images (inputs=images) go through the encoder every step, so their features keep being checked
        self.adapter.check_finite = dm.inputs != "features"
        log.info("%s: %d trainable parameters, %d training classes, eval sets %s", self.label,
                 sum(p.numel() for p in self.adapter.parameters() if p.requires_grad), len(dm.classnames),
                 ", ".join(f"{s.name} ({len(s.classnames)} classes)" for s in dm.eval_sets))

    def _check_features(self, feats: torch.Tensor, dim: int, what: str) -> None:
        if feats.shape[-1] != dim:
            raise XmxError(f"{self.label}: the cached {what} features have width {feats.shape[-1]} but the backbone's "
                           f"embed_dim is {dim}; they come from another backbone - clear those feature-store "
                           "entries or pick the matching backbone")
        if not bool(torch.isfinite(feats).all()):
            raise XmxError(f"{self.label}: the cached {what} features contain NaN or inf; recompute them (clear their "
                           "feature-store entries)")

    def text(self, name: str) -> torch.Tensor:
        """The frozen zero-shot classifier `W [C, N]` of label set ``name`` (``train`` = the training classes)."""
        return getattr(self, self._text_buffers[name])

    # ---- training and evaluation ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.adapter_logits(self.image_features(x).float(), self.text("train"))  # [B, N_train]
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def logits(self, x, eval_set):
        return self.adapter_logits(self.image_features(x).float(), self.text(eval_set.name))  # [B, N_set]

    # ---- results ----------------------------------------------------------------------------------------------
    def extra_results(self) -> dict:
        adapter = getattr(self, "adapter", None)
        return {
            "params": None if adapter is None else sum(p.numel() for p in adapter.parameters() if p.requires_grad),
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
            **self.training_record(),
        }


class ClipAdapterMethod(AdapterMethod):
    """CLIP-Adapter (spec §1) trained with MMA's recipe (§3.7): `v' = norm(ratio·A(v) + (1−ratio)·v)`,
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
