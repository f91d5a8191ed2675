"""Tip-Adapter and Tip-Adapter-F (Zhang et al.; docs/methods/tip_adapter.md#the-cache-model-and-its-search), the cache
model on frozen CLIP features.

The equations, as in the authors' code::

    keys   F = norm(mean_views(raw view features))        # [NK, C]
    values L = one_hot(labels)                             # [NK, N]
    A      = exp(-beta * (1 - norm(f) F^T))                # [B, NK]   affinity
    logits = 100 * norm(f) W + alpha * A L                 # [B, N]

Tip-Adapter uses ``F`` as it is (training-free); Tip-Adapter-F makes ``F`` a trainable ``Linear(C -> NK, bias=False)``
initialised with ``F`` (its rows are not re-normalised while training, as in the original); ``L`` and ``W`` stay fixed.
``alpha`` and ``beta`` are then chosen by an exhaustive grid search on the validation split
(:func:`search_alpha_beta`).

Below the equations: the Lightning modules :class:`TipAdapterMethod` (training-free, alpha/beta searched on
validation in ``build``) and :class:`TipAdapterFMethod` (keys trained, epoch selected on validation, then alpha/beta
searched on validation before testing); the equations above them are plain PyTorch.

Long file: one family (the equations, the vectorised alpha/beta search, the two modules) that XMAdapter extends; the
shared pieces (labels, chunking, checkpoints) come from ``methods/base.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import hashlib
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmx.errors import XmxError
from xmx.methods.base import XmxModule, chunk_rows, eval_labels, resolve_checkpoint
from xmx.results import SELECTION_MODES
from xmx.validate import NonNegFloat, PosFloat, PosInt
from xmx.utils import Heartbeat

__all__ = [
    "TIP_DATASETS", "TIP_DEFAULT", "tip_dataset_config", "norm", "affinity", "build_cache", "check_cache",
    "check_feats", "tip_logits", "TipAdapter", "TipAdapterF", "search_grid", "search_alpha_beta", "SearchResult", "correct_counts",
    "accuracy", "TipAdapterMethod", "TipAdapterFMethod", "grid_summary",
]

log = logging.getLogger(__name__)

ZS_SCALE = 100.0  # Tip-Adapter's fixed CLIP logit scale


# ---- per-dataset defaults (docs/methods/tip_adapter.md#the-cache-model-and-its-search; the authors' configs/*.yaml)
# beta_max, alpha_max: the search maxima ``search_scale: [beta_max, alpha_max]`` (never reached by the grid);
# init_alpha, init_beta: the values used while training Tip-Adapter-F and before any search; epochs: Tip-Adapter-F.
# Written ONCE, in conf/method/tip_adapter.yaml (`datasets:`), which the runs read; xmx/recipes/tip_adapter.yaml holds
# the release's values with their file:line and tests/test_recipes.py checks the config against them.
def _entry(beta_max: float, alpha_max: float, init_alpha: float, epochs: int = 20) -> dict:
    return {"beta_max": float(beta_max), "alpha_max": float(alpha_max), "init_alpha": float(init_alpha),
            "init_beta": 1.0, "n_beta": 200, "n_alpha": 20, "epochs": int(epochs)}


def _config_table() -> dict[str, dict]:
    import yaml

    from xmx.config import config_dir
    table = yaml.safe_load((config_dir() / "method" / "tip_adapter.yaml").read_text(encoding="utf-8"))["datasets"]
    return {name: {k: (int(v) if k in ("n_beta", "n_alpha", "epochs") else float(v)) for k, v in e.items()}
            for name, e in table.items()}


TIP_DATASETS: dict[str, dict] = _config_table()
# [choice] for datasets the paper never ran (synthetic, user datasets): a middle-of-the-table search range.
TIP_DEFAULT: dict = _entry(10, 10, 1.0)


def tip_dataset_config(name: str | None) -> dict:
    """The table entry (docs/methods/tip_adapter.md#the-cache-model-and-its-search) for dataset ``name`` (a copy);
    :data:`TIP_DEFAULT` for a dataset not in the table.
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


def check_feats(f: Tensor, W: Tensor) -> None:
    """Features ``f [B, C]`` must have the width of the classifier ``W [C, N]`` (the same backbone)."""
    if f.ndim != 2 or f.shape[1] != W.shape[0]:
        raise XmxError(f"features have shape {tuple(f.shape)} but the classifier W expects width {W.shape[0]} "
                       "([B, C]); features and classifier come from different backbones")


def tip_logits(f: Tensor, W: Tensor, keys: Tensor, values: Tensor, alpha: float | Tensor,
               beta: float | Tensor) -> Tensor:
    """Tip-Adapter logits ``100 f W + alpha exp(-beta (1 - f keys^T)) values`` with f normalised here.

    f [B, C] (raw or normalised), W [C, N] normalised class texts, keys [NK, C] (used as given: fine-tuned keys are
    not unit vectors), values [NK, N] -> [B, N]."""
    check_cache(W, keys, values)
    check_feats(f, W)
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
        check_feats(f, self.W)
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
    check_feats(f_val, W)
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
    rows = chunk_rows(M, per_row, max_elements)
    nb = chunk_rows(n_beta, rows * per_row, max_elements)                       # betas per chunk
    # a line at least every 10 s, counted in betas scored over all images (also when all rows fit in one chunk)
    beat = Heartbeat(f"alpha/beta search ({n_beta}x{n_alpha} on {M} images), betas", total=n_beta)
    for r0 in range(0, M, rows):
        S_r, zs_r, y_r = S[r0:r0 + rows], zs[r0:r0 + rows], y[r0:r0 + rows]
        m = S_r.shape[0]
        for b0 in range(0, n_beta, nb):
            A = affinity(S_r[None], betas[b0:b0 + nb, None, None])               # [nb, m, NK]
            caches = A @ L                                                       # [nb, m, N]
            correct[b0:b0 + nb] += correct_counts(zs_r, caches, alphas, y_r)     # [nb, n_alpha]
            beat(int((r0 * n_beta + m * min(b0 + nb, n_beta)) // M))
    flat = int(torch.argmax(correct.flatten()))          # first maximum = first pair in beta-major order
    i, j = divmod(flat, n_alpha)
    grid = correct.double().cpu() * (100.0 / M)
    return SearchResult(alpha=alphas_l[j], beta=betas_l[i], acc=float(grid[i, j]), grid=grid, betas=betas_l,
                        alphas=alphas_l)


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.argmax(dim=-1) == y.to(logits.device)).double().mean() * 100.0)



# =================================================================================================================
# The Lightning modules (method layer): Tip-Adapter (training-free) and Tip-Adapter-F on the datamodule's cached
# features. ``conf/method/tip_adapter.yaml`` / ``tip_adapter_f.yaml`` hold every choice; the per-dataset table there
# mirrors :data:`TIP_DATASETS`.
# =================================================================================================================

ENTRY_KEYS = ("beta_max", "alpha_max", "init_alpha", "init_beta", "n_beta", "n_alpha", "epochs")
FULL_GRID_CELLS = 1000  # results_grid=auto writes the whole validation grid up to this many cells
# selection: paper - the release's protocol (main.py / main_imagenet.py): Tip-Adapter-F's epoch is the one with the
# best test accuracy at the initial alpha/beta (logged under this name and monitored instead of val/acc), and on
# ImageNet alpha/beta are searched on the test set.
PAPER_EPOCH_MONITOR = "select/test_acc"
PAPER_TEST_SEARCH = ("imagenet",)  # datasets whose release searches alpha/beta on test (main_imagenet.py)


def _digest(names) -> str:
    return hashlib.sha256("\n".join(map(str, names)).encode()).hexdigest()


def _backbone_id(dm) -> dict | None:
    bb = getattr(dm, "backbone", None)
    if bb is None:
        return None
    try:
        from xmx.features.extract import backbone_identity
        return backbone_identity(bb)
    except Exception:  # noqa: BLE001  (an identity is a convenience for the refusal below, never a requirement)
        d = bb.describe()
        return {k: d.get(k) for k in ("arch", "sha256", "source")}


def grid_summary(grid: Tensor, betas: list[float], full: bool, alphas: list[float] | None = None) -> dict:
    """Validation grid ``[n_beta, ...]`` (accuracy %) -> the best accuracy of every beta row, with ``alphas`` (for a
    ``[n_beta, n_alpha]`` grid) the first alpha reaching it, and when ``full`` the whole grid as nested lists."""
    best = grid.flatten(1).max(dim=1)
    out = {"betas": list(betas), "best_val_acc_per_beta": [round(float(a), 4) for a in best.values]}
    if alphas is not None and grid.ndim == 2:
        out["best_alpha_per_beta"] = [alphas[int(j)] for j in grid.argmax(dim=1)]  # first maximum of each row
    if full:
        out["val_acc_grid"] = grid.tolist()
    return out


class TipAdapterMethod(XmxModule):
    """Training-free Tip-Adapter (docs/methods/tip_adapter.md#the-cache-model-and-its-search). ``build``: cache keys =
    norm(mean over the cached augmented views of the
    training features), values = one-hot labels, W the zero-shot classifier of the training classes; then the
    (beta, alpha) grid search on the validation features picks the values used at test time.

    Per-dataset ``beta_max``/``alpha_max``/``init_alpha``/``init_beta``/``n_beta``/``n_alpha``/``epochs`` come from
    ``datasets`` (the config table, keyed by dataset name); a dataset not in it uses :func:`tip_dataset_config`
    (ImageNet's variants ImageNet's entry, anything else :data:`TIP_DEFAULT`); a non-null top-level key wins over
    both. Eval sets whose classes are a subset of the training classes (ImageNet-A/-R) read their columns through
    ``eval_set.train_index``; unseen classes are refused (a cache holds values for training classes only)."""

    needs_fit = False
    selection_modes = SELECTION_MODES

    def __init__(self, datasets: dict | None = None, beta_max: PosFloat | None = None, alpha_max: PosFloat | None = None,
                 init_alpha: NonNegFloat | None = None, init_beta: NonNegFloat | None = None,
                 n_beta: PosInt | None = None, n_alpha: PosInt | None = None, search: bool = True,
                 search_device: str = "auto", results_grid: Literal["auto"] | bool = "auto",
                 selection: Literal[SELECTION_MODES] = "val", val_shots=None,
                 dataset_templates: dict | None = None, **kwargs):
        """``val_shots`` / ``dataset_templates`` are the recipe's data choices (read by ``data.val_shots`` /
        ``data.templates``); ``selection``: ``val`` or ``paper`` (see :data:`PAPER_EPOCH_MONITOR`)."""
        super().__init__(**kwargs)
        if selection not in SELECTION_MODES:
            raise XmxError(f"selection={selection!r}; valid choices: {', '.join(SELECTION_MODES)}")
        self.selection = selection
        self.datasets = {str(k).lower(): dict(v or {}) for k, v in (datasets or {}).items()}
        for name, entry in self.datasets.items():
            bad = sorted(set(entry) - set(ENTRY_KEYS))
            if bad:
                raise XmxError(f"method.datasets.{name}: unknown key(s) {', '.join(bad)}; valid keys: "
                               f"{', '.join(ENTRY_KEYS)}")
        self.overrides = {k: v for k, v in dict(beta_max=beta_max, alpha_max=alpha_max, init_alpha=init_alpha,
                                                init_beta=init_beta, n_beta=n_beta, n_alpha=n_alpha).items()
                          if v is not None}
        if results_grid not in ("auto", True, False):
            raise XmxError(f"method.results_grid={results_grid!r}; valid choices: auto, true, false")
        if str(search_device) not in ("auto", "cpu") and not str(search_device).startswith("cuda"):
            raise XmxError(f"method.search_device={search_device!r}; valid choices: auto, cpu, cuda, cuda:<i>")
        self.search_enabled, self.search_device, self.results_grid = bool(search), str(search_device), results_grid
        self.hp: dict = {}
        self.hp_source: str | None = None
        self.search_result: dict | None = None
        self.cache_meta: dict = {}

    # ---- construction -----------------------------------------------------------------------------------------
    def dataset_entry(self, name: str | None) -> tuple[dict, str]:
        """(entry, where it came from) for dataset ``name``: config table > core table/default, then overrides."""
        key = (name or "").lower()
        entry = tip_dataset_config(key)
        if key in self.datasets:
            source = f"method.datasets.{key}"
        elif key.startswith("imagenet") and "imagenet" in self.datasets:
            key, source = "imagenet", "method.datasets.imagenet (an ImageNet variant)"
        else:
            key, source = None, ("TIP_DATASETS" if (name or "").lower() in TIP_DATASETS
                                 else "TIP_DEFAULT (dataset not in the table)")
        if key is not None:
            entry.update(self.datasets[key])
        if self.overrides:
            entry.update(self.overrides)
            source += " + method overrides (" + ", ".join(sorted(self.overrides)) + ")"
        for k in ("beta_max", "alpha_max", "init_alpha", "init_beta"):
            entry[k] = float(entry[k])
        for k in ("n_beta", "n_alpha", "epochs"):
            entry[k] = int(entry[k])
        return entry, source

    def make_model(self, keys: Tensor, values: Tensor, W: Tensor, dm) -> nn.Module:
        return TipAdapter(keys, values, W, alpha=self.hp["init_alpha"], beta=self.hp["init_beta"])

    def build(self, dm) -> None:
        if dm.inputs != "features":
            raise XmxError(f"{self.method_name or 'tip_adapter'} builds its cache from cached features; set "
                           "method.inputs=features")
        self.hp, self.hp_source = self.dataset_entry(dm.name)
        for s in [dm.val_set, *dm.eval_sets]:  # refuse unseen classes before any training
            self.columns(s, dm.classnames)
        if self.columns(dm.val_set, dm.classnames) is not None:
            raise XmxError(f"validation set '{dm.val_set.name}' does not have the training classes in their order; "
                           "alpha/beta are searched on training-class logits")
        W = dm.text_classifier(dm.classnames)                                          # [C, N]
        keys, values = build_cache(dm.train_features, dm.train_labels, len(dm.classnames))
        self.model = self.make_model(keys, values, W, dm)
        self.cache_meta = {"dataset": dm.name, "classes": len(dm.classnames), "classes_sha256": _digest(dm.classnames),
                           "width": int(keys.shape[1]), "keys": int(keys.shape[0]),
                           "views": int(dm.train_features.shape[0]) if dm.train_features.ndim == 3 else 1,
                           "backbone": _backbone_id(dm)}
        if not self.needs_fit and self.search_enabled:
            self.search_on_validation(dm)

    def columns(self, eval_set, train_classnames) -> Tensor | None:
        """None when ``eval_set`` has exactly the training classes; else the training-class column of each of its
        classes (``train_index``). Unseen classes -> XmxError."""
        N = len(train_classnames)
        idx = list(eval_set.train_index or [])
        if idx == list(range(N)) or (not idx and list(eval_set.classnames) == list(train_classnames)):
            return None
        if not idx:
            raise XmxError(f"eval set '{eval_set.name}' has other classes than training but no train_index; "
                           "its columns cannot be matched to the cache's classes")
        unseen = [c for c, i in zip(eval_set.classnames, idx) if i is None]
        if unseen:
            raise XmxError(f"{self.method_name or 'tip_adapter'}: eval set '{eval_set.name}' has {len(unseen)} "
                           f"class(es) never trained on (e.g. {unseen[0]!r}); the cache can't score unseen classes "
                           "(its values cover the training classes only) - evaluate new classes with "
                           "method=zeroshot or another text-based method")
        return torch.tensor(idx, dtype=torch.long)

    # ---- evaluation -------------------------------------------------------------------------------------------
    def logits(self, x: Tensor, eval_set) -> Tensor:
        out = self.model(self.image_features(x))                                      # [B, N_train]
        cols = self.columns(eval_set, self.dm.classnames)
        return out if cols is None else out[:, cols.to(out.device)]                  # [B, len(eval classes)]

    def _device_for_search(self) -> torch.device:
        if self.search_device == "auto":
            return torch.device("cuda") if torch.cuda.is_available() else self.model.W.device
        return torch.device(self.search_device)

    def selection_set(self, dm):
        """The eval set alpha/beta are searched on: validation, or with ``selection: paper`` on ImageNet the test set
        (as the release's main_imagenet.py)."""
        if self.selection == "paper" and (dm.name or "").lower() in PAPER_TEST_SEARCH:
            test = dm.eval_sets[0]
            if self.columns(test, dm.classnames) is not None:
                raise XmxError(f"selection=paper searches alpha/beta on '{test.name}', which does not have the "
                               "training classes in their order; use selection=val")
            return test
        return dm.val_set

    @torch.no_grad()
    def accuracy_on(self, eval_set, chunk: int = 4096) -> float:
        """Top-1 accuracy (%) of the current model on ``eval_set``'s cached features."""
        f, y = self.dm.features_of(eval_set), eval_labels(eval_set)
        dev = self.model.W.device
        correct = sum(int((self.logits(f[i:i + chunk].float().to(dev), eval_set).argmax(-1).cpu()
                           == y[i:i + chunk]).sum()) for i in range(0, len(y), chunk))
        return 100.0 * correct / max(len(y), 1)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if getattr(self, "model", None) is not None and getattr(self, "dm", None) is not None:
            # val/acc of what is reported: the searched (or, without a search, the initial) alpha/beta and the
            # selected keys - not the initial-alpha/beta validation score of the checkpoint callback
            self.log("val/acc", self.accuracy_on(self.dm.val_set))

    @torch.no_grad()
    def search_on_validation(self, dm) -> None:
        """The (beta, alpha) grid on the selection set's features (:meth:`selection_set`: validation unless
        ``selection: paper`` says test) with the current keys; applies the best pair."""
        dev = self._device_for_search()
        sel = self.selection_set(dm)
        f_val, y_val = dm.features_of(sel).float(), eval_labels(sel)
        m = self.model
        res = search_alpha_beta(f_val.to(dev), y_val.to(dev), m.W.to(dev), m.cache_keys().detach().float().to(dev),
                                m.values.to(dev), self.hp["beta_max"], self.hp["alpha_max"], self.hp["n_beta"],
                                self.hp["n_alpha"])
        m.set_alpha_beta(res.alpha, res.beta)
        full = self.results_grid is True or (self.results_grid == "auto" and res.grid.numel() <= FULL_GRID_CELLS)
        self.search_result = {"alpha": res.alpha, "beta": res.beta, "val_acc": res.acc, "alphas": res.alphas,
                              **grid_summary(res.grid, res.betas, full, res.alphas)}
        log.info("%s: alpha %.4g, beta %.4g searched on %s (%.2f%%)", self.method_name, res.alpha, res.beta,
                 sel.name, res.acc)

    # ---- checkpoints: a cache belongs to one backbone and one label set -------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["xmx_cache"] = self.cache_meta

    def load_weights(self, path) -> None:
        ckpt = resolve_checkpoint(path)
        raw = torch.load(ckpt, map_location="cpu", weights_only=False)
        sd, meta = raw.get("state_dict", {}), raw.get("xmx_cache") or {}
        keys = sd.get("model.adapter.weight", sd.get("model.keys"))
        values = sd.get("model.values")
        try:
            if keys is not None and values is not None:
                check_cache(self.model.W, keys, values)
        except XmxError as e:
            raise XmxError(f"init_from={path}: {e}") from None
        mine = self.cache_meta
        if meta.get("backbone") and mine.get("backbone") and meta["backbone"] != mine["backbone"]:
            raise XmxError(f"init_from={path}: its cache was built with backbone {meta['backbone'].get('arch')} "
                           f"({meta['backbone']}) but this run uses {mine['backbone'].get('arch')} "
                           f"({mine['backbone']}); rebuild the cache with this backbone")
        if meta.get("classes_sha256") and meta["classes_sha256"] != mine.get("classes_sha256"):
            raise XmxError(f"init_from={path}: its cache was built for other classes ({meta.get('classes')} classes "
                           f"of {meta.get('dataset')}) than this run trains on ({mine.get('classes')} classes of "
                           f"{mine.get('dataset')}); rebuild it for these classes")
        super().load_weights(path)

    # ---- results ----------------------------------------------------------------------------------------------
    def extra_results(self) -> dict:
        m = getattr(self, "model", None)
        out = {"dataset_entry": {"source": self.hp_source, **self.hp}, "cache": {k: v for k, v in
                                                                                self.cache_meta.items()
                                                                                if k != "backbone"}}
        if m is not None:  # the searched grid values exactly (the model holds them as float32 buffers)
            sr = self.search_result or {}
            out.update(alpha=sr.get("alpha", float(m.alpha)), beta=sr.get("beta", float(m.beta)))
        dm = getattr(self, "dm", None)
        out["selection"] = self.selection
        out["searched_on"] = (self.selection_set(dm).name if dm is not None else "val") \
            if self.search_result is not None else None
        out["search"] = self.search_result
        return out


class TipAdapterFMethod(TipAdapterMethod):
    """Tip-Adapter-F (docs/methods/tip_adapter.md#the-cache-model-and-its-search): the cache keys become a trainable
    ``Linear(C -> NK)`` trained with cross-entropy at
    the initial (alpha, beta) of the dataset entry; one cached view per epoch (``data.view_sampling=cycle``); the
    epoch is selected on validation accuracy by the checkpoint callback (monitor ``val/acc``; the run restores the
    best checkpoint before testing); then (beta, alpha) are searched on validation with the selected keys
    (``on_test_start``), never on test.

    ``scheduler_interval``: ``step`` (the original: cosine over epochs x batches; ``T_max`` filled in when the
    scheduler partial leaves it open) or ``epoch``."""

    needs_fit = True

    def __init__(self, scheduler_interval: str = "step", **kwargs):
        super().__init__(scheduler_interval=scheduler_interval, **kwargs)

    def make_model(self, keys, values, W, dm) -> nn.Module:
        return TipAdapterF(keys, values, W, alpha=self.hp["init_alpha"], beta=self.hp["init_beta"])

    def build(self, dm) -> None:
        super().build(dm)
        trainer = self._trainer
        if self.selection == "paper" and trainer is not None:
            # the release keeps the epoch with the best test accuracy: the best checkpoint follows that score
            for cb in trainer.checkpoint_callbacks:
                if getattr(cb, "monitor", None) == "val/acc":  # the resume checkpoint monitors nothing
                    cb.monitor = PAPER_EPOCH_MONITOR
        if getattr(dm, "view_sampling", "cycle") != "cycle":
            log.warning("%s: data.view_sampling=%s; the Tip-Adapter-F recipe trains on one cached view per epoch "
                        "(data.view_sampling=cycle, as the presets set)", self.method_name, dm.view_sampling)

    # ---- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.model.loss(self.image_features(x), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.selection == "paper" and not self.trainer.sanity_checking and self.trainer.state.fn == "fit":
            acc = self.accuracy_on(self.dm.eval_sets[0])  # at the initial alpha/beta, as the release
            self.log(PAPER_EPOCH_MONITOR, acc)
            if self.epoch_curve:
                self.epoch_curve[-1]["test_acc"] = float(acc)

    def on_test_start(self) -> None:
        if self.search_enabled:
            self.search_on_validation(self.dm)
            if self.selection == "paper":
                self.paper_final_choice()

    @torch.no_grad()
    def paper_final_choice(self) -> None:
        """The release's main.py reports ``max(best_acc, acc)``: the better test accuracy of the selected epoch at the
        initial alpha/beta and of the searched alpha/beta. With ``selection: paper`` the run keeps whichever of the
        two is better on test (ties: the searched pair). Not on ImageNet (main_imagenet.py reports its test search)
        and only for Tip-Adapter-F's own model."""
        if (self.dm.name or "").lower() in PAPER_TEST_SEARCH or not isinstance(self.model, TipAdapterF):
            return
        m, test = self.model, self.dm.eval_sets[0]
        searched = (float(m.alpha), float(m.beta))
        acc_searched = self.accuracy_on(test)
        m.set_alpha_beta(self.hp["init_alpha"], self.hp["init_beta"])
        acc_init = self.accuracy_on(test)
        kept = "initial" if acc_init > acc_searched else "searched"
        if kept == "searched":
            m.set_alpha_beta(*searched)
        self.paper_choice = {"kept": kept, "test_acc_searched": acc_searched, "test_acc_initial": acc_init,
                             "why": "main.py reports max(best_acc, acc) on test"}

    def extra_results(self) -> dict:
        out = super().extra_results()
        if getattr(self, "paper_choice", None):
            out["paper_final_choice"] = self.paper_choice
            if self.paper_choice["kept"] == "initial":
                out.update(alpha=self.hp["init_alpha"], beta=self.hp["init_beta"])
        by = (f"{PAPER_EPOCH_MONITOR}: test accuracy at the initial alpha/beta (selection=paper, as the release)"
              if self.selection == "paper" else "val/acc at the initial alpha/beta (best checkpoint)")
        out.update(init_alpha=self.hp.get("init_alpha"), init_beta=self.hp.get("init_beta"),
                   **self.training_record(by))
        out["epoch_selected_on"] = ("test" if self.selection == "paper" else "val") \
            if out.get("selected_epoch") is not None else None
        return out
