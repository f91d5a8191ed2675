"""``python -m xmx.data fake <root> --datasets dtd,oxford_pets``: a small CoOp-layout ``$DATA`` tree without the data.

For each dataset whose split file xmx ships (``split_zhou_*.json``: caltech101, oxford_pets, stanford_cars,
oxford_flowers, dtd, eurosat, ucf101), every image the split file lists is written as a tiny JPEG (``size`` x
``size`` pixels) of one plain colour per class, at the path the real dataset has. ImageNet and its four variants
get their class folders from the shipped WordNet ids with ``--per-class`` images each, and a fake ImageNet also holds
every file the shipped CoOp subsets name, so 1-8-shot runs read the very subsets real ImageNet runs use (hard links
to one JPEG per class: 120k names, a few MB). The language track's data: ``coco_captions`` (COCO's captions JSON +
images), ``wikitext103`` (``wiki.*.raw``) and ``glue`` (every task's TSVs). The real readers, ``python -m xmx.data
check`` (which compares a fake tree with the counts in its marker file, and says ``found``) and any preset run on it
end to end in about a minute on a CPU, so the real-data path can be tried before the data is downloaded.

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
        have = {f for f, _ in files}
        files += [(f, y) for f, y in _imagenet_subset_files(wnids, labels) if f not in have]
        n_train = len(files)
        files += [(f"images/val/{w}/ILSVRC2012_val_{w}_{k}.JPEG", y) for w, y in zip(wnids, labels)
                  for k in range(n_test)]
        return files, 1000, {"train": n_train, "val": 0, "test": n_test * len(wnids)}
    image_dir = info.extra["image_dir"]
    folders = [str(i) for i in range(len(wnids))] if info.extra.get("numbered") else wnids
    files = [(f"{image_dir}/{f}/{k}.jpg", y) for f, y in zip(folders, labels) for k in range(max(1, per_class // 10))]
    return files, 1000, {"train": 0, "val": 0, "test": len(files)}


def _imagenet_subset_files(wnids: list[str], labels: list[int]) -> list[tuple[str, int]]:
    """Every training file the shipped CoOp ImageNet subsets name (all shots and seeds), relative to the dataset
    folder, with its colour index: a fake ImageNet holds them, so 1-8-shot runs read the very subsets the real data
    uses."""
    import gzip
    colour = dict(zip(wnids, labels))
    out: dict[str, int] = {}
    for f in sorted((coop.SPLITS_DIR.parent / "fewshot_subsets" / "imagenet").glob("*.json*")):
        opener = gzip.open if f.suffix == ".gz" else open
        with opener(f, "rt") as fh:
            subset = json.load(fh)
        for part in subset.values():
            for row in part if isinstance(part, list) else []:
                rel = str(row[0]).split("/", 1)[1]  # "imagenet/images/train/<wnid>/<file>" -> "images/train/..."
                out.setdefault(rel, colour[rel.split("/")[2]])
    return sorted(out.items())


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
    try:
        _write_files(tmp, files, lambda label: blobs.setdefault(label, _jpeg(class_colour(label, n_classes),
                                                                             int(size))), link=name == "imagenet")
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


def _write_files(tmp: Path, files, blob_of, link: bool = False) -> None:
    """Write ``files`` [(relative path, key)] under ``tmp``, each with ``blob_of(key)``. ``link``: the first file of
    a key is written and the others are hard links to it (ImageNet's 140k files then cost directory entries, not data
    blocks; rewriting one such file rewrites its whole class); copies where the file system has no hard links."""
    made: set[str] = set()
    first: dict = {}
    for path, key in files:
        target = os.path.join(tmp, path)
        parent = os.path.dirname(target)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        if link and key in first:
            try:
                os.link(first[key], target)
                continue
            except OSError:
                link = False
        with open(target, "wb") as f:
            f.write(blob_of(key))
        first.setdefault(key, target)


# ---- the language track's data (X-adapter presets): COCO captions, WikiText-103, GLUE ------------------------------
TEXT_FAKES = {"coco_captions": "coco", "wikitext103": "wikitext-103-raw", "glue": "glue"}  # name -> folder
_WORDS = ("red", "green", "blue", "yellow", "white", "black", "brown", "orange", "purple", "pink", "grey", "small",
          "large", "old", "new", "dog", "cat", "car", "tree", "house", "apple", "banana", "sky", "grass", "table",
          "man", "woman", "child", "sits", "stands", "runs", "near", "under", "on", "with", "the", "a", "street")
_COLOURS = {"red": (200, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 200), "yellow": (230, 210, 40),
            "white": (240, 240, 240), "black": (15, 15, 15), "brown": (120, 70, 30), "orange": (240, 140, 20),
            "purple": (120, 40, 150), "pink": (240, 150, 190), "grey": (128, 128, 128)}


def _sentence(i: int, n: int = 8) -> str:
    return " ".join(_WORDS[(i * 7 + j * 5 + i // 3) % len(_WORDS)] for j in range(n))


def _fake_coco(tmp: Path, size: int, n_train: int, n_val: int) -> dict:
    colours = list(_COLOURS)
    for split, n, first_id in (("train2017", n_train, 1), ("val2017", n_val, 1_000_001)):
        images, anns, files = [], [], []
        for i in range(n):
            iid, colour = first_id + i, colours[i % len(colours)]
            name = f"{iid:012d}.jpg"
            files.append((f"{split}/{name}", colour))
            images.append({"id": iid, "file_name": name, "height": size, "width": size})
            anns += [{"id": 10 * iid + j, "image_id": iid, "caption": f"A {colour} {_sentence(i + j, 6)}."}
                     for j in range(2)]
        blobs: dict = {}
        _write_files(tmp, files, lambda c: blobs.setdefault(c, _jpeg(_COLOURS[c], size)))
        (tmp / "annotations").mkdir(parents=True, exist_ok=True)
        (tmp / "annotations" / f"captions_{split}.json").write_text(json.dumps(
            {"info": {"description": "xmx fake COCO captions"}, "licenses": [], "images": images,
             "annotations": anns}))
    return {"train": n_train, "val": 0, "test": n_val, "classes": 0}


def _fake_wikitext(tmp: Path, n: int) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    counts = {"train": n, "valid": max(2, n // 10), "test": max(2, n // 10)}
    for split, k in counts.items():
        body = "".join(f" = Heading {h} = \n \n" + "".join(f" {_sentence(h * 10 + i, 14)} . \n \n" for i in range(5))
                       for h in range(-(-k // 5)))
        (tmp / f"wiki.{split}.raw").write_text(body)
    return {"train": counts["train"], "val": counts["valid"], "test": counts["test"], "classes": 0}


def _fake_glue(tmp: Path, n: int) -> dict:
    """Every GLUE task in the files and columns of the GLUE download script (labels alternate)."""
    from xmx.data.text import GLUE_TASKS
    for t in GLUE_TASKS.values():
        folder = tmp / t.folder
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("train",) + t.eval_splits:
            k = n if split == "train" else max(4, n // 4)
            label = (lambda i: f"{(i * 0.37) % 5:.2f}") if t.labels is None else (lambda i: t.labels[i % len(t.labels)])
            if not t.header:  # CoLA: source, label, original label, sentence
                rows = [f"fake\t{label(i)}\t\t{_sentence(i)}" for i in range(k)]
            else:
                cols = ["index", t.text_a] + ([t.text_b] if t.text_b else []) + [t.label]
                rows = ["\t".join(cols)] + ["\t".join([str(i), _sentence(i)] + ([_sentence(i + 3)] if t.text_b else [])
                                                      + [label(i)]) for i in range(k)]
            (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return {"train": n, "val": 0, "test": max(4, n // 4), "classes": 0}


def write_fake_text(root: str | os.PathLike, name: str, size: int = 8, n: int = 600) -> dict:
    """COCO captions (``n`` train2017 images, more than the presets' 500 held out for validation, and ``n // 6``
    val2017 images, two captions each), WikiText-103 raw (``n`` paragraphs) or every GLUE task (``n`` training rows)
    under ``root`` in their distributed layouts, with the marker file. Same atomic rename as the image datasets."""
    t0 = time.perf_counter()
    root = Path(root).expanduser()
    final = root / TEXT_FAKES[name]
    if final.exists() and not (final / MARKER).is_file():
        raise XmxError(f"{final} exists and is not a fake tree; refusing to write into a real dataset folder "
                       "(choose another root)")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.fake-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts = (_fake_coco(tmp, int(size), max(int(n), 520), max(int(n) // 6, 8)) if name == "coco_captions" else
                  _fake_wikitext(tmp, int(n)) if name == "wikitext103" else _fake_glue(tmp, int(n)))
        (tmp / MARKER).write_text(json.dumps({"fake": True, "version": VERSION, "dataset": name, **counts,
                                              "note": "generated by python -m xmx.data fake; not the real data"}))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"dataset": name, "folder": str(final), **counts, "seconds": round(time.perf_counter() - t0, 2)}


def all_fakeable() -> list[str]:
    return fakeable() + list(TEXT_FAKES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmx.data fake",
                                     description="Write a small fake $DATA tree (CoOp layout, tiny one-colour-per-"
                                                 "class JPEGs) from the split files xmx ships.")
    parser.add_argument("root", help="the $DATA folder to write into")
    parser.add_argument("--datasets", default="dtd,oxford_pets",
                        help=f"comma-separated subset of: {','.join(all_fakeable())} (or 'all')")
    parser.add_argument("--size", type=int, default=8, help="image side in pixels (default 8)")
    parser.add_argument("--per-class", type=int, default=20,
                        help="ImageNet training images per class (default 20: 16 shots + 4 validation); its test set "
                             "and the variants get a tenth of it")
    args = parser.parse_args(argv)
    try:
        names = all_fakeable() if args.datasets.strip() == "all" else \
            [n.strip() for n in args.datasets.split(",") if n.strip()]
        if not names:
            raise XmxError("--datasets is empty; name at least one of: " + ", ".join(all_fakeable()))
        for n in names:  # every name checked before anything is written
            if n in TEXT_FAKES:
                continue
            get_info(n)
            if n not in fakeable():
                raise XmxError(f"cannot fake {n!r}: xmx does not ship its split file; fakeable datasets: "
                               f"{', '.join(all_fakeable())}")
        root = Path(args.root).expanduser()
        if root.exists() and not root.is_dir():
            raise XmxError(f"{root} is a file, not a folder; pass the $DATA folder to write the fake tree into "
                           "(python -m xmx.data fake <folder>)")
        for n in names:
            r = write_fake_text(args.root, n, args.size) if n in TEXT_FAKES else \
                write_fake_dataset(args.root, n, args.size, args.per_class)
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
    images = [n for n in names if n not in TEXT_FAKES]
    print(f"fake data (not the real images) under {root}; try: "
          + (f"python -m xmx.data check {root} --datasets {','.join(images)}  and  DATA={root} python -m xmx.run "
             f"experiment=zeroshot_16shot data={images[0]}" if images else
             f"DATA={root} python -m xmx.run experiment=xadapter_texpert_wiki backbone=tiny plm=tiny"))
    return 0
