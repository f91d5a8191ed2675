"""Readers for the 11 CoOp datasets and the four ImageNet variants, reading ``$DATA`` exactly as CoOp's DATASETS.md
lays it out (folder names below). Importing this module registers them.

- Datasets with a CoOp split file (``split_zhou_<Name>.json``): a user's copy under ``$DATA/<dir>/`` wins, otherwise
  the copy shipped in ``xmx/data/splits/`` (Food101 and SUN397 are not shipped: their split files come with the data).
- FGVCAircraft: ``variants.txt`` + ``images_variant_{train,val,test}.txt``, images ``images/<id>.jpg``.
- ImageNet: ``images/{train,val}/<wnid>/`` (val is the test split; there is no val split) and ``classnames.txt``
  (``<wnid> <name>`` lines), else open_clip's class names. Indexed with one ``os.scandir`` per class folder.
- ImageNet-V2 / -Sketch / -A / -R: test-only; A and R are 200-way (labels 0..199 in sorted-wnid order).

Every reader checks that the listed images exist with one directory listing per folder (no per-file stat) and raises
one :class:`XmxError` line naming what is missing and the layout expected.
"""

from __future__ import annotations

import gc
import os
from functools import lru_cache
from itertools import repeat
from pathlib import Path
from typing import Iterable

from xmx.data.datasets import (DATASETS, DatasetInfo, DatasetSplits, Datum, classnames_from, read_split_file,
                               register)
from xmx.errors import XmxError

SPLITS_DIR = Path(__file__).with_name("splits")
_UNSET = object()


# ----------------------------------------------------------------------------------------------- shared helpers
def dataset_dir(root: Path, info: DatasetInfo) -> Path:
    folder = Path(root) / info.dir
    if not folder.is_dir():
        raise XmxError(f"dataset folder {folder} not found for {info.name!r}; expected CoOp layout "
                       f"$DATA/{info.extra['layout']} (see CoOp's DATASETS.md)")
    return folder


def missing_paths(root: Path, items: Iterable[Datum]) -> list[str]:
    """Paths (relative to ``root``) of ``items`` that are not on disk, found with one listing per folder."""
    listing: dict[str, object] = {}
    missing = []
    for d in items:
        parent, _, name = d.path.rpartition("/")
        names = listing.get(parent, _UNSET)
        if names is _UNSET:
            try:
                names = set(os.listdir(os.path.join(root, parent)))
            except (FileNotFoundError, NotADirectoryError):
                names = None
            listing[parent] = names
        if names is None or name not in names:
            missing.append(d.path)
    return missing


def missing_message(name: str, root: Path, missing: list[str], total: int, source: str) -> str:
    """One line for missing images (``missing`` paths) or missing class folders (paths ending in ``/``)."""
    examples = ", ".join(missing[:3])
    fix = f"complete the dataset (python -m xmx.data check {root} lists what is missing)"
    if missing and missing[0].endswith("/"):
        return (f"{name}: {len(missing)} class folders are missing under {root} ({source}), e.g. {examples}; {fix}")
    return f"{name}: {len(missing)} of {total} images listed in {source} are missing under {root}, e.g. {examples}; {fix}"


def _raise_missing(splits: DatasetSplits, missing: list[str]) -> None:
    if missing:
        total = len(splits.train) + len(splits.val) + len(splits.test)
        raise XmxError(missing_message(splits.name, splits.root, missing, total, splits.split_source))


def _make_loader(scan):
    """A ``DatasetInfo.loader`` that scans and fails on missing images."""
    def load(root: Path, info: DatasetInfo) -> DatasetSplits:
        splits, missing = scan(root, info)
        _raise_missing(splits, missing)
        return splits
    load.__name__ = f"load_{scan.__name__.lstrip('_')}"
    return load


def scan_dataset(name: str, root: str | Path) -> tuple[DatasetSplits, list[str]]:
    """Read dataset ``name`` like :func:`xmx.data.datasets.load_dataset` but return the missing image paths instead
    of raising on them (the checker's entry point)."""
    from xmx.data.datasets import get_info
    info = get_info(name)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise XmxError(f"data root {root} does not exist; point paths.data_dir (or $DATA) at the folder that holds "
                       f"the datasets in CoOp layout, e.g. {root}/{info.dir}/")
    scan = info.extra.get("scan")
    if scan is None:
        return info.loader(root, info), []
    return scan(root, info)


