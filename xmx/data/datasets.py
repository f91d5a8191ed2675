"""Datasets as CoOp lays them out under ``$DATA``: a registry of readers that return fixed train/val/test lists.

Every item is a :class:`Datum` whose ``path`` is relative to the ``$DATA`` root (POSIX separators), the same form the
shipped few-shot subset files use, so a subset can always be written down exactly and checked against the tree.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from xmx.errors import XmxError


@dataclass(frozen=True)
class Datum:
    path: str  # relative to the $DATA root, e.g. "oxford_pets/images/Abyssinian_1.jpg"
    label: int
    classname: str


@dataclass
class DatasetSplits:
    name: str
    root: Path  # the $DATA root
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    classnames: list[str]  # index = label
    templates: list[str]
    split_source: str = ""  # which split file (or listing) produced the lists
    # stable class identities (ImageNet family: WordNet ids) where class names are not unique; None = class names.
    # Transfer protocols match a target's classes to the training classes through them.
    class_keys: list[str] | None = None

    @property
    def keys(self) -> list[str]:
        return list(self.class_keys) if self.class_keys is not None else list(self.classnames)

    def split(self, name: str) -> list[Datum]:
        return getattr(self, name)


@dataclass(frozen=True)
class DatasetInfo:
    """What xmx knows about one dataset: where it lives and how to read it."""
    name: str  # the `data=` name, e.g. "oxford_pets"
    dir: str  # folder under $DATA, e.g. "oxford_pets"
    templates: tuple[str, ...]
    loader: Callable[[Path, "DatasetInfo"], DatasetSplits]
    sizes: tuple[int, int, int, int] | None = None  # train, val, test, classes (docs/protocols.md#dataset-sizes), for the checker
    test_only: bool = False
    extra: dict = field(default_factory=dict)  # reader-specific settings (split file name, image folder, ...)


DATASETS: dict[str, DatasetInfo] = {}


def register(info: DatasetInfo) -> DatasetInfo:
    DATASETS[info.name] = info
    return info


def get_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise XmxError(f"unknown dataset {name!r}; valid choices: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def load_dataset(name: str, root: str | Path) -> DatasetSplits:
    """Read dataset ``name`` from the ``$DATA`` folder ``root`` (CoOp layout)."""
    info = get_info(name)
    root = Path(root).expanduser()
    if not root.is_dir() and not info.extra.get("generated"):
        raise XmxError(f"data root {root} does not exist; point paths.data_dir (or $DATA) at the folder that holds "
                       f"the datasets in CoOp layout, e.g. {root}/{info.dir}/")
    return info.loader(root, info)


def read_json(path: Path) -> dict:
    """Read a (possibly gzip-compressed) JSON file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def read_split_file(path: Path, image_prefix: str, what: str = "split file") -> dict[str, list[Datum]]:
    """Read CoOp's ``split_zhou_<Name>.json``: ``{"train"|"val"|"test": [[impath, label, classname], ...]}`` with
    paths relative to the image folder; ``image_prefix`` is that folder relative to ``$DATA``."""
    try:
        raw = read_json(path)
        out = {}
        for split in ("train", "val", "test"):
            out[split] = [Datum(f"{image_prefix}/{p}" if image_prefix else p, int(y), str(c))
                          for p, y, c in raw[split]]
    except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
        raise XmxError(f"{what} {path} is malformed ({type(e).__name__}: {e}); expected CoOp's format "
                       '{"train"|"val"|"test": [[image_path, label, classname], ...]}') from None
    return out


def classnames_from(items: list[Datum]) -> list[str]:
    """Class names indexed by label, as they appear in the split lists."""
    names: dict[int, str] = {}
    for d in items:
        names.setdefault(d.label, d.classname)
    if sorted(names) != list(range(len(names))):
        raise XmxError(f"labels are not contiguous 0..{len(names) - 1}: {sorted(set(range(max(names) + 1)) - set(names))[:5]} missing")
    return [names[i] for i in range(len(names))]
