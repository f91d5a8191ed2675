"""Image transforms (docs/methods/shared.md#image-preprocessing): augmentation presets on top of CLIP's own resize and
mean/std normalisation.

- ``none``: the backbone's eval transform (``resize_mode``: ``shortest`` = resize the short side to ``size`` and centre
  crop, as OpenAI's CLIP; ``squash`` = resize to ``size`` x ``size``, as SigLIP; ``longest`` = fit and pad with zeros)
- ``tip``:  RandomResizedCrop(size, scale 0.5-1, bicubic) + horizontal flip (Tip-Adapter's cache views)
- ``coop``: RandomResizedCrop(size, scale 0.08-1, bicubic) + horizontal flip (CoOp)
- ``tpt_crop``: RandomResizedCrop(size, scale 0.08-1, **bilinear**: torchvision's default, as TPT's/TDA's
  ``get_preaugment``) + flip; ``augmix``: the same crop, then AugMix mixing (:mod:`xmx.data.augmix`). Both are
  drawn per (seed, view, image) for the feature store's test-time views only (TPT, TDA).
``noise_std`` adds Gaussian noise to the normalised image (MMA's robustness study,
docs/methods/mma.md#ablations-and-noise).
"""

from __future__ import annotations

import torch
from torchvision import transforms as T

from xmx.errors import XmxError

PRESETS = {"none": None, "tip": (0.5, 1.0), "coop": (0.08, 1.0), "tpt_crop": (0.08, 1.0), "augmix": (0.08, 1.0)}
PRESET_INTERPOLATION = {"tpt_crop": "bilinear", "augmix": "bilinear"}  # else the backbone's own
CACHED_ONLY = ("augmix",)  # drawn by the feature extractor (PIL), not by the online loaders
_INTERP = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
           "nearest": T.InterpolationMode.NEAREST}


class AddGaussianNoise(torch.nn.Module):
    def __init__(self, std: float):
        super().__init__()
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.randn_like(x) * self.std

    def __repr__(self) -> str:
        return f"AddGaussianNoise(std={self.std})"


def build_transform(preset: str, size: int, mean, std, interpolation: str = "bicubic",
                    noise_std: float = 0.0, resize_mode: str = "shortest") -> T.Compose:
    if preset not in PRESETS:
        raise XmxError(f"augment.preset={preset!r} is unknown; valid choices: {', '.join(PRESETS)}")
    if preset in CACHED_ONLY:
        raise XmxError(f"augment.preset={preset} draws cached test-time views only (method=tda / tpt); use tip, coop "
                       "or tpt_crop for training images")
    interpolation = PRESET_INTERPOLATION.get(preset, interpolation)
    interp = _INTERP.get(interpolation, T.InterpolationMode.BICUBIC)
    if PRESETS[preset] is None and resize_mode == "squash":
        spatial = [T.Resize((size, size), interpolation=interp)]
    elif PRESETS[preset] is None and resize_mode == "longest":
        from open_clip.transform import CenterCropOrPad, ResizeKeepRatio
        spatial = [ResizeKeepRatio(size, longest=1, interpolation=interp), CenterCropOrPad(size, fill=0)]
    elif PRESETS[preset] is None:
        if resize_mode != "shortest":
            raise XmxError(f"resize mode {resize_mode!r} is unknown; valid choices: shortest, squash, longest")
        spatial = [T.Resize(size, interpolation=interp), T.CenterCrop(size)]
    else:
        spatial = [T.RandomResizedCrop(size, scale=PRESETS[preset], interpolation=interp), T.RandomHorizontalFlip()]
    steps = [*spatial, T.ToTensor(), T.Normalize(mean, std)]
    if noise_std:
        steps.append(AddGaussianNoise(noise_std))
    return T.Compose(steps)
