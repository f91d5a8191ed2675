"""xmx.report's intervals, paired comparisons and variance decomposition: known answers on constructed predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file

from tests.test_report import cell, write_result
from xmx.errors import XmxError
from xmx.report import build_report, main
from xmx.report.plots import colours
from xmx.report.stats import (accuracy_replicates, decompose_values, difference_replicates, image_draws,
                              percentile_interval)


def logits_for(correct: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """fp16 logits whose argmax is the label where ``correct`` and another class elsewhere."""
    pred = np.where(correct, labels, (labels + 1) % classes)
    out = np.zeros((len(labels), classes), np.float16)
    out[np.arange(len(labels)), pred] = 1
    return out


def write_run(root, correct, labels, *, method, dataset, seed, classes=5, sets=("test",), **kw):
    """A results.json whose metrics agree with the saved predictions (one eval set per name in ``sets``)."""
    metrics, tensors = {}, {}
    for name, c in zip(sets, correct if len(sets) > 1 else [correct]):
        y = labels[name] if isinstance(labels, dict) else labels
        metrics[f"{name}/acc"] = 100.0 * float(np.mean(c))
        tensors[f"{name}/logits"] = logits_for(np.asarray(c, bool), y, classes)
        tensors[f"{name}/labels"] = y.astype(np.int64)
    path = write_result(root, method=method, dataset=dataset, seed=seed, metrics=metrics, **kw)
    save_file(tensors, str(path.parent / "predictions.safetensors"))
    return path


# ------------------------------------------------------------------------------------------------ the resampling
def test_identical_predictions_give_exactly_zero_and_a_zero_width_interval():
    rng = np.random.default_rng(0)
    c = rng.random((3, 500)) < 0.7
    r = difference_replicates(c, c.copy(), 1000, np.random.default_rng(1))
    assert np.all(r == 0)
    assert percentile_interval(r) == (0.0, 0.0)


def test_image_draws_is_the_plain_bootstrap_of_the_mean():
    """Drawing pattern counts is drawing images: the replicates' mean and variance are the bootstrap's."""
    rng = np.random.default_rng(0)
    c = rng.random((2, 400)) < [[0.6], [0.8]]
    reps = image_draws(c, 20000, np.random.default_rng(3))  # [B, 2]
    p = c.mean(axis=1)
    np.testing.assert_allclose(reps.mean(axis=0), 100 * p, atol=0.1)
    np.testing.assert_allclose(reps.var(axis=0), 100**2 * p * (1 - p) / 400, rtol=0.05)
    # the same image draw for both runs: their covariance is the covariance of the two correctness vectors
    cov = np.cov(reps.T)[0, 1]
    want = 100**2 * np.cov(c.astype(float), bias=True)[0, 1] / 400
    assert cov == pytest.approx(want, rel=0.1, abs=0.05)


def test_a_known_true_difference_is_covered_at_the_nominal_rate():
    """Test sets drawn from a population where A beats B by 3 points: the 95 % interval covers 3 in 90–99 % of
    200 trials (binomial Monte-Carlo error ±3 %), on a fixed seed."""
    rng = np.random.default_rng(12345)
    n, trials, hits = 800, 200, 0
    for _ in range(trials):
        # per image: A right with prob 0.75, B with 0.72, correlated through a shared difficulty
        u = rng.random(n)
        a = u < 0.75
        b = (u < 0.72) ^ ((rng.random(n) < 0.1) & (u < 0.9))  # some disagreement in both directions
        true = 100 * (0.75 - _expected_b())
        lo, hi = percentile_interval(difference_replicates(a[None], b[None], 1000, rng))
        hits += lo <= true <= hi
    assert 0.90 <= hits / trials <= 0.99, hits


def _expected_b() -> float:
    # b = (u < .72) XOR (v < .1 and u < .9): P = P(u<.72)(1 - .1) + P(.72<=u<.9)(.1)
    return 0.72 * 0.9 + 0.18 * 0.1


def test_seed_level_is_resampled_and_inflated():
    """Runs that differ only by seed (every image the same within a run): the interval reflects the seed spread, and
    with many seeds the replicates' variance is the seed variance / S."""
    s, n = 40, 2000
    rng = np.random.default_rng(0)
    acc = rng.normal(70, 2.0, size=s).clip(1, 99)
    c = np.zeros((s, n), bool)
    for i, a in enumerate(acc):
        c[i, : int(round(a / 100 * n))] = True
    reps = accuracy_replicates(c, 4000, np.random.default_rng(1))
    true_acc = c.mean(axis=1) * 100
    assert reps.var() == pytest.approx(true_acc.var(ddof=1) / s + _test_part(c), rel=0.15)


