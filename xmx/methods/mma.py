"""MMA — Multi-Modal Adapter (Seputis et al., arXiv 2409.02958); docs/methods/mma.md#specification.

One attention block adapts the final CLIP image embedding and every class-text embedding jointly. Per image `b`
the token sequence is `S_b = [t_1 … t_N, v_b]` (texts first, image last), and

    O   = up(MHA(down(S_b), mask=M))                           # [N+1, C], no LayerNorm, no inner residual
    v'  = norm((1−λ)·v_b + λ·norm(O_img))                      # [C]
    t'c = norm((1−λ)·t_c + λ·norm(O_txt[c]))                   # [N, C], image-conditioned text features
    logit[b, c] = exp(logit_scale)·⟨v', t'c⟩ (+ logit_bias)

`logit_scale` and `logit_bias` are the backbone's own (the bias only for sigmoid-loss models such as SigLIP; a shift
of every class alike, so the softmax cross-entropy of the released recipe and the accuracy do not change).

Under the default `block` mask every text token attends to one key only (the image), so its attention output is
`out_proj(V(down(v_b)))` whatever the class: `O_txt[b, c] = O_txt[b]`. `MultiModalAdapter.logits` uses that to
avoid both the (N+1)² score matrix and the [B, N, C] text tensor (docs/methods/mma.md#the-mask closed form);
`forward_dense` /
`logits_dense` are the plain masked `nn.MultiheadAttention` computation it is tested against.

Below the math, `MMAMethod` trains the adapter on cached features (docs/methods/mma.md#training-recipe): cross-entropy
over the training
classes' text features; each eval set is scored against its own classes' text features (MMA adapts the text side, so
base-to-new `test_new` is scored on classes never trained on).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from xmx.errors import XmxError
from xmx.methods._training import AdapterMethod  # the shared feature-adapter training loop

MASKS = ("block", "bias", "none")
SAMPLERS = ("linear", "mlp", "bottleneck32")
BLOCKS = ("mha", "transformer")


def _norm(x: torch.Tensor) -> torch.Tensor:
    """L2 normalisation over the last dimension (`norm` in docs/methods/shared.md)."""
    return F.normalize(x, dim=-1)


def _choice(kind: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise XmxError(f"MMA: unknown {kind} {value!r}; choose one of {', '.join(valid)} (method.{kind}=...)")
    return value


def attention_mask(n_texts: int, mask: str, device=None, dtype=torch.float32) -> torch.Tensor:
    """Additive mask `M [N+1, N+1]` over the sequence `[t_1 … t_N, v]` (the image is the last position).

    `block`: 0 where exactly one of i, j is the image, −inf elsewhere (text→image and image→texts only);
    `bias`: +1 on those cross-modal pairs, 0 elsewhere; `none`: all zeros.
    """
    _choice("mask", mask, MASKS)
    pos = torch.arange(n_texts + 1, device=device)
    is_img = pos == n_texts  # [N+1]
    cross = is_img[:, None] ^ is_img[None, :]  # [N+1, N+1], True on the cross-modal pairs
    if mask == "block":
        return torch.zeros(cross.shape, dtype=dtype, device=device).masked_fill(~cross, float("-inf"))
    if mask == "bias":
        return cross.to(dtype)
    return torch.zeros(cross.shape, dtype=dtype, device=device)


def _sampler(kind: str, dim: int, hidden: int) -> tuple[nn.Module, nn.Module]:
    """(down: C→C/r, up: C/r→C) for a sampler kind (docs/methods/mma.md#the-block, #the-mask, docs/methods/mma.md#ablations-and-noise)."""
    if kind == "linear":
        return nn.Linear(dim, hidden), nn.Linear(hidden, dim)
    if kind == "mlp":  # ablation: Linear–GELU–Linear both ways, inner width C/r [code]
        down = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        up = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, dim))
        return down, up
    # bottleneck32, the first public release: 512→32→128 down, 128→32→GELU→512 up [code]
    narrow = 32
    down = nn.Sequential(nn.Linear(dim, narrow), nn.Linear(narrow, hidden))
    up = nn.Sequential(nn.Linear(hidden, narrow), nn.GELU(), nn.Linear(narrow, dim))
    return down, up