# ------------------------------------------------------------------------------------- datasets with a split file
def find_split_file(folder: Path, info: DatasetInfo) -> Path:
    """The user's ``split_zhou_<Name>.json`` under the dataset folder wins; else the copy xmx ships."""
    fname = info.extra["split_file"]
    for cand in (folder / fname, folder / f"{fname}.gz"):
        if cand.is_file():
            return cand
    shipped = SPLITS_DIR / f"{fname}.gz"
    if shipped.is_file():
        return shipped
    raise XmxError(f"split file {folder / fname} not found for {info.name!r} (xmx does not ship it); download "
                   f"{fname} as CoOp's DATASETS.md describes and put it in {folder}/")


def _scan_split_dataset(root: Path, info: DatasetInfo) -> tuple[DatasetSplits, list[str]]:
    folder = dataset_dir(root, info)
    image_dir = info.extra["image_dir"]
    if image_dir and not (folder / image_dir).is_dir():
        raise XmxError(f"image folder {folder / image_dir} not found for {info.name!r}; expected CoOp layout "
                       f"$DATA/{info.extra['layout']}")
    path = find_split_file(folder, info)
    prefix = f"{info.dir}/{image_dir}" if image_dir else info.dir
    split = read_split_file(path, prefix)
    try:
        classnames = classnames_from(split["train"])
    except XmxError as e:
        raise XmxError(f"split file {path} is malformed: {e}") from None
    splits = DatasetSplits(name=info.name, root=root, train=split["train"], val=split["val"], test=split["test"],
                           classnames=classnames, templates=list(info.templates), split_source=str(path))
    return splits, missing_paths(root, splits.train + splits.val + splits.test)


# --------------------------------------------------------------------------------------------------- FGVCAircraft
def _read_lines(path: Path, info: DatasetInfo) -> list[str]:
    if not path.is_file():
        raise XmxError(f"{path} not found for {info.name!r}; expected CoOp layout $DATA/{info.extra['layout']}")
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _scan_aircraft(root: Path, info: DatasetInfo) -> tuple[DatasetSplits, list[str]]:
    folder = dataset_dir(root, info)
    classnames = _read_lines(folder / "variants.txt", info)
    if len(set(classnames)) != len(classnames):
        raise XmxError(f"{folder / 'variants.txt'} is malformed: duplicate variant names; expected one variant a line")
    cname2lab = {c: i for i, c in enumerate(classnames)}
    out = {}
    for split in ("train", "val", "test"):
        path = folder / f"images_variant_{split}.txt"
        items = []
        for n, line in enumerate(_read_lines(path, info), 1):
            imid, _, cname = line.partition(" ")
            if cname not in cname2lab:
                raise XmxError(f"{path} is malformed: line {n} {line!r} names variant {cname!r}, which is not in "
                               f"{folder / 'variants.txt'}; expected '<image id> <variant>' lines")
            items.append(Datum(f"{info.dir}/images/{imid}.jpg", cname2lab[cname], cname))
        out[split] = items
    splits = DatasetSplits(name=info.name, root=root, train=out["train"], val=out["val"], test=out["test"],
                           classnames=classnames, templates=list(info.templates),
                           split_source=str(folder / "images_variant_{train,val,test}.txt"))
    return splits, missing_paths(root, splits.train + splits.val + splits.test)


# ---------------------------------------------------------------------------------------------- ImageNet family
@lru_cache(maxsize=None)
def shipped_wnids(which: str = "imagenet") -> tuple[str, ...]:
    """Sorted WordNet ids: ``imagenet`` (1000), ``imagenet_a`` / ``imagenet_r`` (their 200-class subsets)."""
    return tuple((SPLITS_DIR / f"{which}_wnids.txt").read_text().split())


def imagenet_indices(name: str) -> list[int]:
    """For each label of ImageNet variant ``name``, its ImageNet-1k label (the identity for 1000-class sets)."""
    info = DATASETS[name]
    subset = info.extra.get("wnids")
    all_w = shipped_wnids("imagenet")
    if subset is None:
        return list(range(len(all_w)))
    pos = {w: i for i, w in enumerate(all_w)}
    return [pos[w] for w in shipped_wnids(subset)]


def read_classnames_txt(path: Path) -> dict[str, str]:
    """CoOp's ``classnames.txt``: ``<wnid> <class name>`` a line, checked against the 1000 ImageNet wnids."""
    names: dict[str, str] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, cname = line.strip().partition(" ")
        if not cname.strip():
            raise XmxError(f"{path} is malformed: line {n} {line!r}; expected '<wnid> <class name>' lines")
        names[wnid] = cname.strip()
    if sorted(names) != list(shipped_wnids("imagenet")):
        raise XmxError(f"{path} is malformed: it has {len(names)} wnids, expected the 1000 ImageNet-1k wnids "
                       "('<wnid> <class name>' a line, as in CoOp's classnames.txt)")
    return names


