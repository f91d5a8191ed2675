"""Intervals, paired comparisons and the seed/test variance of accuracies, from the saved test predictions.

Every run keeps its test logits (``predictions.safetensors``), so a run's accuracy can be recomputed on any resample of
its test images without rerunning anything. The resampling (docs/report.md, "Intervals"):

    one replicate b = one draw at two levels
      seeds  : the S runs of a cell (few-shot subset + training randomness) are drawn with replacement;
               in a paired comparison A and B are drawn by the same seed (the same few-shot subset).
      images : the N test images are drawn with replacement, the same draw for every run of the cell and for A
               and B (a paired bootstrap: what both methods get right or wrong on an image cancels).
    acc*_b    = mean over drawn seeds s of acc_s(drawn images) , centred-and-inflated at the seed level by
                sqrt(S/(S-1)) so that the seed variance is not shrunk by the (S-1)/S of the plain bootstrap;
    interval  = 2.5 % and 97.5 % percentiles of acc*_b (B replicates, ``--bootstrap``, seeded ``--ci-seed``).

Averages over datasets average the replicates of their datasets (each dataset's seeds and images drawn apart: they
are different runs and different test sets); base-to-new HM is hm(base*_b, new*_b) per replicate.

Cost: every run of a cell is scored on the same N images, so an image is fully described by its *pattern* of
right/wrong over the cell's runs (at most 2^runs patterns). Drawing N images with replacement is a multinomial
draw over the patterns' counts, so a replicate costs O(patterns), not O(N): ImageNet's 50,000 images and 2,000
replicates take milliseconds.

Variance decomposition of one cell's accuracy (points², :func:`decompose`):
  test     : the variance of a run's accuracy from the finite test set, var(correct)/N (the image bootstrap's),
             averaged over the runs;
  subset   : between few-shot subsets (``data.subset_seed``), when a sweep varies it apart from ``seed``;
  training : between training seeds on one subset;
  seed     : subset + training together, when every run's subset seed is its training seed (the default).
Method of moments on the nested design: training = mean over subsets of the variance over training seeds; subset =
max(0, variance of the subset means - training / seeds per subset).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from xmx.errors import XmxError
from xmx.report.gather import AVG, ROW, dataset_name, hm

INTERVAL_TABLES = ("fewshot", "base2new", "domain_shift", "cross_dataset")  # accuracies from logits
LEVEL = 0.95


# ---------------------------------------------------------------------------------------------------------------
# the resampling core (pure numpy; tested against known answers)
# ---------------------------------------------------------------------------------------------------------------
def image_draws(correct: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``correct`` [R, N] (R runs scored on the same N images) -> [B, R] accuracies (%) on B image resamples, the
    same resample for every run."""
    correct = np.asarray(correct, dtype=bool)
    r, n = correct.shape
    if r <= 62:  # one integer code per image: np.unique on ints is a plain sort
        codes, counts = np.unique(np.left_shift(1, np.arange(r, dtype=np.int64)) @ correct, return_counts=True)
        patterns = (codes[:, None] >> np.arange(r)) & 1  # [K, R]
    else:
        patterns, counts = np.unique(correct.T, axis=0, return_counts=True)  # [K, R], [K]
    draws = rng.multinomial(n, counts / n, size=n_boot)  # [B, K]
    return draws @ patterns.astype(np.float64) * (100.0 / n)


def seed_draws(per_seed: np.ndarray, rng: np.random.Generator, idx: np.ndarray | None = None) -> np.ndarray:
    """[B, S] per-seed replicates -> [B]: the mean over S seeds drawn with replacement (``idx`` [B, S] to share the
    draw between paired methods), with the seed-level deviations inflated by sqrt(S/(S-1))."""
    b, s = per_seed.shape
    centre = per_seed.mean(axis=1)
    if s == 1:
        return centre
    if idx is None:
        idx = rng.integers(0, s, size=(b, s))
    dev = np.take_along_axis(per_seed - centre[:, None], idx, axis=1).mean(axis=1)
    return centre + math.sqrt(s / (s - 1)) * dev


