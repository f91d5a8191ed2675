"""Reading images listed as Datums: decode with PIL, transform, and apply the unreadable-file policy."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from xmx.data.datasets import Datum
from xmx.errors import XmxError

log = logging.getLogger(__name__)


def open_rgb(path) -> Image.Image:
    """Decode any image file PIL understands (CMYK, greyscale, palette, PNG named .jpg: the format is sniffed from
    the bytes) to RGB."""
    with Image.open(path) as img:
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")


class ImageListDataset(Dataset):
    """``items`` under ``root``; returns ``(image[3,H,W], label)`` for methods that run the encoders in the training
    step (cached features are extracted by :mod:`xmx.features.extract`).

    ``unreadable``: ``error`` (default) stops with the file's name; ``skip`` returns ``None`` for that item, which
    :func:`collate_skip` drops and counts."""

    def __init__(self, root: str | Path, items: list[Datum], transform, unreadable: str = "error"):
        if unreadable not in ("error", "skip"):
            raise XmxError(f"data.unreadable={unreadable!r}; valid choices: error, skip")
        self.root, self.items, self.transform = Path(root), items, transform
        self.unreadable = unreadable

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        d = self.items[i]
        path = self.root / d.path
        try:
            img = open_rgb(path)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            if self.unreadable == "skip":
                return None
            raise XmxError(f"unreadable image {path} ({type(e).__name__}: {e}); replace the file, or set "
                           "data.unreadable=skip to leave such files out") from None
        return self.transform(img), d.label


def collate_skip(batch):
    """Default collation minus the items an ``unreadable=skip`` dataset returned as None."""
    kept = [b for b in batch if b is not None]
    if len(kept) < len(batch):
        log.warning("skipped %d unreadable image(s) in a batch", len(batch) - len(kept))
    if not kept:
        return None
    return torch.utils.data.default_collate(kept)
