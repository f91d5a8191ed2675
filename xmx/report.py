"""Gather ``results.json`` files into the papers' tables (Markdown, CSV, optional LaTeX) and plots.

    python -m xmx.report outputs/ multirun/2026-01-01/ [--out report] [--seeds 1,2,3] [--param method.lam]
                         [--references my_refs.yaml] [--compare] [--latex] [--no-plots]

Folders are searched recursively for ``results.json`` (a single run, a multirun root, or a tree of them). Which table
a run belongs to follows from its ``protocol``, ``dataset`` and metric names (never from its method), so a new method
shows up without any change here:

- ``fewshot``: ``metrics["test/acc"]`` per dataset × shots;
- ``base2new``: ``metrics["test_base/acc"]`` and ``["test_new/acc"]``; HM is computed here from mean base and new;
- ``domain_shift`` / ``cross_dataset``: ``test/acc`` on the source and ``test_<target>/acc`` per target (domain shift
  when the protocol says so or every target is an ImageNet variant);
- ``glue``: every ``test*/<metric>`` (``val*/`` when the run logged no test metrics) of a GLUE task;
- ``colour``: ``test/acc`` (or ``val/acc``) on MemoryColor / ColorTerms.

Rows are methods (results.json ``method``), split further by experiment, backbone, protocol, and by the config keys
that were swept: keys of the resolved configs that differ between runs sharing method, experiment, dataset, shots and
seed. Cells are mean ± sample std (ddof 1) over seeds; a cell with fewer seeds than expected is marked.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from xmx.errors import XmxError
from xmx.utils import atomic_write_bytes

SCHEMA = "xmx.results/1"
TABLES = ("fewshot", "base2new", "domain_shift", "cross_dataset", "glue", "colour")
TITLES = {"fewshot": "Few-shot classification", "base2new": "Base-to-new generalisation",
          "domain_shift": "Domain shift", "cross_dataset": "Cross-dataset transfer", "glue": "GLUE (dev)",
          "colour": "Colour probing"}
AVG = "average"  # the dataset name of the averages


def _norm(s) -> str:
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
_ALIAS = {_norm(a): disp for disp, names in _DATASETS for a in [disp, *names]}
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
    return _ALIAS.get(_norm(name), str(name))


def _dataset_order(name: str):
    return (name == AVG, _ORDER.get(name, len(_ORDER)), name)


def _col_order(col: str):
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


def _classify(protocol: str, dataset: str, metrics: dict) -> str:
    p = _norm(protocol)
    if dataset in GLUE_TASKS or "glue" in p:
        return "glue"
    if dataset in COLOUR_SETS or "color" in p or "colour" in p:
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
        name = _METRIC_NAMES.get(_norm(metric), metric)
        obs.append((dataset, f"{sub}_{name}" if sub else name, _finite(metrics, k)))
    return obs


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
            table = _classify(protocol, dataset, metrics)
            obs = _observations(table, dataset, metrics)
            if table == "fewshot":
                obs = [(d, str(shots), v) for d, _, v in obs]
            runs.append({"path": str(path), "mtime": Path(path).stat().st_mtime, "table": table,
                         "method": str(rec["method"]), "experiment": str(rec.get("experiment") or ""),
                         "backbone": _backbone(rec), "protocol": protocol, "dataset": dataset,
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
GROUP = ["table", "method", "experiment", "backbone", "protocol"]
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


def _fmt_value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _assign_variants(runs: pd.DataFrame, swept: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Add the ``variant`` column; drop older duplicates of the same run (returned as skipped)."""
    runs = runs.copy()
    runs["variant"] = [", ".join(f"{k}={_fmt_value(r.cfg.get(k))}" for k in swept[tuple(getattr(r, g) for g in GROUP)])
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
ROW = ["table", "method", "experiment", "backbone", "protocol", "variant", "rshots"]


def hm(b, n) -> float:
    return 2 * b * n / (b + n) if (b + n) else float("nan")


def _label_rows(rows: pd.DataFrame) -> pd.Series:
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
        labels.append(" ".join(parts))
    return pd.Series(labels, index=rows.index)


def observations(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for r in runs.itertuples():
        rshots = "" if r.table == "fewshot" else str(r.shots)
        for dataset, column, value in r.obs:
            rows.append({"table": r.table, "method": r.method, "experiment": r.experiment, "backbone": r.backbone,
                         "protocol": r.protocol, "variant": r.variant, "rshots": rshots, "dataset": dataset,
                         "column": column, "seed": r.seed, "value": value, "run": r.Index})
    return pd.DataFrame(rows)


def _seeds_str(seeds) -> str:
    return ",".join(str(s) for s in sorted(seeds))


def aggregate(obs: pd.DataFrame, expected_seeds: list[int] | None = None) -> pd.DataFrame:
    """Tidy cells: one row per (row, dataset, column) with mean, std, seeds and completeness, plus the averages."""
    exp = obs.groupby(ROW, dropna=False)["seed"].agg(lambda s: sorted(set(s)) if expected_seeds is None
                                                      else sorted(expected_seeds)).rename("expected")
    cells = (obs.groupby(ROW + ["dataset", "column"], dropna=False)
             .agg(mean=("value", "mean"), std=("value", "std"), n_seeds=("seed", "nunique"),
                  seeds=("seed", lambda s: sorted(set(s))))
             .reset_index().join(exp, on=ROW))
    cells["complete"] = [set(e) <= set(s) for s, e in zip(cells.seeds, cells.expected)]
    cells["expected_seeds"] = cells.expected.map(len)
    cells["n_datasets"] = np.nan
    cells["expected_datasets"] = np.nan
    parts = [cells]

    # base-to-new: HM per dataset from the seed means of base and new
    b2n = cells[cells.table == "base2new"]
    if len(b2n):
        w = b2n.pivot_table(index=ROW + ["dataset"], columns="column", values=["mean", "n_seeds", "complete"],
                            aggfunc="first")
        h = pd.DataFrame({"mean": [hm(b, n) for b, n in zip(w["mean"]["base"], w["mean"]["new"])],
                          "n_seeds": np.minimum(w["n_seeds"]["base"], w["n_seeds"]["new"]),
                          "complete": w["complete"]["base"].astype(bool) & w["complete"]["new"].astype(bool)},
                         index=w.index).reset_index()
        h["column"], h["std"] = "hm", np.nan
        h = h.join(exp, on=ROW)
        h["expected_seeds"] = h.expected.map(len)
        parts.append(h)

    # averages over datasets (few-shot, base-to-new, GLUE) or over targets (transfer tables)
    for table in TABLES:
        t = cells[cells.table == table]
        if not len(t) or table == "colour":
            continue
        if table in ("domain_shift", "cross_dataset"):
            t = t[t.column != t.dataset]  # the average is over the targets, not the source
            over, keys, avg = "column", ["dataset"], lambda d: d.assign(column=AVG)
        elif table == "glue":
            # one score per task (the mean of its metrics), then the mean over tasks
            t = (t.groupby(ROW + ["dataset"], dropna=False)
                 .agg(mean=("mean", "mean"), complete=("complete", "all"), n_seeds=("n_seeds", "min"))
                 .reset_index().assign(column="score"))
            over, keys, avg = "dataset", ["column"], lambda d: d.assign(dataset=AVG)
        else:
            over, keys, avg = "dataset", ["column"], lambda d: d.assign(dataset=AVG)
        t_obs = obs[obs.table == table]
        # expected datasets: every dataset of the table (at any shot count); expected targets: those of the source
        expected_over = t.groupby(keys)[over].agg(lambda s: set(s))
        if over == "dataset":
            expected_over = expected_over.map(lambda _: set(t.dataset))
        a = (t.groupby(ROW + keys, dropna=False)
             .agg(mean=("mean", "mean"), n_seeds=("n_seeds", "min"), complete=("complete", "all"),
                  n_datasets=(over, "nunique"), have=(over, lambda s: set(s)))
             .reset_index())
        a["expected_datasets"] = [len(expected_over[tuple(k)] if len(keys) > 1 else expected_over[k[0]])
                                  for k in a[keys].itertuples(index=False)]
        a["complete"] = a.complete & (a.n_datasets == a.expected_datasets)
        # std over seeds of the per-seed average, where a seed covers every expected dataset
        if table != "glue":
            std = []
            for r in a.itertuples():
                sel = t_obs
                for k in ROW + keys:
                    sel = sel[sel[k] == getattr(r, k)]
                if table in ("domain_shift", "cross_dataset"):
                    sel = sel[sel.column != sel.dataset]
                ps = sel.pivot_table(index="seed", columns=over, values="value", aggfunc="mean")
                ps = ps.reindex(columns=sorted(expected_over[getattr(r, keys[0])])).dropna()
                std.append(ps.mean(axis=1).std() if len(ps) > 1 else np.nan)
            a["std"] = std
        else:
            a["std"] = np.nan
        a = avg(a.drop(columns="have")).join(exp, on=ROW)
        a["expected_seeds"] = a.expected.map(len)
        parts.append(a)
        if table == "base2new":
            w = a.pivot_table(index=ROW, columns="column", values=["mean", "complete", "n_seeds", "n_datasets",
                                                                   "expected_datasets"], aggfunc="first")
            h = pd.DataFrame({"mean": [hm(b, n) for b, n in zip(w["mean"]["base"], w["mean"]["new"])],
                              "complete": w["complete"]["base"].astype(bool) & w["complete"]["new"].astype(bool),
                              "n_seeds": np.minimum(w["n_seeds"]["base"], w["n_seeds"]["new"]),
                              "n_datasets": np.minimum(w["n_datasets"]["base"], w["n_datasets"]["new"]),
                              "expected_datasets": w["expected_datasets"]["base"]}, index=w.index).reset_index()
            h = h.assign(dataset=AVG, column="hm", std=np.nan).join(exp, on=ROW)
            h["expected_seeds"] = h.expected.map(len)
            parts.append(h)

    out = pd.concat(parts, ignore_index=True)
    out["seeds"] = [_seeds_str(s) if isinstance(s, (list, set)) else "" for s in out.seeds]
    out["expected"] = out.expected.map(_seeds_str)
    out["complete"] = out.complete.astype(bool)
    out["n_seeds"] = out.n_seeds.astype(int)
    rows = out[ROW].drop_duplicates()
    out = out.merge(rows.assign(label=_label_rows(rows)), on=ROW, how="left")
    out["text"] = [_cell_text(r) for r in out.itertuples()]
    out["sort_d"] = out.dataset.map(_dataset_order)
    out["sort_c"] = out.column.map(_col_order)
    out = out.sort_values(["table", "label", "sort_d", "sort_c"]).drop(columns=["sort_d", "sort_c"])
    cols = ["table", "label", "method", "experiment", "backbone", "protocol", "variant", "rshots", "dataset", "column",
            "mean", "std", "n_seeds", "expected_seeds", "seeds", "expected", "complete", "n_datasets",
            "expected_datasets", "text"]
    return out[cols].rename(columns={"rshots": "shots"}).reset_index(drop=True)


def _cell_text(r) -> str:
    s = f"{r.mean:.2f}"
    if isinstance(r.std, float) and math.isfinite(r.std):
        s += f" ± {r.std:.2f}"
    notes = []
    if isinstance(r.n_datasets, float) and math.isfinite(r.n_datasets) and r.n_datasets < r.expected_datasets:
        notes.append(f"{int(r.n_datasets)}/{int(r.expected_datasets)} datasets")
    if r.n_seeds < r.expected_seeds:
        notes.append(f"{int(r.n_seeds)}/{int(r.expected_seeds)} seeds")
    elif not r.complete and not notes:
        notes.append("incomplete")
    return s + (f" ({', '.join(notes)})" if notes else "")


# ---------------------------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------------------------
REF_FIELDS = ("table", "method", "dataset", "column", "value", "source")


def load_references(path=None) -> pd.DataFrame:
    """The shipped references (``xmx/references.yaml``), or a user file (YAML or CSV) of the same form."""
    if path is None:
        text, where = resources.files("xmx").joinpath("references.yaml").read_text(encoding="utf-8"), "xmx/references.yaml"
    else:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise XmxError(f"cannot read reference file {path} ({e.strerror}); pass an existing YAML or CSV file") from None
    try:
        if where.endswith(".csv"):
            entries = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False).to_dict("records")
            for e in entries:
                for k in ("aliases", "backbone"):
                    e[k] = [x for x in str(e.get(k, "")).split("|") if x]
        else:
            data = yaml.safe_load(text)
            entries = data.get("references") if isinstance(data, dict) else data
    except (yaml.YAMLError, pd.errors.ParserError, ValueError) as e:
        raise XmxError(f"reference file {where} is malformed ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(entries, list):
        raise XmxError(f"reference file {where} must hold a list of entries (or 'references: [...]') with fields "
                       f"{', '.join(REF_FIELDS)}")
    rows = []
    for i, e in enumerate(entries):
        missing = [k for k in REF_FIELDS if not isinstance(e, dict) or e.get(k) in (None, "")]
        if missing:
            raise XmxError(f"reference file {where}, entry {i + 1}: missing {', '.join(missing)}; every entry needs "
                           f"{', '.join(REF_FIELDS)}")
        if e["table"] not in TABLES:
            raise XmxError(f"reference file {where}, entry {i + 1}: table {e['table']!r} is not one of {', '.join(TABLES)}")
        try:
            value = float(e["value"])
        except (TypeError, ValueError):
            raise XmxError(f"reference file {where}, entry {i + 1}: value {e['value']!r} is not a number") from None
        aliases, bb = e.get("aliases") or [], e.get("backbone") or []
        rows.append({"table": e["table"], "method": str(e["method"]),
                     "methods": {_norm(m) for m in [e["method"], *([aliases] if isinstance(aliases, str) else aliases)]},
                     "backbones": {_bb(b) for b in ([bb] if isinstance(bb, str) else bb)},
                     "dataset": dataset_name(e["dataset"]), "column": str(e["column"]), "value": value,
                     "source": str(e["source"]),
                     "n_datasets": int(e["n_datasets"]) if str(e.get("n_datasets") or "").strip() else None})
    return pd.DataFrame(rows)


def _bb(name) -> str:
    return _norm(name).replace("quickgelu", "")


def compare(cells: pd.DataFrame, refs: pd.DataFrame) -> pd.DataFrame:
    """Each cell that has a reference, with ours − reference and the reference's label."""
    rows = []
    for c in cells.itertuples():
        for r in refs.itertuples():
            if (r.table == c.table and _norm(c.method) in r.methods and r.dataset == c.dataset
                    and r.column in ("*", c.column)
                    and (not r.backbones or not c.backbone or _bb(c.backbone) in r.backbones)):
                note = ""
                if c.dataset == AVG and r.n_datasets and not pd.isna(r.n_datasets) and c.n_datasets != r.n_datasets:
                    note = f"ours averages {int(c.n_datasets)} datasets, the reference {int(r.n_datasets)}"
                rows.append({"table": c.table, "label": c.label, "dataset": c.dataset, "column": c.column,
                             "ours": c.mean, "reference": r.value, "diff": c.mean - r.value, "source": r.source,
                             "ours_text": c.text, "complete": c.complete, "note": note})
    return pd.DataFrame(rows, columns=["table", "label", "dataset", "column", "ours", "reference", "diff", "source",
                                       "ours_text", "complete", "note"])


# ---------------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------------
def _wide(cells: pd.DataFrame, columns: str, index="label", rename=None, by_dataset=False) -> pd.DataFrame:
    w = cells.pivot_table(index=index, columns=columns, values="text", aggfunc="first").fillna("–")
    if columns == "dataset" or by_dataset:
        order = sorted(w.columns, key=_dataset_order)
    else:
        order = sorted(w.columns, key=_col_order)
    w = w[order]
    w.columns = [(rename or {}).get(c, "Average" if c == AVG else c) for c in w.columns]
    w.columns.name, w.index.name = None, "method"
    return w


def build_tables(cells: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(file stem, title, wide table of cell texts), in the papers' layouts."""
    out = []
    fs = cells[cells.table == "fewshot"]
    if len(fs):
        w = _wide(fs[fs.dataset == AVG], "column")
        w.columns = [f"{c} shots" for c in w.columns]
        nd = int(fs[fs.dataset == AVG].expected_datasets.max())
        out.append(("fewshot_average", f"Few-shot: mean accuracy (%) over {nd} datasets", w))
        for shots in sorted(fs.column.unique(), key=_col_order):
            out.append((f"fewshot_{shots}shot", f"Few-shot: {shots} shots, test accuracy (%)",
                        _wide(fs[fs.column == shots], "dataset")))
    b2n = cells[cells.table == "base2new"]
    if len(b2n):
        names = {"base": "Base", "new": "New", "hm": "HM"}
        for d in sorted(b2n.dataset.unique(), key=lambda x: (x != AVG, _dataset_order(x))):
            n = int(b2n[b2n.dataset == AVG].expected_datasets.max()) if d == AVG else 0
            title = f"Base-to-new: average over {n} datasets" if d == AVG else f"Base-to-new: {d}"
            out.append((f"base2new_{_slug(d)}", title, _wide(b2n[b2n.dataset == d], "column", rename=names)))
    for table in ("domain_shift", "cross_dataset"):
        t = cells[cells.table == table]
        for src in sorted(t.dataset.unique(), key=_dataset_order):
            s = t[t.dataset == src]
            w = _wide(s, "column", by_dataset=True)
            cols = [src] + [c for c in w.columns if c not in (src, "Average")] + ["Average"]
            w = w[[c for c in cols if c in w.columns]]
            w.columns = [f"{c} (source)" if c == src else c for c in w.columns]
            out.append((f"{table}_{_slug(src)}", f"{TITLES[table]}: {src} → targets, test accuracy (%)", w))
    g = cells[cells.table == "glue"]
    if len(g):
        g = g.assign(key=[("GLUE score" if d == AVG else f"{d} {c}") for d, c in zip(g.dataset, g.column)],
                     order=[(_dataset_order(d), _col_order(c)) for d, c in zip(g.dataset, g.column)])
        keys = list(dict.fromkeys(g.sort_values("order").key))
        w = g.pivot_table(index="label", columns="key", values="text", aggfunc="first").fillna("–")[keys]
        w.columns.name, w.index.name = None, "method"
        out.append(("glue", "GLUE dev set (per task, standard metrics; score = mean over tasks of each task's mean)", w))
    c = cells[cells.table == "colour"]
    if len(c):
        out.append(("colour", "Colour probing: zero-shot accuracy (%)", _wide(c, "dataset")))
    return out


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", str(s)).strip("_").lower() or "x"


def _md(s) -> str:
    return str(s).replace("|", "\\|")


def markdown_table(df: pd.DataFrame) -> str:
    head = [df.index.name or ""] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(map(_md, head)) + " |", "|" + "|".join(["---"] + ["---:"] * len(df.columns)) + "|"]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([_md(idx)] + [_md(v) for v in row]) + " |")
    return "\n".join(lines)


def _tex(s) -> str:
    s = str(s)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("{", r"\{"), ("}", r"\}"), ("±", r"$\pm$"), ("→", r"$\to$"), ("–", "--"), ("†", r"$^\dagger$")):
        s = s.replace(a, b)
    return s


