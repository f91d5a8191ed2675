"""Text-side readers for the X-adapter language track, in the formats the data is distributed in.

- COCO captions: ``<root>/annotations/captions_<split>.json`` + ``<root>/<split>/`` images (split ``train2017``).
- WikiText-103 raw: ``<root>/wiki.{train,valid,test}.raw``.
- GLUE: ``<root>/<Task>/{train,dev}.tsv`` as written by the GLUE download script (CoLA has no header; MNLI's dev
  files are ``dev_matched.tsv`` / ``dev_mismatched.tsv``). Rows are split on tabs with no quote handling, as GLUE
  intends.
- Object colour: MemoryColor (``Index,Descriptor,Item,Color``; 109 items, 11 colours) and ColorTerms
  (``object,color``; 52 items, 10 colours), shipped as package data in ``xmx/data/object_color/``.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from xmx.errors import XmxError

OBJECT_COLOR_DIR = Path(__file__).parent / "object_color"


# ---- COCO captions ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Caption:
    image_id: int
    image: str  # relative to the COCO root, e.g. "train2017/000000000009.jpg"
    caption: str


def read_coco_captions(root: str | os.PathLike, split: str = "train2017", check_images: bool = True) -> list[Caption]:
    """All captions of ``split`` (about 5 per image), in annotation order. With ``check_images`` every referenced
    image must exist under ``<root>/<split>/`` (one directory listing, not one stat per image)."""
    root = Path(root).expanduser()
    ann = root / "annotations" / f"captions_{split}.json"
    if not ann.is_file():
        raise XmxError(f"coco: caption file not found: {ann}; point data.root at the folder holding "
                       f"annotations/ and {split}/")
    try:
        with open(ann, encoding="utf-8") as f:
            js = json.load(f)
        files = {int(im["id"]): im["file_name"] for im in js["images"]}
        anns = js["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise XmxError(f"coco: {ann} is not a COCO caption file ({type(e).__name__}: {e})") from None
    present = None
    if check_images:
        img_dir = root / split
        if not img_dir.is_dir():
            raise XmxError(f"coco: image folder not found: {img_dir}; unpack {split}.zip there")
        present = set(os.listdir(img_dir))
    out = []
    for a in anns:
        try:
            iid, text = int(a["image_id"]), str(a["caption"])
        except (KeyError, TypeError, ValueError):
            raise XmxError(f"coco: {ann}: annotation {a.get('id', '?')} lacks image_id/caption") from None
        if iid not in files:
            raise XmxError(f"coco: {ann}: annotation {a.get('id', '?')} refers to unknown image id {iid}")
        name = files[iid]
        if present is not None and name not in present:
            raise XmxError(f"coco: image {root / split / name} (id {iid}) is missing; re-unpack {split}.zip or "
                           f"set check_images=false")
        out.append(Caption(iid, f"{split}/{name}", " ".join(text.split())))
    return out


# ---- WikiText-103 -------------------------------------------------------------------------------------------------
WIKITEXT_SPLITS = ("train", "valid", "test")


def read_wikitext(root: str | os.PathLike, split: str = "train", drop_headings: bool = True) -> list[str]:
    """Non-empty paragraphs (one per line) of ``wiki.<split>.raw``; headings (`` = Title = ``) dropped by default."""
    if split not in WIKITEXT_SPLITS:
        raise XmxError(f"wikitext: unknown split {split!r}; valid: {', '.join(WIKITEXT_SPLITS)}")
    path = Path(root).expanduser() / f"wiki.{split}.raw"
    if not path.is_file():
        raise XmxError(f"wikitext: file not found: {path}; point data.root at the unpacked "
                       f"wikitext-103-raw/ folder")
    with open(path, encoding="utf-8") as f:
        return wikitext_paragraphs(f, drop_headings)


def wikitext_paragraphs(lines, drop_headings: bool = True) -> list[str]:
    """The non-empty lines, stripped; heading lines (`` = Title = ``) dropped when ``drop_headings``."""
    out = []
    for line in lines:
        s = line.strip()
        if not s or (drop_headings and s.startswith("=") and s.endswith("=")):
            continue
        out.append(s)
    return out


# ---- GLUE ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GlueTask:
    name: str  # canonical lower-case key
    folder: str  # folder name written by the GLUE download script
    header: bool
    text_a: str | int  # column name (header files) or index (CoLA)
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...] | None  # None: regression (STS-B)
    metrics: tuple[str, ...]
    main_metric: str
    eval_splits: tuple[str, ...] = ("dev",)

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


_BIN = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("cola", "CoLA", False, 3, None, 1, _BIN, ("mcc",), "mcc"),
    GlueTask("sst2", "SST-2", True, "sentence", None, "label", _BIN, ("acc",), "acc"),
    GlueTask("mrpc", "MRPC", True, "#1 String", "#2 String", "Quality", _BIN, ("f1", "acc"), "f1"),
    GlueTask("qqp", "QQP", True, "question1", "question2", "is_duplicate", _BIN, ("f1", "acc"), "f1"),
    GlueTask("stsb", "STS-B", True, "sentence1", "sentence2", "score", None, ("pearson", "spearman"), "pearson"),
    GlueTask("mnli", "MNLI", True, "sentence1", "sentence2", "gold_label", ("contradiction", "entailment", "neutral"),
             ("acc",), "acc", ("dev_matched", "dev_mismatched")),
    GlueTask("qnli", "QNLI", True, "question", "sentence", "label", _NLI2, ("acc",), "acc"),
    GlueTask("rte", "RTE", True, "sentence1", "sentence2", "label", _NLI2, ("acc",), "acc"),
    GlueTask("wnli", "WNLI", True, "sentence1", "sentence2", "label", _BIN, ("acc",), "acc"),
]}


def glue_task(task: str) -> GlueTask:
    key = task.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise XmxError(f"glue: unknown task {task!r}; valid: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


@dataclass(frozen=True)
class GlueExample:
    text_a: str
    text_b: str | None
    label: int | float  # class index into GlueTask.labels, or the STS-B score


def read_glue(root: str | os.PathLike, task: str, split: str = "train") -> list[GlueExample]:
    """Examples of ``<root>/<Task>/<split>.tsv``; ``split`` is ``train`` or one of the task's ``eval_splits``
    (``dev``; MNLI ``dev_matched``/``dev_mismatched``). A malformed row raises with its file and line number."""
    t = glue_task(task)
    valid = ("train",) + t.eval_splits
    if split not in valid:
        raise XmxError(f"glue: {t.folder} has no split {split!r}; valid: {', '.join(valid)}")
    path = Path(root).expanduser() / t.folder / f"{split}.tsv"
    if not path.is_file():
        raise XmxError(f"glue: file not found: {path}; point data.root at the folder holding {t.folder}/ "
                       f"(as written by the GLUE download script)")
    out: list[GlueExample] = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    start, cols = 0, {}
    if t.header:
        if not lines:
            raise XmxError(f"glue: {path}: empty file; expected a header row")
        header = lines[0].rstrip("\r").split("\t")
        cols = {name: i for i, name in enumerate(header)}
        for need in (t.text_a, t.text_b, t.label):
            if need is not None and need not in cols:
                raise XmxError(f"glue: {path}:1: header lacks column {need!r} (found {', '.join(header)}); "
                               f"is this the {t.folder} {split}.tsv of GLUE?")
        start = 1
    idx = {k: (cols[v] if isinstance(v, str) else v) for k, v in
           (("a", t.text_a), ("b", t.text_b), ("y", t.label)) if v is not None}
    width = max(idx.values()) + 1
    for n, line in enumerate(lines[start:], start=start + 1):
        row = line.rstrip("\r").split("\t")
        if len(row) < width:
            raise XmxError(f"glue: {path}:{n}: malformed row: expected at least {width} tab-separated columns, "
                           f"found {len(row)}; fix or remove the line")
        raw = row[idx["y"]].strip()
        if t.labels is None:
            try:
                label: int | float = float(raw)
            except ValueError:
                raise XmxError(f"glue: {path}:{n}: malformed row: score {raw!r} is not a number") from None
        else:
            if raw not in t.labels:
                raise XmxError(f"glue: {path}:{n}: malformed row: label {raw!r} is not one of "
                               f"{', '.join(t.labels)}")
            label = t.labels.index(raw)
        out.append(GlueExample(row[idx["a"]], row[idx["b"]] if "b" in idx else None, label))
    if not out:
        raise XmxError(f"glue: {path} has no examples")
    return out


# ---- Object colour (MemoryColor, ColorTerms) ----------------------------------------------------------------------
@dataclass(frozen=True)
class ColorItem:
    descriptor: str  # stripped of surrounding spaces; "" when the item has none
    item: str
    color: str


@dataclass(frozen=True)
class ColorDataset:
    name: str
    items: tuple[ColorItem, ...]
    colors: tuple[str, ...]  # sorted; the label set of the probe

    def label(self, item: ColorItem) -> int:
        return self.colors.index(item.color)


def _read_color_csv(path: Path, name: str, header: list[str], fields: tuple[str, str, str | None]) -> ColorDataset:
    if not path.is_file():
        raise XmxError(f"{name}: file not found: {path}")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [h.strip() for h in rows[0]] != header:
        raise XmxError(f"{name}: {path}:1: expected header {','.join(header)}, found "
                       f"{','.join(rows[0]) if rows else 'an empty file'}")
    item_i, color_i, desc_i = (header.index(c) if c else None for c in fields)
    items = []
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header) or not row[item_i].strip() or not row[color_i].strip():
            raise XmxError(f"{name}: {path}:{n}: malformed row {','.join(row)!r}; expected {','.join(header)}")
        desc = row[desc_i].strip() if desc_i is not None else ""
        items.append(ColorItem(desc, row[item_i].strip(), row[color_i].strip().lower()))
    if not items:
        raise XmxError(f"{name}: {path} has no items")
    return ColorDataset(name, tuple(items), tuple(sorted({it.color for it in items})))


def read_memory_color(path: str | os.PathLike | None = None) -> ColorDataset:
    """MemoryColor (109 items, 11 colours); the shipped copy unless ``path`` is given."""
    return _read_color_csv(Path(path) if path else OBJECT_COLOR_DIR / "memory_color.csv", "memory_color",
                           ["Index", "Descriptor", "Item", "Color"], ("Item", "Color", "Descriptor"))


def read_color_terms(path: str | os.PathLike | None = None) -> ColorDataset:
    """ColorTerms (52 items, 10 colours); the shipped copy unless ``path`` is given."""
    return _read_color_csv(Path(path) if path else OBJECT_COLOR_DIR / "color_terms.csv", "color_terms",
                           ["object", "color"], ("object", "color", None))


COLOR_DATASETS = {"memory_color": read_memory_color, "color_terms": read_color_terms}


def read_color_dataset(name: str, path: str | os.PathLike | None = None) -> ColorDataset:
    if name not in COLOR_DATASETS:
        raise XmxError(f"color probe: unknown dataset {name!r}; valid: {', '.join(COLOR_DATASETS)}")
    return COLOR_DATASETS[name](path)
