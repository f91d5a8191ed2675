"""Zero-shot CLIP (spec §0): logits = exp(logit_scale) · norm(f) · W, W from class names × prompt templates."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xmx.methods.base import XmxModule


def zeroshot_logits(feats: torch.Tensor, W: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """feats [B,C] raw image features, W [C,N] normalised class embeddings -> logits [B,N]."""
    return torch.exp(torch.tensor(logit_scale)) * F.normalize(feats.float(), dim=-1) @ W.to(feats.device)


class ZeroShot(XmxModule):
    needs_fit = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    def build(self, dm) -> None:
        self.logit_scale = dm.logit_scale
        self.classifiers = {s.name: dm.text_classifier(s.classnames, s.templates) for s in [dm.val_set, *dm.eval_sets]}

    def logits(self, x, eval_set):
        return zeroshot_logits(self.image_features(x), self.classifiers[eval_set.name], self.logit_scale)
