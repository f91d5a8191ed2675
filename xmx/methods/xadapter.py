r"""X-adapter (Zhang et al., arXiv 2305.07358; spec §5): plug CLIP knowledge into a frozen BERT / RoBERTa.

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
import warnings
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from xmx.errors import XmxError

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
            raise XmxError("method.placement: last_two needs a PLM with at least 2 layers")
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
            raise XmxError(f"method.placement: {placement!r} is not valid; use last_two, every, or a layer number "
                           f"k (1..{num_layers}) to insert after layer k")
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


# ==== MLM masking =================================================================================================


class MLMMasker:
    """BERT masking: each maskable token (not special, not padding) is selected with probability ``ratio``;
    a selected token becomes the mask token with p ``mask_prob`` (0.8), a random non-special token with p
    ``random_prob`` (0.1), and stays as it is otherwise. Seeded, independent of global random state."""

    def __init__(self, tokenizer, ratio: float = 0.15, mask_prob: float = 0.8, random_prob: float = 0.1,
                 seed: int = 0):
        if not 0.0 < ratio < 1.0:
            raise XmxError(f"method.mask_ratio: {ratio} must be in (0, 1)")
        if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
            raise XmxError(f"method.mask_replace: mask {mask_prob} + random {random_prob} must lie in [0, 1]")
        if tokenizer.mask_token_id is None:
            raise XmxError("MLM masking: the tokenizer has no mask token")
        self.ratio, self.mask_prob, self.random_prob = ratio, mask_prob, random_prob
        self.mask_id = int(tokenizer.mask_token_id)
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        vocab = torch.arange(len(tokenizer))
        self.candidates = vocab[~torch.isin(vocab, self.special)]  # random replacements: never a special token
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B,L] -> (masked input_ids [B,L], labels [B,L]: the original id where predicted, else -100)."""
        ids = input_ids.detach().cpu()
        maskable = ~torch.isin(ids, self.special)
        if attention_mask is not None:
            maskable &= attention_mask.detach().cpu().bool()
        g = self.generator
        selected = (torch.rand(ids.shape, generator=g) < self.ratio) & maskable
        u = torch.rand(ids.shape, generator=g)
        to_mask = selected & (u < self.mask_prob)
        to_random = selected & (u >= self.mask_prob) & (u < self.mask_prob + self.random_prob)
        rand_ids = self.candidates[torch.randint(len(self.candidates), ids.shape, generator=g)]
        out = torch.where(to_mask, torch.full_like(ids, self.mask_id), ids)
        out = torch.where(to_random, rand_ids, out)
        labels = torch.where(selected, ids, torch.full_like(ids, -100))
        return out.to(input_ids.device), labels.to(input_ids.device)


def plm_view_texts(tokenizer, input_ids: torch.Tensor, hide: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, mode: str = "mask_word",
                   mask_word: str | None = None) -> list[str]:
    """The sentences as the PLM sees them, for CLIP (V-expert retrieval query, T-expert features), with every
    position in ``hide`` [B,L] (the MLM targets, including the 10 % kept / random ones) replaced by ``mask_word``
    (default: the tokenizer's mask token) or removed (``mode="remove"``), so the answer cannot leak through CLIP."""
    if mode not in ("mask_word", "remove"):
        raise XmxError(f"method.query_masked: unknown mode {mode!r}; valid: mask_word, remove")
    ids = input_ids.detach().cpu().clone()
    mask_id = int(tokenizer.mask_token_id)
    if hide is not None:
        ids[hide.detach().cpu().bool()] = mask_id
    drop = set(tokenizer.all_special_ids) - {mask_id}
    word = tokenizer.mask_token if mask_word is None else mask_word
    am = attention_mask.detach().cpu().bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
    out = []
    for row, keep in zip(ids.tolist(), am.tolist()):
        toks = [t for t, k in zip(row, keep) if k and t not in drop and not (mode == "remove" and t == mask_id)]
        pieces, run = [], []
        for t in toks:  # decode runs of ordinary tokens; each mask token becomes one mask word
            if t == mask_id:
                if run:
                    pieces.append(tokenizer.decode(run).strip())
                    run = []
                pieces.append(word)
            else:
                run.append(t)
        if run:
            pieces.append(tokenizer.decode(run).strip())
        out.append(tokenizer.clean_up_tokenization(" ".join(p for p in pieces if p)))  # "word ." -> "word."
    return out


