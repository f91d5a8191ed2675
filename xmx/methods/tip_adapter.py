"""Tip-Adapter and Tip-Adapter-F (Zhang et al.; spec §2), the cache model on frozen CLIP features.

The equations, as in the authors' code::

    keys   F = norm(mean_views(raw view features))        # [NK, C]
    values L = one_hot(labels)                             # [NK, N]
    A      = exp(-beta * (1 - norm(f) F^T))                # [B, NK]   affinity
    logits = 100 * norm(f) W + alpha * A L                 # [B, N]

Tip-Adapter uses ``F`` as it is (training-free); Tip-Adapter-F makes ``F`` a trainable ``Linear(C -> NK, bias=False)``
initialised with ``F`` (its rows are not re-normalised while training, as in the original); ``L`` and ``W`` stay fixed.
``alpha`` and ``beta`` are then chosen by an exhaustive grid search on the validation split
(:func:`search_alpha_beta`).

The Lightning module for these lives below the equations (added by the method layer); everything here is plain
PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmx.errors import XmxError

__all__ = [
    "TIP_DATASETS", "TIP_DEFAULT", "tip_dataset_config", "norm", "affinity", "build_cache", "check_cache",
    "tip_logits", "TipAdapter", "TipAdapterF", "search_grid", "search_alpha_beta", "SearchResult", "correct_counts",
    "accuracy",
]

ZS_SCALE = 100.0  # Tip-Adapter's fixed CLIP logit scale


# ---- per-dataset defaults (spec §2; the authors' configs/*.yaml) --------------------------------------------------
# beta_max, alpha_max: the search maxima ``search_scale: [beta_max, alpha_max]`` (never reached by the grid);
# init_alpha, init_beta: the values used while training Tip-Adapter-F and before any search; epochs: Tip-Adapter-F.
def _entry(beta_max: float, alpha_max: float, init_alpha: float, epochs: int = 20) -> dict:
    return {"beta_max": float(beta_max), "alpha_max": float(alpha_max), "init_alpha": float(init_alpha),
            "init_beta": 1.0, "n_beta": 200, "n_alpha": 20, "epochs": int(epochs)}


TIP_DATASETS: dict[str, dict] = {
    "imagenet": _entry(7, 3, 1.17),
    "caltech101": _entry(12, 5, 3),
    "dtd": _entry(13, 13, 2),
    "eurosat": _entry(12, 10, 2, epochs=100),
    "fgvc_aircraft": _entry(30, 30, 5),
    "food101": _entry(10, 10, 1.17),
    "oxford_flowers": _entry(50, 50, 10),
    "oxford_pets": _entry(7, 3, 1.17),
    "stanford_cars": _entry(20, 10, 3),
    "sun397": _entry(12, 10, 1.17),
    "ucf101": _entry(7, 3, 3),
}
# [choice] for datasets the paper never ran (synthetic, user datasets): a middle-of-the-table search range.
TIP_DEFAULT: dict = _entry(10, 10, 1.0)


def tip_dataset_config(name: str | None) -> dict:
    """The spec-§2 entry for dataset ``name`` (a copy); :data:`TIP_DEFAULT` for a dataset not in the table.
    ImageNet's test-only variants (``imagenet_v2``, ``imagenet_sketch``, ...) use ImageNet's entry."""
    key = (name or "").lower()
    if key not in TIP_DATASETS and key.startswith("imagenet"):
        key = "imagenet"
    return dict(TIP_DATASETS.get(key, TIP_DEFAULT))


# ---- the equations -----------------------------------------------------------------------------------------------
def norm(x: Tensor) -> Tensor:
    """L2 normalisation over the last dimension (as the original code writes it: ``x / x.norm()``)."""
    return x / x.norm(dim=-1, keepdim=True)


def affinity(sim: Tensor, beta: float | Tensor) -> Tensor:
    """``exp(-beta (1 - sim))`` for cosine similarities ``sim``: 1 for an identical key, sharper as beta grows."""
    return torch.exp(-beta * (1.0 - sim))


def build_cache(view_feats: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Cache model from raw features of the few-shot images under V augmentations.

    view_feats [V, NK, C] raw (or [NK, C] for one view), labels [NK] in 0..num_classes-1
    -> keys [NK, C] = norm(mean over views), values [NK, N] one-hot (float32)."""
    if view_feats.ndim == 2:
        view_feats = view_feats[None]
    if view_feats.ndim != 3:
        raise XmxError(f"build_cache: view features must be [views, images, C], got shape {tuple(view_feats.shape)}")
    if labels.ndim != 1 or labels.shape[0] != view_feats.shape[1]:
        raise XmxError(f"build_cache: {tuple(labels.shape)} labels for {view_feats.shape[1]} cached images; "
                       "expected one label per image")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise XmxError(f"build_cache: labels span {int(labels.min())}..{int(labels.max())} but num_classes is "
                       f"{num_classes}")
    keys = norm(view_feats.float().mean(dim=0))                               # [NK, C]
    values = F.one_hot(labels.long(), num_classes).float()                    # [NK, N]
    return keys, values


