"""LoRA inside open_clip's attention layers, injected into a built model without forking open_clip.

CLIP-LoRA (Zanella & Ben Ayed, CVPRW'24), as its released ``loralib`` computes it [code], for each adapted projection
``p`` in {q, k, v, o} of an ``nn.MultiheadAttention`` (x its input: the block's normalised tokens for q, k, v; the
concatenated heads for o):

    p(x) = x W_pᵀ + b_p + s · drop_p(x) A_pᵀ B_pᵀ        A_p [r, d_in], B_p [d_out, r]
    s    = alpha / sqrt(r)                                 # the release's scaling (not alpha / r)
    A_p ~ kaiming_uniform(a=√5),  B_p = 0                  # the adapted model equals the frozen one at init

``drop_p`` is a dropout of its own per projection (p = 0.25 by default), active in training only. In evaluation, and
whenever the dropout is 0, the deltas are merged (``W_p + s·B_p A_p``) and the frozen ``nn.MultiheadAttention`` runs
with the merged weights (the release merges at eval too): with ``B = 0`` that is bit for bit the frozen model.

Why not Hugging Face PEFT: its LoRA for ``nn.MultiheadAttention`` adapts the packed ``in_proj`` with one A shared by
q, k and v, always adapts ``out_proj`` as well, and runs by merging the weights before each forward, so there is no
dropout on the branch input. CLIP-LoRA needs separate q/k/v factors, a chosen subset of {q,k,v,o} and dropout before
each branch; :class:`LoRAAttention` is the smallest wrapper that does that (it keeps the frozen module inside it and
calls it for the merged path).

Positions (which blocks get LoRA) follow the release's tables for 12-layer towers, generalised to any depth L:
``bottom`` first third, ``mid`` middle third, ``up`` last third, ``half-bottom``/``half-up`` the halves, ``all``,
``top3`` the last three (the release names it ``top3`` in both towers).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from xmx.errors import XmxError

POSITIONS = ("bottom", "mid", "up", "half-up", "half-bottom", "all", "top3")
ENCODERS = ("text", "vision", "both")
PARAMS = ("q", "k", "v", "o")


def layer_indices(position: str, depth: int) -> list[int]:
    """0-based indices of the blocks that get LoRA for ``position`` in a tower of ``depth`` blocks."""
    if position not in POSITIONS:
        raise XmxError(f"method.position={position!r} is unknown; valid choices: {', '.join(POSITIONS)}")
    third, half = depth // 3, depth // 2
    return {"bottom": list(range(0, third)), "mid": list(range(third, 2 * third)),
            "up": list(range(depth - third, depth)), "half-bottom": list(range(0, half)),
            "half-up": list(range(depth - half, depth)), "all": list(range(depth)),
            "top3": list(range(max(depth - 3, 0), depth))}[position]


def tower_blocks(model: nn.Module, tower: str, what: str = "LoRA") -> list[nn.Module]:
    """The residual attention blocks of one open_clip tower (``text`` or ``vision``), each with an ``attn`` that is an
    ``nn.MultiheadAttention`` (or an already injected :class:`LoRAAttention`); one actionable line otherwise."""
    owner = model.visual if tower == "vision" else getattr(model, "text", model)  # CustomTextCLIP keeps it in .text
    trunk = getattr(owner, "transformer", None)
    blocks = list(getattr(trunk, "resblocks", None) or [])
    if not blocks:
        kind = type(owner).__name__
        raise XmxError(f"{what}: the {tower} tower of this backbone ({kind}) has no transformer attention layers; "
                       "use a ViT backbone (backbone=clip_vit_b16) or adapt the other tower (method.encoder=text)")
    for i, b in enumerate(blocks):
        if not isinstance(getattr(b, "attn", None), (nn.MultiheadAttention, LoRAAttention)):
            raise XmxError(f"{what}: block {i} of the {tower} tower has attention "
                           f"{type(getattr(b, 'attn', None)).__name__}, not nn.MultiheadAttention; this backbone "
                           "cannot take LoRA (use an OpenAI-style CLIP ViT: backbone=clip_vit_b16)")
        attn = b.attn.base if isinstance(b.attn, LoRAAttention) else b.attn
        if not attn._qkv_same_embed_dim or attn.bias_k is not None:
            raise XmxError(f"{what}: block {i} of the {tower} tower uses cross- or biased-kv attention, which LoRA "
                           "does not support here; use an OpenAI-style CLIP ViT (backbone=clip_vit_b16)")
    return blocks


class LoRAProjection(nn.Module):
    """One low-rank branch ``s · drop(x) Aᵀ Bᵀ`` (A [r, d_in], B [d_out, r])."""

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float):
        super().__init__()
        self.r, self.alpha, self.scaling = int(r), float(alpha), float(alpha) / math.sqrt(r)
        self.A = nn.Parameter(torch.empty(r, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear's weights (and the release)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.A)  # [d_out, d_in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * F.linear(F.linear(self.drop(x), self.A), self.B)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + forward(x)`` with the scale and the sum fused into one ``addmm`` (fewer kernels per step)."""
        h = F.linear(self.drop(x), self.A).reshape(-1, self.r)  # [*, r]
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.to(y.dtype), self.B.t().to(y.dtype), alpha=self.scaling)
        return out.view(y.shape)