# ==== expert inputs ===============================================================================================


class ImageIndex:
    """CLIP image embeddings [M,C] (stored L2-normalised) with ids; cosine top-k search by chunked matmul."""

    def __init__(self, embeddings: torch.Tensor, ids: Sequence, dtype: torch.dtype = torch.float32,
                 chunk: int = 65536):
        if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
            raise XmxError(f"image index: {tuple(embeddings.shape)} embeddings for {len(ids)} ids; expected [M,C] "
                           f"with one row per id")
        if embeddings.shape[0] == 0:
            raise XmxError("image index: no images; build it from the COCO train images")
        self.embeddings = F.normalize(embeddings.float(), dim=-1).to(dtype)  # [M,C]
        self.ids = list(ids)
        self.chunk = int(chunk)
        self._pos = None

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device) -> "ImageIndex":
        self.embeddings = self.embeddings.to(device)
        return self

    def position(self, ids: Sequence) -> torch.Tensor:
        """Index rows of ``ids`` [N] (e.g. a caption's own image, to exclude or to use directly)."""
        if self._pos is None:
            self._pos = {x: i for i, x in enumerate(self.ids)}
        try:
            return torch.tensor([self._pos[x] for x in ids], dtype=torch.long)
        except KeyError as e:
            raise XmxError(f"image index: id {e.args[0]!r} is not in the index") from None

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 4, exclude: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [Q,C] (raw or normalised) -> (cosine scores [Q,k], index rows [Q,k]), best first; ``exclude``
        [Q] an index row to skip per query (-1: none)."""
        if not 1 <= k <= len(self):
            raise XmxError(f"image index: k={k} but the index holds {len(self)} images; use 1 <= k <= {len(self)}")
        q = F.normalize(queries.float(), dim=-1).to(self.embeddings.device, self.embeddings.dtype)  # [Q,C]
        ex = exclude.to(q.device) if exclude is not None else None
        best_s = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        for s in range(0, len(self), self.chunk):
            block = self.embeddings[s:s + self.chunk]  # [m,C]
            sc = (q @ block.T).float()  # [Q,m]
            if ex is not None:
                local = ex - s
                hit = (local >= 0) & (local < block.shape[0])
                sc[hit.nonzero().squeeze(1), local[hit]] = float("-inf")
            ts, ti = sc.topk(min(k, block.shape[0]), dim=1)
            best_s, order = torch.cat([best_s, ts], 1).topk(min(k, best_s.shape[1] + ts.shape[1]), dim=1)
            best_i = torch.cat([best_i, ti + s], 1).gather(1, order)
        return best_s, best_i

    def features(self, rows: torch.Tensor) -> torch.Tensor:
        """index rows [Q,k] -> normalised embeddings [Q,k,C]."""
        return self.embeddings[rows.to(self.embeddings.device)]


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


# ==== zero-shot object colour probe ===============================================================================

VALM_TEMPLATES = (
    "Q: What is the color of [D] [I]? A: It is",
    "What is the color of [D] [I]? It is",
    "What is the usual color of [D] [I]?",
    "What is the typical color of [D] [I]?",
    "The color of [D] [I] is",
    "The usual color of [D] [I] is",
    "The common color of [D] [I] is",
    "The typical color of [D] [I] is",
    "[D] [I] usually has the color of",
)


def fill_template(template: str, descriptor: str, item: str, mask_token: str) -> str:
    """``[D] [I]`` -> descriptor (stripped; dropped when empty) and item, then `` <mask>.``"""
    d = descriptor.strip()
    text = template.replace("[D] [I]", f"{d} {item}" if d else item)
    return f"{text} {mask_token}."


def color_token_ids(tokenizer, colors: Sequence[str]) -> torch.Tensor:
    """The single token id of each colour word as it follows a space ([n_colors]); XmxError names a word that is
    not one token (e.g. ``gray`` vs ``grey``, or a missing RoBERTa ``Ġword`` entry)."""
    out = []
    for c in colors:
        ids = tokenizer(" " + c, add_special_tokens=False)["input_ids"]  # BERT strips the space; RoBERTa keeps Ġ
        if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise XmxError(f"color probe: colour word {c!r} is not a single token for this tokenizer "
                           f"({pieces}); use a PLM whose vocabulary holds it or drop it from the colour set")
        out.append(ids[0])
    if len(set(out)) != len(out):
        raise XmxError(f"color probe: two colour words map to the same token: {list(colors)}")
    return torch.tensor(out, dtype=torch.long)


class ColorProbe:
    """The zero-shot colour probe: 9 templates × items prompts; the MLM logits at the mask, restricted to the
    dataset's colour words, pick the colour; accuracy is pooled over templates × items (percent)."""

    def __init__(self, dataset, tokenizer, templates: Sequence[str] = VALM_TEMPLATES, max_length: int = 64):
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.templates = tuple(templates)
        self.color_ids = color_token_ids(tokenizer, dataset.colors)  # [n_colors]
        prompts = [(fill_template(t, it.descriptor, it.item, tokenizer.mask_token), dataset.label(it), ti)
                   for ti, t in enumerate(self.templates) for it in dataset.items]
        self.texts = [p[0] for p in prompts]
        self.labels = torch.tensor([p[1] for p in prompts])  # [N]
        self.template_of = torch.tensor([p[2] for p in prompts])  # [N]
        enc = tokenizer(self.texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        self.input_ids, self.attention_mask = enc["input_ids"], enc["attention_mask"]  # [N,L]
        is_mask = self.input_ids == tokenizer.mask_token_id
        bad = (is_mask.sum(1) != 1).nonzero()
        if len(bad):
            raise XmxError(f"color probe: prompt {self.texts[int(bad[0])]!r} does not hold exactly one mask token "
                           f"after tokenization; raise max_length")
        self.mask_index = is_mask.float().argmax(1)  # [N]

    def __len__(self) -> int:
        return len(self.texts)

    def batches(self, batch_size: int = 64) -> Iterator[dict]:
        """Dicts with ``input_ids``/``attention_mask`` [B,L], ``mask_index`` [B], ``labels`` [B], ``hide`` [B,L]
        (the mask position, for :func:`plm_view_texts`), ``texts`` and ``rows`` (positions in the probe)."""
        for s in range(0, len(self), batch_size):
            sl = slice(s, s + batch_size)
            ids = self.input_ids[sl]
            yield {"input_ids": ids, "attention_mask": self.attention_mask[sl], "mask_index": self.mask_index[sl],
                   "labels": self.labels[sl], "hide": ids == self.tokenizer.mask_token_id,
                   "texts": self.texts[sl], "rows": torch.arange(s, s + ids.shape[0])}

    def restrict(self, mlm_logits: torch.Tensor, mask_index: torch.Tensor) -> torch.Tensor:
        """MLM logits [B,L,V] -> logits over the colour words at the mask [B,n_colors]."""
        at_mask = mlm_logits[torch.arange(mlm_logits.shape[0], device=mlm_logits.device),
                             mask_index.to(mlm_logits.device)]  # [B,V]
        return at_mask[:, self.color_ids.to(at_mask.device)]

    def score(self, color_logits: torch.Tensor) -> dict[str, float]:
        """colour logits [N,n_colors] in probe order -> {"acc": pooled %, "acc/t<i>": per-template %}."""
        if color_logits.shape[0] != len(self):
            raise XmxError(f"color probe: {color_logits.shape[0]} predictions for {len(self)} prompts")
        correct = (color_logits.argmax(1).cpu() == self.labels).float()
        out = {"acc": 100.0 * float(correct.mean())}
        for ti in range(len(self.templates)):
            out[f"acc/t{ti}"] = 100.0 * float(correct[self.template_of == ti].mean())
        return out

    @torch.no_grad()
    def evaluate(self, predict: Callable[[dict], torch.Tensor], batch_size: int = 64) -> dict[str, float]:
        """``predict(batch) -> MLM logits [B,L,V]`` (set the adapter context inside it) -> :meth:`score`."""
        return self.score(torch.cat([self.restrict(predict(b), b["mask_index"]).float().cpu()
                                     for b in self.batches(batch_size)]))


# ==== GLUE metrics ================================================================================================


class GlueMetrics(nn.Module):
    """The task's standard dev-set metrics (percent): Matthews for CoLA, F1 + accuracy for MRPC/QQP,
    Pearson/Spearman for STS-B, accuracy elsewhere. ``update(outputs, targets)`` takes class logits [B,C] or
    regression outputs [B] / [B,1]."""

    def __init__(self, task: str):
        super().__init__()
        from xmx.data.text import glue_task
        self.task = glue_task(task)
        n = self.task.num_labels
        make = {
            "mcc": lambda: torchmetrics.MatthewsCorrCoef(task="multiclass", num_classes=n),
            "f1": lambda: torchmetrics.F1Score(task="binary"),
            "acc": lambda: torchmetrics.Accuracy(task="multiclass", num_classes=n),
            "pearson": lambda: torchmetrics.PearsonCorrCoef(),
            "spearman": lambda: torchmetrics.SpearmanCorrCoef(),
        }
        with warnings.catch_warnings():  # Spearman keeps all predictions: fine for GLUE dev sets (<= 40k rows)
            warnings.filterwarnings("ignore", message=".*will save all targets and predictions.*")
            self.metrics = torchmetrics.MetricCollection({m: make[m]() for m in self.task.metrics})

    @property
    def main_metric(self) -> str:
        return self.task.main_metric

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if self.task.is_regression:
            self.metrics.update(outputs.reshape(-1).float(), targets.float())
        else:
            self.metrics.update(outputs.argmax(-1), targets.long())

    def compute(self) -> dict[str, float]:
        return {k: 100.0 * float(v) for k, v in self.metrics.compute().items()}

    def reset(self) -> None:
        self.metrics.reset()


# ==== LightningModules ============================================================================================
# Below: the xmx runs of the language track. Each keeps the CLIP ``backbone`` and the ``plm`` as submodules named
# exactly so (checkpoints leave them out; with ``finetune_plm`` the PLM is trained and therefore kept). Batches are
# the dicts of ``xmx.data.text_datamodule``.

import logging  # noqa: E402

from xmx.methods.base import XmxModule, resolve_checkpoint  # noqa: E402

log = logging.getLogger(__name__)

EXPERTS = ("v", "t", "none")
PLM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def mlm_head(plm) -> nn.Module:
    """The masked-LM prediction head of a BERT (``cls``) or RoBERTa (``lm_head``) model: hidden [...,d] -> [...,V]."""
    head = getattr(plm.model, "cls", None) or getattr(plm.model, "lm_head", None)
    if head is None:
        raise XmxError(f"plm: {plm.name} has no masked-LM head (cls / lm_head)")
    return head


def linear_warmup(total: int, warmup: float, decay: str = "linear") -> Callable[[int], float]:
    """LR multiplier per optimiser step: linear warm-up over ``warmup`` (a fraction) of ``total`` steps, then
    linear decay to 0 (``decay="linear"``) or constant (``"constant"``)."""
    if decay not in ("linear", "constant"):
        raise XmxError(f"method.decay: {decay!r}; valid: linear, constant")
    warm = max(1, round(float(warmup) * total))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if decay == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warm))
    return f