def check_cache(W: Tensor, keys: Tensor, values: Tensor) -> None:
    """Refuse a cache that does not belong to this classifier: values must cover the N classes of ``W [C, N]``, keys
    must have the feature width C (another backbone otherwise), and there must be one value row per key."""
    C, N = W.shape
    if keys.ndim != 2 or values.ndim != 2:
        raise XmxError(f"cache: keys and values must be 2-D ([NK, C], [NK, N]); got {tuple(keys.shape)} and "
                       f"{tuple(values.shape)}")
    if keys.shape[1] != C:
        raise XmxError(f"cache keys have width {keys.shape[1]} but the features have width {C} (classifier W is "
                       f"[{C}, {N}]): the cache was built with another backbone; rebuild it")
    if values.shape[1] != N:
        raise XmxError(f"cache values cover {values.shape[1]} classes but the classifier W has {N}: the cache was "
                       "built for another label set; rebuild it for these classes")
    if values.shape[0] != keys.shape[0]:
        raise XmxError(f"cache has {keys.shape[0]} keys but {values.shape[0]} value rows; they must match")


def _check_feats(f: Tensor, W: Tensor) -> None:
    if f.ndim != 2 or f.shape[1] != W.shape[0]:
        raise XmxError(f"features have shape {tuple(f.shape)} but the classifier W expects width {W.shape[0]} "
                       "([B, C]); features and classifier come from different backbones")


def tip_logits(f: Tensor, W: Tensor, keys: Tensor, values: Tensor, alpha: float | Tensor,
               beta: float | Tensor) -> Tensor:
    """Tip-Adapter logits ``100 f W + alpha exp(-beta (1 - f keys^T)) values`` with f normalised here.

    f [B, C] (raw or normalised), W [C, N] normalised class texts, keys [NK, C] (used as given: fine-tuned keys are
    not unit vectors), values [NK, N] -> [B, N]."""
    check_cache(W, keys, values)
    _check_feats(f, W)
    f = norm(f.to(keys.dtype))                                   # [B, C]
    zs = ZS_SCALE * f @ W                                         # [B, N]
    A = affinity(f @ keys.T, beta)                               # [B, NK]
    return zs + alpha * (A @ values)                             # [B, N]


