"""Per-layer tokens in open_clip's transformer towers: the forward passes that deep prompt learning (IVLP, MaPLe,
PromptSRC) and MMRL's representation tokens need. Frozen weights only are read here; the tokens are the caller's.

Text tower (causal attention, pooled at the end-of-text token), ``E`` the token embeddings, ``p`` positions:

    prompts  x_0 = E(tokens) with positions 1..n set to P_0, + pos        (P_0 the first layer's tokens)
             before block l = 1..J-1:  x[:, 1:1+n] = P_l                  (the previous outputs there are dropped)
    insert   before block a (the first representation layer): x = [x_0, R_a, x_1:]   (n tokens after SOT)
             before every later listed block l:               x[:, 1:1+n] = R_l
    t = proj(ln_final(x)[eot (+ n when inserted)])

Image tower (a ViT pooled at its class token), ``e`` = [cls, patches] + pos:

    prompts  x_0 = ln_pre([e, V_0])     (V_0 appended after the patches, before ln_pre, as the MaPLe release)
             before block l = 1..J-1:  x[:, -n:] = V_l
    insert   x_0 = ln_pre(e); before block a: x = [x_0, R_a, x_1:]; before later listed blocks: x[:, 1:1+n] = R_l
    v = ln_post(x)[:, 0] · proj;   the tokens ln_post(x) are returned too (MMRL pools its representation tokens)

Towers that cannot take per-layer tokens (timm image towers, Hugging Face text towers, attention pooling,
bidirectional text) are refused in one line by :func:`check_deep_towers` before any work.
"""

from __future__ import annotations

import torch
from torch import nn

from xmx.errors import XmxError


def text_module(model: nn.Module) -> nn.Module:
    """open_clip keeps the text tower on the CLIP itself, or in ``.text`` (CustomTextCLIP)."""
    return getattr(model, "text", model)


def tower_depth(bb, tower: str) -> int:
    m = bb.model
    owner = m.visual if tower == "vision" else text_module(m)
    return len(getattr(getattr(owner, "transformer", None), "resblocks", None) or [])


def check_deep_towers(bb, what: str, text: bool, vision: bool) -> None:
    """One line (``backbone.refuse``) when a tower that must take per-layer tokens cannot."""
    m = bb.model
    if text:
        t = text_module(m)
        if getattr(bb, "text_kind", "open_clip") != "open_clip" or not hasattr(t, "token_embedding"):
            bb.refuse(what, "its text tower is not open_clip's transformer; per-layer text tokens need one")
        if getattr(t, "attn_mask", None) is None or getattr(t, "text_pool_type", "argmax") != "argmax":
            bb.refuse(what, "its text tower is not causal and pooled at the end-of-text token (as CLIP's), which "
                            "the released prompt layouts assume")
        if getattr(t, "cls_emb", None) is not None:
            bb.refuse(what, "its text tower appends a class token")
    if vision:
        from open_clip.transformer import VisionTransformer
        v = m.visual
        if not isinstance(v, VisionTransformer):
            bb.refuse(what, f"its image tower {bb.image_tower} is not open_clip's VisionTransformer; per-layer image "
                            "tokens need one (use a ViT backbone such as backbone=clip_vit_b16)")
        if v.attn_pool is not None or v.pool_type != "tok" or v.proj is None:
            bb.refuse(what, f"its image tower pools with {'attention' if v.attn_pool is not None else v.pool_type} "
                            "instead of the class token")


def _expand(tok: torch.Tensor, batch: int, dtype) -> torch.Tensor:
    tok = tok.to(dtype)
    return tok.unsqueeze(0).expand(batch, -1, -1) if tok.dim() == 2 else tok


def _block(trunk, blk, x: torch.Tensor, mask) -> torch.Tensor:
    if getattr(trunk, "batch_first", True):
        return blk(x, attn_mask=mask)
    return blk(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)