class XAdapterRun(XmxModule):
    """Shared part of the X-adapter runs: the adapter, its CLIP context per batch, AdamW + linear warm-up.

    ``expert``: ``v`` (retrieved CLIP image embeddings), ``t`` (CLIP text-token features) or ``none`` (no adapter:
    the bare / frozen-PLM baselines; also ``adapter: null``). ``adapter``: the :class:`XAdapter` keys (placement,
    heads, d_a, head_dim, ffn_mult, dropout, gate_init). ``k``: images retrieved per sentence. ``context``:
    ``retrieve`` or ``own_image`` (COCO pre-training: the caption's own image where it is in the index, retrieval
    for the others). ``exclude_own``: never retrieve the caption's own image.
    """

    def __init__(self, name: str | None = None, expert: str = "v", adapter: dict | None = None, k: int = 4,
                 context: str = "retrieve", exclude_own: bool = False, batch_size: int | None = 256,
                 max_length: int = 64, steps: int | None = None, epochs: int | None = None, lr: float = 1e-4,
                 weight_decay: float = 0.01, warmup: float = 0.06, decay: str = "linear"):
        super().__init__(name=name, inputs="text", batch_size=batch_size, epochs=epochs)
        if expert not in EXPERTS:
            raise XmxError(f"method.expert: {expert!r}; valid: {', '.join(EXPERTS)}")
        if context not in ("retrieve", "own_image"):
            raise XmxError(f"method.context: {context!r}; valid: retrieve, own_image")
        if int(k) < 1:
            raise XmxError(f"method.k: {k}; retrieve at least one image")
        self.expert = "none" if adapter is None else expert
        self.adapter_cfg = dict(adapter or {})
        self.k, self.context_mode, self.exclude_own = int(k), context, bool(exclude_own)
        self.max_length, self.steps = max_length, steps
        self.lr, self.weight_decay, self.warmup, self.decay = float(lr), float(weight_decay), float(warmup), decay
        self.adapter: XAdapter | None = None
        self.loaded_tensors = 0

    # ---- construction -----------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        self.backbone, self.plm = dm.backbone, dm.plm  # submodules named exactly so: checkpoints skip them
        super().setup(stage)

    def build_metrics(self, dm) -> None:
        """Each run type makes its own metrics in ``build`` (MLM loss/accuracy, colour accuracy, GLUE metrics)."""

    def make_adapter(self) -> XAdapter | None:
        if self.expert == "none":
            return None
        return XAdapter.for_plm(self.plm, self.backbone.embed_dim, expert=self.expert, **self.adapter_cfg)

    def load_weights(self, path) -> None:
        """``init_from``: load the matching tensors; every adapter tensor must be among them (a pre-trained
        adapter of another shape or placement is an error, not a silent random init)."""
        ckpt = resolve_checkpoint(path)
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        own = self.state_dict()
        need = [k for k in own if k.startswith("adapter.")]
        bad = [k for k in need if k not in state or state[k].shape != own[k].shape]
        if bad:
            raise XmxError(f"init_from={path}: the checkpoint lacks {len(bad)} of the {len(need)} adapter tensors "
                           f"(e.g. {bad[0]}); pre-train with the same method.adapter (placement, d_a, heads) and "
                           f"backbone/plm")
        super().load_weights(path)
        self.loaded_tensors = sum(1 for k, v in state.items() if k in own and own[k].shape == v.shape)

    # ---- CLIP context -----------------------------------------------------------------------------------------
    def _index(self) -> ImageIndex:
        index = self.dm.index
        if index.embeddings.device != self.device:
            index.to(self.device)
        return index

    @torch.no_grad()
    def clip_context(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The expert's CLIP feature sequence for the batch: (feats [B,M,C], valid [B,M]); None without adapter."""
        if self.adapter is None:
            return None
        tokens = batch["clip_tokens"].to(self.device)
        if self.expert == "t":
            return self.backbone.encode_text_tokens(tokens, project=True)
        index = self._index()
        own = batch.get("image_rows")
        own = own.to(self.device) if own is not None else None
        q = self.backbone.encode_text(tokens)
        _, rows = index.search(q, min(self.k, len(index)), own if self.exclude_own else None)
        feats = index.features(rows)  # [B,k,C]
        valid = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        if self.context_mode == "own_image" and own is not None:
            have = own >= 0
            if have.any():
                feats = feats.clone()
                feats[have, 0] = index.features(own[have][:, None])[:, 0]
                valid[have, 1:] = False  # the caption's own image alone
        return feats, valid

    def plm_hidden(self, batch: dict, ctx) -> torch.Tensor:
        """Last hidden states [B,L,d] of the PLM (with the adapter's context when there is an adapter)."""
        inputs = {k: batch[k] for k in PLM_INPUTS if k in batch}
        if self.adapter is None:
            return self.plm.model.base_model(**inputs)[0]
        with self.adapter.context(*ctx):
            return self.plm.model.base_model(**inputs)[0]

    # ---- optimisation -----------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        decay = [p for n, p in params if p.ndim >= 2]
        rest = [p for n, p in params if p.ndim < 2]  # biases, LayerNorms, the gates
        return [g for g in ({"params": decay, "weight_decay": self.weight_decay},
                            {"params": rest, "weight_decay": 0.0}) if g["params"]]

    def configure_optimizers(self):
        groups = self.param_groups()
        if not groups:
            return None
        opt = torch.optim.AdamW(groups, lr=self.lr)
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise XmxError("trainer: set trainer.max_steps (or trainer.max_epochs) so the warm-up schedule has a "
                           "length")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup(int(total), self.warmup, self.decay))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def extra_results(self) -> dict:
        out = {"expert": self.expert, "plm": self.plm.describe() if hasattr(self, "plm") else None}
        if self.adapter is not None:
            out.update({"adapter": {**self.adapter_cfg, "positions": [p + 1 for p in self.adapter.positions]},
                        "gates": self.adapter.gates(),
                        "adapter_params": sum(p.numel() for p in self.adapter.parameters())})
            if self.expert == "v":
                out.update({"k": self.k, "context": self.context_mode})
        if self.init_from:
            out["init_from"] = {"path": str(self.init_from), "tensors_loaded": self.loaded_tensors}
        return out

    # evaluation hooks of XmxModule assume (x, y) classification batches: each run below defines its own
    def logits(self, x, eval_set):  # pragma: no cover - not used by the language track
        raise NotImplementedError


