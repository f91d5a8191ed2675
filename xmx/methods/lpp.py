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

300 epochs. The release trains in CLIP's fp16 (weights, features and updates); xmx keeps parameters, softmax and
updates in fp32 and runs the two big products per epoch in ``precision`` (``auto``: fp16 on CUDA as the release,
bf16 on a CPU with native bf16 instructions, where it is ~3x faster than fp32, else fp32: emulated bf16 is ~5x
slower; ``fp32`` is a [choice]; ``extra.matmul_dtype_why`` in results.json says which and why).
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from xmx.errors import XmxError
from xmx.validate import Interval, NonNegInt, PosInt
from xmx.methods.base import (
    XmxModule,
    class_columns,
    eval_labels,
    fast_dev_run,
    fit_device,
)
from xmx.utils import Heartbeat

log = logging.getLogger(__name__)

__all__ = ["LPPMethod", "fit_lpp", "lpp_init", "lpp_logits", "lpp_step_sizes", "matmul_dtype"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
    lam_max = float(torch.linalg.eigvalsh((x.T @ x).float())[-1])  # the release: scipy eigh of fp32 at most
    lr_w = 4.0 * n / lam_max
    lr_alpha = n / (4.0 * float(((x @ T) ** 2).sum(dim=0).max()))
    return lr_w, lr_alpha


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16 / AMX, aarch64 BF16 (/proc/cpuinfo flags)


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The CPU's native bf16 instruction flags (empty when it has none, or when the OS does not say)."""
    try:
        text = open(cpuinfo).read()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return [f for f in BF16_CPU_FLAGS if f in flags]


def matmul_choice(precision: str, device: torch.device | str) -> tuple[torch.dtype, str]:
    """(the dtype of the products, the softmax and G; why). ``fp32``; ``bf16``; ``fp16``; ``auto`` = fp16 on CUDA
    (the release's dtype), bf16 on a CPU with native bf16 instructions (AVX-512 BF16, AMX, Arm BF16), else fp32:
    without them bf16 products are emulated and ~5x slower than fp32 (fp16 ~15x). Parameters, gradients and updates
    stay fp32 in every case."""
    if precision != "auto":
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision], "method.precision"
    if torch.device(device).type == "cuda":
        return torch.float16, "auto: cuda (the release's fp16)"
    flags = cpu_bf16_flags()
    if flags:
        return torch.bfloat16, f"auto: the CPU has native bf16 ({', '.join(flags)})"
    return torch.float32, "auto: the CPU has no native bf16 (no avx512_bf16/amx_bf16/bf16 flag): fp32 is faster"


