"""Training loops shared by several method families (the room's common ground; no family imports another's file).

``AdapterMethod``: a small adapter trained with cross-entropy over the training classes on top of frozen CLIP
features (cached, or images through the frozen encoder) and scored against each label set's frozen zero-shot
classifier. CLIP-Adapter (``clip_adapter.py``) and MMA (``mma.py``) are its subclasses.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from xmx.errors import XmxError
from xmx.methods.base import XmxModule

log = logging.getLogger(__name__)


class AdapterMethod(XmxModule):
    """A small adapter trained with cross-entropy over the training classes, on top of frozen CLIP features.

    ``build(dm)`` computes the zero-shot text classifier `W [C, N]` of every label set once — the training classes,
    the validation set and each eval set with its *own* classes and templates (base-to-new: ``test_new`` has the new
    classes only) — and keeps them as non-persistent buffers (they follow the module to its device and are never
    written into checkpoints: only the adapter's weights are). The backbone's ``logit_scale`` (and ``logit_bias``,
    SigLIP) are read from ``dm`` and stay frozen. Subclasses implement ``make_adapter(dim)`` and
    ``adapter_logits(feats [B, C], W [C, N]) -> [B, N]``.

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
