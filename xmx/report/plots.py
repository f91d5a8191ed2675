"""Plots: few-shot curves (with references) and sweep curves, as PNG bytes."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd

from xmx.report.gather import AVG, GROUP, col_order, dataset_order, fmt_value, hm
from xmx.report.references import backbone_key
from xmx.report.tables import slug


def colours(labels) -> dict[str, tuple]:
    """One colour per row label, the same in every figure of a report: assigned in sorted order of every label the
    report draws (tab10, then tab20b/tab20c for more)."""
    import matplotlib
    cycle = [*matplotlib.colormaps["tab10"].colors, *matplotlib.colormaps["tab20b"].colors,
             *matplotlib.colormaps["tab20c"].colors]
    return {lab: cycle[i % len(cycle)] for i, lab in enumerate(sorted(set(labels)))}


def _dodge(n: int, width: float = 0.3) -> list[float]:
    """x offsets for n lines at the same x positions, so no marker hides another."""
    return [0.0] if n <= 1 else list(np.linspace(-width / 2, width / 2, n))


def _caveat_of(caveats) -> str:
    """One text for the figure from the caveats of what it draws ("" when every line is a real run)."""
    parts = sorted({p for c in caveats if isinstance(c, str) and c for p in c.split(" + ")})
    return " + ".join(parts)


def _png(fig, caveat: str = "") -> bytes:
    """PNG bytes; a figure that draws random-init or synthetic-data numbers says so on the image (and in the PNG's
    ``xmx:caveat`` text chunk, for tools)."""
    if caveat:
        fig.text(0.5, -0.02, f"NOT ACCURACIES: {caveat}", ha="center", va="top", color="#b00020", fontsize=9,
                 fontweight="bold")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight",
                metadata={"xmx:caveat": caveat or "none", "Software": "xmx.report"})
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def plot_fewshot(cells: pd.DataFrame, refs: pd.DataFrame | None, colour: dict | None = None) -> dict[str, bytes]:
    """Accuracy vs shots, one figure per dataset (and the average), one line per method row (dodged sideways, so
    rows measured at the same shots never hide each other; one colour per row across every figure)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fs = cells[cells.table == "fewshot"]
    out = {}
    if not len(fs):
        return out
    # a row measured at 0 shots only (zero-shot) is drawn as a horizontal line, so 0 gets no tick of its own
    only0 = fs.groupby("label").column.agg(lambda c: set(c) == {"0"})
    shots = sorted(fs.column.unique(), key=col_order)
    if "0" in shots and len(shots) > 1 and not (~only0[fs[fs.column == "0"].label.unique()]).any():
        shots.remove("0")
    pos = {s: i for i, s in enumerate(shots)}
    colour = colour or colours(cells.label)
    for d in sorted(fs.dataset.unique(), key=dataset_order):
        fig, ax = plt.subplots(figsize=(5.5, 4))
        groups = list(fs[fs.dataset == d].groupby("label"))
        lines = [lab for lab, _ in groups if not (only0[lab] and "0" not in pos)]
        off = dict(zip(lines, _dodge(len(lines))))
        for label, g in groups:
            g = g.sort_values("column", key=lambda c: c.map(col_order))
            if only0[label] and "0" not in pos:
                ax.axhline(g["mean"].iloc[0], ls=":", color=colour.get(label, "gray"), label=label)
                continue
            ax.errorbar([pos[c] + off[label] for c in g.column], g["mean"], yerr=g["std"].fillna(0), marker="o",
                        capsize=3, label=label, color=colour.get(label))
        if d == AVG and refs is not None and len(refs):
            bbs = {backbone_key(b) for b in fs.backbone if b}
            for (m, src), r in refs[(refs.table == "fewshot") & (refs.dataset == AVG)].groupby(["method", "source"]):
                r = r[[not rb or not bbs or bool(rb & bbs) for rb in r.backbones]]
                if r.empty:
                    continue
                if (r.column == "*").any():
                    ax.axhline(r.value.iloc[0], ls="--", lw=0.8, color="black", alpha=0.5, label=f"{m} (ref)")
                    continue
                r = r[r.column.isin(pos)].sort_values("column", key=lambda c: c.map(col_order))
                if len(r):
                    ax.plot([pos[c] for c in r.column], r.value, ls="--", marker="x", alpha=0.6, label=f"{m} (ref)")
        ax.set_xticks(range(len(shots)), shots)
        ax.set_xlabel("shots per class")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Average over datasets" if d == AVG else d)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        out[f"fewshot_{slug(d)}.png"] = _png(fig, _caveat_of(fs[fs.dataset == d].caveat))
    return out