def imagenet_classnames(root: Path, own_dir: str | None = None) -> tuple[dict[str, str], str]:
    """wnid -> class name: ``$DATA/<own_dir>/classnames.txt``, else ``$DATA/imagenet/classnames.txt``, else
    open_clip's bundled names in sorted-wnid order. Returns the mapping and where it came from."""
    for d in dict.fromkeys([own_dir, "imagenet"]):
        if d and (Path(root) / d / "classnames.txt").is_file():
            path = Path(root) / d / "classnames.txt"
            return read_classnames_txt(path), str(path)
    return dict(zip(shipped_wnids("imagenet"), open_clip_imagenet_classnames())), "open_clip.zero_shot_metadata"


@lru_cache(maxsize=1)
def open_clip_imagenet_classnames() -> tuple[str, ...]:
    """open_clip's bundled ImageNet class names (sorted-wnid order), read from its pure-data module without
    importing the open_clip package (which would import torch) when that has not happened already."""
    import importlib.util
    import sys
    mod = sys.modules.get("open_clip.zero_shot_metadata")
    if mod is None:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise XmxError("ImageNet class names: no classnames.txt under $DATA/imagenet/ and open_clip is not "
                           "installed; add CoOp's classnames.txt ('<wnid> <class name>' lines) or pip install "
                           "open_clip_torch")
        path = Path(list(spec.submodule_search_locations)[0]) / "zero_shot_metadata.py"
        sub = importlib.util.spec_from_file_location("_xmx_open_clip_zero_shot_metadata", path)
        mod = importlib.util.module_from_spec(sub)
        sub.loader.exec_module(mod)
    return tuple(mod.IMAGENET_CLASSNAMES)


def index_folders(root: Path, rel_dir: str, folders: list[str], labels: list[int],
                  classnames: list[str]) -> tuple[list[Datum], list[str]]:
    """List ``$DATA/<rel_dir>/<folder>/`` for each class folder with one ``os.scandir`` (no per-file stat), names
    sorted, hidden files skipped. Returns the items and the folders that do not exist."""
    items: list[Datum] = []
    absent = []
    base = os.path.join(root, rel_dir)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a million new objects, no cycles: the cyclic collector would only rescan them again and again
    try:
        _index_into(items, absent, base, rel_dir, folders, labels, classnames)
    finally:
        if gc_was_enabled:
            gc.enable()
    return items, absent


