"""Linear probe (CLIP paper / CoOp ``lpclip``): multinomial logistic regression on normalised frozen image features,
fitted with L-BFGS, the L2 strength ``C`` searched on the validation subset (coarse log grid, then refined).

The objective is scikit-learn's: ``C · Σ_i CE_i + ½‖W‖²`` (bias not regularised), divided by ``C·n``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xmx.errors import XmxError
from xmx.methods.base import XmxModule


def lbfgs(params, max_iter: int = 1000) -> torch.optim.LBFGS:
    return torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9,
                             history_size=20, line_search_fn="strong_wolfe")


def logistic_loss(X, y, W, b, C: float) -> torch.Tensor:
    """scikit-learn's objective divided by C·n: mean CE + ‖W‖² / (2·C·n)."""
    return F.cross_entropy(X @ W.T + b, y) + (W * W).sum() / (2.0 * C * X.shape[0])


def fit_logistic(X: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, init: tuple | None = None,
                 max_iter: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """X [n,C] normalised features, y [n] -> (W [N,C], b [N]) minimising :func:`logistic_loss`."""
    dim = X.shape[1]
    W = (init[0].clone() if init else torch.zeros(num_classes, dim, device=X.device)).requires_grad_(True)
    b = (init[1].clone() if init else torch.zeros(num_classes, device=X.device)).requires_grad_(True)
    opt = lbfgs([W, b], max_iter)

    def closure():
        opt.zero_grad()
        loss = logistic_loss(X, y, W, b, C)
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def accuracy(X, y, W, b) -> float:
    return 100.0 * ((X @ W.T + b).argmax(-1) == y).float().mean().item()


def search_regularisation(Xtr, ytr, Xval, yval, num_classes: int, coarse=(1e-6, 1e-4, 1e-2, 1, 1e2, 1e4, 1e6),
                          refine_steps: int = 8, max_iter: int = 1000) -> tuple[float, list[tuple[float, float]]]:
    """CoOp's lpclip search: the best C of a coarse log grid, then ``refine_steps`` bisections in log space between
    its neighbours' midpoints. Returns (best C, [(C, val acc), ...] in evaluation order)."""
    curve: list[tuple[float, float]] = []

    def score(C):
        W, b = fit_logistic(Xtr, ytr, num_classes, C, max_iter=max_iter)
        acc = accuracy(Xval, yval, W, b)
        curve.append((float(C), acc))
        return acc

    accs = [score(C) for C in coarse]
    best = max(range(len(coarse)), key=lambda i: (accs[i], -i))  # ties: the first (strongest regularisation)
    lo, hi = math.log10(coarse[best]) - 1, math.log10(coarse[best]) + 1
    for _ in range(refine_steps):
        a_lo, a_hi = score(10 ** lo), score(10 ** hi)
        mid = (lo + hi) / 2
        if a_lo > a_hi:
            hi = mid
        else:
            lo = mid
    best_C, _ = max(curve, key=lambda t: t[1])
    return best_C, curve


class LinearProbe(XmxModule):
    def __init__(self, coarse_grid=(1e-6, 1e-4, 1e-2, 1, 1e2, 1e4, 1e6), refine_steps: int = 8,
                 max_iter: int = 1000, C: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.coarse_grid, self.refine_steps, self.max_iter, self.fixed_C = list(coarse_grid), refine_steps, max_iter, C
        self.curve, self.best_C = [], None

    def build(self, dm) -> None:
        if dm.inputs != "features":
            raise XmxError("linear_probe trains on cached features; set method.inputs=features")
        dim, n = dm.train_features.shape[-1], len(dm.classnames)
        self.head = nn.Linear(dim, n)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def training_step(self, batch, batch_idx):
        dm = self.dm
        V, n, dim = dm.train_features.shape
        X = F.normalize(dm.train_features.reshape(V * n, dim).float(), dim=-1).to(self.device)
        y = dm.train_labels.repeat(V).to(self.device)
        Xv = F.normalize(dm.features_of(dm.val_set).float(), dim=-1).to(self.device)
        yv = torch.tensor([d.label for d in dm.val_set.items], device=self.device)
        k = len(dm.classnames)
        if self.fixed_C is None:
            self.best_C, self.curve = search_regularisation(X, y, Xv, yv, k, self.coarse_grid, self.refine_steps,
                                                            self.max_iter)
        else:
            self.best_C = float(self.fixed_C)
        # the final fit is this run's one optimiser step (L-BFGS on the head, through Lightning: checkpoints follow)
        opt = self.optimizers()

        def closure():
            opt.zero_grad()
            loss = logistic_loss(X, y, self.head.weight, self.head.bias, self.best_C)
            self.manual_backward(loss)
            return loss

        opt.step(closure=closure)
        self.trainer.should_stop = True  # one full-batch fit; no further epochs
        return None

    def configure_optimizers(self):
        return lbfgs(self.head.parameters(), self.max_iter)

    def logits(self, x, eval_set):
        out = self.head(F.normalize(self.image_features(x).float(), dim=-1))
        if eval_set.train_index == list(range(out.shape[1])):
            return out
        if not eval_set.seen_only:
            raise XmxError(f"linear_probe cannot score classes it never trained on (eval set {eval_set.name}); "
                           "evaluate new classes with method=zeroshot or an adapter that uses text")
        return out[:, eval_set.train_index]

    def extra_results(self) -> dict:
        return {"C": self.best_C, "validation_curve": [{"C": c, "val_acc": a} for c, a in self.curve]}