def _test_part(c):
    # image resampling of the mean over runs: var(mean over runs of correctness) / N, in points²
    return 100**2 * c.mean(axis=0).var() / c.shape[1]


def test_seed_only_and_test_only_variance_are_recovered():
    # seed only: each seed's accuracy is set exactly; the test component is what a binomial gives
    vals = np.array([60.0, 62.0, 64.0, 66.0])
    d = decompose_values(vals, np.arange(4), np.full(4, 0.5))
    assert d["seed"] == pytest.approx(np.var(vals, ddof=1))
    assert d["test"] == 0.5
    # test only: identical runs -> no seed variance
    d = decompose_values(np.full(3, 70.0), np.arange(3), np.full(3, 0.21))
    assert d["seed"] == 0 and d["test"] == pytest.approx(0.21)
    # nested: 3 subsets x 4 training seeds with known effects (subset means 60, 65, 70; training ±1)
    sub = np.repeat([1, 2, 3], 4)
    vals = np.repeat([60.0, 65.0, 70.0], 4) + np.tile([-1.0, 1.0, -1.0, 1.0], 3)
    d = decompose_values(vals, sub, np.zeros(12))
    assert d["training"] == pytest.approx(np.var([-1, 1, -1, 1], ddof=1))
    assert d["subset"] == pytest.approx(np.var([60, 65, 70], ddof=1) - d["training"] / 4)
    assert np.isnan(d["seed"])


# ------------------------------------------------------------------------------------------------ the report
def _two_methods(tmp_path, *, gap=0.1, seeds=(1, 2, 3), datasets=("dtd", "eurosat"), n=600, skip_pred=None):
    rng = np.random.default_rng(7)
    for d in datasets:
        labels = rng.integers(0, 5, n)
        base = rng.random(n)
        for s in seeds:
            jitter = rng.random(n) < 0.03
            a = (base < 0.6 + gap) ^ jitter
            b = (base < 0.6) ^ jitter
            write_run(tmp_path, a, labels, method="tip_adapter_f", dataset=d, seed=s)
            if skip_pred == (d, s):
                write_result(tmp_path, method="zeroshot", dataset=d, seed=s, acc=100 * b.mean())
            else:
                write_run(tmp_path, b, labels, method="zeroshot", dataset=d, seed=s)


def test_compare_methods_paired_intervals_and_win_tie_loss(tmp_path, capsys):
    _two_methods(tmp_path / "runs")
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--no-plots",
                 "--compare-methods", "tip_adapter_f", "zeroshot"]) == 0
    out = capsys.readouterr().out
    assert "tip_adapter_f − zeroshot: paired differences" in out
    p = pd.read_csv(tmp_path / "rep" / "compare_tip_adapter_f_vs_zeroshot.csv")
    dtd = p[(p.dataset == "DTD") & (p.column == 16)].iloc[0]
    assert dtd["diff"] == pytest.approx(9.4, abs=3) and 0 < dtd.lo < dtd["diff"] < dtd.hi
    assert dtd.verdict == "win" and dtd.seeds == "1,2,3"
    avg = p[p.dataset == "average"].iloc[0]
    assert avg["diff"] == pytest.approx(p[p.dataset != "average"]["diff"].mean())
    assert "| fewshot | 16 | 2 | 0 | 0 |" in out  # two datasets won


def test_a_tie_and_a_method_against_itself(tmp_path):
    _two_methods(tmp_path / "runs", gap=0.0)
    res = build_report([tmp_path / "runs"], out=tmp_path / "rep", plots=False,
                       compare_pair=[("tip_adapter_f", "zeroshot")])
    p = res["pairs"][0]
    assert set(p.verdict) == {"tie"}
    assert (p["diff"] == 0).all() and (p.lo == 0).all() and (p.hi == 0).all()