class TipAdapter(nn.Module):
    """Training-free Tip-Adapter: fixed keys, values, classifier; ``alpha``/``beta`` set by :meth:`set_alpha_beta`
    (after :func:`search_alpha_beta`). Buffers, so a checkpoint restores the searched values."""

    def __init__(self, keys: Tensor, values: Tensor, W: Tensor, alpha: float = 1.0, beta: float = 1.0):
        super().__init__()
        check_cache(W, keys, values)
        self.register_buffer("W", W.detach().float().clone())            # [C, N]
        self.register_buffer("keys", keys.detach().float().clone())      # [NK, C]
        self.register_buffer("values", values.detach().float().clone())  # [NK, N]
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("beta", torch.tensor(float(beta)))

    @torch.no_grad()
    def set_alpha_beta(self, alpha: float, beta: float) -> None:
        self.alpha.fill_(float(alpha))
        self.beta.fill_(float(beta))

    def cache_keys(self) -> Tensor:
        """keys [NK, C] as the affinity uses them."""
        return self.keys

    def forward(self, f: Tensor) -> Tensor:
        """f [B, C] raw -> logits [B, N]."""
        return tip_logits(f, self.W, self.keys, self.values, self.alpha, self.beta)


class TipAdapterF(nn.Module):
    """Tip-Adapter-F: the keys are a trainable ``Linear(C -> NK, bias=False)`` initialised with ``keys``; values and
    classifier fixed. Train with ``F.cross_entropy(model(f), y)`` (:meth:`loss`)."""

    def __init__(self, keys: Tensor, values: Tensor, W: Tensor, alpha: float = 1.0, beta: float = 1.0):
        super().__init__()
        check_cache(W, keys, values)
        NK, C = keys.shape
        self.register_buffer("W", W.detach().float().clone())            # [C, N]
        self.register_buffer("values", values.detach().float().clone())  # [NK, N]
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("beta", torch.tensor(float(beta)))
        self.adapter = nn.Linear(C, NK, bias=False)                       # weight [NK, C] = the keys
        with torch.no_grad():
            self.adapter.weight.copy_(keys.float())

    set_alpha_beta = TipAdapter.set_alpha_beta

    def cache_keys(self) -> Tensor:
        """current (trained) keys [NK, C]."""
        return self.adapter.weight

    def forward(self, f: Tensor) -> Tensor:
        """f [B, C] raw -> logits [B, N] = 100 f W + alpha exp(-beta (1 - adapter(f))) L."""
        _check_feats(f, self.W)
        f = norm(f.to(self.W.dtype))                                 # [B, C]
        zs = ZS_SCALE * f @ self.W                                    # [B, N]
        A = affinity(self.adapter(f), self.beta)                     # [B, NK]
        return zs + self.alpha * (A @ self.values)                   # [B, N]

    def loss(self, f: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self(f), y)


# ---- validation search -------------------------------------------------------------------------------------------
def search_grid(max_value: float, steps: int) -> list[float]:
    """The authors' grid ``[0.1 + i (max - 0.1) / steps for i in range(steps)]`` (``max`` itself never reached), as
    Python floats computed exactly as the original (``i * (max - 0.1) / steps + 0.1``)."""
    if steps < 1:
        raise XmxError(f"search grid: need at least one step, got {steps}")
    return [i * (max_value - 0.1) / steps + 0.1 for i in range(steps)]


