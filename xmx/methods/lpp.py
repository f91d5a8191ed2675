"""LP++ — a linear probe with text-informed class weights (Huang et al., "LP++: A Surprisingly Strong Linear Probe
for Few-Shot CLIP", CVPR'24; released code ``FereshteShakeri/FewShot-CLIP-Strong-Baseline``,
``methods/linear_probe_p2.py``). No hyper-parameter search: the step sizes come from the data.

The equations, as in the authors' code::

    x_i      = norm(f_i)                      one augmented view of each of the n = K·shots training images
    T        = W_clip                         [d, K] the normalised zero-shot classifier (fixed)
    logits   = x W_v^T + b_v + alpha ⊙ (x T)  # W_v [K, d], b_v [K], alpha [K]: the class-wise blend
    loss     = mean_i CE(logits_i, y_i)
  initialisation
    W_v[k]   = sum_{i: y_i = k} x_i           (the release's "centroids": class sums, not means)
    b_v      ~ U(-1/sqrt(d), 1/sqrt(d))       (nn.Linear's default; ``bias_init: zeros`` is a [choice])
    alpha_k  = 250 · mean_k' mean_{i: y_i = k'} x_i · t_k'      (one value for every class)
  data-informed step sizes
    lr_w     = 4n / lambda_max(X^T X)         SGD, momentum 0.9, on (W_v, b_v), full batch, every epoch
    lr_alpha = n / (4 · max_k sum_i (x_i · t_k)^2)
             plain gradient step on alpha every 10th epoch, with the release's gradient: alpha.grad is never
             zeroed, so each step uses the sum of all alpha gradients since the start (``alpha_grad: cumulative``;
             ``window`` uses the last 10 epochs' sum, a [choice])
  selection: after every epoch, validation accuracy; the last epoch reaching the best one (``>=``) is kept.

300 epochs. The release trains in CLIP's fp16; xmx in fp32.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from xmx.errors import XmxError
from xmx.methods.base import (
    XmxModule,
    class_columns,
    eval_labels,
    fast_dev_run,
    fit_device,
)

log = logging.getLogger(__name__)

__all__ = ["LPPMethod", "fit_lpp", "lpp_init", "lpp_logits", "lpp_step_sizes"]


# ---- the equations -----------------------------------------------------------------------------------------------
def lpp_logits(x: Tensor, W_v: Tensor, b_v: Tensor, alpha: Tensor, T: Tensor) -> Tensor:
    """x [B,d] normalised, W_v [K,d], b_v [K], alpha [K] (or scalar), T [d,K] -> [B,K]."""
    return x @ W_v.T + b_v + alpha * (x @ T)


def lpp_init(x: Tensor, y: Tensor, T: Tensor, num_classes: int, bias: str = "uniform",
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(W_v [K,d] class sums, b_v [K], alpha [K]) as the release initialises them."""
    n, d = x.shape
    counts = torch.bincount(y, minlength=num_classes)
    if bool((counts == 0).any()):
        raise XmxError(f"lpp: class {int((counts == 0).nonzero()[0])} has no training features")
    W_v = torch.zeros(num_classes, d, dtype=x.dtype, device=x.device).index_add_(0, y, x)
    if bias == "uniform":
        bound = 1.0 / math.sqrt(d)
        b_v = (torch.rand(num_classes, generator=generator, dtype=x.dtype) * 2 - 1).to(x.device) * bound
    else:
        b_v = torch.zeros(num_classes, dtype=x.dtype, device=x.device)
    own = (x @ T).gather(1, y[:, None])[:, 0]                                  # x_i · t_{y_i}   [n]
    per_class = torch.zeros(num_classes, dtype=x.dtype, device=x.device).index_add_(0, y, own) / counts.to(x.dtype)
    alpha = torch.full((num_classes,), 250.0 * float(per_class.mean()), dtype=x.dtype, device=x.device)
    return W_v, b_v, alpha


def lpp_step_sizes(x: Tensor, T: Tensor) -> tuple[float, float]:
    """(lr_w, lr_alpha): ``4n / lambda_max(X^T X)`` and ``n / (4 max_k sum_i (x_i·t_k)^2)``."""
    n = x.shape[0]
    lam_max = float(torch.linalg.eigvalsh((x.T @ x).double())[-1])
    lr_w = 4.0 * n / lam_max
    lr_alpha = n / (4.0 * float(((x @ T) ** 2).sum(dim=0).max()))
    return lr_w, lr_alpha


def fit_lpp(x: Tensor, y: Tensor, T: Tensor, num_classes: int, epochs: int = 300, alpha_every: int = 10,
            alpha_grad: str = "cumulative", bias: str = "uniform", momentum: float = 0.9,
            x_val: Tensor | None = None, y_val: Tensor | None = None, generator: torch.Generator | None = None,
            ) -> dict:
    """The release's training loop. Returns {"W", "b", "alpha", "epoch", "val_acc", "curve", "lr_w", "lr_alpha",
    "alpha_init"}; with validation data the state of the last epoch with the best validation accuracy, else the
    last epoch's."""
    W0, b0, a0 = lpp_init(x, y, T, num_classes, bias, generator)
    lr_w, lr_alpha = lpp_step_sizes(x, T)
    W = W0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    alpha = a0.clone().requires_grad_(True)
    opt = torch.optim.SGD([W, b], lr=lr_w, momentum=momentum)
    text = x @ T                                                               # fixed [n,K]
    text_val = x_val @ T if x_val is not None else None
    best = {"val_acc": -1.0}
    curve = []
    for epoch in range(epochs):
        logits = x @ W.T + b + alpha * text
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()                                                        # W, b only (as the release)
        if alpha_grad == "window" and epoch % alpha_every == 0 and alpha.grad is not None:
            alpha.grad.zero_()
        loss.backward()
        opt.step()
        if (epoch + 1) % alpha_every == 0:
            with torch.no_grad():
                alpha -= lr_alpha * alpha.grad
        if x_val is not None:
            with torch.no_grad():
                acc = 100.0 * float(((x_val @ W.T + b + alpha * text_val).argmax(1) == y_val).float().mean())
            curve.append({"epoch": epoch, "val_acc": acc, "loss": float(loss.detach())})
            if acc >= best["val_acc"]:
                best = {"val_acc": acc, "epoch": epoch, "W": W.detach().clone(), "b": b.detach().clone(),
                        "alpha": alpha.detach().clone()}
    if x_val is None:
        best = {"val_acc": None, "epoch": epochs - 1, "W": W.detach(), "b": b.detach(), "alpha": alpha.detach()}
    return {**best, "curve": curve, "lr_w": lr_w, "lr_alpha": lr_alpha, "alpha_init": float(a0[0]),
            "final_loss": float(loss.detach())}