def test_intervals_on_every_cell_and_runs_without_predictions(tmp_path):
    _two_methods(tmp_path / "runs", skip_pred=("eurosat", 2))
    res = build_report([tmp_path / "runs"], out=tmp_path / "rep", plots=False, intervals=True)
    cells = res["cells"]
    c = cell(cells, method="tip_adapter_f", dataset="DTD", column="16")
    assert c.ci_lo < c["mean"] < c.ci_hi and c.ci_note == ""
    assert f"[{c.ci_lo:.2f}, {c.ci_hi:.2f}]" in c.text
    z = cell(cells, method="zeroshot", dataset="EuroSAT", column="16")
    assert np.isnan(z.ci_lo) and z.ci_note == "no predictions" and "[" not in z.text
    za = cell(cells, method="zeroshot", dataset="average", column="16")
    assert np.isnan(za.ci_lo)  # an average with a part lacking predictions has no interval
    ta = cell(cells, method="tip_adapter_f", dataset="average", column="16")
    assert ta.ci_lo < ta["mean"] < ta.ci_hi


def test_compare_marks_a_published_number_outside_the_interval(tmp_path):
    _two_methods(tmp_path / "runs")
    res = build_report([tmp_path / "runs"], out=tmp_path / "rep", plots=False)
    ours = cell(res["cells"], method="tip_adapter_f", dataset="DTD", column="16")["mean"]
    refs = tmp_path / "refs.yaml"
    refs.write_text(f"""
- {{table: fewshot, method: tip_adapter_f, dataset: dtd, column: "16", value: {ours + 0.01:.3f}, source: inside}}
- {{table: fewshot, method: tip_adapter_f, dataset: eurosat, column: "16", value: 1.0, source: far}}
""")
    res = build_report([tmp_path / "runs"], out=tmp_path / "rep", plots=False, references=[refs], do_compare=True)
    cmp = res["compare"].set_index("source")
    assert cmp.loc["inside", "inside"] == "yes" and cmp.loc["far", "inside"] == "no"
    assert "**no**" in res["markdown"]


def test_variance_decomposition_table_and_figure(tmp_path):
    _two_methods(tmp_path / "runs")
    res = build_report([tmp_path / "runs"], out=tmp_path / "rep", variance=True)
    v = res["variance"]
    row = v[(v.method == "tip_adapter_f") & (v.dataset == "DTD")].iloc[0]
    assert row.runs == 3 and row.test > 0 and np.isfinite(row.seed)
    assert (tmp_path / "rep" / "plots" / "variance_fewshot.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "variance.csv").exists()


def test_unknown_method_name_is_one_line(tmp_path, capsys):
    _two_methods(tmp_path / "runs", datasets=("dtd",), seeds=(1,))
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--compare-methods", "coop",
                 "zeroshot"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compare-methods coop" in err[0] and "tip_adapter_f" in err[0]
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--bootstrap", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--bootstrap 5" in err[0]
    with pytest.raises(XmxError, match="no run has this method"):
        build_report([tmp_path / "runs"], out=tmp_path / "rep", compare_pair=[("nope", "zeroshot")])


def test_one_colour_per_method_across_plots_and_base_to_new_figure(tmp_path):
    for s in (1, 2):
        for m, acc in (("coop", 70), ("kgcoop", 72)):
            write_result(tmp_path / "runs", method=m, dataset="dtd", protocol="base2new", seed=s,
                         metrics={"test_base/acc": acc + s, "test_new/acc": acc - 10})
    build_report([tmp_path / "runs"], out=tmp_path / "rep")
    assert (tmp_path / "rep" / "plots" / "base2new.png").stat().st_size > 1000
    c1, c2 = colours(["b", "a"]), colours(["a", "b", "c"])
    assert c1["a"] == c2["a"] and c1["b"] == c2["b"] and c1["a"] != c1["b"]


def test_synthetic_demo_runs_are_not_averaged_with_real_datasets(tmp_path):
    write_result(tmp_path, method="zeroshot", dataset="dtd", acc=40.0)
    write_result(tmp_path, method="zeroshot", dataset="synthetic", acc=100.0)
    res = build_report([tmp_path], out=tmp_path / "rep", plots=False)
    assert cell(res["cells"], method="zeroshot", dataset="average", column="16")["mean"] == 40.0


def test_fp16_argmax_through_the_bits_equals_the_float_argmax():
    from xmx.report.stats import argmax_rows
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((5000, 37)) * rng.choice([1e-3, 1, 300], size=(5000, 1))).astype(np.float16)
    x[:50] = -np.abs(x[:50])  # rows of negatives only
    np.testing.assert_array_equal(argmax_rows(x, chunk=999), x.astype(np.float32).argmax(axis=1))
    np.testing.assert_array_equal(argmax_rows(x.astype(np.float32)), x.astype(np.float32).argmax(axis=1))
