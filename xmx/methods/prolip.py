"""ProLIP — fine-tune only CLIP's image projection, regularised towards its pre-trained value (Fahes et al.,
"CLIP's Visual Embedding Projector is a Few-shot Cornucopia"; released code ``astra-vision/ProLIP``,
``methods/ProLIP.py``).

The equations, as in the authors' code::

    z_i     = the image encoder's features *before* its final linear projection    [n, D]   (cached: their own
                                                                                              feature-store kind)
    f_i     = z_i P + b                      P [D, C] trainable, initialised at P0 (CLIP's); b CLIP's bias (ResNet
                                             attention pool: frozen; ViT: none)   ->  f = CLIP's embedding at P = P0
    logits  = 100 · norm(f) W_clip           W_clip [C, K] the normalised zero-shot classifier of the label set
    loss    = CE(logits, y) + lambda · ||P - P0||_F^2      (sum of squares: ``MSELoss(reduction="sum")``)

Full batch: one epoch = one step on all n training images, with the cached augmented view ``epoch % views`` (the
release cycles through 300 pre-extracted views); Adam (eps 1e-4), cosine annealing over the 300 epochs.

Hyper-parameters: with ``search: true`` (the release's few-shot-validation setting, ``few_shot_few_val``) a grid
``lr ∈ {1e-2, …, 1e-8}`` × ``lambda ∈ {10, 1, 0.1, 0.01, 1e-3, 1e-4, 0}`` is trained and the first pair with the
best validation accuracy is kept (lr-major order); without it (the validation-free settings, base-to-new) ``lr``
and ``lambda = lambda_rule(shots)``: ``1/N`` (``inv_shots``, the release's choice), ``1/N^2`` or ``fixed``.
New classes need nothing special: their text classifier scores the projected features.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from xmx.errors import XmxError
from xmx.validate import NonNegFloat, PosFloat, PosInt
from xmx.methods.base import XmxModule, eval_labels, fast_dev_run, fit_device
from xmx.utils import Heartbeat

log = logging.getLogger(__name__)

__all__ = ["LAMBDA_GRID", "LR_GRID", "ProLIPMethod", "fit_projection", "project", "prolip_logits", "prolip_loss"]

LR_GRID = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
LAMBDA_GRID = (10.0, 1.0, 0.1, 0.01, 0.001, 0.0001, 0.0)
ZS_SCALE = 100.0


# ---- the equations -----------------------------------------------------------------------------------------------
def project(z: Tensor, P: Tensor, bias: Tensor | None) -> Tensor:
    """Pre-projection features z [B,D] -> embeddings z P + b [B,C] (CLIP's own when P = P0)."""
    f = z @ P
    return f if bias is None else f + bias


def prolip_logits(z: Tensor, P: Tensor, bias: Tensor | None, W: Tensor, scale: float = ZS_SCALE) -> Tensor:
    return scale * F.normalize(project(z, P, bias), dim=-1) @ W


def prolip_loss(z: Tensor, y: Tensor, P: Tensor, P0: Tensor, bias: Tensor | None, W: Tensor, lam: float,
                scale: float = ZS_SCALE) -> Tensor:
    return F.cross_entropy(prolip_logits(z, P, bias, W, scale), y) + lam * ((P - P0) ** 2).sum()


def fit_projection(views: Tensor, y: Tensor, P0: Tensor, bias: Tensor | None, W: Tensor, lr: float, lam: float,
                   epochs: int = 300, eps: float = 1e-4, scale: float = ZS_SCALE,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, dict]:
    """The release's loop: views [V,n,D] pre-projection training features (view ``epoch % V`` each epoch),
    -> (trained P [D,C] float32, {"seconds", "epochs", "final_loss"}). ``dtype=torch.float16``: as the release, which
    trains the projection of the fp16 CLIP model: P, Adam's moments, the features, the classifier and the loss in
    half precision (Adam's eps 1e-4 is the release's guard against fp16 underflow)."""
    P = P0.to(dtype).clone().requires_grad_(True)
    P0, W = P0.to(dtype), W.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    opt = torch.optim.Adam([P], lr=lr, eps=eps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    beat = Heartbeat(f"ProLIP fit (lr {lr:g}, lambda {lam:g}), epochs", total=epochs)  # a line every 10 s
    for epoch in range(epochs):
        beat(epoch)
        z = views[epoch % views.shape[0]].to(dtype)  # views stay in their stored precision (300 views are large)
        loss = prolip_loss(z, y, P, P0, bias, W, lam, scale).float()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    if P.device.type == "cuda":
        torch.cuda.synchronize(P.device)
    return P.detach().float(), {"seconds": time.perf_counter() - t0, "epochs": epochs, "final_loss": float(loss.detach())}


def accuracy(z: Tensor, y: Tensor, P: Tensor, bias: Tensor | None, W: Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((prolip_logits(z, P, bias, W).argmax(1) == y).float().mean())


# ==================================================================================================== LightningModule
class ProLIPMethod(XmxModule):
    """ProLIP on cached pre-projection features (``feature_output: pre_projection`` makes the datamodule serve
    them); the full-batch loops run in ``build`` on ``device`` (no Lightning epochs)."""

    needs_fit = False

    def __init__(self, epochs: PosInt = 300, search: bool = True, lr_grid=LR_GRID, lambda_grid=LAMBDA_GRID,
                 lr: PosFloat = 1e-5, lambda_rule: Literal["inv_shots", "inv_shots2", "fixed"] = "inv_shots",
                 lam: NonNegFloat = 0.1, adam_eps: PosFloat = 1e-4, zs_scale: PosFloat = ZS_SCALE,
                 feature_output: Literal["pre_projection"] = "pre_projection", device: str = "auto",
                 precision: Literal["fp32", "fp16"] = "fp32", val_shots=None, dataset_templates: dict | None = None,
                 **kwargs):
        """``val_shots`` / ``dataset_templates``: the recipe's data choices (``data.val_shots`` / ``data.templates``
        read them). ``precision``: fp32 (default) | fp16 (the release: projection and Adam state in half)."""
        super().__init__(epochs=epochs, **kwargs)
        if precision not in ("fp32", "fp16"):
            raise XmxError(f"method.precision={precision!r}; valid choices: fp32, fp16 (the release: fp16)")
        self.precision = precision
        if feature_output != "pre_projection":
            raise XmxError("prolip trains the image projection: it needs method.feature_output=pre_projection")
        if lambda_rule not in ("inv_shots", "inv_shots2", "fixed"):
            raise XmxError(f"method.lambda_rule={lambda_rule!r}; valid choices: inv_shots, inv_shots2, fixed")
        if int(epochs) < 1:
            raise XmxError("method.epochs must be a positive integer")
        if search and (not lr_grid or not lambda_grid):
            raise XmxError("method.search=true needs non-empty method.lr_grid and method.lambda_grid")
        self.search_enabled, self.lr_grid, self.lambda_grid = bool(search), [float(v) for v in lr_grid], \
            [float(v) for v in lambda_grid]
        self.lr, self.lambda_rule, self.lam, self.adam_eps = float(lr), lambda_rule, float(lam), float(adam_eps)
        self.zs_scale, self.feature_output, self.device_choice = float(zs_scale), feature_output, str(device)
        self.chosen: dict = {}
        self.search_curve: list[dict] = []
        self.fit_info: dict = {}

    @property
    def train_dtype(self) -> torch.dtype:
        return torch.float16 if self.precision == "fp16" else torch.float32

    def lambda_for(self, shots: int) -> float:
        if self.lambda_rule == "inv_shots":
            return 1.0 / shots
        if self.lambda_rule == "inv_shots2":
            return 1.0 / shots ** 2
        return self.lam

    def build(self, dm) -> None:
        if dm.inputs != "features" or getattr(dm, "feature_output", "raw") != "pre_projection":
            raise XmxError("prolip needs cached pre-projection features: method.inputs=features and "
                           "data.feature_output=pre_projection (the method config sets both)")
        dev = fit_device(self.device_choice)
        P0, bias = dm.backbone.image_projection()
        P0, bias = P0.to(dev), None if bias is None else bias.to(dev)
        views = dm.train_features.to(dev)                                             # [V,n,D] stored precision
        if views.shape[-1] != P0.shape[0]:
            raise XmxError(f"prolip: cached features have width {views.shape[-1]} but the backbone's projection "
                           f"expects {P0.shape[0]}; clear the stale pre-projection entries of the feature store")
        y = dm.train_labels.to(dev)
        W = dm.text_classifier(list(dm.classnames)).to(dev).float()
        shots = int(dm.shots)
        fdr = fast_dev_run(self)  # debug=fdr: one epoch, one grid point
        epochs = 1 if fdr else self.epochs
        lr_grid, lambda_grid = (self.lr_grid[:1], self.lambda_grid[:1]) if fdr else (self.lr_grid, self.lambda_grid)
        if self.search_enabled:
            zv, yv = dm.features_of(dm.val_set).to(dev).float(), eval_labels(dm.val_set).to(dev)
            best = None
            t0 = time.perf_counter()
            for lr in lr_grid:
                for lam in lambda_grid:
                    P, _ = fit_projection(views, y, P0, bias, W, lr, lam, epochs, self.adam_eps, self.zs_scale,
                                          self.train_dtype)
                    acc = accuracy(zv, yv, P, bias, W)
                    self.search_curve.append({"lr": lr, "lambda": lam, "val_acc": acc})
                    if best is None or acc > best[0]:  # the release: strictly better replaces (first max kept)
                        best = (acc, lr, lam, P)
            acc, lr, lam, P = best
            self.chosen = {"lr": lr, "lambda": lam, "val_acc": acc, "by": "val grid search"}
            self.fit_info = {"search_seconds": time.perf_counter() - t0, "fits": len(self.search_curve)}
        else:
            lr, lam = self.lr, self.lambda_for(shots)
            P, info = fit_projection(views, y, P0, bias, W, lr, lam, epochs, self.adam_eps, self.zs_scale,
                                          self.train_dtype)
            self.chosen = {"lr": lr, "lambda": lam, "by": f"lambda_rule={self.lambda_rule} (no validation)"}
            self.fit_info = info
        self.P, self.bias = P, bias
        self.fit_info.update(views=int(views.shape[0]), rows=int(views.shape[1]), pre_dim=int(P0.shape[0]),
                             drift=float((P - P0).norm() / P0.norm()))
        self.heads = {s.name: dm.text_classifier(list(s.classnames), list(s.templates or dm.templates)).to(dev).float()
                      for s in [dm.val_set, *dm.eval_sets]}
        log.info("prolip: lr %.3g, lambda %.3g (%s)", lr, lam, self.chosen["by"])

    def logits(self, x: Tensor, eval_set) -> Tensor:
        if x.dim() != 2:
            raise XmxError("prolip scores cached pre-projection features; set method.inputs=features")
        z = x.float().to(self.P.device)
        return prolip_logits(z, self.P, self.bias, self.heads[eval_set.name], self.zs_scale).to(x.device)

    def extra_results(self) -> dict:
        return {"chosen": self.chosen, "search": self.search_curve or None, "fit": self.fit_info,
                "epochs": self.epochs, "zs_scale": self.zs_scale, "feature_output": self.feature_output,
                "precision": self.precision}
