"""The linear probe is CoOp's lpclip: scikit-learn's L-BFGS logistic regression on raw features, lpclip's C search
(grid order, first maximum, left on ties, the last step's C), and a torch solver equal to scikit-learn's."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from sklearn.linear_model import LogisticRegression

from conftest import load_bench, one_line_error
from xmx.methods.linear_probe import COARSE_GRID, LinearProbe, fit_sklearn, fit_torch, logistic_objective, lpclip_search
from xmx.run import run


def _scripted_search(acc_of_C, grid=COARSE_GRID, steps=8):
    """Run lpclip_search with a fake solver whose validation accuracy is ``acc_of_C(C)``; returns (C, curve)."""
    Xv = np.eye(2)
    yv = np.array([0, 1])

    def fit(X, y, k, C):
        a = acc_of_C(C)  # 0, 50 or 100 %: right on the first a·2 validation rows
        right = int(round(a / 50))
        W = np.array([[1.0, 0.0], [0.0, 1.0]])
        if right < 2:
            W = W[::-1].copy() if right == 0 else np.array([[1.0, 0.0], [1.0, 0.0]])
        return W, np.zeros(2)

    return lpclip_search(fit, None, None, Xv, yv, 2, grid, steps)


def test_lpclip_grid_order_first_maximum_and_left_on_ties():
    # every C scores the same: lpclip keeps the first grid entry (1e6, the weakest regularisation), then on every
    # tie moves left: C = 1e5 after the first step, and the range shrinks towards 1e5
    C, curve = _scripted_search(lambda C: 50.0)
    assert [e["C"] for e in curve[:7]] == [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6]
    assert curve[7]["C"] == pytest.approx(1e5) and curve[8]["C"] == pytest.approx(1e7)
    assert C == pytest.approx(1e5)
    assert len(curve) == 7 + 2 * 8 and all(e["stage"] == "bisect" for e in curve[7:])


def test_lpclip_keeps_the_last_steps_C_not_the_best_seen():
    # the grid's peak C=1 scores 50 %, everything else 0: the first step compares 0.1 and 10 (a tie at 0 %) and keeps
    # the left end 0.1 although C=1 scored better (today's probe returned the best C seen)
    C, curve = _scripted_search(lambda C: 50.0 if math.isclose(C, 1.0) else 0.0, steps=1)
    assert [round(e["C"], 6) for e in curve[7:]] == [0.1, 10.0]
    assert C == pytest.approx(0.1)
    # right wins -> the kept C is the right end, and the range becomes [mid, right]
    C2, curve2 = _scripted_search(lambda C: 100.0 if C > 2 else 50.0, grid=[1.0], steps=2)
    assert [round(e["C"], 6) for e in curve2[1:]] == [0.1, 10.0, 1.0, 10.0]
    assert C2 == pytest.approx(10.0)


def _blobs(n=120, dim=16, k=4, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    return scale * (rng.normal(size=(k, dim))[y] + rng.normal(size=(n, dim))), y


def test_sklearn_fit_is_coops_logistic_regression():
    X, y = _blobs()
    W, b = fit_sklearn(X, y, 4, 0.5)
    ref = LogisticRegression(solver="lbfgs", C=0.5, max_iter=1000).fit(X, y)
    np.testing.assert_allclose(W, ref.coef_, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b, ref.intercept_, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("C", [0.01, 1.0])
def test_torch_solver_equals_sklearn(C, one_thread):
    """Same objective, same minimum: equal objective values, weights and held-out probabilities up to the solvers'
    tolerance."""
    X, y = _blobs()
    Ws, bs = fit_sklearn(X, y, 4, C, tol=1e-10)
    Wt, bt = fit_torch(X, y, 4, C, tol=1e-10, device="cpu")
    obj = lambda W, b: logistic_objective(torch.tensor(X), torch.tensor(y), torch.tensor(W), torch.tensor(b),  # noqa
                                          C).item()
    assert obj(Wt, bt) == pytest.approx(obj(Ws, bs), rel=1e-8)
    np.testing.assert_allclose(Wt, Ws, atol=1e-4)
    Xq, _ = _blobs(seed=1)
    pt = torch.softmax(torch.tensor(Xq @ Wt.T + bt), -1).numpy()
    ps = torch.softmax(torch.tensor(Xq @ Ws.T + bs), -1).numpy()
    np.testing.assert_allclose(pt, ps, atol=1e-3)
    assert (pt.argmax(1) == ps.argmax(1)).all()


def test_bad_keys_are_one_line_before_any_work():
    one_line_error(lambda: LinearProbe(solver="liblinear"), "method.solver='liblinear'", "sklearn")
    one_line_error(lambda: LinearProbe(C=0), "method.C=0")


def test_run_fits_raw_features_as_lpclip(make_cfg, tmp_path):
    """The run's head is scikit-learn's fit on the *raw* training features at the selected C (today's probe fitted
    L2-normalised features with a torch L-BFGS), and results.json records the search."""
    # a short, well-regularised search (fits that converge): the grid order itself is tested above
    cfg = make_cfg(["method=linear_probe", "method.coarse_grid=[0.01]", "method.refine_steps=1"],
                   output_dir=tmp_path / "lp")
    res = run(cfg)
    ex = res["extra"]
    assert ex["normalize"] is False and ex["solver"] == "sklearn"
    assert [round(e["C"], 6) for e in ex["validation_curve"]] == [0.01, 0.001, 0.1]
    assert ex["C"] in [e["C"] for e in ex["validation_curve"][1:]]  # the last bisection step's C
    L.seed_everything(int(cfg.seed), verbose=False)  # the run's random-init tiny backbone, hence its features
    dm = instantiate(cfg.data, backbone=instantiate(cfg.backbone), _convert_="all")
    dm.setup("fit")
    V, n, d = dm.train_features.shape
    X = dm.train_features.reshape(V * n, d).double().numpy()
    ref = LogisticRegression(solver="lbfgs", C=ex["C"], max_iter=1000).fit(X, dm.train_labels.repeat(V).numpy())
    state = torch.load(tmp_path / "lp" / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]
    np.testing.assert_allclose(state["head.weight"].numpy(), ref.coef_, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(state["head.bias"].numpy(), ref.intercept_, rtol=1e-3, atol=1e-3)


def test_bench_smoke_reports_the_demo_search_and_solvers(tmp_path):
    res = load_bench("linear_probe").main(["--smoke", "--repeats", "1", "--out", str(tmp_path / "b.json")])
    assert res["part_i"]["fits"] == 7 + 2 * 8 + 1 and res["part_i"]["wall_s"] > 0
    assert set(res["part_ii"]) == {"sklearn_cpu", "torch_cpu_float64", "torch_cpu_float32"}
    assert all(r["s_per_iter"] > 0 and r["iters"] == 5 for r in res["part_ii"].values())