def _causal(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((n, n), float("-inf"), device=like.device, dtype=like.dtype).triu_(1)


def _project(owner, x: torch.Tensor) -> torch.Tensor:
    proj = owner.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def encode_text_deep(model: nn.Module, emb: torch.Tensor, tokens: torch.Tensor, layers: dict[int, torch.Tensor],
                     mode: str = "prompts") -> torch.Tensor:
    """Token embeddings ``emb [N,L,W]`` (``mode=prompts``: positions 1..n already hold P_0), token ids ``tokens
    [N,L]`` (they locate EOT), ``layers`` {block index: tokens [n,W] or [N,n,W]} -> projected text features [N,C].

    ``prompts``: layers 1..J-1 replace positions 1..n (layer 0 is the input itself, not read from ``layers``).
    ``insert``: the smallest listed block inserts its n tokens after SOT; later listed blocks replace them."""
    t = text_module(model)
    trunk = t.transformer
    cast = trunk.get_cast_dtype()
    N, L, _ = emb.shape
    x = emb.to(cast) + t.positional_embedding[:L].to(cast)
    eot = tokens.to(x.device).argmax(dim=-1)
    inserted = 0
    first = min(layers) if (layers and mode == "insert") else None
    for i, blk in enumerate(trunk.resblocks):
        tok = layers.get(i)
        if tok is not None and (mode == "insert" or i > 0):
            n = tok.shape[-2]
            keep = x[:, 1:] if (mode == "insert" and i == first) else x[:, 1 + n:]
            x = torch.cat([x[:, :1], _expand(tok, N, x.dtype), keep], dim=1)
            if mode == "insert":
                inserted = n
        x = _block(trunk, blk, x, _causal(x.shape[1], x))
    x = t.ln_final(x)
    return _project(t, x[torch.arange(N, device=x.device), eot + inserted])


def encode_image_deep(visual: nn.Module, images: torch.Tensor, layers: dict[int, torch.Tensor],
                      mode: str = "prompts") -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B,3,H,W] through an open_clip ViT with per-layer tokens -> (class-token feature [B,C] projected,
    all tokens after ln_post [B,T,W]). ``prompts``: layer 0's tokens appended before ln_pre, layers 1..J-1 replace the
    last n; ``insert``: the smallest listed block inserts after the class token, later listed blocks replace."""
    trunk = visual.transformer
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    B = x.shape[0]
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(B, -1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    if mode == "prompts" and layers.get(0) is not None:
        x = torch.cat([x, _expand(layers[0], B, x.dtype)], dim=1)
    x = visual.ln_pre(x)
    first = min(layers) if (layers and mode == "insert") else None
    for i, blk in enumerate(trunk.resblocks):
        tok = layers.get(i)
        if tok is not None:
            n = tok.shape[-2]
            if mode == "prompts" and i > 0:
                x = torch.cat([x[:, :-n], _expand(tok, B, x.dtype)], dim=1)
            elif mode == "insert":
                keep = x[:, 1:] if i == first else x[:, 1 + n:]
                x = torch.cat([x[:, :1], _expand(tok, B, x.dtype), keep], dim=1)
        x = _block(trunk, blk, x, None)
    x = visual.ln_post(x)  # per token: the same as open_clip's pool-then-norm for the class token
    return x[:, 0] @ visual.proj, x


class LabelSetPrompts(nn.Module):
    """One label set's fixed prompt parts: token ids ``tokens [N, L]`` of its prompt texts (deep prompts: "<phrase>
    <name>." whose positions 1..n_ctx the first layer's prompts replace; MMRL: the dataset template) cut after the set's
    last EOT (causal towers), and their embeddings ``emb [N, L, W]`` (non-persistent: they follow from the names)."""

    def __init__(self, bb, texts: list[str], n_ctx: int = 0, trim: bool = True):
        super().__init__()
        tokens = bb.tokenize(list(texts))
        L = int(tokens.argmax(-1).max()) + 1 if trim else tokens.shape[1]
        if n_ctx and 1 + n_ctx >= int(tokens.argmax(-1).min()):
            raise XmxError(f"deep prompts: the prompt of some class is too short for {n_ctx} context tokens")
        tokens = tokens[:, :L]
        with torch.no_grad():
            emb = bb.token_embedding(tokens).float().cpu()
        self.register_buffer("tokens", tokens.clone(), persistent=False)
        self.register_buffer("emb", emb, persistent=False)
        self.n_ctx = n_ctx


def encode_class_prompts(model, lp: LabelSetPrompts, text_layers: dict[int, torch.Tensor], chunk: int | None = None,
                         checkpoint: bool = True, mode: str = "prompts") -> torch.Tensor:
    """Raw text features [N, C] of a label set with the prompts ``text_layers`` (layer 0 written into the input).
    ``chunk``: that many classes per pass, each pass cut after its own last EOT and recomputed in the backward pass
    (``checkpoint`` and gradients on): peak activation memory follows the chunk, gradients are the plain ones."""
    N = lp.tokens.shape[0]
    step = N if not chunk else max(1, int(chunk))

    def run(emb, tok, *flat):
        layers = dict(zip(keys, flat))
        if mode == "prompts" and 0 in layers:
            p0 = layers[0].to(emb.dtype).unsqueeze(0).expand(emb.shape[0], -1, -1)
            emb = torch.cat([emb[:, :1], p0, emb[:, 1 + lp.n_ctx:]], dim=1)
        return encode_text_deep(model, emb, tok, layers, mode=mode)

    keys = sorted(text_layers)
    flat = [text_layers[k] for k in keys]
    out = []
    for i in range(0, N, step):
        tok = lp.tokens[i:i + step]
        if step < N:  # this chunk's own cut (causal attention: positions after the last EOT change nothing)
            tok = tok[:, :int(tok.argmax(-1).max()) + 1]
        emb = lp.emb[i:i + step, :tok.shape[1]]
        if step < N and checkpoint and torch.is_grad_enabled() and any(t.requires_grad for t in flat):
            from torch.utils.checkpoint import checkpoint as ckpt
            out.append(ckpt(run, emb, tok, *flat, use_reentrant=False))
        else:
            out.append(run(emb, tok, *flat))
    return torch.cat(out).float()