def percentile_interval(reps: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    a = (1 - level) / 2
    lo, hi = np.percentile(reps, [100 * a, 100 * (1 - a)])
    return float(lo), float(hi)


def accuracy_replicates(correct: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[S, N] correctness of S seeds' runs on one test set -> [B] replicates of the seed-mean accuracy (%)."""
    return seed_draws(image_draws(correct, n_boot, rng), rng)


def difference_replicates(correct_a: np.ndarray, correct_b: np.ndarray, n_boot: int,
                          rng: np.random.Generator) -> np.ndarray:
    """Paired: [S, N] for A and for B (row s = seed s for both) -> [B] replicates of mean_s(acc_A - acc_B)."""
    s = correct_a.shape[0]
    both = image_draws(np.concatenate([correct_a, correct_b]), n_boot, rng)  # one image draw for A and B
    return seed_draws(both[:, :s] - both[:, s:], rng)


# ---------------------------------------------------------------------------------------------------------------
# predictions of runs
# ---------------------------------------------------------------------------------------------------------------
def argmax_rows(logits: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Row argmax. fp16 (how xmx saves logits) through its bits: for IEEE halves, ``b ^ ((b >> 15) & 0x7FFF)`` on the
    int16 bits orders like the values (negatives reversed), and int16 argmax is vectorised where numpy's fp16
    argmax is not: 3–6× faster than casting to float32 first (ImageNet's 50,000 × 1,000 in ≈ 0.2 s)."""
    if logits.dtype != np.float16:
        return logits.argmax(axis=1)
    out = np.empty(len(logits), np.int64)
    for i in range(0, len(logits), chunk):
        b = logits[i:i + chunk].view(np.int16)
        out[i:i + chunk] = (b ^ ((b >> 15) & np.int16(0x7FFF))).argmax(axis=1)
    return out


class Predictions:
    """Per (run, eval set): the boolean vector 'argmax logits == label' and the labels, read once."""

    def __init__(self, runs: pd.DataFrame):
        self.runs = runs
        self._cache: dict[tuple[int, str], tuple[np.ndarray, np.ndarray] | None] = {}
        self._keys: dict[int, list[str] | None] = {}

    def _file(self, run: int) -> Path:
        return Path(self.runs.loc[run, "path"]).parent / "predictions.safetensors"

    def eval_sets(self, run: int) -> list[str] | None:
        if run not in self._keys:
            f = self._file(run)
            if not f.is_file():
                self._keys[run] = None
            else:
                from safetensors import safe_open
                with safe_open(str(f), "np") as h:
                    self._keys[run] = sorted({k.rsplit("/", 1)[0] for k in h.keys() if k.endswith("/logits")})
        return self._keys[run]

    def eval_set_for(self, run: int, table: str, dataset: str, column: str) -> str | None:
        """The eval set whose predictions give the run's number in (table, dataset, column)."""
        sets = self.eval_sets(run)
        if not sets:
            return None
        if table == "fewshot":
            want = "test"
        elif table == "base2new":
            want = {"base": "test_base", "new": "test_new"}.get(column)
        elif column == dataset and "test" in sets:
            want = "test"
        else:
            want = next((s for s in sets if s.startswith("test_") and dataset_name(s[5:]) == column), None)
        return want if want in sets else None

    def correct(self, run: int, eval_set: str) -> tuple[np.ndarray, np.ndarray]:
        key = (run, eval_set)
        if key not in self._cache:
            from safetensors import safe_open
            with safe_open(str(self._file(run)), "np") as h:
                logits = h.get_tensor(f"{eval_set}/logits")
                labels = h.get_tensor(f"{eval_set}/labels").astype(np.int64)
            self._cache[key] = (argmax_rows(logits) == labels, labels)
        return self._cache[key]


def _stack(preds: Predictions, runs: list[int], table: str, dataset: str, column: str):
    """[S, N] correctness of ``runs`` (sorted by seed) on the cell's eval set, or (None, why)."""
    rows, labels = [], None
    for run in runs:
        es = preds.eval_set_for(run, table, dataset, column)
        if es is None:
            why = "no predictions" if preds.eval_sets(run) is None else "no predictions for this eval set"
            return None, why
        c, y = preds.correct(run, es)
        if labels is not None and (len(y) != len(labels) or not np.array_equal(y, labels)):
            return None, "runs were tested on different images"
        labels = y
        rows.append(c)
    return np.stack(rows), ""


# ---------------------------------------------------------------------------------------------------------------
# intervals for every cell
# ---------------------------------------------------------------------------------------------------------------
def cell_intervals(cells: pd.DataFrame, obs: pd.DataFrame, runs: pd.DataFrame, n_boot: int = 2000,
                   seed: int = 0, level: float = LEVEL, preds: Predictions | None = None) -> pd.DataFrame:
    """``cells`` with ``ci_lo``, ``ci_hi`` (% points) and ``ci_note`` (why a cell has none)."""
    rng = np.random.default_rng(seed)
    preds = preds or Predictions(runs)
    reps: dict[tuple, np.ndarray] = {}
    why: dict[tuple, str] = {}
    key_cols = ROW + ["dataset", "column"]
    for key, g in obs.groupby(key_cols, dropna=False, sort=True):
        table = key[0]
        if table not in INTERVAL_TABLES:
            why[key] = "no interval for this table's metrics"
            continue
        g = g.sort_values("seed")
        stack, reason = _stack(preds, list(g.run), table, key[-2], key[-1])
        if stack is None:
            why[key] = reason
            continue
        reps[key] = accuracy_replicates(stack, n_boot, rng)
    # HM per dataset, averages over datasets/targets, from the replicates of their parts
    out_lo, out_hi, out_note = [], [], []
    for c in cells.itertuples():
        row = tuple(getattr(c, k if k != "rshots" else "shots") for k in ROW)
        r, note = _cell_reps(c, row, reps, why, cells)
        if r is None:
            out_lo.append(np.nan), out_hi.append(np.nan), out_note.append(note)
        else:
            lo, hi = percentile_interval(r, level)
            out_lo.append(lo), out_hi.append(hi), out_note.append("")
    return cells.assign(ci_lo=out_lo, ci_hi=out_hi, ci_note=out_note)


def _cell_reps(c, row, reps, why, cells):
    key = row + (c.dataset, c.column)
    if key in reps:
        return reps[key], ""
    if key in why:
        return None, why[key]
    if c.table == "base2new" and c.column == "hm":
        b, n = (_cell_reps(c._replace(column=x), row, reps, why, cells) for x in ("base", "new"))
        if b[0] is None or n[0] is None:
            return None, b[1] or n[1]
        return hm(b[0], n[0]), ""
    if c.dataset == AVG or c.column == AVG:  # average over datasets (or over transfer targets)
        same = cells[(cells.table == c.table) & (cells.label == c.label)]
        if c.dataset == AVG:
            parts = same[(same.dataset != AVG) & (same.column == c.column)]
        else:
            parts = same[(same.dataset == c.dataset) & (same.column != AVG) & (same.column != c.dataset)]
        got = [_cell_reps(p, row, reps, why, cells) for p in parts.itertuples()]
        if not got:
            return None, "no parts"
        missing = [w for r, w in got if r is None]
        if missing:
            return None, missing[0]
        return np.mean([r for r, _ in got], axis=0), ""
    return None, "no runs"


def interval_text(lo: float, hi: float) -> str:
    return f"[{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) and math.isfinite(hi) else ""


# ---------------------------------------------------------------------------------------------------------------
# paired comparison of two methods
# ---------------------------------------------------------------------------------------------------------------
PAIR_KEYS = ["table", "backbone", "caveat", "protocol", "selection", "rshots"]


def _rows_of(obs: pd.DataFrame, name: str) -> pd.DataFrame:
    sel = obs[(obs.method == name) | (obs.experiment == name)]
    if sel.empty:
        known = sorted(set(obs.method) | set(obs.experiment) - {""})
        raise XmxError(f"--compare-methods {name}: no run has this method or experiment name; pass one of "
                       f"{', '.join(known)}")
    return sel


def compare_methods(obs: pd.DataFrame, runs: pd.DataFrame, a: str, b: str, n_boot: int = 2000, seed: int = 0,
                    level: float = LEVEL, preds: Predictions | None = None) -> pd.DataFrame:
    """A − B per (table, dataset, column) and over datasets: the difference of seed means, its interval, the seeds
    paired, and the verdict (win: the interval lies above 0, loss: below, tie: it contains 0)."""
    rng = np.random.default_rng(seed)
    preds = preds or Predictions(runs)
    oa, ob = _rows_of(obs, a), _rows_of(obs, b)
    for name, o in ((a, oa), (b, ob)):
        amb = o.groupby(PAIR_KEYS, dropna=False)[["experiment", "variant"]].nunique()
        if (amb > 1).any(axis=None):
            raise XmxError(f"--compare-methods {name}: several variants or presets of it share one table "
                           f"({', '.join(sorted(set(o.experiment)))}); pass a preset (experiment) name instead")
    rows = []
    per_key: dict[tuple, list] = {}
    for key, ga in oa.groupby(PAIR_KEYS + ["dataset", "column"], dropna=False, sort=True):
        gb = ob.set_index(PAIR_KEYS + ["dataset", "column"]).sort_index()
        if key not in gb.index:
            continue
        gb = gb.loc[[key]]
        seeds = sorted(set(ga.seed) & set(gb.seed))
        rec = {**dict(zip(PAIR_KEYS + ["dataset", "column"], key)), "a": a, "b": b, "seeds": ",".join(map(str, seeds))}
        if not seeds:
            rec.update(diff=np.nan, lo=np.nan, hi=np.nan, verdict="", note="no seed in common")
            rows.append(rec)
            continue
        va = ga.set_index("seed").loc[seeds]
        vb = gb.reset_index().set_index("seed").loc[seeds]
        rec["diff"] = float(va.value.mean() - vb.value.mean())
        sa, why_a = _stack(preds, list(va.run), key[0], key[-2], key[-1])
        sb, why_b = _stack(preds, list(vb.run), key[0], key[-2], key[-1])
        if sa is None or sb is None or sa.shape != sb.shape:
            rec.update(lo=np.nan, hi=np.nan, verdict="", note=why_a or why_b or "A and B were tested on different images")
        else:
            r = difference_replicates(sa, sb, n_boot, rng)
            rec["lo"], rec["hi"] = percentile_interval(r, level)
            rec["verdict"] = "win" if rec["lo"] > 0 else "loss" if rec["hi"] < 0 else "tie"
            rec["note"] = "" if len(seeds) > 1 else "1 seed: test-sample interval only"
            if not (key[0] in ("domain_shift", "cross_dataset") and key[-1] == key[-2]):  # a source is no target
                per_key.setdefault(key[:-2] + (key[-1] if key[0] in ("fewshot", "base2new") else key[-2],),
                                   []).append(r)
        rows.append(rec)
    df = pd.DataFrame(rows, columns=PAIR_KEYS + ["dataset", "column", "a", "b", "seeds", "diff", "lo", "hi",
                                                 "verdict", "note"])
    if df.empty:
        raise XmxError(f"--compare-methods {a} {b}: the two never ran on the same table, dataset and protocol; "
                       "compare methods that share runs")
    # averages over datasets (few-shot, base-to-new: per column) or over targets (transfer: per source)
    avg = []
    parts = df[~(df.table.isin(("domain_shift", "cross_dataset")) & (df.column == df.dataset))]
    for k, g in parts.assign(__g=[c if t in ("fewshot", "base2new") else d for t, d, c in
                                  zip(parts.table, parts.dataset, parts.column)]).groupby(PAIR_KEYS + ["__g"],
                                                                                          dropna=False):
        if len(g) < 2:
            continue
        rk = tuple(k)
        reps = per_key.get(rk)
        complete = reps is not None and len(reps) == len(g)
        rec = {**dict(zip(PAIR_KEYS, k[:-1])), "a": a, "b": b, "seeds": "", "diff": float(g["diff"].mean())}
        if k[0] in ("fewshot", "base2new"):
            rec.update(dataset=AVG, column=k[-1])
        else:
            rec.update(dataset=k[-1], column=AVG)
        if complete:
            r = np.mean(reps, axis=0)
            rec["lo"], rec["hi"] = percentile_interval(r, level)
            rec["verdict"] = "win" if rec["lo"] > 0 else "loss" if rec["hi"] < 0 else "tie"
            rec["note"] = f"mean over {len(g)}"
        else:
            rec.update(lo=np.nan, hi=np.nan, verdict="", note=f"mean over {len(g)}; some lack predictions")
        avg.append(rec)
    return pd.concat([df, pd.DataFrame(avg, columns=df.columns)], ignore_index=True)


def win_tie_loss(cmp: pd.DataFrame) -> pd.DataFrame:
    """Per table and column: how many datasets A wins, ties, loses (averages left out)."""
    d = cmp[(cmp.dataset != AVG) & (cmp.column != AVG) & (cmp.verdict != "")]
    return (d.groupby(["table", "column"]).verdict.value_counts().unstack(fill_value=0)
            .reindex(columns=["win", "tie", "loss"], fill_value=0).reset_index())


# ---------------------------------------------------------------------------------------------------------------
# variance decomposition
# ---------------------------------------------------------------------------------------------------------------
def decompose_values(values: np.ndarray, subset: np.ndarray, test_var: np.ndarray) -> dict:
    """Variance components (points²) of one cell from its runs' accuracies, subset seeds and test variances."""
    values, subset = np.asarray(values, float), np.asarray(subset)
    out = {"runs": len(values), "test": float(np.mean(test_var)) if len(test_var) else np.nan}
    groups = [values[subset == s] for s in np.unique(subset)]
    if len(groups) == len(values):  # each run its own subset: subset and training together
        out.update(seed=float(np.var(values, ddof=1)) if len(values) > 1 else np.nan, subset=np.nan, training=np.nan)
        return out
    within = [np.var(g, ddof=1) for g in groups if len(g) > 1]
    training = float(np.mean(within)) if within else np.nan
    per = np.mean([len(g) for g in groups])
    means = np.array([g.mean() for g in groups])
    subset_var = (max(0.0, float(np.var(means, ddof=1)) - (training if math.isfinite(training) else 0.0) / per)
                  if len(groups) > 1 else np.nan)
    out.update(seed=np.nan, subset=subset_var, training=training)
    return out


def decompose(obs: pd.DataFrame, runs: pd.DataFrame, preds: Predictions | None = None) -> pd.DataFrame:
    """One row per cell (row, dataset, column) of the accuracy tables with its variance components."""
    preds = preds or Predictions(runs)
    rows = []
    for key, g in obs[obs.table.isin(INTERVAL_TABLES)].groupby(ROW + ["dataset", "column"], dropna=False):
        sub = [runs.loc[r, "cfg"].get("data.subset_seed") for r in g.run]
        sub = np.array([s if s is not None and not (isinstance(s, float) and math.isnan(s)) else sd
                        for s, sd in zip(sub, g.seed)])
        tv = []
        for run in g.run:
            es = preds.eval_set_for(run, key[0], key[-2], key[-1])
            if es is not None:
                c = preds.correct(run, es)[0].astype(float)
                tv.append(100.0 ** 2 * c.var() / len(c))
        rec = dict(zip(ROW + ["dataset", "column"], key))
        rec.update(decompose_values(g.value.to_numpy(), sub, np.array(tv) if len(tv) == len(g) else np.array([])))
        if len(tv) != len(g):
            rec["note"] = "no predictions: no test component"
        rows.append(rec)
    cols = ROW + ["dataset", "column", "runs", "seed", "subset", "training", "test", "note"]
    return pd.DataFrame(rows).reindex(columns=cols).rename(columns={"rshots": "shots"})
