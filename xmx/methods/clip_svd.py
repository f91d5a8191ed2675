"""CLIP-SVD (Koleilat, Rivaz & Xiao, "Singular Value Few-shot Adaptation of Vision-Language Models", arXiv 2509.03740),
as its released code (HealthX-Lab/CLIP-SVD) trains it [code].

Every adapted linear weight W [m, n] of the towers' transformer blocks (q, k, v and output projections of the
attention, both MLP layers; the packed ``in_proj`` / ``qkv`` split into its q, k, v rows first, as the release does)
is decomposed once, from the frozen weight:

    W = U diag(s₀) Vᵀ                       U [m, r], V [n, r], r = min(m, n) (full rank: the release's rank ratio 1)
    W(s) = W + U diag(s − s₀) Vᵀ            s [r] trainable, initialised at s₀  →  W(s₀) = W exactly
    logit[b, c] = 100 · ⟨norm(f_img(x_b; s)), norm(f_txt(prompt_c; s))⟩,  loss = CE      (the release's fixed 100)

The release computes ``x ↦ ((x V) ⊙ s) Uᵀ + b`` (two thin layers); ``W + U diag(s − s₀) Vᵀ`` is the same function
(exact algebra, not an approximation) that costs one small ``m·n·r`` product per weight and step instead of two
token-sized matmuls, and at ``s = s₀`` it *is* the frozen weight, bit for bit (the release's form differs from it by
the SVD's round-off). Only ``s`` trains (AdamW's decoupled weight decay acts on ``s`` itself, as in the release).

Cost per step and adapted weight (T tokens through it): forward ``T·m·n`` (as the frozen layer) + ``m·n·r`` (the
rebuild); backward ``T·m·n`` (input gradient, as the frozen layer) + ``T·m·n`` (the weight gradient ``Gᵀ X`` that
``∂L/∂s = diag(Uᵀ (Gᵀ X) V)`` needs: the one cost no exact form avoids; the thin form needs two such products) +
``m·n·r``. In evaluation the rebuilt weight is cached until ``s`` changes.

The decomposition of the frozen weights is computed once per backbone (float64 ``torch.linalg.svd``, stored as
float32) and cached in the feature store (kind ``svd``), keyed on the sha256 of the decomposed weights' bytes.

The towers are found generically (:mod:`xmx.backbones.blocks`): OpenAI-style open_clip, SigLIP / EVA-02 / PE (timm
ViTs), MobileCLIP (FastViT: only its attention stages have linear layers), transformers CLIP / SigLIP. What a tower
has that the method cannot adapt (convolutions, linear layers outside the blocks, e.g. an attention-pool head) is
said in one log line before any work; a selected tower with nothing to adapt is refused with one line.

Recipe [code] (``xmx/recipes/clip_svd.yaml``): every linear of every block of both towers, AdamW (lr 5e-4, wd 0.01,
betas 0.9/0.999), cosine to 1e-6 over 200 × K iterations stepped per iteration (few-shot and domain shift), batch 32,
RandomResizedCrop(224, 0.08–1, bicubic) + flip, the dataset's one template (configs/few_shot/<dataset>.yaml), fp16
autocast in the release (bf16 here where the GPU has it), final weights. Base-to-new: epochs per dataset, lr 4e-4,
a cosine whose T_max is the number of *epochs* but which is stepped per *iteration* (so it cycles; reproduced).
ViT-B/16: 12 × 6 × 768 (image) + 12 × 6 × 512 (text) = 92,160 trainable singular values.
"""

from __future__ import annotations

import hashlib
import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from xmx.backbones.blocks import LAYER_CHOICES, block_range, linear_role, towers
from xmx.errors import XmxError
from xmx.methods._training import EncoderMethod

log = logging.getLogger(__name__)

PARAMS = ("q", "k", "v", "o", "mlp")
ENCODERS = ("text", "vision", "both")
SVD_ALGORITHM = "torch.linalg.svd float64, full_matrices=False, stored float32"


class SingularValueDelta(nn.Module):
    """The parametrization ``W ↦ W + U diag(s − s₀) Vᵀ`` of one weight, per row chunk (q, k, v of a packed
    projection are decomposed separately). ``s`` of the trained chunks is a parameter (``s.<i>``); the others keep
    ``s₀`` and add nothing. U, V, s₀ are derived (non-persistent buffers): checkpoints hold only ``s``."""

    def __init__(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, train: list[bool]):
        super().__init__()
        # U [C, m, r], S [C, r], Vh [C, r, n]
        self.register_buffer("U", U, persistent=False)
        self.register_buffer("Vh", Vh, persistent=False)
        self.register_buffer("s0", S.clone(), persistent=False)
        self.trained = [i for i, t in enumerate(train) if t]
        self.s = nn.ParameterList([nn.Parameter(S[i].clone()) for i in self.trained])
        self._cache: tuple | None = None

    def delta(self) -> torch.Tensor:
        """``s − s₀`` per chunk [C, r] (zero for the chunks that do not train)."""
        d = torch.zeros_like(self.s0)
        if self.trained:
            d = d.index_put((torch.tensor(self.trained, device=d.device),),
                            torch.stack(list(self.s)) - self.s0[self.trained])
        return d

    def forward(self, W: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.s)
        if not grad:  # evaluation: rebuild once per value of s
            key = (tuple(p._version for p in self.s), tuple(p.data_ptr() for p in self.s), W.device, W.dtype)
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        C, m, _ = self.U.shape
        delta = torch.bmm(self.U * self.delta().unsqueeze(1), self.Vh)  # [C, m, n]
        out = W + delta.reshape(C * m, -1).to(W.dtype)
        if not grad:
            self._cache = (key, out.detach())
        return out

    def clear_cache(self) -> None:
        self._cache = None

    def _apply(self, fn, recurse=True):
        self._cache = None
        return super()._apply(fn, recurse)


