"""Linear probe = CoOp's ``lpclip`` (CLIP paper protocol; docs/methods/linear_probe.md): scikit-learn's L-BFGS
multinomial
logistic regression on the **raw** frozen image features (``normalize: true`` keeps xmx's earlier L2-normalised
variant), its inverse L2 strength ``C`` chosen on the validation subset:

    coarse:  C in [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6], in that order; the first maximum of val accuracy wins (C*)
    bisect:  lo, hi = C*/10, 10·C*; ``steps`` times: fit both ends; acc(lo) < acc(hi) -> keep hi, the range becomes
             [mid, hi] (log10 midpoint); otherwise (ties included) keep lo, the range becomes [lo, mid]
    C        the C kept by the last step (not the best seen); ``steps = 0`` keeps C*

The objective (scikit-learn's L2 penalty): ``C·Σ_i CE_i + ½‖W‖²`` (bias not penalised), ``max_iter`` 1000,
``tol`` 1e-4. Two solvers minimise it: ``sklearn`` (``LogisticRegression(solver="lbfgs")``, what CoOp runs; the
fast path on CPU) and ``torch`` (full-batch ``torch.optim.LBFGS`` on the same objective; the fast path for large
problems on a GPU, tested equal to the scikit-learn fit). ``solver: auto`` takes torch only on a GPU and only when
the problem is large (``torch_min_elements`` = samples × width × classes).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xmx.errors import XmxError
from xmx.validate import NonNegFloat, NonNegInt, PosFloat, PosInt
from xmx.methods.base import XmxModule
from xmx.utils import Heartbeat

log = logging.getLogger(__name__)

COARSE_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)  # lpclip's search_list, in its order
SOLVERS = ("auto", "sklearn", "torch")

# fit(X [n,d] float64 numpy, y [n] int, num_classes, C) -> (W [N,d], b [N]) as float64 numpy
Fit = Callable[[np.ndarray, np.ndarray, int, float], tuple[np.ndarray, np.ndarray]]


# ---- solvers -----------------------------------------------------------------------------------------------------
SMALL_PROBLEM = 5e7  # samples x width x classes below which BLAS/OpenMP threads cost more than they give


def fit_sklearn(X: np.ndarray, y: np.ndarray, num_classes: int, C: float, max_iter: int = 1000,
                tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """CoOp's fit: ``LogisticRegression(solver="lbfgs", penalty="l2", C=C, max_iter=1000)`` (L2 is scikit-learn's
    default penalty). Returns the weights of all ``num_classes`` classes (a class absent from ``y`` gets zero weights
    and a -inf-like bias). Small problems run single-threaded: with torch's OpenMP pool in the same process, BLAS and
    OpenMP threads on tiny matrices spin against each other (the demo's probe ran 17x slower)."""
    import contextlib
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    small = X.shape[0] * X.shape[1] * num_classes < SMALL_PROBLEM
    with threadpool_limits(1) if small else contextlib.nullcontext(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # lpclip runs with the same cap and ignores it too
        clf = LogisticRegression(solver="lbfgs", C=float(C), max_iter=int(max_iter), tol=tol)
        clf.fit(X, y)
    coef, icpt = clf.coef_, clf.intercept_
    if coef.shape[0] == 1 and len(clf.classes_) == 2:  # binary: one logit z; softmax([-z/2, z/2]) = sigmoid(z)
        coef, icpt = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-icpt / 2, icpt / 2])
    W = np.zeros((num_classes, X.shape[1]))
    b = np.full(num_classes, -1e9)
    W[clf.classes_], b[clf.classes_] = coef, icpt
    return W, b


def logistic_objective(X: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor, C: float) -> torch.Tensor:
    """scikit-learn's objective divided by C·n: mean CE + ‖W‖² / (2·C·n)."""
    return F.cross_entropy(X @ W.T + b, y) + (W * W).sum() / (2.0 * C * X.shape[0])


