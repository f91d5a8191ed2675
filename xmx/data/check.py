"""``python -m xmx.data check <root>``: which CoOp datasets are under ``$DATA``, and are they complete?

One line per dataset: ``found`` (every listed image present and the counts equal the published sizes,
docs/protocols.md#dataset-sizes; for a tree written by ``python -m xmx.data fake``, the counts its marker file
records, and the line says ``fake``), ``missing`` (no dataset folder) or ``incomplete`` (anything else, with the
reason and the first few missing paths). Exit status 0 only when
every dataset that was found is complete (and at least one was found).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from xmx.data import coop
from xmx.data.datasets import get_info
from xmx.errors import XmxError

SPLITS = ("train", "val", "test")


def check_dataset(name: str, root: str | Path) -> dict:
    """``{"train", "val", "test", "classes", "status", "expected", "message", "missing"}`` for one dataset."""
    info = get_info(name)
    root = Path(root).expanduser()
    expected = dict(zip(SPLITS + ("classes",), info.sizes)) if info.sizes else None
    fake = _fake_counts(root / info.dir)
    if fake is not None:
        expected = fake
    out = {"train": 0, "val": 0, "test": 0, "classes": 0, "status": "missing", "expected": expected,
           "message": "", "missing": []}
    if not (root / info.dir).is_dir():
        out["message"] = f"no {root / info.dir}/ (expected $DATA/{info.extra.get('layout', info.dir)})"
        return out
    out["status"] = "incomplete"
    try:
        splits, missing = coop.scan_dataset(name, root)
    except XmxError as e:
        out["message"] = str(e)
        return out
    for s in SPLITS:
        out[s] = len(splits.split(s))
    out["classes"] = len(splits.classnames)
    out["missing"] = missing[:5]
    problems = []
    if missing:
        problems.append(coop.missing_message(name, root, missing, sum(out[s] for s in SPLITS), splits.split_source))
    if expected:
        diff = [f"{k} {out[k]} (expected {v})" for k, v in expected.items() if out[k] != v]
        if diff:
            problems.append(("counts differ from those its fake-data marker records: " if fake is not None else
                             "counts differ from the published sizes (docs/protocols.md#dataset-sizes): ")
                            + ", ".join(diff))
    out["status"] = "incomplete" if problems else "found"
    if fake is not None:
        problems.append("fake data (python -m xmx.data fake), not the real images")
    out["message"] = "; ".join(problems)
    out["manifest"] = _manifest_note(root / info.dir)
    return out


def _fake_counts(folder: Path) -> dict | None:
    """The split counts a fake tree's marker records (None for a real dataset folder)."""
    from xmx.data.fake import MARKER
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not marker.get("fake"):
        return None
    return {k: int(marker[k]) for k in SPLITS + ("classes",) if isinstance(marker.get(k), int)}


def _manifest_note(folder: Path) -> str:
    """Where ``python -m xmx.data get`` fetched this dataset from (its ``xmx_manifest.json``), or ""."""
    try:
        m = json.loads((folder / "xmx_manifest.json").read_text())
        return f"from {m['source']}" + (f" rev {str(m['revision'])[:12]}" if m.get("revision") else "") + \
            f", {len(m.get('files', []))} file(s) hashed in {folder.name}/xmx_manifest.json"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def check_all(root: str | Path, names: list[str] | None = None) -> dict[str, dict]:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise XmxError(f"data root {root} does not exist; pass the folder that holds the datasets in CoOp layout")
    return {n: check_dataset(n, root) for n in (names or coop.COOP_DATASETS)}


def _fmt(name: str, r: dict) -> str:
    if r["status"] == "missing":
        return f"{name:<16} missing     {r['message']}"
    exp = r["expected"] or {}
    counts = "  ".join(f"{k} {r[k]}/{exp[k]}" if k in exp else f"{k} {r[k]}" for k in SPLITS + ("classes",))
    line = f"{name:<16} {r['status']:<11} {counts}"
    line += f"  -- {r['message']}" if r["message"] else ""
    return line + (f"  [{r['manifest']}]" if r.get("manifest") else "")


def exit_code(results: dict[str, dict]) -> int:
    found = [r for r in results.values() if r["status"] != "missing"]
    return 0 if found and all(r["status"] == "found" for r in found) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmx.data check",
                                     description="Check the CoOp datasets under a $DATA folder against their real sizes.")
    parser.add_argument("root", help="the $DATA folder (CoOp layout)")
    parser.add_argument("--json", action="store_true",
                        help='print {dataset: {"train", "val", "test", "classes", "status"}} as JSON')
    parser.add_argument("--datasets", default=None,
                        help=f"comma-separated subset of: {','.join(coop.COOP_DATASETS)}")
    args = parser.parse_args(argv)
    try:
        names = [n.strip() for n in args.datasets.split(",") if n.strip()] if args.datasets else None
        for n in names or []:
            get_info(n)
        results = check_all(args.root, names)
    except XmxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({n: {k: r[k] for k in ("train", "val", "test", "classes", "status")}
                          for n, r in results.items()}, indent=1))
    else:
        for n, r in results.items():
            print(_fmt(n, r))
        nfound = sum(r["status"] != "missing" for r in results.values())
        ncomplete = sum(r["status"] == "found" for r in results.values())
        print(f"{nfound} of {len(results)} datasets found under {Path(args.root).expanduser()}, {ncomplete} complete")
    return exit_code(results)