# ---- which weights --------------------------------------------------------------------------------------------
def svd_targets(model: nn.Module, encoder: str = "both", layers="all", params=PARAMS) -> tuple[list, list[str]]:
    """The weights CLIP-SVD adapts: ``[(module, attribute, qualified name, roles, train mask)]`` and one note per
    tower on what it leaves frozen. Raises one line when a selected tower has nothing to adapt."""
    params = set(params)
    found, notes = [], []
    tw = towers(model)
    for t in (["text", "vision"] if encoder == "both" else [encoder]):
        tower = tw[t]
        chosen = set(block_range(layers, len(tower.blocks)))
        n_lin, frozen_other, blocks_without = 0, 0, 0
        for i, (bname, block) in enumerate(tower.blocks):
            if i not in chosen:
                continue
            here = 0
            for sub, mod in block.named_modules():
                qual = f"{bname}.{sub}" if sub else bname
                if isinstance(mod, nn.MultiheadAttention):
                    if not mod._qkv_same_embed_dim:
                        frozen_other += 1
                        continue
                    found.append((mod, "in_proj_weight", qual + ".in_proj_weight", ("q", "k", "v"),
                                  [r in params for r in ("q", "k", "v")]))
                    here += 1
                elif isinstance(mod, nn.Linear):
                    roles = linear_role(qual, mod)
                    if roles == ("other",):
                        frozen_other += 1
                        continue
                    found.append((mod, "weight", qual + ".weight", roles, [r in params for r in roles]))
                    here += 1
            n_lin += here
            blocks_without += here == 0
        outside = sum(1 for n, m in model.named_modules() if isinstance(m, nn.Linear) and
                      (n.split(".", 1)[0] in ("visual", "vision_model", "visual_projection")) == (t == "vision")
                      and not any(n.startswith(b + ".") for b, _ in tower.blocks))
        if n_lin == 0:
            raise XmxError(f"CLIP-SVD: the {t} tower of this backbone ({tower.kind}) has no linear layers in its "
                           f"selected blocks ({len(tower.blocks)} blocks found); adapt the other tower "
                           f"(method.encoder={'vision' if t == 'text' else 'text'}) or use a ViT backbone")
        left = []
        if blocks_without:
            left.append(f"{blocks_without} selected blocks without linear layers (convolutions, norms)")
        if frozen_other:
            left.append(f"{frozen_other} other linear layers in blocks")
        if outside:
            left.append(f"{outside} linear layers outside the blocks (projection / pooling head)")
        notes.append(f"{t} tower ({tower.kind}): {n_lin} weights in {len(chosen)} of {len(tower.blocks)} blocks"
                     + (f"; left frozen: {', '.join(left)}" if left else ""))
    found = [f for f in found if any(f[4])]
    return found, notes


