"""GDA — Gaussian discriminant analysis on CLIP features (Wang et al., "A Hard-to-Beat Baseline for Training-free
CLIP-based Adaptation", ICLR'24; released code ``mrflogs/ICLR24``). Training-free.

The equations, as in the authors' code (``main_few_shots.py``, ``main_base2new.py``)::

    x_i     = norm(f_i)                 for every cached augmented view of every few-shot image (10 views: 10·NK rows)
    mu_k    = mean_{i: y_i = k} x_i                                        # [K, d]  class means
    S       = cov({x_i - mu_{y_i}})      (unbiased, 1/(n-1))               # [d, d]  pooled within-class covariance
    P       = d · pinv((n-1)·S + tr(S)·I)                                  # the release's "KS" shrinkage estimator
                                                                           #   = inverse of ((n-1)S + tr(S) I) / d
    W       = P mu^T                                                        # [d, K]
    b_k     = log pi_k - 1/2 mu_k^T P mu_k,    pi_k = 1/K                   # [K]
    logits  = 100 · norm(f) W_clip + alpha · (norm(f) W + b)                # W_clip [d, K] the zero-shot classifier
    alpha   = argmax over {1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100} of validation accuracy (first maximum)

``(n-1)·S + tr(S)·I`` is positive definite whenever ``S != 0`` (the ``tr(S) I`` term), so a 1-shot problem (rank-0
within-class scatter of one view, or fewer samples than dimensions) still has a finite inverse: no NaN.

Base-to-new (``main_base2new.py``): the base classifier uses ``P = pinv(mean_k cov_k)`` (per-class unbiased
covariances averaged, no shrinkage; ``covariance: class_mean``); a **new** class with text embedding ``w`` has no
images, so its Gaussian is synthesised from the ``topk = 64`` training features nearest to ``w``::

    N_w      = the 64 rows x_i with the largest w·x_i
    mu_w     = mean(N_w ∪ {w repeated 16 times})                           # 16: ``new_text_repeats``
    C_w      = (N_w - w)^T (N_w - w) / (64 - 1)
    P_new    = mean_w  d · pinv((64-1)·C_w + tr(C_w)·I)
    W_new, b_new as above with mu_w, P_new and a uniform prior over the new classes; alpha is the base one.

Covariance estimators: ``ks`` (the release), ``class_mean`` (the release's base-to-new base), and scikit-learn's
``ledoit_wolf`` / ``oas`` / ``empirical`` (then ``P = inv(Sigma)`` through ``torch.linalg.pinv``).

Selection: ``selection: val`` (default) searches alpha on the validation set. The release searches alpha on the
**test** set for ImageNet (it has no validation split there: ``val_features = test_features``) and on the whole
validation split for the other datasets; the top-level ``selection=paper`` reproduces that (ImageNet and its variants: the
first eval set, i.e. test), and results.json records where alpha was chosen.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from xmx.errors import XmxError
from xmx.validate import Ge, NonNegInt, PosFloat
from xmx.methods.base import XmxModule, class_columns, eval_labels, fit_device
from xmx.results import SELECTION_MODES
from xmx.utils import Heartbeat

log = logging.getLogger(__name__)

__all__ = [
    "ALPHAS",
    "GDAMethod",
    "class_mean_precision",
    "class_means",
    "gda_classifier",
    "ks_precision",
    "search_alpha",
    "sklearn_precision",
    "synthesize_new_classes",
]

ALPHAS = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)  # the release's grid
COVARIANCES = ("ks", "class_mean", "ledoit_wolf", "oas", "empirical")


# ---- the equations -----------------------------------------------------------------------------------------------
def shrunk_pinv(A: Tensor, trace: Tensor) -> Tensor:
    """``pinv(A)`` for the release's shrunk matrices ``A = scatter + tr(S)·I`` [..,d,d]: positive definite whenever
    ``tr(S) > 0`` (every eigenvalue >= tr(S)), so ``pinv = inv`` there (an LU inverse, several times faster than
    the eigendecomposition ``pinv`` runs); ``tr(S) = 0`` means ``A = 0``, whose pinv is 0."""
    pos = trace > 0
    out = torch.zeros_like(A)
    if bool(pos.all()):
        return torch.linalg.inv(A)
    if bool(pos.any()):
        out[pos] = torch.linalg.inv(A[pos])
    return out


def class_means(x: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """x [n,d], y [n] -> mu [K,d]; every class must have at least one row."""
    counts = torch.bincount(y, minlength=num_classes)
    if bool((counts == 0).any()):
        missing = int((counts == 0).nonzero()[0])
        raise XmxError(f"GDA: class {missing} has no training features; every class needs at least one shot")
    sums = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, y, x)
    return sums / counts[:, None].to(x.dtype)


def ks_precision(centred: Tensor) -> Tensor:
    """The release's shrinkage estimator of the shared precision matrix from centred rows [n,d]:
    ``d · pinv((n-1)·S + tr(S)·I)`` with ``S`` the unbiased covariance (:func:`shrunk_pinv`)."""
    n, d = centred.shape
    if n < 2:
        raise XmxError("GDA: the covariance needs at least 2 training features; add shots or augmented views")
    scatter = centred.T @ centred                                    # (n-1)·S
    trace = torch.diagonal(scatter).sum() / (n - 1)                  # tr(S)
    eye = torch.eye(d, dtype=centred.dtype, device=centred.device)
    return d * shrunk_pinv(scatter + trace * eye, trace)


def class_mean_precision(x: Tensor, y: Tensor, mu: Tensor) -> Tensor:
    """The release's base-to-new base estimator: ``pinv(mean_k cov_k)`` with per-class unbiased covariances."""
    K, d = mu.shape
    counts = torch.bincount(y, minlength=K)
    if bool((counts < 2).any()):
        raise XmxError("GDA: method.covariance=class_mean needs at least 2 features per class (shots x views); use "
                       "method.covariance=ks (the shrinkage estimator) for 1-shot problems")
    c = x - mu[y]
    covs = torch.zeros(K, d, d, dtype=x.dtype, device=x.device)
    beat = Heartbeat("GDA class covariances", total=K)  # a line every 10 s
    for k in range(K):  # one [d,d] at a time keeps memory at K·d² (the result) rather than n·d²
        beat(k)
        ck = c[y == k]
        covs[k] = ck.T @ ck / (ck.shape[0] - 1)
    return torch.linalg.pinv(covs.mean(dim=0), hermitian=True)


