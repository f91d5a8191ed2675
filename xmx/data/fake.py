"""``python -m xmx.data fake <root> --datasets dtd,oxford_pets``: a small CoOp-layout ``$DATA`` tree without the data.

For each dataset whose split file xmx ships (``split_zhou_*.json``: caltech101, oxford_pets, stanford_cars,
oxford_flowers, dtd, eurosat, ucf101), every image the split file lists is written as a tiny JPEG (``size`` x
``size`` pixels) of one plain colour per class, at the path the real dataset has. ImageNet and its four variants
get their class folders from the shipped WordNet ids with ``--per-class`` images each (ImageNet's counts then differ
from the real ones, so the checker says ``incomplete``); 16-shot runs sample from them, while 1-8-shot runs use the
shipped CoOp subsets, whose files a fake ImageNet does not hold. The real readers, ``python -m
xmx.data check`` (which then says ``found`` with the exact counts) and any preset run on it end to end in about a
minute on a CPU, so the real-data path can be tried before the data is downloaded.

Every dataset folder gets a marker file ``xmx_fake_data.json``: runs on such a tree record ``data.synthetic: true``
in ``results.json``, and reports say their numbers come from synthetic data. The tree is written into a temporary
folder and renamed into place, so a half-written dataset folder is never read; an existing dataset folder is only
replaced when it is itself a fake one (never a real dataset).
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

from xmx.data import coop
from xmx.data.datasets import DATASETS, get_info, read_json
from xmx.errors import XmxError

MARKER = "xmx_fake_data.json"
VERSION = 1


IMAGENET_FAMILY = ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def fakeable() -> list[str]:
    """The datasets whose split file ships with xmx (the fake tree follows it) and the ImageNet family (class
    folders from the shipped WordNet ids, ``--per-class`` images each)."""
    return [n for n in coop.COOP_DATASETS if n in IMAGENET_FAMILY or ("split_file" in DATASETS[n].extra
            and (coop.SPLITS_DIR / f"{DATASETS[n].extra['split_file']}.gz").is_file())]


def _listing(name: str, per_class: int) -> tuple[list[tuple[str, int]], int, dict]:
    """(path relative to the dataset folder, colour index) of every file, the number of colours, split counts.
    ImageNet-family labels are ImageNet-1k indices, so a class has one colour in every variant."""
    info = DATASETS[name]
    if name not in IMAGENET_FAMILY:
        raw = read_json(coop.SPLITS_DIR / f"{info.extra['split_file']}.gz")
        image_dir = info.extra["image_dir"]
        files = [(f"{image_dir}/{p}" if image_dir else p, int(y)) for s in ("train", "val", "test")
                 for p, y, _ in raw[s]]
        return files, len({int(y) for _, y, _ in raw["train"]}), {s: len(raw[s]) for s in ("train", "val", "test")}
    wnids = list(coop.shipped_wnids(info.extra.get("wnids", "imagenet")))
    labels = coop.imagenet_indices(name)
    if name == "imagenet":
        n_test = max(1, per_class // 10)
        files = [(f"images/train/{w}/{w}_{k}.JPEG", y) for w, y in zip(wnids, labels) for k in range(per_class)]
        files += [(f"images/val/{w}/ILSVRC2012_val_{w}_{k}.JPEG", y) for w, y in zip(wnids, labels)
                  for k in range(n_test)]
        return files, 1000, {"train": per_class * len(wnids), "val": 0, "test": n_test * len(wnids)}
    image_dir = info.extra["image_dir"]
    folders = [str(i) for i in range(len(wnids))] if info.extra.get("numbered") else wnids
    files = [(f"{image_dir}/{f}/{k}.jpg", y) for f, y in zip(folders, labels) for k in range(max(1, per_class // 10))]
    return files, 1000, {"train": 0, "val": 0, "test": len(files)}


def is_fake_tree(root: str | os.PathLike, name: str) -> bool:
    """True when ``$DATA/<dataset dir>`` was written by :func:`write_fake_dataset`."""
    info = DATASETS.get(name)
    return info is not None and (Path(root).expanduser() / info.dir / MARKER).is_file()


def class_colour(label: int, n: int) -> tuple[int, int, int]:
    """A distinct RGB colour per class: hues spread round the circle, three lightness rings for many classes."""
    ring = label % 3
    hue = (label // 3) / max(1, -(-n // 3)) + ring / 7.0
    r, g, b = colorsys.hls_to_rgb(hue % 1.0, (0.35, 0.55, 0.75)[ring], 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def _jpeg(colour: tuple[int, int, int], size: int) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_fake_dataset(root: str | os.PathLike, name: str, size: int = 8, per_class: int = 20) -> dict:
    """Write dataset ``name`` under ``root`` (see the module docstring); returns ``{"dataset", "folder", "train",
    "val", "test", "classes", "seconds"}``. ``per_class``: training images per class of ImageNet (its test set
    and the variants get ``per_class // 10``, at least 1); the other datasets follow their split files."""
    info = get_info(name)
    if name not in fakeable():
        raise XmxError(f"cannot fake {name!r}: xmx does not ship its split file; fakeable datasets: "
                       f"{', '.join(fakeable())}")
    if not 1 <= int(size) <= 512:
        raise XmxError(f"--size {size}: image side in pixels must be in 1..512")
    if int(per_class) < 1:
        raise XmxError(f"--per-class {per_class}: give at least 1 image per class")
    t0 = time.perf_counter()
    root = Path(root).expanduser()
    final = root / info.dir
    if final.exists() and not (final / MARKER).is_file():
        raise XmxError(f"{final} exists and is not a fake tree; refusing to write into a real dataset folder "
                       "(choose another root)")
    root.mkdir(parents=True, exist_ok=True)
    files, n_classes, counts = _listing(name, int(per_class))
    blobs: dict[int, bytes] = {}
    tmp = root / f".{info.dir}.fake-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    made: set[str] = set()
    try:
        for path, label in files:
            if label not in blobs:
                blobs[label] = _jpeg(class_colour(label, n_classes), int(size))
            target = os.path.join(tmp, path)
            parent = os.path.dirname(target)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            with open(target, "wb") as f:
                f.write(blobs[label])
        (tmp / MARKER).write_text(json.dumps({"fake": True, "version": VERSION, "dataset": name, "size": int(size),
                                              "classes": len(blobs), **counts,
                                              "note": "tiny one-colour-per-class JPEGs written by "
                                                      "python -m xmx.data fake; not the real dataset"}))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"dataset": name, "folder": str(final), **counts, "classes": len(blobs),
            "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmx.data fake",
                                     description="Write a small fake $DATA tree (CoOp layout, tiny one-colour-per-"
                                                 "class JPEGs) from the split files xmx ships.")
    parser.add_argument("root", help="the $DATA folder to write into")
    parser.add_argument("--datasets", default="dtd,oxford_pets",
                        help=f"comma-separated subset of: {','.join(fakeable())} (or 'all')")
    parser.add_argument("--size", type=int, default=8, help="image side in pixels (default 8)")
    parser.add_argument("--per-class", type=int, default=20,
                        help="ImageNet training images per class (default 20: 16 shots + 4 validation); its test set "
                             "and the variants get a tenth of it")
    args = parser.parse_args(argv)
    try:
        names = fakeable() if args.datasets.strip() == "all" else \
            [n.strip() for n in args.datasets.split(",") if n.strip()]
        if not names:
            raise XmxError("--datasets is empty; name at least one of: " + ", ".join(fakeable()))
        for n in names:  # every name checked before anything is written
            get_info(n)
            if n not in fakeable():
                raise XmxError(f"cannot fake {n!r}: xmx does not ship its split file; fakeable datasets: "
                               f"{', '.join(fakeable())}")
        root = Path(args.root).expanduser()
        if root.exists() and not root.is_dir():
            raise XmxError(f"{root} is a file, not a folder; pass the $DATA folder to write the fake tree into "
                           "(python -m xmx.data fake <folder>)")
        for n in names:
            r = write_fake_dataset(args.root, n, args.size, args.per_class)
            print(f"{n:<16} wrote train {r['train']}  val {r['val']}  test {r['test']}  classes {r['classes']}  "
                  f"({r['seconds']:.1f}s) -> {r['folder']}")
    except XmxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a folder that cannot be written (permissions, a full disk)
        print(f"error: cannot write the fake tree under {args.root} ({e.strerror}: {e.filename}); pass a writable "
              "folder", file=sys.stderr)
        return 2
    root = Path(args.root).expanduser()
    print(f"fake data (not the real images) under {root}; try: python -m xmx.data check {root} --datasets "
          f"{','.join(names)}  and  DATA={root} python -m xmx.run experiment=zeroshot_16shot data={names[0]}")
    return 0
