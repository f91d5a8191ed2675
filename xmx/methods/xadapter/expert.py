r"""X-adapter (Zhang et al., arXiv 2305.07358; docs/methods/xadapter.md#design): plug CLIP knowledge into a frozen
BERT / RoBERTa.

Expert block, inserted after chosen PLM layers; ``H ∈ R^{B×L×d}`` the PLM hidden states, ``E ∈ R^{B×M×d_clip}`` a CLIP
feature sequence with a key-padding mask (V-expert: the pooled CLIP image embeddings of the top-k images retrieved
for the sentence, M = k; T-expert: the CLIP text tower's last-layer token features of the sentence, M ≤ 77)::

    E'  = Linear(d_clip → d_att)(E)                               d_att = d, or the bottleneck width d_a
    A   = MHA(Q = H, K = E', V = E')                              12 heads at full width
        = Up(MHA(Q = Down(H), K = E', V = E'))                    bottleneck: Down d→d_a, d_a/64 heads, Up d_a→d
    H1  = LN(H + A)
    H2  = LN(H1 + FFN(H1))                                        FFN: d → 4d → d, GELU
    H  ← H + g · (H2 − H)                                         g: a learnable scalar, initialised to 0

At ``g = 0`` the adapter is the identity, and on the first step only ``g`` receives a gradient
(∂L/∂H2 = g · ∂L/∂H = 0, so every weight inside the block gets exactly zero).

Placement (``placement``): ``last_two`` (default: between the last two PLM layers, i.e. after layer n−1 of n),
``every`` (after every layer), an integer ``k`` (after layer k, 1-based, 1 ≤ k ≤ n) or a list of such integers.
The adapter is injected PEFT-style: a forward hook on ``model.base_model.encoder.layer[i]`` replaces that layer's
output hidden states, so the HF model's own code runs unchanged. The CLIP context is given per forward with
``with adapter.context(feats, valid): plm.model(...)``.

Objectives and evaluation: BERT-style MLM masking (:class:`MLMMasker`), the retrieval index of CLIP image embeddings
(:class:`ImageIndex`), the zero-shot object-colour probe with the 9 VaLM templates (:class:`ColorProbe`) and the GLUE
metrics (:class:`GlueMetrics`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xmx.errors import XmxError
from xmx.features.retrieval import ImageIndex

# ==== the expert block ============================================================================================


class ExpertBlock(nn.Module):
    """One X-adapter block: cross-attention from PLM hidden states to projected CLIP features, FFN, gated residual."""

    def __init__(self, d: int, d_clip: int, heads: int = 12, d_a: int | None = None, head_dim: int = 64,
                 ffn_mult: int = 4, dropout: float = 0.1, gate_init: float = 0.0, ln_eps: float = 1e-12):
        super().__init__()
        self.bottleneck = d_a is not None
        d_att = d_a if self.bottleneck else d
        n_heads = max(1, d_a // head_dim) if self.bottleneck else heads
        if d_att % n_heads:
            raise XmxError(f"method.adapter: attention width {d_att} is not divisible by {n_heads} heads; "
                           f"set method.adapter.heads (or d_a) so that it divides")
        self.proj = nn.Linear(d_clip, d_att)  # E' = Linear(d_clip → d_att)(E)
        self.down = nn.Linear(d, d_att) if self.bottleneck else nn.Identity()
        self.up = nn.Linear(d_att, d) if self.bottleneck else nn.Identity()
        self.attn = nn.MultiheadAttention(d_att, n_heads, dropout=dropout, batch_first=True)
        self.ln1 = nn.LayerNorm(d, eps=ln_eps)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Linear(ffn_mult * d, d))
        self.ln2 = nn.LayerNorm(d, eps=ln_eps)
        self.drop = nn.Dropout(dropout)
        self.gate = nn.Parameter(torch.full((), float(gate_init)))  # g

    def forward(self, h: torch.Tensor, e: torch.Tensor, e_valid: torch.Tensor | None = None) -> torch.Tensor:
        """h [B,L,d], e [B,M,d_clip], e_valid [B,M] (True = a real feature) -> h [B,L,d]."""
        if e.shape[0] != h.shape[0]:
            raise XmxError(f"X-adapter: context batch {e.shape[0]} != text batch {h.shape[0]}; give one CLIP "
                           f"feature sequence per sentence")
        e = self.proj(e.to(h.dtype))  # E' [B,M,d_att]
        pad = None
        if e_valid is not None:
            pad = ~e_valid.to(device=h.device, dtype=torch.bool)  # [B,M] True = ignore
            empty = pad.all(dim=1)  # a sentence with no context: attend to slot 0, then zero the result
            if empty.any():
                pad = pad.clone()
                pad[empty, 0] = False
        a, _ = self.attn(self.down(h), e, e, key_padding_mask=pad, need_weights=False)
        a = self.up(a)  # A [B,L,d]
        if pad is not None and empty.any():
            a = a.masked_fill(empty[:, None, None], 0.0)
        h1 = self.ln1(h + self.drop(a))  # H1 = LN(H + MHA(H, E', E'))
        h2 = self.ln2(h1 + self.drop(self.ffn(h1)))  # H2 = LN(H1 + FFN(H1))
        return h + self.gate * (h2 - h)  # H ← H + g·(H2 − H)


def resolve_placement(placement: str | int | Sequence[int], num_layers: int) -> list[int]:
    """The 0-based indices of the PLM layers after which an adapter block runs."""
    if placement == "last_two":
        if num_layers < 2:
            raise XmxError("method.adapter.placement: last_two needs a PLM with at least 2 layers")
        return [num_layers - 2]
    if placement == "every":
        return list(range(num_layers))
    ks = [placement] if isinstance(placement, (int, str)) else list(placement)
    out = []
    for k in ks:
        try:
            k = int(k)
        except (TypeError, ValueError):
            k = None
        if k is None or not 1 <= k <= num_layers:
            raise XmxError(f"method.adapter.placement: {placement!r} is not valid; use last_two, every, or a layer "
                           f"number k (1..{num_layers}) to insert after layer k")
        out.append(k - 1)
    return sorted(set(out))


class XAdapter(nn.Module):
    """The X-adapter blocks of one PLM and the hooks that run them; owns no PLM weights (checkpoints hold only the
    adapter). ``expert`` (``v`` or ``t``) is recorded for bookkeeping: both experts are the same block, fed with
    different CLIP features."""

    def __init__(self, hidden_size: int, num_layers: int, d_clip: int, placement: str | int | Sequence[int] =
                 "last_two", heads: int = 12, d_a: int | None = None, head_dim: int = 64, ffn_mult: int = 4,
                 dropout: float = 0.1, gate_init: float = 0.0, expert: str = "v"):
        super().__init__()
        if expert not in ("v", "t"):
            raise XmxError(f"method.expert: unknown expert {expert!r}; valid: v (CLIP image features of retrieved "
                           f"images), t (CLIP text-token features)")
        self.expert = expert
        self.num_layers = num_layers
        self.positions = resolve_placement(placement, num_layers)
        self.blocks = nn.ModuleDict({str(i): ExpertBlock(hidden_size, d_clip, heads, d_a, head_dim, ffn_mult,
                                                         dropout, gate_init) for i in self.positions})
        self._handles: list = []
        self._ctx: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @classmethod
    def for_plm(cls, plm, d_clip: int, **kw) -> "XAdapter":
        """Build for an :class:`xmx.backbones.plm.PLM` and attach its hooks."""
        return cls(plm.hidden_size, plm.num_layers, d_clip, **kw).attach(plm.layers)

    # ---- injection --------------------------------------------------------------------------------------------
    def attach(self, layers: nn.ModuleList) -> "XAdapter":
        """Register a forward hook on ``layers[i]`` for every placement position (``plm.layers`` =
        ``model.base_model.encoder.layer``)."""
        if len(layers) != self.num_layers:
            raise XmxError(f"X-adapter: built for {self.num_layers} layers but the PLM has {len(layers)}")
        self.detach()
        for i in self.positions:
            self._handles.append(layers[i].register_forward_hook(self._hook(str(i))))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, key: str) -> Callable:
        def hook(module, args, output):
            if self._ctx is None:
                raise XmxError("X-adapter: no CLIP context was set for this forward; wrap the PLM call in "
                               "`with adapter.context(feats, valid):`")
            h = output if isinstance(output, torch.Tensor) else output[0]  # transformers 5: tensor; 4.x: tuple
            new = self.blocks[key](h, *self._ctx)
            return new if isinstance(output, torch.Tensor) else (new,) + tuple(output[1:])
        return hook

    @contextlib.contextmanager
    def context(self, feats: torch.Tensor, valid: torch.Tensor | None = None) -> Iterator[None]:
        """CLIP features [B,M,d_clip] (+ valid mask [B,M], True = real) for the PLM forwards inside the block."""
        prev, self._ctx = self._ctx, (feats, valid)
        try:
            yield
        finally:
            self._ctx = prev

    def gates(self) -> dict[str, float]:
        return {f"layer{int(k) + 1}": float(b.gate.detach()) for k, b in self.blocks.items()}


class ClassificationHead(nn.Module):
    """GLUE head on the first token's hidden state ([CLS] / <s>): dropout, dense, tanh, dropout, out."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, num_labels)
        self.drop = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B,L,d] -> logits [B,num_labels] (regression: [B,1])."""
        x = self.drop(hidden[:, 0])
        return self.out(self.drop(torch.tanh(self.dense(x))))


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B,L,V], labels [B,L] (-100 = not predicted) -> mean cross-entropy over predicted tokens."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def glue_loss(logits: torch.Tensor, targets: torch.Tensor, regression: bool) -> torch.Tensor:
    if regression:
        return F.mse_loss(logits.reshape(-1).float(), targets.float())
    return F.cross_entropy(logits.float(), targets.long())


# ==== expert inputs ===============================================================================================


@torch.no_grad()
def v_expert_inputs(clip, index: ImageIndex, texts: Sequence[str], k: int = 4,
                    exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """V-expert context: CLIP-encode ``texts`` (the PLM's view, see :func:`plm_view_texts`), retrieve the top-k
    images -> (features [B,k,C] normalised, valid [B,k] all True)."""
    q = clip.encode_text(clip.tokenize(texts))  # [B,C]
    _, rows = index.search(q, k, exclude)
    feats = index.features(rows).to(q.device)
    return feats, torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)


@torch.no_grad()
def t_expert_inputs(clip, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """T-expert context: CLIP text tower last-layer token features -> (feats [B,77,C], valid [B,77] True up to and
    including end-of-text)."""
    return clip.encode_text_tokens(clip.tokenize(texts), project=True)