# ==================================================================================================== LightningModule
class LPPMethod(XmxModule):
    """LP++ (no gradient steps through Lightning: the release's full-batch loop runs in ``build``, on ``device``).
    Training rows: view ``train_view`` of the cached augmented views (the release draws one augmentation per
    image); ``train_view: all`` uses every cached view as a row (a [choice])."""

    needs_fit = False

    def __init__(self, epochs: int = 300, alpha_every: int = 10, alpha_grad: str = "cumulative",
                 bias_init: str = "uniform", momentum: float = 0.9, train_view: int | str = 0, device: str = "auto",
                 **kwargs):
        super().__init__(epochs=epochs, **kwargs)
        if alpha_grad not in ("cumulative", "window"):
            raise XmxError(f"method.alpha_grad={alpha_grad!r}; valid choices: cumulative, window")
        if bias_init not in ("uniform", "zeros"):
            raise XmxError(f"method.bias_init={bias_init!r}; valid choices: uniform, zeros")
        if int(epochs) < 1 or int(alpha_every) < 1:
            raise XmxError("method.epochs and method.alpha_every must be positive integers")
        if not (train_view == "all" or (isinstance(train_view, int) and train_view >= 0)):
            raise XmxError(f"method.train_view={train_view!r}; valid choices: a view index (0, 1, ...) or all")
        self.alpha_every, self.alpha_grad, self.bias_init = int(alpha_every), alpha_grad, bias_init
        self.momentum, self.train_view, self.device_choice = float(momentum), train_view, str(device)
        self.result: dict = {}
        self.heads: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def build(self, dm) -> None:
        if dm.inputs != "features":
            raise XmxError("lpp trains on cached features; set method.inputs=features")
        K = len(dm.classnames)
        for s in [dm.val_set, *dm.eval_sets]:
            if class_columns(s, K)[0] == "new":
                raise XmxError(f"lpp cannot score classes it never trained on (eval set {s.name}); evaluate new "
                               "classes with method=zeroshot, gda or prolip")
        dev = fit_device(self.device_choice)
        V, n, d = dm.train_features.shape
        if self.train_view == "all":
            x, y = dm.train_features.reshape(V * n, d), dm.train_labels.repeat(V)
        else:
            if self.train_view >= V:
                raise XmxError(f"method.train_view={self.train_view} but only {V} views are cached "
                               "(augment.views)")
            x, y = dm.train_features[self.train_view], dm.train_labels
        x = F.normalize(x.to(dev).float(), dim=-1)
        y = y.to(dev)
        T = dm.text_classifier(list(dm.classnames)).to(dev).float()
        xv = F.normalize(dm.features_of(dm.val_set).to(dev).float(), dim=-1)
        yv = eval_labels(dm.val_set).to(dev)
        g = torch.Generator().manual_seed(int(getattr(dm, "seed", 1)))
        epochs = 1 if fast_dev_run(self) else self.epochs
        self.result = fit_lpp(x, y, T, K, epochs, self.alpha_every, self.alpha_grad, self.bias_init,
                              self.momentum, xv, yv, g)
        W, b, a = self.result["W"], self.result["b"], self.result["alpha"]
        for s in [dm.val_set, *dm.eval_sets]:
            kind, cols = class_columns(s, K)
            Ts = dm.text_classifier(list(s.classnames), list(s.templates or dm.templates)).to(dev).float()
            if kind == "seen":
                c = cols.to(dev)
                self.heads[s.name] = (W[c], b[c], a[c], Ts)
            else:
                self.heads[s.name] = (W, b, a, Ts)
        log.info("lpp: epoch %d kept (val %.2f%%), lr_w %.4g, lr_alpha %.4g", self.result["epoch"],
                 self.result["val_acc"], self.result["lr_w"], self.result["lr_alpha"])

    def logits(self, x: Tensor, eval_set) -> Tensor:
        W, b, a, T = self.heads[eval_set.name]
        f = F.normalize(self.image_features(x).float().to(W.device), dim=-1)
        return lpp_logits(f, W, b, a, T).to(x.device)

    def extra_results(self) -> dict:
        r = self.result
        return {"selected_epoch": r.get("epoch"), "selected_by": "val/acc (last epoch reaching the best, as the "
                "release)", "val_acc": r.get("val_acc"), "lr_w": r.get("lr_w"), "lr_alpha": r.get("lr_alpha"),
                "alpha_init": r.get("alpha_init"),
                "alpha_mean": None if "alpha" not in r else float(r["alpha"].mean()),
                "epochs": self.epochs, "alpha_grad": self.alpha_grad, "bias_init": self.bias_init,
                "train_view": self.train_view, "epoch_curve": r.get("curve")}