def latex_table(df: pd.DataFrame, title: str) -> str:
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(title)}}}", r"\small",
             r"\begin{tabular}{l" + "r" * len(df.columns) + "}", r"\toprule",
             " & ".join(_tex(c) for c in [df.index.name or "", *df.columns]) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex(v) for v in [idx, *row]) + r" \\" for idx, row in df.iterrows()]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def plot_fewshot(cells: pd.DataFrame, refs: pd.DataFrame | None) -> dict[str, bytes]:
    """Accuracy vs shots, one figure per dataset (and the average), one line per method row."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fs = cells[cells.table == "fewshot"]
    out = {}
    if not len(fs):
        return out
    # a row measured at 0 shots only (zero-shot) is drawn as a horizontal line, so 0 gets no tick of its own
    only0 = fs.groupby("label").column.agg(lambda c: set(c) == {"0"})
    shots = sorted(fs.column.unique(), key=_col_order)
    if "0" in shots and len(shots) > 1 and not (~only0[fs[fs.column == "0"].label.unique()]).any():
        shots.remove("0")
    pos = {s: i for i, s in enumerate(shots)}
    for d in sorted(fs.dataset.unique(), key=_dataset_order):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for label, g in fs[fs.dataset == d].groupby("label"):
            g = g.sort_values("column", key=lambda c: c.map(_col_order))
            if only0[label] and "0" not in pos:
                ax.axhline(g["mean"].iloc[0], ls=":", color="gray", label=label)
                continue
            ax.errorbar([pos[c] for c in g.column], g["mean"], yerr=g["std"].fillna(0), marker="o", capsize=3,
                        label=label)
        if d == AVG and refs is not None and len(refs):
            bbs = {_bb(b) for b in fs.backbone if b}
            for (m, src), r in refs[(refs.table == "fewshot") & (refs.dataset == AVG)].groupby(["method", "source"]):
                r = r[[not rb or not bbs or bool(rb & bbs) for rb in r.backbones]]
                if r.empty:
                    continue
                if (r.column == "*").any():
                    ax.axhline(r.value.iloc[0], ls="--", lw=0.8, color="black", alpha=0.5, label=f"{m} (ref)")
                    continue
                r = r[r.column.isin(pos)].sort_values("column", key=lambda c: c.map(_col_order))
                if len(r):
                    ax.plot([pos[c] for c in r.column], r.value, ls="--", marker="x", alpha=0.6, label=f"{m} (ref)")
        ax.set_xticks(range(len(shots)), shots)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Average over datasets" if d == AVG else d)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        out[f"fewshot_{_slug(d)}.png"] = _png(fig)
    return out


def plot_sweeps(runs: pd.DataFrame, obs: pd.DataFrame, swept: dict, params: list[str]) -> dict[str, bytes]:
    """Metric vs each swept config key (or the --param keys): one figure per method group and key."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = {}
    for gkey, keys in swept.items():
        keys = [k for k in keys if not params or k in params]
        if not keys:
            continue
        sel = runs
        for c, v in zip(GROUP, gkey):
            sel = sel[sel[c] == v]
        o = obs[obs.run.isin(sel.index)]
        for key in keys:
            xs = {i: sel.cfg[i].get(key) for i in sel.index}
            xs = {i: v for i, v in xs.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
            if len({json.dumps(v, sort_keys=True, default=str) for v in xs.values()}) < 2:
                continue
            o = obs[obs.run.isin(list(xs))]
            others = {i: ", ".join(f"{k}={_fmt_value(sel.cfg[i].get(k))}" for k in swept[gkey] if k != key)
                      for i in xs}
            d = o.assign(x=o.run.map(xs), other=o.run.map(others), xkey=o.run.map(lambda i: str(xs[i])))
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs.values())
            agg = (d.groupby(["dataset", "column", "other", "xkey"])
                   .agg(x=("x", "first"), mean=("value", "mean"), std=("value", "std")).reset_index())
            if gkey[0] == "base2new":  # HM from mean base and new at each point
                w = agg.pivot_table(index=["dataset", "other", "xkey", "x"], columns="column", values="mean").reset_index()
                if {"base", "new"} <= set(w.columns):
                    agg = pd.concat([agg, w.assign(column="hm", mean=[hm(b, n) for b, n in zip(w.base, w.new)],
                                                   std=np.nan)[agg.columns]], ignore_index=True)
            # only the lines that were actually swept (two or more values of the key)
            agg = agg[agg.groupby(["dataset", "column", "other"]).xkey.transform("nunique") > 1]
            if agg.empty:
                continue
            cats = sorted(agg.xkey.unique(), key=lambda s: (float(s) if numeric else 0, s))
            fig, ax = plt.subplots(figsize=(5.5, 4))
            for (ds, col, other), g in agg.groupby(["dataset", "column", "other"]):
                g = g.assign(p=g.x.astype(float) if numeric else g.xkey.map(cats.index)).sort_values("p")
                name = " ".join(p for p in [ds, "" if col == ds else (f"{col}-shot" if col.isdigit() else col),
                                            f"{{{other}}}" if other else ""] if p)
                ax.errorbar(g.p, g["mean"], yerr=g["std"].fillna(0), marker="o", capsize=3, label=name)
            if not numeric:
                ax.set_xticks(range(len(cats)), cats)
            ax.set_xlabel(key)
            ax.set_ylabel("metric (%)")
            ax.set_title(" ".join(p for p in [gkey[1], f"({gkey[2]})" if gkey[2] else "", gkey[0]] if p))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
            out[f"sweep_{_slug(gkey[0])}_{_slug(gkey[1])}_{_slug(gkey[2])}_{_slug(key)}.png"] = _png(fig)
    return out


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
NOTES = ("Cells are mean ± sample std (ddof 1) over seeds. A cell marked '(n/m seeds)' has fewer seeds than expected "
         "(expected: {expected}); '(k/n datasets)' marks an average that lacks datasets the table has elsewhere. "
         "Averages over datasets are means of the per-dataset means; base-to-new HM = 2BN/(B+N) is computed from the "
         "mean base and new accuracies.")