def fit_torch(X: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, num_classes: int, C: float,
              max_iter: int = 1000, tol: float = 1e-4, device: str | torch.device | None = None,
              dtype: torch.dtype = torch.float64) -> tuple[np.ndarray, np.ndarray]:
    """The same objective with ``torch.optim.LBFGS`` (strong Wolfe line search), full batch on ``device``; stops when
    the largest gradient entry of scikit-learn's (1/n-scaled) objective is below ``tol``, as scipy's L-BFGS-B does."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    Xt = torch.as_tensor(X).to(dev, dtype)
    yt = torch.as_tensor(y).to(dev).long()
    W = torch.zeros(num_classes, Xt.shape[1], device=dev, dtype=dtype, requires_grad=True)
    b = torch.zeros(num_classes, device=dev, dtype=dtype, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=int(max_iter), max_eval=int(max_iter) * 5 // 4,
                            tolerance_grad=tol, tolerance_change=1e-12, history_size=10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = logistic_objective(Xt, yt, W, b, C)
        loss.backward()
        return loss

    opt.step(closure)
    b = b.detach() - b.detach().mean()  # the bias is unpenalised, so only defined up to a shift: centre it as sklearn
    return W.detach().cpu().double().numpy(), b.cpu().double().numpy()


def choose_solver(solver: str, n: int, dim: int, num_classes: int, min_elements: float) -> str:
    if solver not in SOLVERS:
        raise XmxError(f"method.solver={solver!r}; valid choices: {', '.join(SOLVERS)}")
    if solver != "auto":
        return solver
    return "torch" if torch.cuda.is_available() and n * dim * num_classes >= min_elements else "sklearn"


# ---- lpclip's C search -------------------------------------------------------------------------------------------
def accuracy(X: np.ndarray, y: np.ndarray, W: np.ndarray, b: np.ndarray) -> float:
    return 100.0 * float(((X @ W.T + b).argmax(-1) == y).mean())


def lpclip_search(fit: Fit, Xtr: np.ndarray, ytr: np.ndarray, Xval: np.ndarray, yval: np.ndarray, num_classes: int,
                  grid: Sequence[float] = COARSE_GRID, steps: int = 8,
                  report: Callable[[dict], None] | None = None) -> tuple[float, list[dict]]:
    """CoOp ``lpclip``'s search (module docstring). Returns (the C of the last step, the curve: one dict per fit
    ``{"C", "val_acc", "stage": "coarse"|"bisect", "step"}`` in evaluation order). ``report`` sees every entry."""
    if not grid:
        raise XmxError("method.coarse_grid is empty; give at least one C (lpclip: [1e6, 1e4, ..., 1e-6])")
    curve: list[dict] = []

    def score(C: float, stage: str, step: int) -> float:
        with Heartbeat(f"linear probe {stage} C={float(C):.4g}").during("fitting"):  # a line every 10 s
            W, b = fit(Xtr, ytr, num_classes, float(C))
        entry = {"C": float(C), "val_acc": accuracy(Xval, yval, W, b), "stage": stage, "step": step}
        curve.append(entry)
        if report is not None:
            report(entry)
        return entry["val_acc"]

    accs = [score(C, "coarse", i) for i, C in enumerate(grid)]
    peak = float(grid[int(np.argmax(accs))])  # the first maximum, in the grid's order
    c_final, c_left, c_right = peak, peak * 1e-1, peak * 1e1
    for step in range(int(steps)):
        a_left, a_right = score(c_left, "bisect", step), score(c_right, "bisect", step)
        mid = 0.5 * (math.log10(c_left) + math.log10(c_right))
        if a_left < a_right:
            c_final, c_left, c_right = c_right, 10.0 ** mid, c_right
        else:  # ties keep the left end (stronger regularisation)
            c_final, c_left, c_right = c_left, c_left, 10.0 ** mid
    return c_final, curve


# ---- the Lightning module ----------------------------------------------------------------------------------------
class LinearProbe(XmxModule):
    """The probe on cached features: ``build`` reads the training and validation features, ``training_step`` runs the
    search and the final fit (one full-batch step; no further epochs), ``logits`` applies the fitted head."""

    def __init__(self, coarse_grid: Sequence[float] = COARSE_GRID, refine_steps: NonNegInt = 8, max_iter: PosInt = 1000,
                 tol: PosFloat = 1e-4, C: PosFloat | None = None, normalize: bool = False,
                 solver: Literal[SOLVERS] = "auto", torch_min_elements: NonNegFloat = 2e9, **kwargs):
        super().__init__(**kwargs)
        if solver not in SOLVERS:  # refuse before any feature is extracted
            raise XmxError(f"method.solver={solver!r}; valid choices: {', '.join(SOLVERS)}")
        if C is not None and not float(C) > 0:
            raise XmxError(f"method.C={C}: the inverse L2 strength must be > 0 (or null to search it)")
        if int(refine_steps) < 0:
            raise XmxError(f"method.refine_steps={refine_steps} must be >= 0")
        self.automatic_optimization = False
        self.coarse_grid, self.refine_steps = [float(c) for c in coarse_grid], int(refine_steps)
        self.max_iter, self.tol, self.fixed_C, self.normalize = int(max_iter), float(tol), C, bool(normalize)
        self.solver, self.torch_min_elements = solver, float(torch_min_elements)
        self.curve: list[dict] = []
        self.best_C: float | None = None
        self.solver_used: str | None = None
        self.fit_seconds: float | None = None
        self.fit_cpu_seconds: float | None = None

    def build(self, dm) -> None:
        if dm.inputs != "features":
            raise XmxError("linear_probe trains on cached features; set method.inputs=features")
        dim, n = dm.train_features.shape[-1], len(dm.classnames)
        self.head = nn.Linear(dim, n)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _prep(self, feats: torch.Tensor) -> torch.Tensor:
        feats = feats.float()
        return F.normalize(feats, dim=-1) if self.normalize else feats

    def training_step(self, batch, batch_idx):
        dm = self.dm
        V, n, dim = dm.train_features.shape
        X = self._prep(dm.train_features.reshape(V * n, dim)).double().numpy()
        y = dm.train_labels.repeat(V).numpy()
        Xv = self._prep(dm.features_of(dm.val_set)).double().numpy()
        yv = np.array([d.label for d in dm.val_set.items])
        k = len(dm.classnames)
        self.solver_used = choose_solver(self.solver, X.shape[0], dim, k, self.torch_min_elements)
        if self.solver_used == "torch":
            fit: Fit = lambda A, t, c, C: fit_torch(A, t, c, C, self.max_iter, self.tol)  # noqa: E731
        else:
            fit = lambda A, t, c, C: fit_sklearn(A, t, c, C, self.max_iter, self.tol)  # noqa: E731
        t0, c0 = time.perf_counter(), time.process_time()
        total = len(self.coarse_grid) + 2 * self.refine_steps
        if self.fixed_C is None:
            def report(e: dict) -> None:
                log.info("linear probe [%d/%d] %s C=%.4g: val acc %.2f%% (%.1fs)", len(self.curve) + 1, total,
                         e["stage"], e["C"], e["val_acc"], time.perf_counter() - t0)
                self.curve.append(e)

            self.curve = []
            self.best_C, _ = lpclip_search(fit, X, y, Xv, yv, k, self.coarse_grid, self.refine_steps, report)
        else:
            self.best_C = float(self.fixed_C)
        W, b = fit(X, y, k, self.best_C)
        self.fit_seconds, self.fit_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        log.info("linear probe: C=%.4g (%s, %s solver), %d fits in %.1fs (%.1fs CPU)", self.best_C,
                 "searched on validation" if self.fixed_C is None else "fixed", self.solver_used,
                 len(self.curve) + 1, self.fit_seconds, self.fit_cpu_seconds)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(W).float())
            self.head.bias.copy_(torch.from_numpy(b).float())
        self.optimizers().step()  # a no-op step (no gradients): Lightning counts it, so checkpoints are written
        self.trainer.should_stop = True  # one full-batch fit; no further epochs
        return None

    def configure_optimizers(self):
        # the solver sets the head's weights; this optimiser only lets Lightning count the fit as a training step
        return torch.optim.SGD(self.head.parameters(), lr=0.0)

    def logits(self, x, eval_set):
        out = self.head(self._prep(self.image_features(x)))
        if eval_set.train_index == list(range(out.shape[1])):
            return out
        if not eval_set.seen_only:
            raise XmxError(f"linear_probe cannot score classes it never trained on (eval set {eval_set.name}); "
                           "evaluate new classes with method=zeroshot or an adapter that uses text")
        return out[:, eval_set.train_index]

    def extra_results(self) -> dict:
        return {"C": self.best_C, "C_selected_by": "fixed" if self.fixed_C is not None else
                "lpclip search on validation (last bisection step)", "normalize": self.normalize,
                "solver": self.solver_used, "fit_seconds": self.fit_seconds, "fit_cpu_seconds": self.fit_cpu_seconds,
                "validation_curve": [dict(e) for e in self.curve]}