def sklearn_precision(centred: Tensor, estimator: str) -> Tensor:
    """scikit-learn's covariance estimators (``ledoit_wolf``, ``oas``, ``empirical``) on centred rows [n,d]; the
    covariance is inverted with ``torch.linalg.pinv``."""
    from sklearn.covariance import OAS, EmpiricalCovariance, LedoitWolf
    cls = {"ledoit_wolf": LedoitWolf, "oas": OAS, "empirical": EmpiricalCovariance}[estimator]
    est = cls(assume_centered=True, store_precision=False).fit(centred.detach().cpu().double().numpy())
    cov = torch.as_tensor(est.covariance_, dtype=centred.dtype, device=centred.device)
    return torch.linalg.pinv(cov, hermitian=True)


def gda_classifier(mu: Tensor, precision: Tensor, prior: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Linear discriminant of Gaussians with shared precision ``P``: ``W = P mu^T`` [d,K],
    ``b = log pi - 1/2 diag(mu P mu^T)`` [K] (uniform ``pi`` by default)."""
    K = mu.shape[0]
    if prior is None:
        prior = torch.full((K,), 1.0 / K, dtype=mu.dtype, device=mu.device)
    W = precision @ mu.T                                             # [d,K] (P symmetric)
    b = prior.log() - 0.5 * (mu * W.T).sum(dim=1)                    # [K]
    return W, b


def synthesize_new_classes(x: Tensor, text_new: Tensor, topk: int = 64, text_repeats: int = 16,
                           chunk: int = 64) -> tuple[Tensor, Tensor]:
    """The release's Gaussians for classes without images. x [n,d] normalised training features, text_new [d,M]
    normalised text embeddings -> (mu [M,d], the averaged KS precision [d,d])."""
    n, d = x.shape
    k = int(topk)
    if n < 2:
        raise XmxError("GDA: synthesising new classes needs at least 2 training features (method.new_topk)")
    if k > n:  # never clamped: the k used is the k recorded
        raise XmxError(f"method.new_topk={k} is more than the {n} training features (images x cached views); set "
                       f"method.new_topk<={n}")
    idx = torch.topk(text_new.T @ x.T, k=k, dim=1).indices           # [M,k]
    M = text_new.shape[1]
    mus, prec = [], torch.zeros(d, d, dtype=x.dtype, device=x.device)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    beat = Heartbeat("GDA new-class Gaussians", total=M)  # a line every 10 s
    for s in range(0, M, chunk):
        beat(s)
        nb = x[idx[s:s + chunk]]                                     # [m,k,d]
        w = text_new[:, s:s + chunk].T                               # [m,d]
        mus.append((nb.sum(dim=1) + text_repeats * w) / (k + text_repeats))
        c = nb - w[:, None, :]
        scatter = c.transpose(1, 2) @ c                              # (k-1)·C_w  [m,d,d]
        trace = torch.diagonal(scatter, dim1=1, dim2=2).sum(dim=1) / (k - 1)  # tr(C_w) [m]
        prec += (d * shrunk_pinv(scatter + trace[:, None, None] * eye, trace)).sum(dim=0)
    return torch.cat(mus), prec / M


def search_alpha(zs_logits: Tensor, gda_logits: Tensor, labels: Tensor, alphas=ALPHAS,
                 fallback: float = 0.1) -> tuple[float, float, list]:
    """The release's search (main_few_shots.py:68-76): ``best_alpha = fallback`` (0.1) and ``best_acc = 0``, then the
    first alpha of ``alphas`` whose accuracy of ``zs + alpha·gda`` beats the best so far (ties keep the earlier one);
    when no alpha has accuracy above 0 the fallback stays. Returns (alpha, accuracy %, [(alpha, acc), ...])."""
    curve = []
    best_a, best_acc = float(fallback), 0.0
    beat = Heartbeat("GDA alpha search", total=len(alphas))  # a line every 10 s
    for i, a in enumerate(alphas):
        beat(i)
        acc = 100.0 * float(((zs_logits + a * gda_logits).argmax(dim=1) == labels).float().mean())
        curve.append((float(a), acc))
        if acc > best_acc:
            best_a, best_acc = float(a), acc
    return best_a, best_acc, curve


# ==================================================================================================== LightningModule
class GDAMethod(XmxModule):
    """GDA (training-free). ``build``: W, b from the normalised cached training views, alpha searched on the
    validation set (or, under ``selection: paper``, where the release searched it); new classes of an eval set
    are synthesised from their text embeddings when ``new_classes: synthesize`` (base-to-new)."""

    needs_fit = False
    selection_modes = SELECTION_MODES  # paper: the release searches alpha on ImageNet's test set

    def __init__(self, covariance: Literal[COVARIANCES] = "ks", alphas=ALPHAS, zs_scale: PosFloat = 100.0,
                 selection: Literal["val", "paper"] = "val", new_classes: Literal["synthesize", "refuse"] = "synthesize",
                 new_topk: Annotated[int, Ge(2)] = 64, new_text_repeats: NonNegInt = 16,
                 solve_dtype: Literal["float32", "float64"] = "float32", device: str = "auto",
                 fallback_alpha: float = 0.1, val_shots=None, dataset_templates: dict | None = None, **kwargs):
        """``val_shots`` / ``dataset_templates`` are the recipe's data choices (``data.val_shots`` / ``data.templates``
        read them); ``fallback_alpha``: the alpha kept when none has validation accuracy above 0 (the release's 0.1)."""
        super().__init__(**kwargs)
        self.fallback_alpha = float(fallback_alpha)
        if covariance not in COVARIANCES:
            raise XmxError(f"method.covariance={covariance!r}; valid choices: {', '.join(COVARIANCES)}")
        if selection not in SELECTION_MODES:
            raise XmxError(f"selection={selection!r}; valid choices: {', '.join(SELECTION_MODES)}")
        if new_classes not in ("synthesize", "refuse"):
            raise XmxError(f"method.new_classes={new_classes!r}; valid choices: synthesize, refuse")
        if solve_dtype not in ("float32", "float64"):
            raise XmxError(f"method.solve_dtype={solve_dtype!r}; valid choices: float32, float64")
        if not alphas or any(not (float(a) >= 0) for a in alphas):
            raise XmxError("method.alphas must be a non-empty list of non-negative numbers")
        if int(new_topk) < 2 or int(new_text_repeats) < 0:
            raise XmxError("method.new_topk must be >= 2 and method.new_text_repeats >= 0")
        self.covariance, self.alphas, self.zs_scale, self.selection = covariance, [float(a) for a in alphas], \
            float(zs_scale), selection
        self.new_classes, self.new_topk, self.new_text_repeats = new_classes, int(new_topk), int(new_text_repeats)
        self.solve_dtype = getattr(torch, solve_dtype)
        self.device_choice = str(device)
        self.alpha: float | None = None
        self.search: dict | None = None
        self.heads: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # eval set -> (W_clip, W, b)
        self.final: dict[str, tuple[Tensor, Tensor]] = {}  # eval set -> (100·W_clip + alpha·W, alpha·b)
        self.fit_info: dict = {}

    def build(self, dm) -> None:
        if dm.inputs != "features":
            raise XmxError("gda estimates its Gaussians from cached features; set method.inputs=features")
        dev = fit_device(self.device_choice)
        V, n, d = dm.train_features.shape
        K = len(dm.classnames)
        for s in [dm.val_set, *dm.eval_sets]:  # refuse what cannot be scored before any work
            kind, _ = class_columns(s, K)
            if kind == "new" and self.new_classes == "refuse":
                raise XmxError(f"gda: eval set '{s.name}' has classes never trained on; set "
                               "method.new_classes=synthesize (the release's base-to-new variant)")
        x = F.normalize(dm.train_features.to(dev, self.solve_dtype).reshape(V * n, d), dim=-1)   # [V·n, d]
        y = dm.train_labels.to(dev).repeat(V)                                                    # [V·n]
        mu = class_means(x, y, K)
        if self.covariance == "ks":
            P = ks_precision(x - mu[y])
        elif self.covariance == "class_mean":
            P = class_mean_precision(x, y, mu)
        else:
            P = sklearn_precision(x - mu[y], self.covariance)
        if not bool(torch.isfinite(P).all()):
            raise XmxError("gda: the precision matrix is not finite (NaN/inf in the cached features?); recompute them")
        W, b = gda_classifier(mu, P)
        self.fit_info = {"train_rows": int(V * n), "views": int(V), "dim": int(d), "classes": int(K),
                         "covariance": self.covariance}
        self._x, self._W, self._b = x, W, b  # the synthesis of new classes reads the training rows
        for s in [dm.val_set, *dm.eval_sets]:
            self.heads[s.name] = self._head(dm, s, dev)
        del self._x
        self._choose_alpha(dm, dev)

    def _head(self, dm, eval_set, dev) -> tuple[Tensor, Tensor, Tensor]:
        W_clip = dm.text_classifier(list(eval_set.classnames), list(eval_set.templates or dm.templates)).to(dev)
        kind, cols = class_columns(eval_set, len(dm.classnames))
        if kind == "same":
            return W_clip.float(), self._W.float(), self._b.float()
        if kind == "seen":
            c = cols.to(dev)
            return W_clip.float(), self._W[:, c].float(), self._b[c].float()
        mu_new, P_new = synthesize_new_classes(self._x, W_clip.to(self.solve_dtype), self.new_topk,
                                               self.new_text_repeats)
        W, b = gda_classifier(mu_new, P_new)
        return W_clip.float(), W.float(), b.float()

    def _parts(self, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
        W_clip, W, b = self.heads[name]
        f = F.normalize(x.float().to(W.device), dim=-1)
        return self.zs_scale * f @ W_clip, f @ W + b

    def _choose_alpha(self, dm, dev) -> None:
        on = dm.val_set
        if self.selection == "paper" and str(dm.name).lower() == "imagenet":
            on = dm.eval_sets[0]  # the release: ImageNet's "validation" features are its test features
        zs, g = self._parts(dm.features_of(on).to(dev), on.name)
        self.alpha, acc, curve = search_alpha(zs, g, eval_labels(on).to(dev), self.alphas, self.fallback_alpha)
        self.search = {"on": on.name, "val_acc" if on is dm.val_set else "acc": acc,
                       "curve": [{"alpha": a, "acc": c} for a, c in curve]}
        log.info("gda: alpha %.4g chosen on %s (%.2f%%)", self.alpha, on.name, acc)
        # alpha fixed: one classifier per eval set, 100·W_clip + alpha·W and alpha·b (one matmul per batch)
        self.final = {name: (self.zs_scale * W_clip + self.alpha * W, self.alpha * b)
                      for name, (W_clip, W, b) in self.heads.items()}

    def logits(self, x: Tensor, eval_set) -> Tensor:
        W, b = self.final[eval_set.name]
        f = F.normalize(self.image_features(x).float().to(W.device), dim=-1)
        return (f @ W + b).to(x.device)

    def extra_results(self) -> dict:
        return {"alpha": self.alpha, "selection": self.selection, "searched_on": (self.search or {}).get("on"),
                "search": self.search, "fit": self.fit_info, "zs_scale": self.zs_scale,
                "new_classes": {"rule": self.new_classes, "topk": self.new_topk,
                                "text_repeats": self.new_text_repeats}}