def _parse_seeds(s: str | None) -> list[int] | None:
    if not s:
        return None
    try:
        return sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise XmxError(f"--seeds {s!r}: give comma-separated integers, e.g. --seeds 1,2,3") from None


def build_report(folders, out="report", seeds=None, params=(), references=(), do_compare=False, latex=False,
                 plots=True) -> dict:
    """Read, aggregate and write everything; returns what was produced (for the CLI and tests)."""
    paths = find_results(folders)
    runs, skipped = load_runs(paths)
    if runs.empty:
        reasons = "; ".join(f"{p}: {r}" for p, r in skipped.head(3).itertuples(index=False))
        raise XmxError(f"none of the {len(paths)} results.json files can be used ({reasons}); re-run the "
                       "unfinished runs or pass other folders")
    present = set().union(*(c.keys() for c in runs.cfg))
    for p in params:
        if p not in present:
            raise XmxError(f"--param {p}: no run's resolved config has this key; pass a dotted key of the config, "
                           "e.g. method.lam")
    swept = swept_keys(runs, params)
    runs, dups = _assign_variants(runs, swept)
    skipped = pd.concat([skipped, dups], ignore_index=True)
    obs = observations(runs)
    cells = aggregate(obs, seeds)
    refs = pd.concat([load_references()] + [load_references(r) for r in references], ignore_index=True)
    tables = build_tables(cells)
    cmp = compare(cells, refs) if do_compare else None

    out = Path(out)
    files: dict[str, bytes] = {}
    md = ["# xmx report", "",
          f"{len(runs)} runs from {len(paths)} results.json files under {', '.join(map(str, folders))}; "
          f"{len(skipped)} skipped.", "",
          NOTES.format(expected=("--seeds " + ",".join(map(str, seeds))) if seeds
                       else "the union of the seeds seen for that row"), ""]
    tex = []
    for stem, title, w in tables:
        md += [f"## {title}", "", markdown_table(w), ""]
        tex.append(latex_table(w, title))
        files[f"{stem}.md"] = (markdown_table(w) + "\n").encode()
    for table in TABLES:
        t = cells[cells.table == table]
        if len(t):
            files[f"{table}.csv"] = t.to_csv(index=False).encode()
    files["cells.csv"] = cells.to_csv(index=False).encode()
    files["skipped.csv"] = skipped.to_csv(index=False).encode()
    if len(skipped):
        md += ["## Skipped runs", "", "| results.json | reason |", "|---|---|"]
        md += [f"| {_md(p)} | {_md(r)} |" for p, r in skipped.itertuples(index=False)] + [""]
    if cmp is not None:
        md += ["## Comparison with references", ""]
        if len(cmp):
            md += ["| table | method | dataset | column | ours | reference | ours − ref | reference source | note |",
                   "|---|---|---|---|---:|---:|---:|---|---|"]
            md += [f"| {r.table} | {_md(r.label)} | {r.dataset} | {r.column} | {r.ours_text} | {r.reference:.2f} | "
                   f"{r.diff:+.2f} | {_md(r.source)} | {r.note} |" for r in cmp.itertuples()] + [""]
        else:
            md += ["No cell has a reference number.", ""]
        files["compare.csv"] = cmp.drop(columns="ours_text").to_csv(index=False).encode()
    files["report.md"] = "\n".join(md).encode()
    if latex:
        files["report.tex"] = ("% generated by python -m xmx.report; needs \\usepackage{booktabs}\n"
                               + "\n".join(tex)).encode()
    if plots:
        for name, data in {**plot_fewshot(cells, refs), **plot_sweeps(runs, obs, swept, list(params))}.items():
            files[f"plots/{name}"] = data
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    return {"runs": runs, "skipped": skipped, "cells": cells, "tables": tables, "compare": cmp,
            "files": sorted(str(out / n) for n in files), "markdown": "\n".join(md)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xmx.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", help="Hydra output folders (runs, multirun roots, or trees of them)")
    ap.add_argument("--out", default="report", help="output folder (default ./report)")
    ap.add_argument("--seeds", help="expected seeds, e.g. 1,2,3 (default: the union of seeds seen per row)")
    ap.add_argument("--param", action="append", default=[],
                    help="config key swept, e.g. method.lam (repeatable; default: detected from the configs)")
    ap.add_argument("--references", action="append", default=[], metavar="FILE",
                    help="extra reference numbers (YAML or CSV, the form of xmx/references.yaml)")
    ap.add_argument("--compare", action="store_true", help="print each cell's difference to the references")
    ap.add_argument("--latex", action="store_true", help="also write report.tex")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = ap.parse_args(argv)
    try:
        res = build_report(args.folders, out=args.out, seeds=_parse_seeds(args.seeds), params=args.param,
                           references=args.references, do_compare=args.compare, latex=args.latex,
                           plots=not args.no_plots)
    except XmxError as e:
        print(f"xmx.report: error: {e}", file=sys.stderr)
        return 2
    print(res["markdown"])
    if res["compare"] is not None:
        print("\nDifferences to references (ours − reference):")
        if res["compare"].empty:
            print("  no cell has a reference number")
        for r in res["compare"].itertuples():
            print(f"  {r.table:13s} {r.label} | {r.dataset} | {r.column}: {r.ours_text} vs {r.reference:.2f} "
                  f"→ {r.diff:+.2f}  [{r.source}]" + (f"  ({r.note})" if r.note else ""))
    print(f"\nwrote {len(res['files'])} files to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