class XAdapterMLM(XAdapterRun):
    """Adapter-only masked-LM pre-training (V-expert on COCO captions, T-expert on WikiText-103). Logs
    ``train/loss``, ``val/mlm_loss``, ``val/mlm_acc`` (masked-token accuracy, %; also as ``val/acc`` so the default
    checkpoint monitor keeps the best) and ``<eval set>/mlm_loss`` / ``mlm_acc`` at test."""

    def build(self, dm) -> None:
        if self.expert == "none":
            raise XmxError("method=xadapter_mlm pre-trains an adapter: set method.expert to v or t and give "
                           "method.adapter")
        self.adapter = self.make_adapter()
        self._sums: dict[str, list[float]] = {}
        self.val_curve: list[dict] = []

    def mlm_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (mean loss over predicted tokens, #correct, #predicted); the head runs on predicted positions only."""
        hidden = self.plm_hidden(batch, self.clip_context(batch))
        labels = batch["labels"]
        sel = labels != -100
        n = sel.sum()
        if not bool(n):
            return hidden.sum() * 0.0, n, n
        logits = mlm_head(self.plm)(hidden[sel])  # [P,V]
        target = labels[sel]
        loss = F.cross_entropy(logits.float(), target)
        return loss, (logits.argmax(-1) == target).sum(), n

    def training_step(self, batch, batch_idx):
        loss, _, n = self.mlm_step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["input_ids"].shape[0]))
        return loss

    def _accumulate(self, name: str, batch) -> None:
        loss, correct, n = self.mlm_step(batch)
        s = self._sums.setdefault(name, [0.0, 0.0, 0.0])
        s[0] += float(loss) * int(n)
        s[1] += int(correct)
        s[2] += int(n)

    def _emit(self, name: str) -> dict:
        loss, correct, n = self._sums.pop(name, [0.0, 0.0, 0.0])
        if not n:
            return {}
        return {f"{name}/mlm_loss": loss / n, f"{name}/mlm_acc": 100.0 * correct / n}

    def validation_step(self, batch, batch_idx):
        self._accumulate("val", batch)

    def on_validation_epoch_end(self) -> None:
        m = self._emit("val")
        if m:
            self.log_dict(m, prog_bar=True)
            self.log("val/acc", m["val/mlm_acc"])
            self.val_curve.append({"step": int(self.global_step), **m})

    def on_test_epoch_start(self) -> None:
        self._sums = {}

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._accumulate(self.dm.eval_sets[dataloader_idx].name, batch)

    def on_test_epoch_end(self) -> None:
        for s in self.dm.eval_sets:
            m = self._emit(s.name)
            if m:
                self.log_dict(m)

    def extra_results(self) -> dict:
        return {**super().extra_results(), "mask_ratio": getattr(self.dm, "mask_ratio", None),
                "val_curve": self.val_curve}