class MultiModalAdapter(nn.Module):
    """The MMA block: `down`, `attn` (masked multi-head self-attention, or a Transformer layer), `up`;
    docs/methods/mma.md#specification.

    Args:
        dim: CLIP embedding width C.
        reduction: C / (attention width); 4 in the paper.
        heads: attention heads.
        mask: `block` (0/−inf, default) | `bias` (+1 cross-modal) | `none`.
        lam: residual blend weight λ for both modalities (0.2).
        sampler: `linear` (default) | `mlp` | `bottleneck32`.
        block: `mha` (default) | `transformer` (`nn.TransformerEncoderLayer(C/r, heads)`, PyTorch defaults).
        adapt_text: False = image-only ablation (text features pass through unchanged).
    """

    def __init__(self, dim: int, reduction: int = 4, heads: int = 4, mask: str = "block", lam: float = 0.2,
                 sampler: str = "linear", block: str = "mha", adapt_text: bool = True):
        super().__init__()
        self.mask = _choice("mask", mask, MASKS)
        self.sampler = _choice("sampler", sampler, SAMPLERS)
        self.block = _choice("block", block, BLOCKS)
        if dim <= 0 or reduction <= 0 or dim % reduction:
            raise XmxError(f"MMA: dim {dim} is not divisible by reduction {reduction}; pick a reduction dividing the "
                           f"CLIP width")
        hidden = dim // reduction
        if heads <= 0 or hidden % heads:
            raise XmxError(f"MMA: attention width {hidden} (= {dim}/{reduction}) is not divisible by heads={heads}; "
                           f"pick heads dividing it")
        if not 0.0 <= lam <= 1.0:
            raise XmxError(f"MMA: lam={lam} is outside [0, 1]; the blend weight λ must be a fraction (default 0.2)")
        self.dim, self.hidden, self.heads, self.lam, self.adapt_text = dim, hidden, heads, float(lam), adapt_text
        # every call checks its inputs for NaN/inf (one device sync per tensor); a caller that validated its cached
        # features once (the LightningModule, the benchmark) turns this off for the training loop
        self.check_finite = True

        self.down, self.up = _sampler(sampler, dim, hidden)
        if block == "mha":
            self.attn = nn.MultiheadAttention(hidden, heads, dropout=0.0, bias=True, batch_first=True)
        else:  # PyTorch defaults (FFN 2048, dropout 0.1, ReLU, post-norm) [code]; batch_first only changes layout
            self.attn = nn.TransformerEncoderLayer(hidden, heads, batch_first=True)

    # ------------------------------------------------------------------ input checks
    def _check(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> None:
        for name, x in (("image", image_feats), ("text", text_feats)):
            if x.ndim != 2:
                raise XmxError(f"MMA: {name} features must be 2-D [rows, {self.dim}], got shape {tuple(x.shape)}")
            if x.shape[-1] != self.dim:
                raise XmxError(f"MMA: {name} features have width {x.shape[-1]} but the adapter was built for "
                               f"dim={self.dim}; build it with the backbone's embed_dim")
        if text_feats.shape[0] == 0:
            raise XmxError("MMA: the class list is empty (N=0 text features); give at least one class name")
        for name, x in (("image", image_feats), ("text", text_feats)):
            if self.check_finite and not bool(torch.isfinite(x).all()):  # a device sync: see check_finite
                raise XmxError(f"MMA: {name} features contain NaN or inf; recompute or clear the cached features")

    # ------------------------------------------------------------------ the masked attention, two ways
    def _mask(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return attention_mask(n, self.mask, device=like.device, dtype=like.dtype)  # [N+1, N+1]

    def raw_attention_dense(self, image_feats: torch.Tensor, text_feats: torch.Tensor, need_weights: bool = False):
        """Reference: `O = up(attn(down(S), mask=M))` on the materialised sequence.

        Returns `(o_img [B, C], o_txt [B, N, C], weights [B, heads, N+1, N+1] or None)`; weights only for `mha`.
        """
        self._check(image_feats, text_feats)
        v, t = _norm(image_feats), _norm(text_feats)  # [B, C], [N, C]
        B, N = v.shape[0], t.shape[0]
        seq = torch.cat([self.down(t).unsqueeze(0).expand(B, N, self.hidden),  # texts first ...
                         self.down(v).unsqueeze(1)], dim=1)  # ... image last: [B, N+1, C/r]
        mask = self._mask(N, seq)  # [N+1, N+1]
        weights = None
        if self.block == "mha":
            out, weights = self.attn(seq, seq, seq, attn_mask=mask, need_weights=need_weights,
                                     average_attn_weights=False)  # [B, N+1, C/r]
        else:
            out = self.attn(seq, src_mask=mask)  # [B, N+1, C/r]
        o = self.up(out)  # [B, N+1, C]
        return o[:, N], o[:, :N], weights

    def raw_attention_block(self, image_feats: torch.Tensor, text_feats: torch.Tensor):
        """Fast path for `mask=block`, `block=mha`: `(o_img [B, C], o_txt [B, C])` without the (N+1)² scores.

        Text rows attend to the single image key, so softmax = 1 and their output is `out_proj(V(down(v_b)))`,
        the same for every class; the image row attends over the N text keys (a [B, heads, N] score matrix).
        """
        if not self.fast:
            raise XmxError(f"MMA: the block fast path needs mask=block and block=mha (this adapter has "
                           f"mask={self.mask}, block={self.block}); use raw_attention_dense")
        self._check(image_feats, text_feats)
        v, t = _norm(image_feats), _norm(text_feats)  # [B, C], [N, C]
        B, N, H, dh = v.shape[0], t.shape[0], self.heads, self.hidden // self.heads
        w_q, w_k, w_v = self.attn.in_proj_weight.chunk(3)  # each [C/r, C/r]
        b_q, b_k, b_v = self.attn.in_proj_bias.chunk(3)  # each [C/r]
        dv, dt = self.down(v), self.down(t)  # [B, C/r], [N, C/r]

        # text rows: one key (the image) → attention output is the image's value, projected
        o_txt = self.up(self.attn.out_proj(F.linear(dv, w_v, b_v)))  # [B, C]

        # image row: softmax over the N text keys, per head
        q = F.linear(dv, w_q, b_q).view(B, H, dh)  # [B, H, dh]
        k = F.linear(dt, w_k, b_k).view(N, H, dh)  # [N, H, dh]
        val = F.linear(dt, w_v, b_v).view(N, H, dh)  # [N, H, dh]
        scores = torch.einsum("bhd,nhd->bhn", q, k) / math.sqrt(dh)  # [B, H, N]
        att = scores.softmax(dim=-1)  # [B, H, N]
        heads_out = torch.einsum("bhn,nhd->bhd", att, val).reshape(B, self.hidden)  # [B, C/r]
        o_img = self.up(self.attn.out_proj(heads_out))  # [B, C]
        return o_img, o_txt

    @property
    def fast(self) -> bool:
        """True when `logits`/`forward` can use the closed form of docs/methods/mma.md#the-mask (block mask, plain MHA)."""
        return self.mask == "block" and self.block == "mha"

    # ---- blend and logits (docs/methods/mma.md#blend-and-logits) ------------------------------------------------
    def _blend(self, feats: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return _norm((1 - self.lam) * feats + self.lam * _norm(o))

    def forward_dense(self, image_feats: torch.Tensor, text_feats: torch.Tensor):
        """Reference forward on the materialised masked sequence: `(v' [B, C], t' [B, N, C])`."""
        o_img, o_txt, _ = self.raw_attention_dense(image_feats, text_feats)
        v, t = _norm(image_feats), _norm(text_feats)  # [B, C], [N, C]
        image_out = self._blend(v, o_img)  # [B, C]
        if self.adapt_text:
            text_out = self._blend(t.unsqueeze(0), o_txt)  # [B, N, C]
        else:
            text_out = t.unsqueeze(0).expand(v.shape[0], -1, -1)  # [B, N, C], frozen text
        return image_out, text_out

    def forward(self, image_feats: torch.Tensor, text_feats: torch.Tensor):
        """Adapted features `(v' [B, C], t' [B, N, C])`, docs/methods/mma.md#blend-and-logits; inputs [B, C] and [N, C] (normalised here)."""
        if not self.fast:
            return self.forward_dense(image_feats, text_feats)
        o_img, o_txt = self.raw_attention_block(image_feats, text_feats)  # [B, C], [B, C]
        v, t = _norm(image_feats), _norm(text_feats)
        image_out = self._blend(v, o_img)  # [B, C]
        if self.adapt_text:
            text_out = self._blend(t.unsqueeze(0), o_txt.unsqueeze(1))  # [B, N, C]
        else:
            text_out = t.unsqueeze(0).expand(v.shape[0], -1, -1)  # [B, N, C]
        return image_out, text_out

    def logits_dense(self, image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale) -> torch.Tensor:
        """Reference logits `exp(logit_scale)·⟨v'_b, t'_{b,c}⟩` [B, N] through the [B, N, C] tensor."""
        image_out, text_out = self.forward_dense(image_feats, text_feats)
        return _scale(logit_scale, image_out) * torch.einsum("bc,bnc->bn", image_out, text_out)

    def logits(self, image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale, logit_bias=None) -> torch.Tensor:
        """Logits [B, N] (+ ``logit_bias``, the backbone's, when given: SigLIP)."""
        out = self._scaled_logits(image_feats, text_feats, logit_scale)
        return out if logit_bias is None else out + logit_bias

    def _scaled_logits(self, image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale) -> torch.Tensor:
        """Logits [B, N] without bias; `logit_scale` is the log of the multiplier, as CLIP stores it.

        Under `block` + `mha`, with `u_b = norm(O_txt[b])` and unit `t_c`, `u_b` (docs/methods/mma.md#the-mask):
        `logit[b,c] = s·((1−λ)⟨v'_b,t_c⟩ + λ⟨v'_b,u_b⟩) / sqrt((1−λ)² + λ² + 2λ(1−λ)⟨t_c,u_b⟩)` — O(B·N) memory.
        """
        if not self.fast:
            if self.adapt_text:
                return self.logits_dense(image_feats, text_feats, logit_scale)
            image_out, _ = self.forward_dense(image_feats, text_feats)  # text frozen: t' = t
            return _scale(logit_scale, image_out) * image_out @ _norm(text_feats).T
        o_img, o_txt = self.raw_attention_block(image_feats, text_feats)  # [B, C], [B, C]
        v, t = _norm(image_feats), _norm(text_feats)  # [B, C], [N, C]
        v_ad = self._blend(v, o_img)  # v' [B, C]
        s = _scale(logit_scale, v_ad)
        vt = v_ad @ t.T  # ⟨v'_b, t_c⟩ [B, N]
        if not self.adapt_text:
            return s * vt
        lam = self.lam
        u = _norm(o_txt)  # u_b [B, C]
        vu = (v_ad * u).sum(-1, keepdim=True)  # ⟨v'_b, u_b⟩ [B, 1]
        tu = u @ t.T  # ⟨t_c, u_b⟩ [B, N]
        # |(1−λ)t_c + λu_b|, floored like F.normalize's eps
        length = ((1 - lam) ** 2 + lam ** 2 + 2 * lam * (1 - lam) * tu).clamp_min(1e-24).sqrt()  # [B, N]
        return s * ((1 - lam) * vt + lam * vu) / length.clamp_min(1e-12)


def _scale(logit_scale, like: torch.Tensor) -> torch.Tensor:
    """`exp(logit_scale)` as a tensor on `like`'s device (a float or a 0-d tensor is accepted)."""
    return torch.as_tensor(logit_scale, dtype=like.dtype, device=like.device).exp()


# ==================================================================================================== LightningModule
class MMAMethod(AdapterMethod):
    """MMA (docs/methods/mma.md#specification) as a LightningModule; the constructor keys mirror ``MultiModalAdapter``
    (``conf/method/mma.yaml``).

    Per batch: `logits = MultiModalAdapter.logits(raw feats [B, C], T [N, C], logit_scale)` with `T` the normalised
    zero-shot text features of the label set in use (the training classes in training). Under the default
    ``mask=block`` + ``block=mha`` this is the closed form of docs/methods/mma.md#the-mask (no [B, N, C] tensor);
    other variants run the
    dense masked attention."""

    label = "MMA"

    def __init__(self, reduction: int = 4, heads: int = 4, mask: str = "block", lam: float = 0.2,
                 sampler: str = "linear", block: str = "mha", adapt_text: bool = True, **kwargs):
        super().__init__(**kwargs)
        # refuse bad names before any features are extracted (the sizes are checked in build, against the backbone)
        _choice("mask", mask, MASKS)
        _choice("sampler", sampler, SAMPLERS)
        _choice("block", block, BLOCKS)
        if not 0.0 <= float(lam) <= 1.0:
            raise XmxError(f"MMA: lam={lam} is outside [0, 1]; the blend weight λ must be a fraction (default 0.2)")
        self.config = dict(reduction=int(reduction), heads=int(heads), mask=mask, lam=float(lam), sampler=sampler,
                           block=block, adapt_text=bool(adapt_text))

    def make_adapter(self, dim: int) -> nn.Module:
        return MultiModalAdapter(dim, **self.config)

    def adapter_logits(self, feats, W):
        return self.adapter.logits(feats, W.T, self.logit_scale, self.logit_bias)  # T = Wᵀ [N, C]; logits [B, N]

    def extra_results(self) -> dict:
        adapter = getattr(self, "adapter", None)
        return {**super().extra_results(), **self.config,
                "closed_form": None if adapter is None else bool(adapter.fast)}