def _index_into(items, absent, base, rel_dir, folders, labels, classnames) -> None:
    for folder, label, cname in zip(folders, labels, classnames):
        try:
            with os.scandir(os.path.join(base, folder)) as it:
                names = sorted(e.name for e in it if not e.name.startswith(".") and not e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            absent.append(f"{rel_dir}/{folder}/")
            continue
        prefix = f"{rel_dir}/{folder}/"
        items.extend(map(Datum, [prefix + n for n in names], repeat(label), repeat(cname)))


def _require_dir(folder: Path, info: DatasetInfo) -> None:
    if not folder.is_dir():
        raise XmxError(f"image folder {folder} not found for {info.name!r}; expected CoOp layout "
                       f"$DATA/{info.extra['layout']}")


def _scan_imagenet(root: Path, info: DatasetInfo) -> tuple[DatasetSplits, list[str]]:
    dataset_dir(root, info)
    names, source = imagenet_classnames(root, info.dir)
    wnids = sorted(names)
    labels = list(range(len(wnids)))
    cnames = [names[w] for w in wnids]
    out, absent = {}, []
    for split, sub in (("train", "train"), ("test", "val")):
        rel = f"{info.dir}/images/{sub}"
        _require_dir(Path(root) / rel, info)
        out[split], miss = index_folders(root, rel, wnids, labels, cnames)
        absent += miss
    splits = DatasetSplits(name=info.name, root=root, train=out["train"], val=[], test=out["test"],
                           classnames=cnames, templates=list(info.templates), class_keys=list(wnids),
                           split_source=f"listing of {root}/{info.dir}/images/{{train,val}}/<wnid>/ ({source})")
    return splits, absent


def _scan_variant(root: Path, info: DatasetInfo) -> tuple[DatasetSplits, list[str]]:
    dataset_dir(root, info)
    names, source = imagenet_classnames(root, info.dir)
    wnids = list(shipped_wnids(info.extra.get("wnids", "imagenet")))
    rel = f"{info.dir}/{info.extra['image_dir']}"
    _require_dir(Path(root) / rel, info)
    folders = [str(i) for i in range(len(wnids))] if info.extra.get("numbered") else wnids
    cnames = [names[w] for w in wnids]
    test, absent = index_folders(root, rel, folders, list(range(len(wnids))), cnames)
    splits = DatasetSplits(name=info.name, root=root, train=[], val=[], test=test, classnames=cnames,
                           templates=list(info.templates), class_keys=list(wnids), split_source=f"listing of {root}/{rel}/ ({source})")
    return splits, absent


# ------------------------------------------------------------------------------------------------- registration
PHOTO = ("a photo of a {}.",)

#          name,            dir,               image dir,                split file,                          template
_SPLIT_DATASETS = [
    ("caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", PHOTO,
     (4128, 1649, 2465, 100)),
    ("oxford_pets", "oxford_pets", "images", "split_zhou_OxfordPets.json", ("a photo of a {}, a type of pet.",),
     (2944, 736, 3669, 37)),
    ("stanford_cars", "stanford_cars", "", "split_zhou_StanfordCars.json", PHOTO, (6509, 1635, 8041, 196)),
    ("oxford_flowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
     ("a photo of a {}, a type of flower.",), (4093, 1633, 2463, 102)),
    ("food101", "food-101", "images", "split_zhou_Food101.json", ("a photo of {}, a type of food.",),
     (50500, 20200, 30300, 101)),
    ("sun397", "sun397", "SUN397", "split_zhou_SUN397.json", PHOTO, (15880, 3970, 19850, 397)),
    ("dtd", "dtd", "images", "split_zhou_DescribableTextures.json", ("{} texture.",), (2820, 1128, 1692, 47)),
    ("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json", ("a centered satellite photo of {}.",),
     (13500, 5400, 8100, 10)),
    ("ucf101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", ("a photo of a person doing {}.",),
     (7639, 1898, 3783, 101)),
]

for _name, _dir, _img, _split, _tmpl, _sizes in _SPLIT_DATASETS:
    _layout = (f"{_dir}/{_img + '/' if _img else '{cars_train,cars_test}/'}<images> + {_dir}/{_split}"
               + ("" if (SPLITS_DIR / f"{_split}.gz").is_file() else " (not shipped with xmx)"))
    register(DatasetInfo(name=_name, dir=_dir, templates=_tmpl, loader=_make_loader(_scan_split_dataset),
                         sizes=_sizes, extra={"image_dir": _img, "split_file": _split, "layout": _layout,
                                              "scan": _scan_split_dataset}))

register(DatasetInfo(name="fgvc_aircraft", dir="fgvc_aircraft", templates=("a photo of a {}, a type of aircraft.",),
                     loader=_make_loader(_scan_aircraft), sizes=(3334, 3333, 3333, 100),
                     extra={"layout": "fgvc_aircraft/{images/<id>.jpg, variants.txt, "
                                      "images_variant_{train,val,test}.txt}", "scan": _scan_aircraft}))

register(DatasetInfo(name="imagenet", dir="imagenet", templates=PHOTO, loader=_make_loader(_scan_imagenet),
                     sizes=(1281167, 0, 50000, 1000),
                     extra={"layout": "imagenet/images/{train,val}/<wnid>/<image> (+ imagenet/classnames.txt)",
                            "scan": _scan_imagenet}))

for _name, _dir, _img, _extra, _sizes in [
    ("imagenet_v2", "imagenetv2", "imagenetv2-matched-frequency-format-val", {"numbered": True}, (0, 0, 10000, 1000)),
    ("imagenet_sketch", "imagenet-sketch", "images", {}, (0, 0, 50889, 1000)),
    ("imagenet_a", "imagenet-adversarial", "imagenet-a", {"wnids": "imagenet_a"}, (0, 0, 7500, 200)),
    ("imagenet_r", "imagenet-rendition", "imagenet-r", {"wnids": "imagenet_r"}, (0, 0, 30000, 200)),
]:
    _sub = "<0..999>" if _extra.get("numbered") else "<wnid>"
    register(DatasetInfo(name=_name, dir=_dir, templates=PHOTO, loader=_make_loader(_scan_variant), sizes=_sizes,
                         test_only=True,
                         extra={"image_dir": _img, "layout": f"{_dir}/{_img}/{_sub}/<image>", "scan": _scan_variant,
                                **_extra}))

COOP_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                 "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101", "imagenet_v2", "imagenet_sketch",
                 "imagenet_a", "imagenet_r")
