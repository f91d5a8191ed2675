"""Reading images listed as Datums: decode with PIL, transform, and apply the unreadable-file policy."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from xmx.data.datasets import Datum
from xmx.errors import XmxError

log = logging.getLogger(__name__)


def item_seed(seed: int, view: int, index: int) -> int:
    """The RNG seed of one augmented view of one image: independent of worker count and iteration order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{view}:{index}".encode()).digest()[:8], "little") & (2**63 - 1)


def open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:  # format sniffed from the bytes: PNG-in-.jpg works
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")


class ImageListDataset(Dataset):
    """``items`` under ``root``; returns ``(image[3,H,W], label)``. With ``seed`` set, view ``view`` of item ``i``
    draws its random augmentation from :func:`item_seed` so a view is reproducible.

    ``unreadable``: ``error`` (default) stops with the file's name; ``skip`` returns ``None`` for that item, which
    :func:`collate_skip` drops and counts."""

    def __init__(self, root: str | Path, items: list[Datum], transform, unreadable: str = "error",
                 seed: int | None = None, view: int = 0, with_index: bool = False):
        if unreadable not in ("error", "skip"):
            raise XmxError(f"data.unreadable={unreadable!r}; valid choices: error, skip")
        self.root, self.items, self.transform = Path(root), items, transform
        self.unreadable, self.seed, self.view, self.with_index = unreadable, seed, view, with_index

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
        if self.seed is None:
            x = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed(self.seed, self.view, i))
                x = self.transform(img)
        return (x, d.label, i) if self.with_index else (x, d.label)


def collate_skip(batch):
    """Default collation minus the items an ``unreadable=skip`` dataset returned as None."""
    kept = [b for b in batch if b is not None]
    if len(kept) < len(batch):
        log.warning("skipped %d unreadable image(s) in a batch", len(batch) - len(kept))
    if not kept:
        return None
    return torch.utils.data.default_collate(kept)