class XAdapterColorProbe(XAdapterRun):
    """Zero-shot object colour (evaluation only): the MLM logits at the mask, restricted to the colour words.
    Without ``init_from`` the bare PLM (no adapter) is the baseline; with ``init_from=<pre-training run>`` the
    V-expert adapter is loaded and fed the images retrieved for each prompt. Logs ``<set>/acc`` per colour set
    (``test_memory_color/acc``, ``test_color_terms/acc``); per-template accuracies go to ``extra``."""

    needs_fit = False

    def build(self, dm) -> None:
        if self.expert != "none" and not self.init_from:
            log.warning("colour probe: no init_from, so no pre-trained adapter: this is the bare-PLM baseline "
                        "(an untrained adapter is the identity)")
            self.expert = "none"
        self.adapter = self.make_adapter()
        self.per_template: dict[str, dict[str, float]] = {}

    def on_test_epoch_start(self) -> None:
        self._out = {s.name: ([], [], []) for s in self.dm.eval_sets}

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        s = self.dm.eval_sets[dataloader_idx]
        probe = self.dm.probes[s.name]
        hidden = self.plm_hidden(batch, self.clip_context(batch))  # [B,L,d]
        at = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["mask_index"]]  # [B,d]
        logits = mlm_head(self.plm)(at)[:, probe.color_ids.to(at.device)]  # [B,n_colors]
        out = self._out[s.name]
        out[0].append(logits.detach().float().cpu())
        out[1].append(batch["labels"].cpu())
        out[2].append(batch["rows"].cpu())

    def on_test_epoch_end(self) -> None:
        self.predictions = {}
        for s in self.dm.eval_sets:
            logits, labels, rows = (torch.cat(x) for x in self._out[s.name])
            probe = self.dm.probes[s.name]
            if len(rows) == len(probe):
                scores = probe.score(logits[rows.argsort()])
            else:  # a partial pass (debug=fdr / limit_test_batches): score the prompts seen
                correct = (logits.argmax(1) == labels).float()
                t = probe.template_of[rows]
                scores = {"acc": 100.0 * float(correct.mean())}
                scores.update({f"acc/t{i}": 100.0 * float(correct[t == i].mean()) for i in t.unique().tolist()})
            self.log(f"{s.name}/acc", scores["acc"])
            self.per_template[s.name] = {k: v for k, v in scores.items() if k != "acc"}
            self.predictions[s.name] = {"logits": logits.half(), "labels": labels}

    def extra_results(self) -> dict:
        return {**super().extra_results(), "per_template": self.per_template,
                "templates": list(VALM_TEMPLATES)}


