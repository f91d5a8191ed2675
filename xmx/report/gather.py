"""Gather ``results.json`` files: find them, read them into runs, classify each into a table, find the swept
config keys, and turn runs into observations (one number per run × column)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pandas as pd

from xmx.errors import XmxError
from xmx.results import SCHEMA, SELECTION_MODES  # noqa: F401 - the one definition; SCHEMA offered here too
TABLES = ("fewshot", "base2new", "domain_shift", "cross_dataset", "glue", "colour")
TITLES = {"fewshot": "Few-shot classification", "base2new": "Base-to-new generalisation",
          "domain_shift": "Domain shift", "cross_dataset": "Cross-dataset transfer", "glue": "GLUE (dev)",
          "colour": "Colour probing"}
AVG = "average"  # the dataset name of the averages
# results.json "selection" (xmx.results.SELECTION_MODES) is part of every row's identity, so a mean never mixes val
# and paper; paper rows carry PAPER_MARK.
PAPER_MARK = "†"


def norm_name(s) -> str:
    """Lower-case alphanumerics only: 'Tip-Adapter-F' == 'tip_adapter_f'."""
    return re.sub(r"[^a-z0-9]", "", str(s).lower())


# Display names, in the papers' order; keys are every spelling xmx (or a user) may give a dataset.
_DATASETS = [
    ("ImageNet", ["imagenet"]), ("Caltech101", ["caltech101", "caltech"]),
    ("OxfordPets", ["oxford_pets", "pets"]), ("StanfordCars", ["stanford_cars", "cars"]),
    ("Flowers102", ["oxford_flowers", "flowers102", "flowers"]), ("Food101", ["food101", "food"]),
    ("FGVCAircraft", ["fgvc_aircraft", "aircraft", "fgvc"]), ("SUN397", ["sun397", "sun"]), ("DTD", ["dtd"]),
    ("EuroSAT", ["eurosat"]), ("UCF101", ["ucf101", "ucf"]),
    ("ImageNet-V2", ["imagenetv2", "imagenet_v2"]), ("ImageNet-Sketch", ["imagenet_sketch", "sketch"]),
    ("ImageNet-A", ["imagenet_a", "imagenet_adversarial"]), ("ImageNet-R", ["imagenet_r", "imagenet_rendition"]),
    ("CoLA", ["cola"]), ("SST-2", ["sst2"]), ("MRPC", ["mrpc"]), ("QQP", ["qqp"]), ("STS-B", ["stsb"]),
    ("MNLI", ["mnli"]), ("QNLI", ["qnli"]), ("RTE", ["rte"]), ("WNLI", ["wnli"]),
    ("MemoryColor", ["memorycolor", "memory_color"]), ("ColorTerms", ["colorterms", "color_terms"]),
]
_ALIAS = {norm_name(a): disp for disp, names in _DATASETS for a in [disp, *names]}
_ORDER = {disp: i for i, (disp, _) in enumerate(_DATASETS)}
IMAGENET_VARIANTS = {"ImageNet-V2", "ImageNet-Sketch", "ImageNet-A", "ImageNet-R"}
GLUE_TASKS = {"CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "QNLI", "RTE", "WNLI"}
COLOUR_SETS = {"MemoryColor", "ColorTerms"}
_METRIC_NAMES = {"acc": "acc", "accuracy": "acc", "mcc": "matthews", "matthews": "matthews",
                 "matthewscorrcoef": "matthews", "f1": "f1", "pearson": "pearson", "pearsonr": "pearson",
                 "spearman": "spearman", "spearmanr": "spearman"}


def dataset_name(name) -> str:
    """Canonical display name of a dataset (unknown names are kept as given)."""
    if str(name) == AVG:
        return AVG
    return _ALIAS.get(norm_name(name), str(name))


def dataset_order(name: str):
    return (name == AVG, _ORDER.get(name, len(_ORDER)), name)


def col_order(col: str):
    try:
        return (0, float(col), col)
    except ValueError:
        return (1, {"base": 0, "new": 1, "hm": 2, "score": 9}.get(col, 5), col)


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------
class _Skip(Exception):
    """A results.json that is not averaged; the message is the reason shown to the user."""


def find_results(folders) -> list[Path]:
    paths: list[Path] = []
    for folder in folders:
        folder = Path(folder).expanduser()
        if folder.is_file() and folder.name == "results.json":
            paths.append(folder)
            continue
        if not folder.is_dir():
            raise XmxError(f"{folder} is not a folder; pass Hydra output folders (a run, a multirun root or a tree "
                           "of them) that contain results.json files")
        if not os.access(folder, os.R_OK | os.X_OK):
            raise XmxError(f"cannot read folder {folder}; check its permissions")
        paths.extend(sorted(folder.rglob("results.json")))
    seen, out = set(), []
    for p in paths:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            out.append(p)
    if not out:
        raise XmxError(f"no results.json found under {', '.join(map(str, folders))}; pass the Hydra output "
                       "folders of finished runs (outputs/… or multirun/…)")
    return out


def _flatten(d, prefix="") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v, sort_keys=True)
        else:
            out[key] = v
    return out


def _backbone(rec: dict) -> str:
    """The PLM for the language track, else the CLIP architecture (results.json ``weights``)."""
    plm = (rec.get("config") or {}).get("plm")
    if isinstance(plm, dict):
        for k in ("name", "model_name", "pretrained", "model", "arch"):
            if isinstance(plm.get(k), str) and plm[k]:
                return Path(plm[k]).name if "/" in plm[k] and Path(plm[k]).is_absolute() else plm[k]
    w = rec.get("weights") or {}
    for k in ("arch", "name"):
        if isinstance(w.get(k), str) and w[k]:
            return w[k]
    return ""


def _finite(metrics: dict, key: str) -> float:
    if key not in metrics:
        raise _Skip(f"metrics has no {key!r} (has: {', '.join(sorted(metrics)) or 'none'})")
    try:
        v = float(metrics[key])
    except (TypeError, ValueError):
        raise _Skip(f"metric {key!r} is not a number: {metrics[key]!r}") from None
    if not math.isfinite(v):
        raise _Skip(f"metric {key!r} is {v}")
    return v


def _colour_targets(metrics: dict) -> list[str]:
    return [t for t in _targets(metrics) if dataset_name(t) in COLOUR_SETS]


def _classify(protocol: str, dataset: str, metrics: dict) -> str:
    p = norm_name(protocol)
    if dataset in GLUE_TASKS or "glue" in p:
        return "glue"
    if (dataset in COLOUR_SETS or "color" in p or "colour" in p or "color" in norm_name(dataset)
            or _colour_targets(metrics)):  # the colour probe's eval sets are not transfer targets
        return "colour"
    if "test_base/acc" in metrics or "test_new/acc" in metrics or ("base" in p and "new" in p):
        return "base2new"
    targets = _targets(metrics)
    if targets or "domain" in p or "cross" in p:
        if "domain" in p or (targets and all(dataset_name(t) in IMAGENET_VARIANTS for t in targets)):
            return "domain_shift"
        return "cross_dataset"
    return "fewshot"


def _targets(metrics: dict) -> list[str]:
    out = []
    for k in metrics:
        m = re.fullmatch(r"test_(.+)/acc", k)
        if m and m.group(1) not in ("base", "new"):
            out.append(m.group(1))
    return out


def _observations(table: str, dataset: str, metrics: dict) -> list[tuple[str, str, float]]:
    """(dataset, column, value) triples of one run."""
    if table == "fewshot":
        return [(dataset, None, _finite(metrics, "test/acc"))]  # column = shots, filled in by the caller
    if table == "base2new":
        return [(dataset, "base", _finite(metrics, "test_base/acc")), (dataset, "new", _finite(metrics, "test_new/acc"))]
    if table in ("domain_shift", "cross_dataset"):
        targets = _targets(metrics)
        if not targets:
            raise _Skip("a transfer run needs test_<target>/acc metrics")
        obs = [(dataset, dataset_name(t), _finite(metrics, f"test_{t}/acc")) for t in targets]
        if "test/acc" in metrics and dataset not in [o[1] for o in obs]:
            obs.insert(0, (dataset, dataset, _finite(metrics, "test/acc")))
        return obs
    if table == "colour":
        targets = _colour_targets(metrics)
        if targets:  # one run probing several sets (test_memory_color/acc, test_color_terms/acc)
            return [(dataset_name(t), "acc", _finite(metrics, f"test_{t}/acc")) for t in targets]
        key = "test/acc" if "test/acc" in metrics else "val/acc"
        return [(dataset, "acc", _finite(metrics, key))]
    # glue: every metric of the test eval sets, or of the validation sets when there are none
    for prefix in ("test", "val"):
        keys = [k for k in metrics if "/" in k and k.split("/", 1)[0].startswith(prefix)]
        if keys:
            break
    else:
        raise _Skip("a GLUE run needs test*/<metric> or val*/<metric> metrics")
    obs = []
    for k in sorted(keys):
        evalset, metric = k.split("/", 1)
        sub = evalset[len(prefix):].lstrip("_")
        name = _METRIC_NAMES.get(norm_name(metric), metric)
        obs.append((dataset, f"{sub}_{name}" if sub else name, _finite(metrics, k)))
    return obs


def caveat(rec: dict) -> str:
    """Why a run's numbers are not accuracies: random-init weights (CLIP or PLM) and/or synthetic data (the
    generated dataset, or a tree written by ``python -m xmx.data fake``); "" for a real run."""
    parts = []
    if any(isinstance(rec.get(k), dict) and rec[k].get("random_init") for k in ("weights", "weights_plm")):
        parts.append("random-init weights")
    data = rec.get("data") if isinstance(rec.get("data"), dict) else {}
    if data.get("synthetic") or norm_name(rec.get("dataset")) == "synthetic":
        parts.append("synthetic data")
    return " + ".join(parts)


CAVEAT_NOTE = ("**Not accuracies:** {n} of {total} runs use {what}; their rows are marked ⚠. Such numbers test the "
               "pipeline, they say nothing about the methods.")


def load_runs(paths) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read results.json files: (runs used, skipped runs with their reason)."""
    runs, skipped = [], []
    for path in paths:
        try:
            try:
                rec = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                raise _Skip(f"unreadable ({type(e).__name__}: {e})") from None
            except json.JSONDecodeError as e:
                raise _Skip(f"not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise _Skip("not a JSON object")
            schema = rec.get("schema")
            if schema is not None and schema != SCHEMA:
                raise _Skip(f"schema {schema!r} is not {SCHEMA!r}")
            if rec.get("status") != "complete":
                raise _Skip(f"status is {rec.get('status')!r}, not 'complete' (unfinished or failed run)")
            missing = [k for k in ("method", "dataset", "seed", "metrics") if rec.get(k) is None]
            if missing:
                raise _Skip(f"missing field(s) {', '.join(missing)}")
            metrics = rec["metrics"]
            if not isinstance(metrics, dict):
                raise _Skip("metrics is not an object")
            try:
                seed = int(rec["seed"])
                shots = int(rec["shots"]) if rec.get("shots") is not None else 0
            except (TypeError, ValueError):
                raise _Skip(f"seed/shots are not integers ({rec.get('seed')!r}, {rec.get('shots')!r})") from None
            dataset = dataset_name(rec["dataset"])
            protocol = str(rec.get("protocol") or "")
            selection = rec.get("selection") or (rec.get("config") or {}).get("selection") or "val"
            if selection not in SELECTION_MODES:
                raise _Skip(f"selection {selection!r} is not one of {', '.join(SELECTION_MODES)}")
            table = _classify(protocol, dataset, metrics)
            obs = _observations(table, dataset, metrics)
            if table == "fewshot":
                obs = [(d, str(shots), v) for d, _, v in obs]
            runs.append({"path": str(path), "mtime": Path(path).stat().st_mtime, "table": table,
                         "method": str(rec["method"]), "experiment": str(rec.get("experiment") or ""),
                         "backbone": _backbone(rec), "caveat": caveat(rec), "protocol": protocol,
                         "selection": selection, "dataset": dataset,
                         "shots": shots, "seed": seed, "obs": obs,
                         "cfg": _flatten(rec["config"]) if isinstance(rec.get("config"), dict) else {}})
        except _Skip as e:
            skipped.append({"path": str(path), "reason": str(e)})
    return pd.DataFrame(runs), pd.DataFrame(skipped, columns=["path", "reason"])


# ---------------------------------------------------------------------------------------------------------------
# sweeps: config keys that differ between otherwise identical runs
# ---------------------------------------------------------------------------------------------------------------
_IGNORE = re.compile(r"(^|\.)(hydra|paths|logger|loggers|callbacks|wandb)(\.|$)"
                     r"|(dir|path|file|root|timestamp|time|_id|run_name|seed)$")
GROUP = ["table", "method", "experiment", "backbone", "caveat", "protocol", "selection"]
CELL = ["dataset", "shots", "seed"]


def swept_keys(runs: pd.DataFrame, forced: list[str] = ()) -> dict[tuple, list[str]]:
    """Per (table, method, experiment, backbone, protocol): the config keys that vary between runs of one cell."""
    out = {}
    for gkey, g in runs.groupby(GROUP, sort=False):
        keys = set()
        for _, cell in g.groupby(CELL):
            if len(cell) < 2:
                continue
            cfgs = pd.DataFrame(list(cell["cfg"])).astype(str)
            keys |= {k for k in cfgs.columns if cfgs[k].nunique(dropna=False) > 1 and not _IGNORE.search(k)}
        present = set().union(*(c.keys() for c in g["cfg"]))
        keys |= {k for k in forced if k in present}
        out[gkey] = sorted(keys)
    return out


def fmt_value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def assign_variants(runs: pd.DataFrame, swept: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Add the ``variant`` column; drop older duplicates of the same run (returned as skipped)."""
    runs = runs.copy()
    runs["variant"] = [", ".join(f"{k}={fmt_value(r.cfg.get(k))}" for k in swept[tuple(getattr(r, g) for g in GROUP)])
                       for r in runs.itertuples()]
    runs = runs.sort_values("mtime", ascending=False, kind="stable")
    dup = runs.duplicated(GROUP + ["variant"] + CELL, keep="first")
    keep = runs[~dup]
    first = keep.set_index(GROUP + ["variant"] + CELL)["path"]
    skipped = [{"path": r.path, "reason": f"duplicate of the newer run {first.loc[tuple(getattr(r, c) for c in GROUP + ['variant'] + CELL)]}"}
               for r in runs[dup].itertuples()]
    return keep.sort_index(), pd.DataFrame(skipped, columns=["path", "reason"])


# ---------------------------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------------------------
ROW = ["table", "method", "experiment", "backbone", "caveat", "protocol", "selection", "variant", "rshots"]


def hm(b, n) -> float:
    return 2 * b * n / (b + n) if (b + n) else float("nan")


def label_rows(rows: pd.DataFrame) -> pd.Series:
    """Row labels: the method, plus whatever else tells two rows of one table apart."""
    labels = []
    for r in rows.itertuples():
        t = rows[rows.table == r.table]
        parts = [r.method]
        if t[t.method == r.method].experiment.nunique() > 1 and r.experiment:
            parts.append(f"({r.experiment})")
        if t.backbone.nunique() > 1 and r.backbone:
            parts.append(f"[{r.backbone}]")
        if t.protocol.nunique() > 1 and r.protocol:
            parts.append(f"<{r.protocol}>")
        if t.rshots.nunique() > 1 and r.rshots != "":
            parts.append(f"{r.rshots}-shot")
        if r.variant:
            parts.append(f"{{{r.variant}}}")
        if r.selection == "paper":
            parts.append(f"{PAPER_MARK} (selection: paper)")
        if r.caveat:
            parts.append(f"⚠ {r.caveat}")
        labels.append(" ".join(parts))
    return pd.Series(labels, index=rows.index)


def observations(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in runs.itertuples():
        rshots = "" if r.table == "fewshot" else str(r.shots)
        for dataset, column, value in r.obs:
            rows.append({"table": r.table, "method": r.method, "experiment": r.experiment, "backbone": r.backbone,
                         "caveat": r.caveat, "protocol": r.protocol, "selection": r.selection, "variant": r.variant,
                         "rshots": rshots, "dataset": dataset,
                         "column": column, "seed": r.seed, "value": value, "run": r.Index})
    return pd.DataFrame(rows)
