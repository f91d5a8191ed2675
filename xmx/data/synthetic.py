"""A procedurally generated dataset written to disk in CoOp's layout, so the demo and the tests read images through
exactly the code that reads real datasets: ``<root>/synthetic/images/<class>/<n>.jpg`` + ``split_zhou_Synthetic.json``.

Ten classes ("red circle", "blue square", ...): a coloured shape at a jittered position and size on a noisy
background. Generated once, into a temporary folder renamed into place, so a half-written tree is never read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from xmx.data.datasets import DatasetInfo, DatasetSplits, classnames_from, read_split_file, register
from xmx.errors import XmxError
from xmx.utils import apply_umask

VERSION = 1
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "purple": (150, 50, 190)}
SHAPES = ("circle", "square")
PER_CLASS = {"train": 40, "val": 10, "test": 20}
SIZE = 48
DIR = "synthetic"
SPLIT_FILE = "split_zhou_Synthetic.json"
MARKER = "xmx_synthetic.json"


def _draw(rng: np.random.Generator, colour: tuple[int, int, int], shape: str) -> Image.Image:
    bg = rng.integers(90, 166, size=3)
    pixels = np.clip(bg + rng.normal(0, 18, size=(SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    r = int(rng.integers(9, 16))
    cx, cy = (int(v) for v in rng.integers(r + 2, SIZE - r - 2, size=2))
    fill = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in colour)
    box = (cx - r, cy - r, cx + r, cy + r)
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=fill)
    return img


def generate(target: Path, seed: int = 0) -> None:
    """Write the synthetic dataset into ``target`` (a new folder)."""
    rng = np.random.default_rng(seed)
    classes = [f"{c}_{s}" for c in COLOURS for s in SHAPES]
    split = {k: [] for k in PER_CLASS}
    for label, cname in enumerate(classes):
        colour, shape = cname.split("_")
        (target / "images" / cname).mkdir(parents=True, exist_ok=True)
        n = 0
        for part, count in PER_CLASS.items():
            for _ in range(count):
                rel = f"{cname}/{cname}_{n:04d}.jpg"
                _draw(rng, COLOURS[colour], shape).save(target / "images" / rel, quality=90)
                split[part].append([rel, label, cname])
                n += 1
    (target / SPLIT_FILE).write_text(json.dumps(split))
    (target / MARKER).write_text(json.dumps({"generator": "xmx.data.synthetic", "version": VERSION, "seed": seed,
                                             "classes": classes, "per_class": PER_CLASS, "size": SIZE}))


def ensure(root: Path) -> Path:
    """Generate ``<root>/synthetic`` unless a complete copy is there; return its path."""
    final = root / DIR
    marker = final / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()).get("version") != VERSION:
            raise XmxError(f"{final} was written by another version of the synthetic generator; delete the folder "
                           "and run again")
        return final
    if final.exists():
        raise XmxError(f"{final} exists but is not a complete synthetic dataset (no {MARKER}); delete it and rerun")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root))
    try:
        apply_umask(tmp, directory=True)  # mkdtemp's 0700 would hide the data from the group
        generate(tmp)
        try:
            os.rename(tmp, final)  # atomic; fails if another process finished first
        except OSError:
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _load(root: Path, info: DatasetInfo) -> DatasetSplits:
    folder = ensure(root)
    split = read_split_file(folder / SPLIT_FILE, f"{DIR}/images")
    return DatasetSplits(name=info.name, root=root, train=split["train"], val=split["val"], test=split["test"],
                         classnames=classnames_from(split["train"]), templates=list(info.templates),
                         split_source=str(folder / SPLIT_FILE))


register(DatasetInfo(name="synthetic", dir=DIR, templates=("a photo of a {}.",), loader=_load,
                     sizes=(400, 100, 200, 10), extra={"generated": True}))
