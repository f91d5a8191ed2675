"""Zero-shot CLIP (docs/methods/shared.md#zero-shot-classifier): logits = exp(logit_scale) · norm(f) · W (+
logit_bias), W from class names × prompt
templates. ``logit_scale`` and ``logit_bias`` are the backbone's own: SigLIP-family models carry a learned bias and
score each class with a sigmoid (the bias shifts every class alike, so top-1/top-5 do not change; the logits kept in
``predictions.safetensors`` are the model's own)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xmx.methods.base import XmxModule


def zeroshot_logits(feats: torch.Tensor, W: torch.Tensor, logit_scale: float,
                    logit_bias: float | None = None) -> torch.Tensor:
    """feats [B,C] raw image features, W [C,N] normalised class embeddings -> logits [B,N]."""
    out = torch.exp(torch.tensor(logit_scale)) * F.normalize(feats.float(), dim=-1) @ W.to(feats.device)
    return out if logit_bias is None else out + logit_bias


class ZeroShot(XmxModule):
    needs_fit = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    def build(self, dm) -> None:
        self.logit_scale = dm.logit_scale
        self.logit_bias = getattr(dm, "logit_bias", None)
        self.classifiers = {s.name: dm.text_classifier(s.classnames, s.templates) for s in [dm.val_set, *dm.eval_sets]}

    def logits(self, x, eval_set):
        return zeroshot_logits(self.image_features(x), self.classifiers[eval_set.name], self.logit_scale,
                               self.logit_bias)

    def extra_results(self) -> dict:
        return {"logit_scale": self.logit_scale, "logit_bias": self.logit_bias}
