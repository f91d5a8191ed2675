"""Published reference numbers (``xmx/references.yaml`` or a user file) and the per-cell comparison with them."""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path

import pandas as pd
import yaml

from xmx.errors import XmxError
from xmx.report.gather import AVG, TABLES, norm_name, dataset_name

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
                for k in ("aliases", "backbone", "experiment"):
                    e[k] = [x for x in str(e.get(k, "")).split("|") if x]
        else:
            data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: 10× faster
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
        aliases, bb, ex = e.get("aliases") or [], e.get("backbone") or [], e.get("experiment") or []
        rows.append({"table": e["table"], "method": str(e["method"]),
                     "methods": {norm_name(m) for m in [e["method"], *([aliases] if isinstance(aliases, str) else aliases)]},
                     "backbones": {backbone_key(b) for b in ([bb] if isinstance(bb, str) else bb)},
                     # the presets whose runs the number may be compared with (empty: any run of the method)
                     "experiments": {str(x) for x in ([ex] if isinstance(ex, str) else ex)},
                     "dataset": dataset_name(e["dataset"]), "column": str(e["column"]), "value": value,
                     "source": str(e["source"]),
                     "n_datasets": int(e["n_datasets"]) if str(e.get("n_datasets") or "").strip() else None})
    return pd.DataFrame(rows)


def backbone_key(name) -> str:
    return norm_name(name).replace("quickgelu", "")


def compare(cells: pd.DataFrame, refs: pd.DataFrame) -> pd.DataFrame:
    """Each cell that has a reference, with ours − reference and the reference's label."""
    rows = []
    for c in cells.itertuples():
        for r in refs.itertuples():
            if (r.table == c.table and norm_name(c.method) in r.methods and r.dataset == c.dataset
                    and r.column in ("*", c.column)
                    and (not r.backbones or not c.backbone or backbone_key(c.backbone) in r.backbones)
                    and (not r.experiments or c.experiment in r.experiments)):
                note = ""
                if c.dataset == AVG and r.n_datasets and not pd.isna(r.n_datasets) and c.n_datasets != r.n_datasets:
                    note = f"ours averages {int(c.n_datasets)} datasets, the reference {int(r.n_datasets)}"
                rows.append({"table": c.table, "label": c.label, "dataset": c.dataset, "column": c.column,
                             "ours": c.mean, "reference": r.value, "diff": c.mean - r.value, "source": r.source,
                             "ours_text": c.text, "complete": c.complete, "note": note})
    return pd.DataFrame(rows, columns=["table", "label", "dataset", "column", "ours", "reference", "diff", "source",
                                       "ours_text", "complete", "note"])
