"""Export classification results in LAION CLIP_benchmark's format, so xmx numbers sit beside its tables.

One JSON per run and eval set, as ``clip_benchmark eval`` writes them::

    {"dataset": ..., "model": ..., "pretrained": ..., "task": ..., "language": "en",
     "metrics": {"acc1": 0.xx, "acc5": 0.xx, "mean_per_class_recall": 0.xx}, ...xmx fields}

(fractions, not percent; ``acc5`` is NaN below 5 classes, as CLIP_benchmark writes it), named
``{dataset}_{pretrained}_{model}_{language}_{task}_seed{seed}.json``, plus ``benchmark.csv``: the rows
``clip_benchmark build`` makes of such files (metrics flattened into columns, ``model_fullname = model + " " +
pretrained``). ``model`` is the open_clip architecture (or the transformers folder's name), ``pretrained`` the tag,
the checkpoint's file name, or ``random-init``; ``task`` is ``zeroshot_classification`` for zero-shot,
``linear_probe`` for the linear probe and ``fewshot_<method>`` for the adapters. Extra flat fields say which xmx run
it is (method, shots, seed, protocol, eval set, job id, results file). Runs written before top-5 and mean per-class
recall were recorded get them from their ``predictions.safetensors``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from xmx.errors import XmxError
from xmx.report.gather import find_results
from xmx.utils import atomic_write_bytes, atomic_write_text

LANGUAGE = "en"
FIXED = ("dataset", "model", "pretrained", "task", "language", "acc1", "acc5", "mean_per_class_recall",
         "model_fullname")


def _slug(s: str) -> str:
    return str(s).replace("/", "_").replace(" ", "_")


def _pretrained(w: dict) -> str:
    if w.get("random_init"):
        return "random-init"
    if w.get("tag"):
        return str(w["tag"])
    src = str(w.get("source") or w.get("file") or "")
    if src.startswith("open_clip:") and "/" in src:  # results from before tags were recorded separately
        return src.rsplit("/", 1)[1]
    return Path(src).name if src else "unknown"


def _task(method: str) -> str:
    if method == "zeroshot":
        return "zeroshot_classification"
    if method == "linear_probe":
        return "linear_probe"
    return f"fewshot_{method}"


def _dataset(rec: dict, eval_set: str) -> str:
    if eval_set == "test":
        return str(rec["dataset"])
    sub = eval_set[len("test_"):]
    return f"{rec['dataset']}/{sub}" if sub in ("base", "new") else sub


def _from_predictions(folder: Path, eval_set: str, classes: int) -> dict:
    """acc5 and mean per-class recall (percent) recomputed from the stored logits, with the run's own metrics."""
    from safetensors.torch import load_file

    from xmx.methods.base import classification_metrics
    f = folder / "predictions.safetensors"
    if not f.is_file():
        return {}
    preds = load_file(str(f))
    if f"{eval_set}/logits" not in preds:
        return {}
    logits, labels = preds[f"{eval_set}/logits"].float(), preds[f"{eval_set}/labels"].long()
    out = {}
    for key, metric in classification_metrics(max(classes, logits.shape[1])).items():
        metric.update(logits, labels)
        out[key] = 100.0 * float(metric.compute())
    return out


def clip_benchmark_records(rec: dict, folder: Path) -> list[dict]:
    """The CLIP_benchmark dumps of one results.json (one per classification eval set)."""
    metrics, w = rec.get("metrics") or {}, rec.get("weights") or {}
    splits = ((rec.get("data") or {}).get("splits") or {})
    out = []
    for key in sorted(metrics):
        if not key.endswith("/acc") or not key.startswith("test"):
            continue
        eval_set = key[:-len("/acc")]
        classes = int((splits.get(eval_set) or {}).get("classes") or 0)
        m = {k: metrics.get(f"{eval_set}/{k}") for k in ("acc", "acc5", "mean_per_class_recall")}
        if m["acc5"] is None or m["mean_per_class_recall"] is None:
            m = {**_from_predictions(folder, eval_set, classes), "acc": m["acc"]}
        acc5 = m.get("acc5")
        if classes and classes < 5:
            acc5 = None  # CLIP_benchmark reports top-5 only with at least 5 classes
        mpcr = m.get("mean_per_class_recall")
        out.append({
            "dataset": _dataset(rec, eval_set), "model": str(w.get("arch") or w.get("name") or "unknown"),
            "pretrained": _pretrained(w), "task": _task(str(rec.get("method"))),
            "metrics": {"acc1": float(m["acc"]) / 100.0,
                        "acc5": float("nan") if acc5 is None else float(acc5) / 100.0,
                        "mean_per_class_recall": float("nan") if mpcr is None else float(mpcr) / 100.0},
            "language": LANGUAGE,
            "method": rec.get("method"), "shots": rec.get("shots"), "seed": rec.get("seed"),
            "protocol": rec.get("protocol"), "eval_set": eval_set, "experiment": rec.get("experiment"),
            "random_init": bool(w.get("random_init")), "job_id": rec.get("job_id"),
            "results": str(folder / "results.json"),
        })
    return out


def _row(dump: dict) -> dict:
    """One row of ``clip_benchmark build``'s CSV."""
    row = dict(dump["metrics"])
    row.update({k: v for k, v in dump.items() if k != "metrics"})
    row["model_fullname"] = f"{row['model']} {row['pretrained']}"
    return row


def export_clip_benchmark(folders, out) -> dict:
    """Write the per-run JSON files and ``benchmark.csv`` under ``out``; returns {"files", "rows", "skipped"}."""
    out = Path(out)
    files, rows, skipped = [], [], []
    for path in find_results(folders):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            skipped.append((str(path), f"unreadable: {type(e).__name__}"))
            continue
        if rec.get("status") != "complete":
            skipped.append((str(path), f"status {rec.get('status')!r}"))
            continue
        dumps = clip_benchmark_records(rec, path.parent)
        if not dumps:
            skipped.append((str(path), "no test*/acc classification metric"))
        for d in dumps:
            name = (f"{_slug(d['dataset'])}_{_slug(d['pretrained'])}_{_slug(d['model'])}_{d['language']}_"
                    f"{d['task']}_seed{d['seed']}.json")
            if any(f.name == name for f in files):  # the same run twice (e.g. a rerun in another folder)
                name = name[:-len(".json")] + f"_{str(d['job_id'] or len(files))[:8]}.json"
            atomic_write_text(out / name, json.dumps(d))
            files.append(out / name)
            rows.append(_row(d))
    if not rows:
        raise XmxError(f"no classification results to export under {', '.join(map(str, folders))} "
                       f"({'; '.join(f'{p}: {r}' for p, r in skipped[:3])})")
    extra = sorted({k for r in rows for k in r} - set(FIXED))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*FIXED, *extra])
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    atomic_write_bytes(out / "benchmark.csv", buf.getvalue().encode())
    return {"files": [str(f) for f in files] + [str(out / "benchmark.csv")], "rows": rows, "skipped": skipped}