def matmul_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype :func:`matmul_choice` picks."""
    return matmul_choice(precision, device)[0]


def fit_lpp(x: Tensor, y: Tensor, T: Tensor, num_classes: int, epochs: int = 300, alpha_every: int = 10,
            alpha_grad: str = "cumulative", bias: str = "uniform", momentum: float = 0.9,
            x_val: Tensor | None = None, y_val: Tensor | None = None, generator: torch.Generator | None = None,
            precision: str = "fp32") -> dict:
    """The release's training loop, with its gradients written out instead of taken by autograd. Since
    ``alpha ⊙ (x T) = x (alpha ⊙ T)``, the logits are ONE product ``[X, 1] [W_eff, b_v]ᵀ`` with
    ``W_eff = W_v + alpha ⊙ Tᵀ``, and the one backward product ``Gᵀ X`` (``G = (softmax − onehot)/n``) gives
    every gradient: ``∂W_v = ∂W_eff = Gᵀ X``, ``∂b_v = Σ_i G_i``, ``∂alpha_k = ∂W_eff[k] · t_k``. Two
    n×d×K products per epoch and one for validation, the products, the softmax and G in ``precision`` (see
    ``matmul_dtype``; the release computes all of it in fp16), parameters, gradients and updates in fp32; SGD with
    momentum as ``torch.optim.SGD`` (``buf = m·buf + g``, the first step ``buf = g``). Equal to the autograd loop in
    fp32 (tested).

    Returns {"W", "b", "alpha", "epoch", "val_acc", "curve", "lr_w", "lr_alpha", "alpha_init", "final_loss",
    "matmul_dtype", "matmul_dtype_why"}; with validation data the state of the last epoch with the best validation accuracy, else the
    last epoch's."""
    n, d = x.shape
    W, b, alpha = lpp_init(x, y, T, num_classes, bias, generator)
    alpha_init = float(alpha[0])
    lr_w, lr_alpha = lpp_step_sizes(x, T)
    h, why = matmul_choice(precision, x.device)

    def with_ones(f: Tensor) -> Tensor:                                        # [f, 1]: the bias rides in the product
        return torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype, device=f.device)], 1).to(h)

    Xa = with_ones(x)
    Xh = x.to(h)                                      # the backward product on [X, 1] is ~2x slower on CPU than on X
    Xv = with_ones(x_val) if x_val is not None else None
    Tt = T.T.contiguous()                                                      # [K, d]
    rows = torch.arange(n, device=x.device)
    # buffers written in place every epoch: fresh 64 MB tensors per epoch cost a third of the CPU time (page faults)
    L = torch.empty(n, num_classes, dtype=h, device=x.device)
    P = torch.empty_like(L)
    Lv = torch.empty(len(Xv), num_classes, dtype=h, device=x.device) if Xv is not None else None
    G_h = torch.empty(num_classes, d, dtype=h, device=x.device)

    def augmented(W: Tensor, b: Tensor, alpha: Tensor) -> Tensor:              # [W_eff, b_v]   [K, d+1]
        return torch.cat([W + alpha[:, None] * Tt, b[:, None]], 1).to(h)

    W_aug = augmented(W, b, alpha)
    buf_W = buf_b = None
    alpha_acc = torch.zeros_like(alpha)                                        # alpha.grad, never zeroed
    best = {"val_acc": -1.0}
    curve = []
    loss = torch.tensor(float("nan"))
    beat = Heartbeat(f"LP++ fit ({n} rows, {num_classes} classes), epochs", total=epochs)  # a line every 10 s
    for epoch in range(epochs):
        beat(epoch)
        torch.softmax(torch.mm(Xa, W_aug.T, out=L), dim=1, out=P)              # [n, K], in dtype h
        loss = -P[rows, y].float().clamp_min(torch.finfo(torch.float32).tiny).log().mean()
        P[rows, y] -= 1.0                                                      # n·G
        G_eff = torch.mm(P.T, Xh, out=G_h).float() / n                         # ∂W_eff   [K, d]
        g_b = P.sum(0).float() / n                                             # ∂b_v     [K]
        if alpha_grad == "window" and epoch % alpha_every == 0:
            alpha_acc.zero_()
        alpha_acc += (G_eff * Tt).sum(1)
        if buf_W is None:
            buf_W, buf_b = G_eff.clone(), g_b.clone()
        else:
            buf_W.mul_(momentum).add_(G_eff)
            buf_b.mul_(momentum).add_(g_b)
        W = W - lr_w * buf_W
        b = b - lr_w * buf_b
        if (epoch + 1) % alpha_every == 0:
            alpha = alpha - lr_alpha * alpha_acc
        W_aug = augmented(W, b, alpha)                                         # also the next epoch's forward
        if Xv is not None:
            pred = torch.mm(Xv, W_aug.T, out=Lv).max(1).indices                  # max: 2x faster than argmax in bf16
            acc = 100.0 * float((pred == y_val).float().mean())
            curve.append({"epoch": epoch, "val_acc": acc, "loss": float(loss)})
            if acc >= best["val_acc"]:
                best = {"val_acc": acc, "epoch": epoch, "W": W, "b": b, "alpha": alpha}
    if Xv is None:
        best = {"val_acc": None, "epoch": epochs - 1, "W": W, "b": b, "alpha": alpha}
    return {**best, "curve": curve, "lr_w": lr_w, "lr_alpha": lr_alpha, "alpha_init": alpha_init,
            "final_loss": float(loss), "matmul_dtype": str(h).removeprefix("torch."), "matmul_dtype_why": why}


# ==================================================================================================== LightningModule
class LPPMethod(XmxModule):
    """LP++ (no gradient steps through Lightning: the release's full-batch loop runs in ``build``, on ``device``).
    Training rows: view ``train_view`` of the cached augmented views (the release draws one augmentation per
    image); ``train_view: all`` uses every cached view as a row (a [choice])."""

    needs_fit = False

    def __init__(self, epochs: PosInt = 300, alpha_every: PosInt = 10,
                 alpha_grad: Literal["cumulative", "window"] = "cumulative",
                 bias_init: Literal["uniform", "zeros"] = "uniform", momentum: Annotated[float, Interval(ge=0, lt=1)] = 0.9,
                 train_view: NonNegInt | Literal["all"] = 0, device: str = "auto",
                 precision: Literal[PRECISIONS] = "auto", val_shots=None, dataset_templates: dict | None = None,
                 **kwargs):
        """``val_shots`` / ``dataset_templates``: the recipe's data choices (``data.val_shots`` / ``data.templates``
        read them)."""
        super().__init__(epochs=epochs, **kwargs)
        if alpha_grad not in ("cumulative", "window"):
            raise XmxError(f"method.alpha_grad={alpha_grad!r}; valid choices: cumulative, window")
        if bias_init not in ("uniform", "zeros"):
            raise XmxError(f"method.bias_init={bias_init!r}; valid choices: uniform, zeros")
        if precision not in PRECISIONS:
            raise XmxError(f"method.precision={precision!r}; valid choices: {', '.join(PRECISIONS)}")
        if int(epochs) < 1 or int(alpha_every) < 1:
            raise XmxError("method.epochs and method.alpha_every must be positive integers")
        if not (train_view == "all" or (isinstance(train_view, int) and train_view >= 0)):
            raise XmxError(f"method.train_view={train_view!r}; valid choices: a view index (0, 1, ...) or all")
        self.alpha_every, self.alpha_grad, self.bias_init = int(alpha_every), alpha_grad, bias_init
        self.momentum, self.train_view, self.device_choice = float(momentum), train_view, str(device)
        self.precision = precision
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
                              self.momentum, xv, yv, g, self.precision)
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
                "train_view": self.train_view, "precision": self.precision,
                "matmul_dtype": r.get("matmul_dtype"), "matmul_dtype_why": r.get("matmul_dtype_why"),
                "epoch_curve": r.get("curve")}
