"""``python -m xmx.report``: build the report folder (tables, CSV, comparisons, plots) from result folders."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from xmx.errors import XmxError
from xmx.report.gather import (CAVEAT_NOTE, TABLES, assign_variants, find_results, load_runs, observations,
                               swept_keys)
from xmx.report.plots import plot_base2new, plot_fewshot, plot_sweeps, plot_variance
from xmx.report.references import compare, load_references
from xmx.report.stats import (Predictions, cell_intervals, compare_methods, decompose, interval_text, win_tie_loss)
from xmx.report.tables import md_cell, slug, aggregate, build_tables, latex_table, markdown_table
from xmx.utils import atomic_write_bytes

NOTES = ("Cells are mean ± sample std (ddof 1) over seeds. A cell marked '(n/m seeds)' has fewer seeds than expected "
         "(expected: {expected}); '(k/n datasets)' marks an average that lacks datasets the table has elsewhere. "
         "Averages over datasets are means of the per-dataset means; base-to-new HM = 2BN/(B+N) is computed from the "
         "mean base and new accuracies. " "† selection: paper — the authors' protocol, which selects on the test set "
         "(Tip-Adapter-F's epoch; ImageNet α/β): such rows are kept apart from validation-selected ones and never "
         "averaged with them.")


INSIDE_NOTE = ("'reference inside': whether the published number lies inside xmx's 95 % interval for the cell (seeds and "
               "test images resampled from the runs' saved predictions; docs/report.md). **no** is a measured "
               "disagreement, not noise.")
PAIR_NOTE = ("A − B in accuracy points: the difference of the seed means, with a 95 % interval from a two-level paired "
             "bootstrap (seeds drawn with replacement, A and B by the same seed; test images drawn with replacement, "
             "the same draw for A and B). win / loss: the interval lies above / below 0; tie: it contains 0. "
             "Method: docs/report.md.")
VAR_NOTE = ("Per cell, in points² (variance.csv; plots/variance_<table>.png): `seed` = spread between seeds when each "
            "seed draws its own subset (subset + training together), `subset` and `training` apart when a sweep "
            "varies data.subset_seed apart from seed, `test` = the finite test set's variance of one run's accuracy.")


def pair_markdown(p: pd.DataFrame) -> str:
    lines = ["| table | dataset | column | seeds | A − B | 95 % interval | verdict | note |",
             "|---|---|---|---|---:|---|---|---|"]
    for r in p.itertuples():
        lines.append(f"| {r.table} | {r.dataset} | {r.column} | {r.seeds} | {r.diff:+.2f} | "
                     f"{interval_text(r.lo, r.hi) or '–'} | {r.verdict or '–'} | {md_cell(r.note)} |")
    return "\n".join(lines)


def _parse_seeds(s: str | None) -> list[int] | None:
    if not s:
        return None
    try:
        return sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise XmxError(f"--seeds {s!r}: give comma-separated integers, e.g. --seeds 1,2,3") from None


def build_report(folders, out="report", seeds=None, params=(), references=(), do_compare=False, latex=False,
                 plots=True, intervals=False, compare_pair=None, variance=False, n_boot=2000, ci_seed=0) -> dict:
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
    runs, dups = assign_variants(runs, swept)
    skipped = pd.concat([skipped, dups], ignore_index=True)
    obs = observations(runs)
    cells = aggregate(obs, seeds)
    refs = pd.concat([load_references()] + [load_references(r) for r in references], ignore_index=True)
    pair, preds = None, Predictions(runs)  # each run's predictions are read once, whatever asks for them
    if compare_pair:  # validated before any resampling: unknown names are one line
        pair = [compare_methods(obs, runs, a, b, n_boot, ci_seed, preds=preds) for a, b in compare_pair]
    if intervals or do_compare:
        cells = cell_intervals(cells, obs, runs, n_boot, ci_seed, preds=preds)
        if intervals:
            cells["text"] = [t + (f" {interval_text(lo, hi)}" if interval_text(lo, hi) else "")
                             for t, lo, hi in zip(cells.text, cells.ci_lo, cells.ci_hi)]
    tables = build_tables(cells)
    cmp = compare(cells, refs) if do_compare else None
    if cmp is not None and len(cmp):
        ci = cells.set_index(["table", "label", "dataset", "column"])[["ci_lo", "ci_hi", "ci_note"]]
        j = cmp.join(ci, on=["table", "label", "dataset", "column"])
        cmp = cmp.assign(ci_lo=j.ci_lo.values, ci_hi=j.ci_hi.values,
                         inside=["" if pd.isna(lo) else ("yes" if lo <= ref <= hi else "no")
                                 for lo, hi, ref in zip(j.ci_lo, j.ci_hi, cmp.reference)])

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
        md += [f"| {md_cell(p)} | {md_cell(r)} |" for p, r in skipped.itertuples(index=False)] + [""]
    if cmp is not None:
        md += ["## Comparison with references", ""]
        if len(cmp):
            md += [INSIDE_NOTE, "",
                   "| table | method | dataset | column | ours | xmx 95 % interval | reference | ours − ref | "
                   "reference inside | reference source | note |",
                   "|---|---|---|---|---:|---|---:|---:|---|---|---|"]
            md += [f"| {r.table} | {md_cell(r.label)} | {r.dataset} | {r.column} | {r.ours_text} | "
                   f"{interval_text(r.ci_lo, r.ci_hi) or '–'} | {r.reference:.2f} | {r.diff:+.2f} | "
                   f"{ {'yes': 'yes', 'no': '**no**'}.get(r.inside, '– (no predictions)')} | {md_cell(r.source)} | "
                   f"{r.note} |" for r in cmp.itertuples()] + [""]
        else:
            md += ["No cell has a reference number.", ""]
        files["compare.csv"] = cmp.drop(columns="ours_text").to_csv(index=False).encode()
    for p in pair or []:
        a, b = p.a.iloc[0], p.b.iloc[0]
        stem = f"compare_{slug(a)}_vs_{slug(b)}"
        md += [f"## {a} − {b}: paired differences", "", PAIR_NOTE, "", pair_markdown(p), ""]
        wtl = win_tie_loss(p)
        if len(wtl):
            md += ["Win / tie / loss over datasets (win: the interval lies above 0):", "",
                   "| table | column | win | tie | loss |", "|---|---|---:|---:|---:|"]
            md += [f"| {r.table} | {r.column} | {r.win} | {r.tie} | {r.loss} |" for r in wtl.itertuples()] + [""]
        files[f"{stem}.csv"] = p.to_csv(index=False).encode()
        files[f"{stem}.md"] = (pair_markdown(p) + "\n").encode()
    var = decompose(obs, runs, preds) if variance else None
    if var is not None:
        md += ["## Variance of accuracies", "", VAR_NOTE, "",
               "| table | method | dataset | column | runs | seed | subset | training | test |",
               "|---|---|---|---|---:|---:|---:|---:|---:|"]
        f = lambda v: "–" if pd.isna(v) else f"{v:.3f}"  # noqa: E731
        md += [f"| {r.table} | {md_cell(r.method)} | {r.dataset} | {r.column} | {r.runs} | {f(r.seed)} | {f(r.subset)} | "
               f"{f(r.training)} | {f(r.test)} |" for r in var.itertuples()] + [""]
        files["variance.csv"] = var.to_csv(index=False).encode()
    files["report.md"] = "\n".join(md).encode()
    if latex:
        files["report.tex"] = ("% generated by python -m xmx.report; needs \\usepackage{booktabs}\n"
                               + "\n".join(tex)).encode()
    if plots:
        figs = {**plot_fewshot(cells, refs), **plot_base2new(cells), **plot_sweeps(runs, obs, swept, list(params))}
        if var is not None:
            figs.update(plot_variance(var))
        for name, data in figs.items():
            files[f"plots/{name}"] = data
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    return {"runs": runs, "skipped": skipped, "cells": cells, "tables": tables, "compare": cmp, "pairs": pair,
            "variance": var,
            "files": sorted(str(out / n) for n in files), "markdown": "\n".join(md)}


def _pairs(folders, groups) -> list[tuple[str, str]]:
    """``--compare-methods A B`` -> [(A, B)]; ``--compare-methods A`` -> A against every other method seen."""
    out = []
    for g in groups:
        if len(g) > 2:
            raise XmxError(f"--compare-methods {' '.join(g)}: give two names (A B) or one (A against all others)")
        if len(g) == 2:
            out.append((g[0], g[1]))
            continue
        runs, _ = load_runs(find_results(folders))
        others = sorted(set(runs.method) - {g[0]}) if len(runs) else []
        if g[0] not in set(runs.method) | set(runs.experiment):
            raise XmxError(f"--compare-methods {g[0]}: no run has this method or experiment name; pass one of "
                           f"{', '.join(sorted(set(runs.method)))}")
        out += [(g[0], o) for o in others]
    return out


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
    ap.add_argument("--intervals", action="store_true",
                    help="give every accuracy cell its 95 %% interval (seeds + test images, from predictions)")
    ap.add_argument("--compare-methods", nargs="+", metavar="METHOD", action="append", default=[],
                    help="A B: A − B per dataset with paired 95 %% intervals and win/tie/loss; A alone: A against "
                         "every other method (method or preset names; repeatable)")
    ap.add_argument("--variance", action="store_true",
                    help="variance decomposition per cell (seed / subset / training / test set) + plots")
    ap.add_argument("--bootstrap", type=int, default=2000, metavar="B", help="bootstrap replicates (default 2000)")
    ap.add_argument("--ci-seed", type=int, default=0, help="random seed of the resampling (default 0)")
    ap.add_argument("--format", choices=("report", "clip_benchmark"), default="report",
                    help="clip_benchmark: one CLIP_benchmark JSON per run and eval set + their merged benchmark.csv")
    args = ap.parse_args(argv)
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
        if args.bootstrap < 100:
            raise XmxError(f"--bootstrap {args.bootstrap}: give at least 100 replicates (default 2000)")
        res = build_report(args.folders, out=args.out, seeds=_parse_seeds(args.seeds), params=args.param,
                           references=args.references, do_compare=args.compare, latex=args.latex,
                           plots=not args.no_plots, intervals=args.intervals,
                           compare_pair=_pairs(args.folders, args.compare_methods), variance=args.variance,
                           n_boot=args.bootstrap, ci_seed=args.ci_seed)
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