def plot_base2new(cells: pd.DataFrame, colour: dict | None = None) -> dict[str, bytes]:
    """Base-to-new: one figure per (backbone) table with three panels (base, new, HM); bars per method row, one
    group per dataset and the average."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    b2n = cells[cells.table == "base2new"]
    if not len(b2n):
        return {}
    colour = colour or colours(cells.label)
    labels = sorted(b2n.label.unique())
    datasets = sorted(b2n.dataset.unique(), key=dataset_order)
    width = 0.8 / len(labels)
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.6 * len(datasets) * max(1, len(labels)) ** 0.5 + 2), 8),
                             sharex=True)
    for ax, (col, title) in zip(axes, (("base", "Base classes"), ("new", "New classes"), ("hm", "Harmonic mean"))):
        for i, lab in enumerate(labels):
            g = b2n[(b2n.label == lab) & (b2n.column == col)].set_index("dataset")
            xs = [j + (i - (len(labels) - 1) / 2) * width for j, d in enumerate(datasets) if d in g.index]
            ys = [g.loc[d, "mean"] for d in datasets if d in g.index]
            err = [0 if pd.isna(g.loc[d, "std"]) else g.loc[d, "std"] for d in datasets if d in g.index]
            ax.bar(xs, ys, width=width, yerr=err, capsize=2, color=colour.get(lab), label=lab if col == "base" else None)
        ax.set_ylabel(f"{title}\naccuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(datasets)), ["Average" if d == AVG else d for d in datasets], rotation=30,
                        ha="right")
    axes[0].set_title("Base-to-new generalisation")
    fig.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return {"base2new.png": _png(fig, _caveat_of(b2n.caveat))}


def plot_variance(var: pd.DataFrame) -> dict[str, bytes]:
    """Variance components per cell, one figure per table: stacked horizontal bars (points²), one bar per
    (method, dataset, column)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = {}
    comps = [("seed", "seed (subset + training)"), ("subset", "few-shot subset"), ("training", "training seed"),
             ("test", "finite test set")]
    cmap = matplotlib.colormaps["Set2"].colors
    for table, t in var.groupby("table", sort=False):
        t = t.sort_values(["method", "dataset", "column"], key=lambda c: c.map(str))
        names = [" · ".join(p for p in (r.method, r.dataset, "" if r.column == r.dataset else
                                        (f"{r.column}-shot" if str(r.column).isdigit() else str(r.column))) if p)
                 for r in t.itertuples()]
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.28 * len(t)))
        left = np.zeros(len(t))
        for (k, lab), c in zip(comps, cmap):
            v = t[k].fillna(0).to_numpy(dtype=float)
            if not v.any():
                continue
            ax.barh(range(len(t)), v, left=left, color=c, label=lab)
            left += v
        ax.set_yticks(range(len(t)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("variance of the accuracy (points²)")
        ax.set_title(f"Where the spread comes from: {table}")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # never over the bars
        fig.tight_layout()
        out[f"variance_{slug(table)}.png"] = _png(fig, _caveat_of(t.get("caveat", [])))
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
            others = {i: ", ".join(f"{k}={fmt_value(sel.cfg[i].get(k))}" for k in swept[gkey] if k != key)
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
            caveat = gkey[GROUP.index("caveat")]
            out[f"sweep_{slug(gkey[0])}_{slug(gkey[1])}_{slug(gkey[2])}_{slug(key)}"
                + (f"_{slug(caveat)}" if caveat else "") + ".png"] = _png(fig, caveat)
    return out