class XAdapterGlue(XAdapterRun):
    """GLUE fine-tuning: T-expert adapter + classification head train, PLM frozen. Baselines: ``adapter: null``
    (or ``expert: none``: frozen PLM + head) and ``finetune_plm: true`` (full fine-tuning; ``plm_lr`` for the
    PLM's parameters; the PLM is then saved in checkpoints). Logs the task's metrics on the dev set(s)
    (``test/acc``, ``test/mcc``, ``test/f1``, ``test/pearson``, ``test/spearman``; MNLI ``test_matched/acc`` and
    ``test_mismatched/acc``) and on validation (``val/<metric>``, the first dev set)."""

    def __init__(self, *args, finetune_plm: bool = False, plm_lr: float = 2e-5, head_dropout: float = 0.1, **kw):
        super().__init__(*args, **kw)
        self.finetune_plm, self.plm_lr, self.head_dropout = bool(finetune_plm), float(plm_lr), float(head_dropout)

    def build(self, dm) -> None:
        self.task = dm.task
        if self.finetune_plm:
            self.plm.frozen = False
            self.plm.model.requires_grad_(True)
            self.frozen_prefixes = ("backbone.",)  # the fine-tuned PLM is part of the result
        self.adapter = self.make_adapter()
        self.head = ClassificationHead(self.plm.hidden_size, self.task.num_labels, self.head_dropout)
        self.val_metrics = GlueMetrics(self.task.name)
        self.test_metrics = nn.ModuleList(GlueMetrics(self.task.name) for _ in dm.eval_sets)

    def param_groups(self) -> list[dict]:
        groups = super().param_groups()
        if not self.finetune_plm:
            return groups
        plm_ids = {id(p) for p in self.plm.parameters()}
        out = []
        for g in groups:
            for is_plm in (False, True):
                ps = [p for p in g["params"] if (id(p) in plm_ids) == is_plm]
                if ps:
                    out.append({**g, "params": ps, **({"lr": self.plm_lr} if is_plm else {})})
        return out

    def forward_logits(self, batch: dict) -> torch.Tensor:
        return self.head(self.plm_hidden(batch, self.clip_context(batch)))

    def training_step(self, batch, batch_idx):
        loss = glue_loss(self.forward_logits(batch), batch["labels"], self.task.is_regression)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["input_ids"].shape[0]))
        return loss

    def validation_step(self, batch, batch_idx):
        self.val_metrics.update(self.forward_logits(batch).float(), batch["labels"])

    def on_validation_epoch_end(self) -> None:
        if self.val_metrics.metrics[self.task.metrics[0]].update_called:
            self.log_dict({f"val/{k}": v for k, v in self.val_metrics.compute().items()}, prog_bar=True)
        self.val_metrics.reset()

    def on_test_epoch_start(self) -> None:
        self._out = {s.name: ([], []) for s in self.dm.eval_sets}

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        s = self.dm.eval_sets[dataloader_idx]
        logits = self.forward_logits(batch).float()
        self.test_metrics[dataloader_idx].update(logits, batch["labels"])
        self._out[s.name][0].append(logits.detach().cpu())
        self._out[s.name][1].append(batch["labels"].cpu())

    def on_test_epoch_end(self) -> None:
        self.predictions = {}
        for s, m in zip(self.dm.eval_sets, self.test_metrics):
            if not self._out[s.name][0]:
                continue
            self.log_dict({f"{s.name}/{k}": v for k, v in m.compute().items()})
            m.reset()
            self.predictions[s.name] = {"logits": torch.cat(self._out[s.name][0]).half(),
                                        "labels": torch.cat(self._out[s.name][1])}

    def extra_results(self) -> dict:
        return {**super().extra_results(), "task": self.task.name, "main_metric": self.task.main_metric,
                "finetune_plm": self.finetune_plm}
