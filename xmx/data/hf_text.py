"""The language track's data from the Hugging Face Hub (``data.source: hf``), read with ``datasets``.

- GLUE: ``nyu-mll/glue``, one config per task (``sst2``, ``mnli``, ...), splits ``train`` / ``validation``
  (MNLI ``validation_matched`` / ``validation_mismatched``).
- WikiText-103: ``Salesforce/wikitext``, config ``wikitext-103-raw-v1``: one row per line of the raw files.
- COCO captions, Karpathy splits: ``yerevann/coco-karpathy`` (``train`` / ``validation`` / ``test``; one row per
  image with its ``sentences``, ``filepath`` ``train2014|val2014``, ``filename`` and ``cocoid``).

``data.hf.path`` is the repository id (the default), or a local folder holding the repository's parquet files in the
Hub's layout (``<config>/<split>-*.parquet``, or ``data/<split>-*.parquet`` without a config) for machines without
network. ``data.hf.revision`` pins the commit; ``datasets`` serves repeated loads from its cache and honours
``HF_DATASETS_OFFLINE=1`` (cache only). Rows become the same examples the file readers of :mod:`xmx.data.text` give
(GLUE labels as the TSV files' label indices, WikiText paragraphs with the same filter), so either source feeds the
same DataModules.
"""

from __future__ import annotations

import os
from pathlib import Path

from xmx.data.text import Caption, GlueExample, glue_task, wikitext_paragraphs
from xmx.errors import XmxError

HUB = {"glue": "nyu-mll/glue", "wikitext103": "Salesforce/wikitext", "coco_captions": "yerevann/coco-karpathy"}
WIKITEXT_CONFIG = "wikitext-103-raw-v1"

# nyu-mll/glue: text columns and the ClassLabel names of each config (the label ints follow these names)
GLUE_HF = {
    "cola": (("sentence", None), ("unacceptable", "acceptable")),
    "sst2": (("sentence", None), ("negative", "positive")),
    "mrpc": (("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
    "qqp": (("question1", "question2"), ("not_duplicate", "duplicate")),
    "stsb": (("sentence1", "sentence2"), None),
    "mnli": (("premise", "hypothesis"), ("entailment", "neutral", "contradiction")),
    "qnli": (("question", "sentence"), ("entailment", "not_entailment")),
    "rte": (("sentence1", "sentence2"), ("entailment", "not_entailment")),
    "wnli": (("sentence1", "sentence2"), ("not_entailment", "entailment")),
}
# the TSV files' label strings for each HF ClassLabel name (GLUE's own files write 0/1 for these tasks)
_TSV_OF = {"unacceptable": "0", "acceptable": "1", "negative": "0", "positive": "1", "not_equivalent": "0",
           "equivalent": "1", "not_duplicate": "0", "duplicate": "1"}
_WNLI_TSV = {"not_entailment": "0", "entailment": "1"}
GLUE_SPLIT = {"train": "train", "dev": "validation", "dev_matched": "validation_matched",
              "dev_mismatched": "validation_mismatched"}


def load_rows(path: str, config: str | None, split: str, revision: str | None):
    """A ``datasets.Dataset``: ``split`` of ``config`` from the Hub repository ``path`` at ``revision``, or from the
    parquet files of a local folder in the Hub's layout."""
    import datasets
    local = Path(os.path.expanduser(path))
    try:
        if local.is_dir():
            sub = local / (config or "data")
            pattern = str(sub / f"{split}-*.parquet")
            if not list(sub.glob(f"{split}-*.parquet")):
                raise XmxError(f"data.hf.path: no {pattern} (a local copy of the Hub repository's parquet files)")
            return datasets.load_dataset("parquet", data_files={split: pattern}, split=split)
        return datasets.load_dataset(path, config, split=split, revision=revision)
    except XmxError:
        raise
    except Exception as e:  # offline without a cache, unknown repo/config/split, unreachable endpoint
        msg = " ".join(str(e).split())[:240]
        raise XmxError(f"data.source=hf: cannot load {path} ({config or 'default'}, {split}) at revision "
                       f"{revision}: {type(e).__name__}: {msg}; set data.hf.path to a local folder of the parquet "
                       "files, or data.source=files") from None


def read_glue_hf(path: str, task: str, split: str = "train", revision: str | None = None) -> list[GlueExample]:
    t = glue_task(task)
    valid = ("train",) + t.eval_splits
    if split not in valid:
        raise XmxError(f"glue: {t.folder} has no split {split!r}; valid: {', '.join(valid)}")
    (col_a, col_b), names = GLUE_HF[t.name]
    rows = load_rows(path, t.name, GLUE_SPLIT[split], revision)
    out = []
    for r in rows:
        y = r["label"]
        if names is None:
            label: int | float = float(y)
        else:
            name = names[int(y)]
            tsv = name if t.name in ("mnli", "qnli", "rte") else (_WNLI_TSV if t.name == "wnli" else _TSV_OF)[name]
            label = t.labels.index(tsv)
        out.append(GlueExample(r[col_a], r[col_b] if col_b else None, label))
    if not out:
        raise XmxError(f"glue: {path} {t.name} {split} has no examples")
    return out


def read_wikitext_hf(path: str, split: str = "train", revision: str | None = None,
                     drop_headings: bool = True) -> list[str]:
    hf_split = {"train": "train", "valid": "validation", "test": "test"}.get(split)
    if hf_split is None:
        raise XmxError(f"wikitext: unknown split {split!r}; valid: train, valid, test")
    rows = load_rows(path, WIKITEXT_CONFIG, hf_split, revision)
    return wikitext_paragraphs(rows["text"], drop_headings)


KARPATHY_SPLITS = ("train", "validation", "test")


def read_coco_karpathy_hf(path: str, split: str = "train", revision: str | None = None) -> list[Caption]:
    """Every caption of Karpathy's ``split``: ``Caption(cocoid, "<train2014|val2014>/<file name>", text)``."""
    if split not in KARPATHY_SPLITS:
        raise XmxError(f"coco (hf): unknown Karpathy split {split!r}; valid: {', '.join(KARPATHY_SPLITS)}")
    rows = load_rows(path, None, split, revision)
    out = []
    for r in rows:
        for s in r["sentences"]:
            out.append(Caption(int(r["cocoid"]), f"{r['filepath']}/{r['filename']}", " ".join(str(s).split())))
    return out