@dataclass
class SearchResult:
    """Outcome of a validation grid search. ``grid[i, j]`` is the accuracy (%) at ``betas[i]``, ``alphas[j]``."""
    alpha: float
    beta: float
    acc: float
    grid: Tensor                      # [n_beta, n_alpha] accuracy in percent (float64, CPU)
    betas: list[float]
    alphas: list[float]
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready (results.json ``extra``): chosen values, best accuracy and the validation curve."""
        return {"alpha": self.alpha, "beta": self.beta, "val_acc": self.acc, "betas": self.betas,
                "alphas": self.alphas, "val_acc_grid": self.grid.tolist(), **self.extra}


def _chunk_rows(n_rows: int, per_row: int, max_elements: int) -> int:
    return max(1, min(n_rows, max_elements // max(per_row, 1)))


@torch.no_grad()
def correct_counts(zs: Tensor, caches: Tensor, alphas: Tensor, y: Tensor) -> Tensor:
    """Number of correct predictions of ``zs + alpha * cache`` for every (cache, alpha):
    zs [M, N], caches [P, M, N], alphas [Q], y [M] -> [P, Q] (int64). Ties inside a row go to the lower class index
    (``argmax`` keeps the first maximum)."""
    logits = zs[None, None] + alphas[None, :, None, None] * caches[:, None]       # [P, Q, M, N]
    return (logits.argmax(dim=-1) == y).sum(dim=-1)                              # [P, Q]


@torch.no_grad()
def search_alpha_beta(f_val: Tensor, y_val: Tensor, W: Tensor, keys: Tensor, values: Tensor, beta_max: float,
                      alpha_max: float, n_beta: int = 200, n_alpha: int = 20,
                      max_elements: int = 1 << 28) -> SearchResult:
    """Exhaustive (beta, alpha) search on validation features, vectorised.

    f_val [M, C] raw, y_val [M], W [C, N], keys [NK, C] (as the model uses them), values [NK, N].
    Grid ``beta_i = 0.1 + i (beta_max - 0.1)/n_beta``, ``alpha_j = 0.1 + j (alpha_max - 0.1)/n_alpha``; the best
    accuracy wins, ties keep the first pair in beta-major order (as the original double loop with ``>``).

    ``S = f keys^T`` is computed once; per beta the cache logits ``exp(-beta (1 - S)) L`` are one matmul, and since
    alpha enters linearly (``zs + alpha * cache``) all alphas are scored at once. Rows and betas are chunked so
    that no intermediate exceeds ``max_elements`` elements."""
    check_cache(W, keys, values)
    _check_feats(f_val, W)
    if y_val.ndim != 1 or y_val.shape[0] != f_val.shape[0]:
        raise XmxError(f"search: {tuple(y_val.shape)} labels for {f_val.shape[0]} validation features")
    if f_val.shape[0] == 0:
        raise XmxError("search: the validation set is empty; alpha/beta cannot be searched")
    betas_l, alphas_l = search_grid(beta_max, n_beta), search_grid(alpha_max, n_alpha)
    dev, dt = keys.device, keys.dtype
    f = norm(f_val.to(dev, dt))                                                  # [M, C]
    y = y_val.to(dev).long()                                                     # [M]
    zs = ZS_SCALE * f @ W.to(dev, dt)                                            # [M, N]
    S = f @ keys.T                                                               # [M, NK]
    L = values.to(dev, dt)                                                       # [NK, N]
    betas = torch.tensor(betas_l, device=dev, dtype=dt)
    alphas = torch.tensor(alphas_l, device=dev, dtype=dt)
    M, NK = S.shape
    N = L.shape[1]
    correct = torch.zeros(n_beta, n_alpha, dtype=torch.long, device=dev)
    per_row = NK + N + n_alpha * N                        # affinity + cache + all-alpha logits, for one beta
    rows = _chunk_rows(M, per_row, max_elements)
    nb = _chunk_rows(n_beta, rows * per_row, max_elements)                       # betas per chunk
    for r0 in range(0, M, rows):
        S_r, zs_r, y_r = S[r0:r0 + rows], zs[r0:r0 + rows], y[r0:r0 + rows]
        for b0 in range(0, n_beta, nb):
            A = affinity(S_r[None], betas[b0:b0 + nb, None, None])               # [nb, m, NK]
            caches = A @ L                                                       # [nb, m, N]
            correct[b0:b0 + nb] += correct_counts(zs_r, caches, alphas, y_r)     # [nb, n_alpha]
    flat = int(torch.argmax(correct.flatten()))          # first maximum = first pair in beta-major order
    i, j = divmod(flat, n_alpha)
    grid = correct.double().cpu() * (100.0 / M)
    return SearchResult(alpha=alphas_l[j], beta=betas_l[i], acc=float(grid[i, j]), grid=grid, betas=betas_l,
                        alphas=alphas_l)


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.argmax(dim=-1) == y.to(logits.device)).double().mean() * 100.0)