class LoRAAttention(nn.Module):
    """A frozen ``nn.MultiheadAttention`` (kept as ``base``) plus LoRA branches on some of q, k, v, o.

    Same call signature and return value as the module it wraps (``(out, None)``; no attention weights)."""

    def __init__(self, base: nn.MultiheadAttention, params: Iterable[str], r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        E = base.embed_dim
        self.lora = nn.ModuleDict({p: LoRAProjection(E, E, r, alpha, dropout) for p in params})
        dev, dt = base.in_proj_weight.device, base.in_proj_weight.dtype
        self.lora.to(device=dev, dtype=dt if dt.is_floating_point else None)
        self.base.requires_grad_(False)
        self.train(base.training)  # a frozen backbone is in eval: so are its new branches until a method trains them

    @property
    def batch_first(self) -> bool:
        return self.base.batch_first

    def train(self, mode: bool = True):  # the frozen attention stays in eval; only the branches' dropout follows
        self.training = mode
        self.lora.train(mode)
        return self

    def _merged(self) -> dict[str, torch.Tensor]:
        E, out = self.base.embed_dim, {}
        if any(p in self.lora for p in "qkv"):
            w = self.base.in_proj_weight
            chunks = [w[i * E:(i + 1) * E] + self.lora[p].delta_weight().to(w.dtype) if p in self.lora
                      else w[i * E:(i + 1) * E] for i, p in enumerate("qkv")]
            out["in_proj_weight"] = torch.cat(chunks)
        if "o" in self.lora:
            w = self.base.out_proj.weight
            out["out_proj.weight"] = w + self.lora["o"].delta_weight().to(w.dtype)
        return out

    def _dropout_active(self) -> bool:
        return self.training and any(isinstance(m.drop, nn.Dropout) and m.drop.p > 0 for m in self.lora.values())

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self._dropout_active():  # merged weights through the frozen module itself
            out, _ = functional_call(self.base, self._merged(), (query, key, value),
                                     dict(key_padding_mask=key_padding_mask, need_weights=False,
                                          attn_mask=attn_mask, is_causal=is_causal))
            return out, None
        if key_padding_mask is not None:
            raise XmxError("LoRA attention: key_padding_mask is not supported in training with dropout; set "
                           "method.dropout=0")
        return self._unmerged(query, key, value, attn_mask, is_causal), None

    def _unmerged(self, query, key, value, attn_mask, is_causal):
        """The release's training path: separate q/k/v projections, each with its own dropout before the branch."""
        b = self.base
        E, H = b.embed_dim, b.num_heads
        if not b.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        w, bias = b.in_proj_weight, b.in_proj_bias
        inputs = (query, key, value)
        if query is key and key is value:  # self-attention (open_clip's blocks): one packed projection
            frozen = F.linear(query, w, bias).chunk(3, dim=-1)
        else:
            frozen = [F.linear(x, w[i * E:(i + 1) * E], None if bias is None else bias[i * E:(i + 1) * E])
                      for i, x in enumerate(inputs)]
        q, k, v = (self.lora[p].add_to(y, x) if p in self.lora else y
                   for p, x, y in zip("qkv", inputs, frozen))  # [N, L, E] each
        N, L, S = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(N, -1, H, E // H).transpose(1, 2) for t in (q, k, v))  # [N, H, L, d]
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype) if attn_mask.is_floating_point() else attn_mask
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(N, H, L, S)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None)
        o = o.transpose(1, 2).reshape(N, L, E)
        out = F.linear(o, b.out_proj.weight, b.out_proj.bias)
        if "o" in self.lora:
            out = self.lora["o"].add_to(out, o)
        return out if b.batch_first else out.transpose(0, 1)


def check_lora_config(encoder: str, position: str, params: Iterable[str], r: int, alpha: float,
                      dropout: float) -> list[str]:
    """Refuse bad LoRA keys with one line each (before any model work); returns ``params`` as a list."""
    if encoder not in ENCODERS:
        raise XmxError(f"method.encoder={encoder!r} is unknown; valid choices: {', '.join(ENCODERS)}")
    if position not in POSITIONS:
        raise XmxError(f"method.position={position!r} is unknown; valid choices: {', '.join(POSITIONS)}")
    params = [params] if isinstance(params, str) else list(params)
    bad = [p for p in params if p not in PARAMS]
    if bad or not params or len(set(params)) != len(params):
        raise XmxError(f"method.params={params}: entries must be distinct items of q, k, v, o (got unknown "
                       f"{bad or 'none'}); e.g. method.params=[q,k,v]")
    if isinstance(r, bool) or int(r) != r or int(r) <= 0:
        raise XmxError(f"method.r={r}: the LoRA rank must be a positive integer (CLIP-LoRA: 2)")
    if not math.isfinite(float(alpha)) or float(alpha) <= 0:
        raise XmxError(f"method.alpha={alpha}: the LoRA scale must be a positive number (CLIP-LoRA: 1)")
    if not 0.0 <= float(dropout) < 1.0:
        raise XmxError(f"method.dropout={dropout}: must be in [0, 1) (CLIP-LoRA: 0.25)")
    return params


def inject_lora(model: nn.Module, encoder: str = "both", position: str = "all", params=("q", "k", "v"),
                r: int = 2, alpha: float = 1.0, dropout: float = 0.25) -> list[LoRAAttention]:
    """Replace the attention of the chosen blocks of an open_clip CLIP ``model`` in place by :class:`LoRAAttention`
    (frozen base inside); returns the wrappers, text tower first. Only the LoRA factors require grad."""
    params = check_lora_config(encoder, position, params, r, alpha, dropout)
    towers = ["text", "vision"] if encoder == "both" else [encoder]
    blocks = {t: tower_blocks(model, t) for t in towers}  # validate both towers before changing anything
    wrappers = []
    for t in towers:
        for i in layer_indices(position, len(blocks[t])):
            blk = blocks[t][i]
            if isinstance(blk.attn, LoRAAttention):
                raise XmxError(f"LoRA: block {i} of the {t} tower already has LoRA; inject once per backbone")
            blk.attn = LoRAAttention(blk.attn, params, int(r), float(alpha), float(dropout))
            wrappers.append(blk.attn)
    return wrappers
