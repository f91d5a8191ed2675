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


UNREADABLE = ("error", "skip")


def check_unreadable(policy: str, key: str = "data.unreadable") -> str:
    """The ``data.unreadable`` policy, validated: ``error`` stops at the first unreadable image naming it, ``skip``
    leaves such images out of every list (feature extraction, image batches) and counts them."""
    if policy not in UNREADABLE:
        raise XmxError(f"{key}={policy!r}; valid choices: error, skip (skip leaves unreadable images "
                       "out and counts them)")
    return policy


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
        check_unreadable(unreadable)
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


class _Probe(Dataset):
    def __init__(self, root: Path, items: list[Datum]):
        self.root, self.items = Path(root), items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> bool:
        try:
            open_rgb(self.root / self.items[i].path)
            return True
        except Exception:  # noqa: BLE001 - anything PIL cannot decode is unreadable
            return False


def find_unreadable(root: str | Path, items: list[Datum], num_workers: int = 0, what: str = "the") -> list[int]:
    """Indices of ``items`` that PIL cannot decode (one full decode each, in ``num_workers`` processes)."""
    if not items:
        return []
    from xmx.utils import Heartbeat
    loader = torch.utils.data.DataLoader(_Probe(Path(root), items), batch_size=64, num_workers=num_workers,
                                         collate_fn=list)
    beat = Heartbeat(f"checking {what} images", total=len(items), logger=log)  # a line every 10 s
    ok: list[bool] = []
    for batch in loader:
        ok += batch
        beat(len(ok))
    return [i for i, good in enumerate(ok) if not good]


def collate_skip(batch):
    """Default collation minus the items an ``unreadable=skip`` dataset returned as None."""
    kept = [b for b in batch if b is not None]
    if len(kept) < len(batch):
        log.warning("skipped %d unreadable image(s) in a batch", len(batch) - len(kept))
    if not kept:
        return None
    return torch.utils.data.default_collate(kept)
