"""``python -m xmx.report``: build the report folder (tables, CSV, comparisons, plots) from result folders."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from xmx.config import check_writable_dir
from xmx.errors import XmxError
from xmx.report.gather import (CAVEAT_NOTE, TABLES, _assign_variants, find_results, load_runs, observations,
                               swept_keys)
from xmx.report.plots import plot_fewshot, plot_sweeps
from xmx.report.references import compare, load_references
from xmx.report.tables import _md, aggregate, build_tables, latex_table, markdown_table
from xmx.utils import atomic_write_bytes

NOTES = ("Cells are mean ± sample std (ddof 1) over seeds. A cell marked '(n/m seeds)' has fewer seeds than expected "
         "(expected: {expected}); '(k/n datasets)' marks an average that lacks datasets the table has elsewhere. "
         "Averages over datasets are means of the per-dataset means; base-to-new HM = 2BN/(B+N) is computed from the "
         "mean base and new accuracies. " "† selection: paper — the authors' protocol, which selects on the test set "
         "(Tip-Adapter-F's epoch; ImageNet α/β): such rows are kept apart from validation-selected ones and never "
         "averaged with them.")


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
    marked = runs[runs.caveat != ""]
    banner = CAVEAT_NOTE.format(n=len(marked), total=len(runs),
                                what=" and/or ".join(sorted({p for c in marked.caveat for p in c.split(" + ")})))
    if len(marked):
        md[2:2] = [f"> {banner}", ""]
    tex = []
    for stem, title, w in tables:
        md += [f"## {title}", "", markdown_table(w), ""]
        tex.append(latex_table(w, title))
        flagged = any("⚠" in str(i) for i in w.index)
        files[f"{stem}.md"] = ((f"> {banner}\n\n" if flagged else "") + markdown_table(w) + "\n").encode()
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
    ap.add_argument("--format", choices=("report", "clip_benchmark"), default="report",
                    help="clip_benchmark: one CLIP_benchmark JSON per run and eval set + their merged benchmark.csv")
    args = ap.parse_args(argv)
    try:  # the output folder first: a file or a read-only place is one line, not a traceback after the work
        check_writable_dir("--out", args.out)
    except XmxError as e:
        print(f"xmx.report: error: {e}", file=sys.stderr)
        return 2
    if args.format == "clip_benchmark":
        from xmx.report.clip_benchmark import export_clip_benchmark
        try:
            res = export_clip_benchmark(args.folders, args.out)
        except XmxError as e:
            print(f"xmx.report: error: {e}", file=sys.stderr)
            return 2
        for p, why in res["skipped"]:
            print(f"skipped {p}: {why}")
        print(f"wrote {len(res['files'])} files to {args.out}/ ({len(res['rows'])} CLIP_benchmark rows)")
        return 0
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
