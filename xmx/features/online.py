"""Image loaders of the online training path (``inputs: images``: CLIP-LoRA, MMA-Yang, ...), with the decode where
``data.decode`` puts it.

- ``pil`` (default): PIL decodes and torchvision's transforms (:func:`xmx.data.transforms.build_transform`) augment in
  the loader workers; batches are ``(images [B,3,S,S], labels [B])``.
- ``gpu`` (``auto`` on a CUDA trainer; ``tensor`` runs the same code on the CPU, for tests): the workers read file
  bytes and the JPEG header only, and draw the augmentation's random numbers — the crop box and flip of
  RandomResizedCrop + RandomHorizontalFlip, then the Gaussian noise — from the same global RNG, in the same order, as
  the PIL transforms draw them, so both paths crop, flip and add noise identically for the same seed (and ``RNGState``
  resumes either bit for bit). The batch of bytes is decoded on the trainer's device by the feature store's code
  (:func:`xmx.features.decode.decode_batch`: one batched nvjpeg call, PIL for PNG/CMYK/rejected files) and
  resized/cropped/flipped/normalised there (:class:`~xmx.features.decode.Preprocess`), in the datamodule's
  ``transfer_batch_to_device`` hook (nvjpeg reads its input from host memory). The pixels differ from the PIL path's
  by resize rounding only (antialiased bicubic on uint8 tensors vs PIL's; the tolerance of ``tests/test_extract.py``).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.transforms import RandomResizedCrop

from xmx.config import DECODES, check_decode  # noqa: F401 - DECODES re-exported
from xmx.data.images import ImageListDataset, collate_skip
from xmx.data.transforms import PRESETS, build_transform
from xmx.errors import XmxError
from xmx.features.decode import (RATIO, Preprocess, collate_bytes, decode_batch, error_line, read_for_decode,
                                 resolve_decode, transform_batch, unreadable_message)

log = logging.getLogger(__name__)


def draw_params(pp: Preprocess, height: int, width: int) -> tuple | None:
    """The crop box ``(top, left, h, w)`` and flip of one ``height x width`` image, drawn from the global RNG exactly
    as ``RandomResizedCrop(S, scale) + RandomHorizontalFlip()`` draw them on a PIL image (same calls, same order);
    None for the eval transform (no draw)."""
    scale = PRESETS[pp.preset]
    if scale is None:
        return None
    # get_params only reads the (C, H, W) of its argument: an expanded 1-element tensor costs nothing
    top, left, h, w = RandomResizedCrop.get_params(torch.empty(1).expand(3, height, width), list(scale), list(RATIO))
    return top, left, h, w, bool(torch.rand(1) < 0.5)


class OnlineBytes(Dataset):
    """``items`` (Datums) under ``root`` -> per item the JPEG bytes (or a PIL-decoded uint8 image for anything
    else), the label, the crop/flip parameters and the noise ``[1,3,S,S]`` (fp32, as ``AddGaussianNoise`` draws it:
    after the crop and flip); an unreadable file becomes ``{"index", "error"}`` (the hook applies
    ``data.unreadable``)."""

    def __init__(self, root: str | Path, items, pp: Preprocess):
        self.root, self.items, self.pp = Path(root), items, pp

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        d = self.items[i]
        path = self.root / d.path
        try:
            data, image, height, width = read_for_decode(path)
        except Exception as e:  # noqa: BLE001 - one line, raised or counted by the hook
            return {"index": i, "error": error_line(path, e)}
        params = draw_params(self.pp, height, width)
        S = self.pp.size
        noise = torch.randn(3, S, S) * self.pp.noise_std if self.pp.noise_std else None
        return {"index": i, "label": d.label, "data": data, "image": image, "params": [params],
                "noise": None if noise is None else noise[None]}


def _collate_online(items, split: str):
    batch = collate_bytes(items)
    batch["split"] = split
    if "label" not in batch:  # every item unreadable
        batch["label"] = torch.empty(0, dtype=torch.long)
    return batch


def is_online_batch(batch) -> bool:
    return isinstance(batch, dict) and "split" in batch


class _Paths:
    """``items``' absolute paths, built only for the one an error message names."""

    def __init__(self, root: Path, items):
        self.root, self.items = root, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> str:
        return str(self.root / self.items[i].path)


class OnlineImages:
    """One split's loader and what its device-side decode needs: ``loader()`` and ``decode(batch, device)``."""

    def __init__(self, root, items, backbone, *, preset: str, noise_std: float, decode: str, device: torch.device,
                 split: str, unreadable: str = "error", key: str = "data.decode"):
        self.root, self.items, self.split, self.unreadable = Path(root), items, split, unreadable
        self.mode = resolve_decode(check_decode(decode, key), device, key)  # pil | gpu | tensor
        bb = backbone
        self.resize_mode = getattr(bb, "resize_mode", "shortest")
        if self.mode == "pil":
            self.transform = build_transform(preset, bb.image_size, bb.image_mean, bb.image_std, bb.interpolation,
                                             noise_std, self.resize_mode)
            self.pp = None
        else:
            if preset not in PRESETS:
                raise XmxError(f"augment.preset={preset!r} is unknown; valid choices: {', '.join(PRESETS)}")
            self.pp = Preprocess.from_backbone(bb, preset, noise_std)
        self.counts = {"gpu_decoded": 0, "cpu_decoded": 0}

    def dataset(self) -> Dataset:
        if self.pp is None:
            return ImageListDataset(self.root, self.items, self.transform, self.unreadable)
        return OnlineBytes(self.root, self.items, self.pp)

    def collate(self):
        return collate_skip if self.pp is None else functools.partial(_collate_online, split=self.split)

    def decode(self, batch: dict, device: torch.device):
        """A collated byte batch -> ``(images float [B,3,S,S] on device, labels [B] on device)``, or None when no
        image of the batch is readable (``data.unreadable=skip``)."""
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())  # nvjpeg wants an explicit index
        imgs = decode_batch(batch, device, self.counts, _Paths(self.root, self.items)) if len(batch["index"]) else []
        if batch["errors"]:
            if self.unreadable == "error":
                raise XmxError(unreadable_message(batch["errors"][0][1], len(batch["errors"]) - 1))
            log.warning("skipped %d unreadable image(s) in a batch, e.g. %s", len(batch["errors"]),
                        batch["errors"][0][1])
        if not len(batch["index"]):
            return None
        x = transform_batch(batch, imgs, self.pp, device)  # [B,3,S,S] float32 (one view per item)
        return x, batch["label"].to(device, non_blocking=True)
