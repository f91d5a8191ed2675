"""Aggregate observations into cells (mean ± std over seeds) and lay them out as the papers' tables (Markdown, LaTeX)."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from xmx.report.gather import AVG, PAPER_MARK, ROW, TABLES, TITLES, col_order, dataset_order, label_rows, hm


SYNTHETIC = "synthetic"  # the dataset name of xmx's generated demo set (conf/data/synthetic.yaml)


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
        if (t.dataset != SYNTHETIC).any():  # the generated demo set is reported apart, never averaged with others
            t = t[t.dataset != SYNTHETIC]
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
    out = out.merge(rows.assign(label=label_rows(rows)), on=ROW, how="left")
    out["text"] = [_cell_text(r) for r in out.itertuples()]
    out["sort_d"] = out.dataset.map(dataset_order)
    out["sort_c"] = out.column.map(col_order)
    out = out.sort_values(["table", "label", "sort_d", "sort_c"]).drop(columns=["sort_d", "sort_c"])
    cols = ["table", "label", "method", "experiment", "backbone", "caveat", "protocol", "selection", "variant",
            "rshots", "dataset", "column",
            "mean", "std", "n_seeds", "expected_seeds", "seeds", "expected", "complete", "n_datasets",
            "expected_datasets", "text"]
    return out[cols].rename(columns={"rshots": "shots"}).reset_index(drop=True)


def _cell_text(r) -> str:
    s = f"{r.mean:.2f}" + (PAPER_MARK if r.selection == "paper" else "")
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


def _wide(cells: pd.DataFrame, columns: str, index="label", rename=None, by_dataset=False) -> pd.DataFrame:
    w = cells.pivot_table(index=index, columns=columns, values="text", aggfunc="first").fillna("–")
    if columns == "dataset" or by_dataset:
        order = sorted(w.columns, key=dataset_order)
    else:
        order = sorted(w.columns, key=col_order)
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
        for shots in sorted(fs.column.unique(), key=col_order):
            out.append((f"fewshot_{shots}shot", f"Few-shot: {shots} shots, test accuracy (%)",
                        _wide(fs[fs.column == shots], "dataset")))
    b2n = cells[cells.table == "base2new"]
    if len(b2n):
        names = {"base": "Base", "new": "New", "hm": "HM"}
        for d in sorted(b2n.dataset.unique(), key=lambda x: (x != AVG, dataset_order(x))):
            n = int(b2n[b2n.dataset == AVG].expected_datasets.max()) if d == AVG else 0
            title = f"Base-to-new: average over {n} datasets" if d == AVG else f"Base-to-new: {d}"
            out.append((f"base2new_{slug(d)}", title, _wide(b2n[b2n.dataset == d], "column", rename=names)))
    for table in ("domain_shift", "cross_dataset"):
        t = cells[cells.table == table]
        for src in sorted(t.dataset.unique(), key=dataset_order):
            s = t[t.dataset == src]
            w = _wide(s, "column", by_dataset=True)
            cols = [src] + [c for c in w.columns if c not in (src, "Average")] + ["Average"]
            w = w[[c for c in cols if c in w.columns]]
            w.columns = [f"{c} (source)" if c == src else c for c in w.columns]
            out.append((f"{table}_{slug(src)}", f"{TITLES[table]}: {src} → targets, test accuracy (%)", w))
    g = cells[cells.table == "glue"]
    if len(g):
        g = g.assign(key=[("GLUE score" if d == AVG else f"{d} {c}") for d, c in zip(g.dataset, g.column)],
                     order=[(dataset_order(d), col_order(c)) for d, c in zip(g.dataset, g.column)])
        keys = list(dict.fromkeys(g.sort_values("order").key))
        w = g.pivot_table(index="label", columns="key", values="text", aggfunc="first").fillna("–")[keys]
        w.columns.name, w.index.name = None, "method"
        out.append(("glue", "GLUE dev set (per task, standard metrics; score = mean over tasks of each task's mean)", w))
    c = cells[cells.table == "colour"]
    if len(c):
        out.append(("colour", "Colour probing: zero-shot accuracy (%)", _wide(c, "dataset")))
    return out


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", str(s)).strip("_").lower() or "x"


def md_cell(s) -> str:
    return str(s).replace("|", "\\|")


def markdown_table(df: pd.DataFrame) -> str:
    head = [df.index.name or ""] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(map(md_cell, head)) + " |", "|" + "|".join(["---"] + ["---:"] * len(df.columns)) + "|"]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([md_cell(idx)] + [md_cell(v) for v in row]) + " |")
    return "\n".join(lines)


def _tex(s) -> str:
    s = str(s)
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("{", r"\{"), ("}", r"\}"), ("±", r"$\pm$"), ("→", r"$\to$"), ("–", "--"), ("†", r"$^\dagger$"),
                 ("⚠", r"\textbf{(!)}")):
        s = s.replace(a, b)
    return s


def latex_table(df: pd.DataFrame, title: str) -> str:
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(title)}}}", r"\small",
             r"\begin{tabular}{l" + "r" * len(df.columns) + "}", r"\toprule",
             " & ".join(_tex(c) for c in [df.index.name or "", *df.columns]) + r" \\", r"\midrule"]
    lines += [" & ".join(_tex(v) for v in [idx, *row]) + r" \\" for idx, row in df.iterrows()]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)