def singular_value_count(targets) -> int:
    """How many singular values ``targets`` (from :func:`svd_targets`) train: full rank per chunk, no SVD needed."""
    n = 0
    for mod, attr, _, roles, train in targets:
        m, k = getattr(mod, attr).shape
        n += min(m // len(roles), k) * sum(train)
    return n


def weights_digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for w in tensors:
        w = w.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{list(w.shape)}\0".encode())
        h.update(w.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def decompose(W: torch.Tensor, chunks: int) -> dict[str, torch.Tensor]:
    """``U [C, m, r]``, ``S [C, r]``, ``Vh [C, r, n]`` of the ``chunks`` row blocks of W (float64 SVD, float32 out)."""
    Wc = W.detach().to(torch.float64).reshape(chunks, W.shape[0] // chunks, W.shape[1])
    U, S, Vh = torch.linalg.svd(Wc, full_matrices=False)
    return {"U": U.float().contiguous(), "S": S.float().contiguous(), "Vh": Vh.float().contiguous()}


def frozen_svd(targets, store=None) -> list[dict[str, torch.Tensor]]:
    """The decomposition of every target weight, from the feature store when it holds it (kind ``svd``, keyed on
    the weights' sha256), else computed (and stored)."""
    weights = [getattr(mod, attr) for mod, attr, *_ in targets]
    chunks = [len(roles) for _, _, _, roles, _ in targets]

    def compute():
        out = {}
        for i, (W, c) in enumerate(zip(weights, chunks)):
            for k, v in decompose(W, c).items():
                out[f"{i}.{k}"] = v
        return out

    if store is None:
        flat = compute()
    else:
        key = {"weights_sha256": weights_digest(weights), "shapes": [list(W.shape) for W in weights],
               "chunks": chunks, "algorithm": SVD_ALGORITHM}
        flat = store.get_or_compute("svd", key, compute)
        log.info("feature store %s: svd (%d weights)", store.last_outcome, len(weights))
    return [{k: flat[f"{i}.{k}"] for k in ("U", "S", "Vh")} for i in range(len(weights))]


def inject_svd(model: nn.Module, encoder: str = "both", layers="all", params=PARAMS, store=None,
               announce: str | None = "CLIP-SVD") -> list[SingularValueDelta]:
    """Reparameterise the chosen weights of ``model`` in place (``torch.nn.utils.parametrize``); only the singular
    values ``s`` require grad. Returns the parametrizations in module order."""
    targets, notes = svd_targets(model, encoder, layers, params)
    if announce:
        log.warning("%s: %s", announce, "; ".join(notes))
    dev = next(model.parameters()).device
    out = []
    for (mod, attr, qual, roles, train), f in zip(targets, frozen_svd(targets, store)):
        if parametrize.is_parametrized(mod, attr):
            raise XmxError(f"CLIP-SVD: {qual} is already reparameterised; inject once per backbone")
        p = SingularValueDelta(f["U"].to(dev), f["S"].to(dev), f["Vh"].to(dev), train)
        parametrize.register_parametrization(mod, attr, p, unsafe=True)
        getattr(mod.parametrizations, attr).original.requires_grad_(False)
        out.append(p)
    return out


def check_svd_config(encoder, layers, params) -> list[str]:
    if encoder not in ENCODERS:
        raise XmxError(f"method.encoder={encoder!r} is unknown; valid choices: {', '.join(ENCODERS)}")
    if isinstance(layers, str):
        if layers not in LAYER_CHOICES:
            raise XmxError(f"method.layers={layers!r} is unknown; valid choices: {', '.join(LAYER_CHOICES)} or a "
                           "list of 0-based block indices")
    else:
        try:
            bad = [i for i in layers if isinstance(i, bool) or int(i) != i or int(i) < 0]
        except (TypeError, ValueError):
            bad = [layers]
        if bad or not list(layers):
            raise XmxError(f"method.layers={list(layers) if not bad else layers}: expected a non-empty list of 0-based "
                           f"block indices or one of {', '.join(LAYER_CHOICES)}")
    params = [params] if isinstance(params, str) else list(params)
    bad = [p for p in params if p not in PARAMS]
    if bad or not params or len(set(params)) != len(params):
        raise XmxError(f"method.params={params}: entries must be distinct items of {', '.join(PARAMS)} (got unknown "
                       f"{bad or 'none'}); e.g. method.params=[q,k,v,o,mlp]")
    return params


class ClipSVDMethod(EncoderMethod):
    """CLIP-SVD (module docstring); the keys mirror the release's configs (include_train_layers, train_q/k/v/o_proj/
    mlp, train_image_encoder/train_text_encoder)."""

    label = "CLIP-SVD"

    def __init__(self, encoder: str = "both", layers="all", params=PARAMS, cache_svd: bool = True,
                 dataset_templates: dict | None = None, epochs_by_dataset: dict | None = None, **kwargs):
        """``dataset_templates`` / ``epochs_by_dataset`` are the recipe's per-dataset tables, read by
        ``data.templates`` / ``method.epochs`` in the config (kept in the resolved config, unused here)."""
        params = check_svd_config(encoder, layers, params)
        super().__init__(**kwargs)
        self.svd_config = dict(encoder=encoder, layers=layers if isinstance(layers, str) else [int(i) for i in layers],
                               params=params)
        self.cache_svd = bool(cache_svd)
        self.adapts_text = encoder in ("text", "both")

    def adapt(self, backbone):
        store = getattr(getattr(self, "_dm", None), "store", None) if self.cache_svd else None
        self.svd_layers = inject_svd(backbone.model, store=store, **self.svd_config)
        return []

    def build(self, dm) -> None:
        self._dm = dm
        try:
            super().build(dm)
        finally:
            self._dm = None

    def train(self, mode: bool = True):
        for m in getattr(self, "svd_layers", []):  # s changes between evaluations (optimizer steps, a reload)
            m.clear_cache()
        return super().train(mode)

    def load_weights(self, path) -> None:
        super().load_weights(path)
        for m in getattr(self, "svd_layers", []):
            m.clear_cache()

    def training_step(self, batch, batch_idx):
        with parametrize.cached():  # every adapted weight rebuilt once per step (open_clip reads some twice)
            return super().training_step(batch, batch_idx)

    def extra_results(self) -> dict:
        layers = getattr(self, "svd_layers", [])
        return {**super().extra_results(), **self.svd_config, "svd_weights": len(layers),
                "singular_values": sum(p.numel() for m in layers for p in m.s),
                "svd_algorithm": SVD_ALGORITHM}
