"""Prompt learning on the frozen CLIP text encoder: CoOp (Zhou et al., IJCV'22), CoCoOp (Zhou et al., CVPR'22) and
KgCoOp (Yao et al., CVPR'23). Released code: KaiyangZhou/CoOp (trainers/coop.py, trainers/cocoop.py), htyao89/KgCoOp
(trainers/kgcoop.py).

A class prompt is a sequence of input token embeddings; `v_1 … v_M` (M = n_ctx) are learned context vectors of the
token-embedding width W, `w_c` the embeddings of class c's name tokens:

    end     P_c = [SOT, v_1 … v_M, w_c, ".", EOT]
    middle  P_c = [SOT, v_1 … v_{M/2}, w_c, v_{M/2+1} … v_M, ".", EOT]          (M/2 = M // 2)
    front   P_c = [SOT, w_c, v_1 … v_M, ".", EOT]

One context shared by all classes, or one per class (`csc`, CoOp only: classes never trained have none). With `g` the
frozen text tower (pooled at EOT, projected), `f(x)` the frozen image feature and `s` CLIP's logit scale:

    CoOp     t_c = g(P_c);   logit[b, c] = exp(s)·⟨norm f(x_b), norm t_c⟩;   L = CE
    CoCoOp   π_b = MetaNet(norm f(x_b)),  MetaNet = Linear(C/16→W) ∘ ReLU ∘ Linear(C→C/16)
             v_m(x_b) = v_m + π_b  (every context token shifted alike);  t_{b,c} = g(P_c with v_m(x_b))
             logit[b, c] = exp(s)·⟨norm f(x_b), norm t_{b,c}⟩;   L = CE
    KgCoOp   CoOp's logits;  L = CE + λ·(1 − mean_c cos(t_c, w_c^clip))            (λ = 8)
             w^clip: the hand-crafted (zero-shot) classifier of the training classes. For unit vectors
             1 − cos = ½‖norm t_c − w_c‖², so the term is (λ/2)·mean_c ‖norm t_c − w_c‖² (the paper's form; the
             released code writes 1 − cos, as here).

The image encoder is frozen, so `f(x)` comes from the feature store: `augment.views` cached augmented views of every
training image stand in for fresh augmentation (one view per image per epoch). Only the text tower runs in the
training step, through ``CLIPBackbone.encode_text_from_embeddings``; the fixed parts of every label set's prompts (SOT,
class-name tokens, ".", EOT) are embedded once. Attention in the text tower is causal, so the tokens after the last
end-of-text token of a label set cannot change its features: prompts are cut there (``trim_context``; ImageNet with
"a photo of a": 77 → 18 tokens), which gives the same features up to float rounding.

Below the math: ``ClassPrompts`` (one label set's fixed embeddings), ``PromptLearner`` (the context and Meta-Net: all
that trains and all that checkpoints hold), ``WarmupCosineLR`` (Dassl's schedule), then the LightningModules.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from xmx.errors import XmxError
from xmx.methods.base import XmxModule

log = logging.getLogger(__name__)

POSITIONS = ("end", "middle", "front")
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}
PLACEHOLDER = "X"  # the released code's stand-in word for the context positions; its embeddings are never used
CLIP_CONTEXT = 77  # every CLIP text tower open_clip builds; the exact limit is checked against the backbone in build


def _eot(tokens: torch.Tensor) -> torch.Tensor:
    """Position of the end-of-text token of every row (it has the largest id in CLIP's vocabulary)."""
    return tokens.argmax(dim=-1)


def phrase_tokens(tokenize, phrase: str) -> int:
    """Number of BPE tokens of ``phrase`` (without SOT/EOT) under ``tokenize`` (texts -> [N, L] ids)."""
    return int(_eot(tokenize([phrase]))[0]) - 1


def check_ctx_init(ctx_init: str | None, n_ctx: int, tokenize) -> None:
    if ctx_init:
        n = phrase_tokens(tokenize, ctx_init.replace("_", " "))
        if n != n_ctx:
            raise XmxError(f"method.ctx_init={ctx_init!r} is {n} tokens but method.n_ctx={n_ctx}; set "
                           f"method.n_ctx={n} or method.ctx_init=null (random init)")


# ======================================================================================================= the prompts
class ClassPrompts(nn.Module):
    """The fixed parts of one label set's prompts, embedded once: SOT (``prefix [N,1,W]``) and everything after the
    context (``suffix [N,S,W]``: name tokens, ".", EOT, padding up to the cut), the token ids ``tokens [N,L]`` that
    locate EOT, and for ``middle``/``front`` the per-class order ``order [N,L]`` that moves the name tokens.

    Buffers are not persistent: checkpoints never hold them (they follow from the class names)."""

    def __init__(self, backbone, classnames: list[str], n_ctx: int, position: str = "end", trim: bool = True):
        super().__init__()
        if position not in POSITIONS:
            raise XmxError(f"method.position={position!r}; valid choices: {', '.join(POSITIONS)}")
        if not classnames:
            raise XmxError("prompt learning: a label set has no classes; check the dataset's class names")
        names = [c.replace("_", " ") for c in classnames]
        # tokens of "name." as the prompt has them (BPE may merge the full stop into the name: "prey)." is one token)
        dot_lens = (_eot(backbone.tokenize([n + "." for n in names])) - 1).tolist()
        limit = int(backbone.context_length)
        longest = max(range(len(names)), key=lambda i: dot_lens[i])
        need = 1 + n_ctx + dot_lens[longest] + 1  # SOT, context, name + ".", EOT
        if need > limit:
            raise XmxError(f"method.n_ctx={n_ctx} is too long: the class {names[longest]!r} ({dot_lens[longest]} "
                           f"tokens with its full stop) needs {need} of the text encoder's {limit} positions; set "
                           f"method.n_ctx<={limit - 2 - dot_lens[longest]}")
        text = [" ".join([PLACEHOLDER] * n_ctx) + " " + n + "." for n in names]
        tokens = backbone.tokenize(text)  # [N, context_length]
        eot = _eot(tokens)
        x_id = int(backbone.tokenize([PLACEHOLDER])[0, 1])
        placed = bool((tokens[:, 1:1 + n_ctx] == x_id).all()) and bool((eot == 1 + n_ctx + torch.tensor(dot_lens)).all())
        if not placed:
            raise XmxError("prompt learning: the tokenizer split the placeholder context unexpectedly; this backbone's "
                           "tokenizer is not CLIP's BPE")
        # the name's own tokens (what middle/front move): "name." without a separate full-stop token
        dot_id = int(backbone.tokenize(["."])[0, 1])
        before_eot = tokens.gather(1, (eot - 1)[:, None])[:, 0]
        name_lens = [d - int(b == dot_id) for d, b in zip(dot_lens, before_eot.tolist())]
        # the cut is exact only behind causal attention (bidirectional towers, e.g. MobileCLIP's, see the padding)
        L = int(eot.max()) + 1 if trim and getattr(backbone, "causal_text", True) else tokens.shape[1]
        tokens = tokens[:, :L]
        with torch.no_grad():
            emb = backbone.token_embedding(tokens).float().cpu()  # [N, L, W]
        self.n_cls, self.n_ctx, self.position, self.length = len(names), n_ctx, position, L
        self.name_lens = name_lens
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)  # [N, 1, W]
        self.register_buffer("suffix", emb[:, 1 + n_ctx:].clone(), persistent=False)  # [N, S, W]
        order = None
        if position != "end":  # positions in the `end` layout [SOT, ctx, name, rest] read by each output slot
            rows = []
            half = n_ctx // 2
            for n in name_lens:
                ctx = list(range(1, 1 + n_ctx))
                name = list(range(1 + n_ctx, 1 + n_ctx + n))
                rest = list(range(1 + n_ctx + n, L))
                mid = ctx[:half] + name + ctx[half:] if position == "middle" else name + ctx
                rows.append([0] + mid + rest)
            order = torch.tensor(rows, dtype=torch.long)  # [N, L]
            tokens = tokens.gather(1, order)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("tokens", tokens.clone(), persistent=False)  # [N, L]

    def assemble(self, ctx: torch.Tensor) -> torch.Tensor:
        """Context ``[n_ctx, W]`` (shared), ``[N, n_ctx, W]`` (per class) or ``[B, K, n_ctx, W]`` (per image, K = 1
        or N) -> prompt embeddings ``[..., N, L, W]``."""
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0)  # [1, n_ctx, W]
        W = self.prefix.shape[-1]
        lead = torch.broadcast_shapes(ctx.shape[:-2], (self.n_cls,))  # (..., N)
        ctx = ctx.to(self.prefix.dtype)
        x = torch.cat([self.prefix.expand(*lead, 1, W), ctx.expand(*lead, self.n_ctx, W),
                       self.suffix.expand(*lead, self.suffix.shape[1], W)], dim=-2)  # [..., N, L, W]
        if self.order is not None:
            x = x.gather(-2, self.order[..., None].expand(*lead, self.length, W))
        return x


class PromptLearner(nn.Module):
    """What trains: the context ``ctx`` ([n_ctx, W] shared, or [N, n_ctx, W] class-specific) and, for CoCoOp, the
    Meta-Net ``Linear(C→C/16)–ReLU–Linear(C/16→W)`` (named as the released code: ``linear1``, ``relu``, ``linear2``).

    ``init`` [n_ctx, W]: the embeddings of the init phrase (copied to every class under ``csc``); else N(0, 0.02²)."""

    def __init__(self, n_ctx: int, width: int, init: torch.Tensor | None = None, n_cls: int | None = None,
                 std: float = 0.02, meta_dim: int | None = None, meta_reduction: int = 16):
        super().__init__()
        shape = (n_ctx, width) if n_cls is None else (n_cls, n_ctx, width)
        if init is not None:
            ctx = init.detach().float().clone().expand(*shape).clone()
        else:
            ctx = torch.empty(*shape)
            nn.init.normal_(ctx, std=std)
        self.ctx = nn.Parameter(ctx)
        self.meta_net = None
        if meta_dim is not None:
            hidden = meta_dim // meta_reduction
            if hidden < 1:
                raise XmxError(f"CoCoOp: image width {meta_dim} / method.meta_reduction={meta_reduction} leaves no "
                               "hidden units; lower method.meta_reduction")
            self.meta_net = nn.Sequential(OrderedDict([
                ("linear1", nn.Linear(meta_dim, hidden)), ("relu", nn.ReLU(inplace=True)),
                ("linear2", nn.Linear(hidden, width))]))

    @property
    def csc(self) -> bool:
        return self.ctx.dim() == 3

    def context(self, image_feats: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The context tokens: ``[n_ctx, W]`` / ``[N, n_ctx, W]`` (CoOp; ``rows`` picks a label set's classes
        under csc), or per image ``[B, 1 or N, n_ctx, W]`` = ctx + MetaNet(norm f) (CoCoOp; ``image_feats`` [B, C])."""
        ctx = self.ctx if rows is None or not self.csc else self.ctx[rows]
        if self.meta_net is None:
            return ctx
        bias = self.meta_net(F.normalize(image_feats.float(), dim=-1))  # π [B, W]
        if ctx.dim() == 2:
            return (ctx.unsqueeze(0) + bias[:, None, :]).unsqueeze(1)  # [B, 1, n_ctx, W]
        return ctx.unsqueeze(0) + bias[:, None, None, :]  # [B, N, n_ctx, W]


def encode_prompts(backbone, prompts: torch.Tensor, tokens: torch.Tensor, amp: torch.dtype | None = None,
                   batch: int | None = None, checkpoint: bool = False) -> torch.Tensor:
    """Prompt embeddings [M, L, W] + token ids [M, L] -> text features [M, C] (fp32, raw) through the frozen tower,
    ``batch`` sequences at a time (activation checkpointing per batch when ``checkpoint`` and gradients flow)."""
    M = prompts.shape[0]
    step = M if not batch else max(1, int(batch))
    cast = (torch.autocast(prompts.device.type, dtype=amp) if amp is not None and prompts.device.type == "cuda"
            else nullcontext())
    out = []
    with cast:
        for i in range(0, M, step):
            p, t = prompts[i:i + step], tokens[i:i + step]
            if checkpoint and torch.is_grad_enabled() and p.requires_grad:
                from torch.utils.checkpoint import checkpoint as ckpt
                out.append(ckpt(backbone.encode_text_from_embeddings, p, t, use_reentrant=False))
            else:
                out.append(backbone.encode_text_from_embeddings(p, t))
    return torch.cat(out).float()


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Dassl's `cosine` schedule with a constant warm-up (CoOp/CoCoOp/KgCoOp configs), per epoch:
    `lr(e) = warmup_lr` for `e < warmup_epochs`, else `base·½(1 + cos(π·(e − warmup_epochs)/T_max))`; `T_max` is the
    number of epochs (the cosine never reaches its end: the last epoch runs at `cos(π·(T_max−2)/T_max)`, as there)."""

    def __init__(self, optimizer, T_max: int, warmup_epochs: int = 1, warmup_lr: float = 1e-5, last_epoch: int = -1):
        if T_max < 1:
            raise XmxError(f"method.scheduler.T_max={T_max}; the cosine needs at least one epoch")
        self.T_max, self.warmup_epochs, self.warmup_lr = int(T_max), int(warmup_epochs), float(warmup_lr)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        e = self.last_epoch
        if e < self.warmup_epochs:
            return [self.warmup_lr for _ in self.base_lrs]
        f = 0.5 * (1 + math.cos(math.pi * (e - self.warmup_epochs) / self.T_max))
        return [base * f for base in self.base_lrs]


# ==================================================================================================== LightningModules
class PromptLearningMethod(XmxModule):
    """CoOp and its family on cached image features; the constructor keys are ``conf/method/coop.yaml``'s.

    ``build(dm)`` embeds the fixed prompt parts of every label set once (training classes, validation set, each eval
    set with its *own* classes: base-to-new ``test_new`` gets prompts of classes never trained on), makes the
    ``PromptLearner`` and keeps the frozen backbone as ``self.backbone`` (left out of checkpoints). Subclasses:
    ``CoOpMethod``, ``CoCoOpMethod`` (``meta_net``), ``KgCoOpMethod`` (``kg_weight``)."""

    label = "CoOp"
    conditional = False  # CoCoOp: per-image context from the Meta-Net

    def __init__(self, n_ctx: int = 16, ctx_init: str | None = None, position: str = "end", csc: bool = False,
                 init_std: float = 0.02, trim_context: bool = True, amp: str | None = "bf16",
                 text_batch: int | None = None, grad_checkpoint: bool = False, protocol: str | None = None,
                 test_epoch: str = "best_val", epochs_by_shots: dict | None = None, epochs_by_dataset: dict | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        if test_epoch not in ("best_val", "last"):
            raise XmxError(f"method.test_epoch={test_epoch!r}; valid choices: last (the released code: the final "
                           "epoch), best_val (the epoch with the best val/acc)")
        self.test_epoch = test_epoch
        if position not in POSITIONS:
            raise XmxError(f"method.position={position!r}; valid choices: {', '.join(POSITIONS)}")
        if int(n_ctx) < 1:
            raise XmxError(f"method.n_ctx={n_ctx}; the prompt needs at least one context token")
        if int(n_ctx) + 4 > CLIP_CONTEXT:  # SOT, >= 1 name token, ".", EOT
            raise XmxError(f"method.n_ctx={n_ctx} is too long for CLIP's {CLIP_CONTEXT}-token context; set "
                           f"method.n_ctx<={CLIP_CONTEXT - 4}")
        if amp not in (None, "none", *AMP):
            raise XmxError(f"method.amp={amp!r}; valid choices: bf16, fp16, null (fp32)")
        if csc and protocol in ("base2new", "cross_dataset"):
            raise XmxError(f"method.csc=true with protocol={protocol}: classes never trained on have no "
                           "class-specific context; set method.csc=false")
        if ctx_init:
            import open_clip  # CLIP's BPE: the count is checked again with the backbone's own tokenizer in build
            check_ctx_init(ctx_init, int(n_ctx), open_clip.tokenize)
        self.n_ctx, self.ctx_init, self.position, self.csc = int(n_ctx), ctx_init or None, position, bool(csc)
        self.init_std, self.trim_context = float(init_std), bool(trim_context)
        self.amp = AMP.get(amp) if amp else None
        self.amp_name = amp if amp in AMP else None
        self.text_batch, self.grad_checkpoint = (int(text_batch) if text_batch else None), bool(grad_checkpoint)
        self._sets: dict[str, str] = {}  # label set name -> ClassPrompts attribute (shared by identical class lists)
        self._rows: dict[str, str] = {}  # csc: label set name -> buffer of its classes' rows in the context
        self._eval_cache: dict[str, torch.Tensor] = {}
        self.logit_scale: float | None = None
        self.epochs_trained = 0

    # ---- construction -----------------------------------------------------------------------------------------
    def make_learner(self, n_ctx: int, width: int, init, n_cls: int | None, embed_dim: int) -> PromptLearner:
        return PromptLearner(n_ctx, width, init=init, n_cls=n_cls, std=self.init_std)

    def build(self, dm) -> None:
        bb = dm.backbone
        self.backbone = bb  # a submodule named so: checkpoints leave it out (XmxModule.frozen_prefixes)
        label_sets = [("train", list(dm.classnames), None)] + [(s.name, list(s.classnames), s)
                                                                for s in [dm.val_set, *dm.eval_sets]]
        init = None
        if self.ctx_init:
            phrase = self.ctx_init.replace("_", " ")
            check_ctx_init(phrase, self.n_ctx, bb.tokenize)
            with torch.no_grad():
                init = bb.token_embedding(bb.tokenize([phrase]))[0, 1:1 + self.n_ctx].float().cpu()  # [n_ctx, W]
        by_names: dict[tuple, str] = {}
        for name, classnames, s in label_sets:
            key = tuple(classnames)
            if key not in by_names:
                attr = f"prompts_{len(by_names)}"
                self.add_module(attr, ClassPrompts(bb, classnames, self.n_ctx, self.position, self.trim_context))
                by_names[key] = attr
            self._sets[name] = by_names[key]
            if self.csc and s is not None:
                idx = list(s.train_index or [])
                if len(idx) != len(classnames) or any(i is None for i in idx):
                    missing = [c for c, i in zip(classnames, idx or [None] * len(classnames)) if i is None]
                    raise XmxError(f"method.csc=true: {name!r} has classes never trained on ({', '.join(missing[:3])}"
                                   f"{', ...' if len(missing) > 3 else ''}), which have no class-specific context; set "
                                   "method.csc=false")
                attr = "rows_" + name.replace(".", "_").replace("/", "_")
                self.register_buffer(attr, torch.tensor(idx, dtype=torch.long), persistent=False)
                self._rows[name] = attr
        self.learner = self.make_learner(self.n_ctx, int(bb.text_width), init,
                                         len(dm.classnames) if self.csc else None, int(bb.embed_dim))
        self.logit_scale = float(dm.logit_scale)
        self.build_extra(dm)
        log.info("%s: %d trainable parameters, n_ctx %d (%s), position %s, csc %s, prompt lengths %s", self.label,
                 sum(p.numel() for p in self.learner.parameters()), self.n_ctx,
                 f"init {self.ctx_init!r}" if self.ctx_init else "random init", self.position, self.csc,
                 {n: getattr(self, a).length for n, a in self._sets.items()})

    def build_extra(self, dm) -> None:
        """Hook for subclasses (KgCoOp: the hand-crafted classifier)."""

    def prompts(self, name: str) -> ClassPrompts:
        return getattr(self, self._sets[name])

    def rows(self, name: str) -> torch.Tensor | None:
        return getattr(self, self._rows[name]) if name in self._rows else None

    def _encode(self, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return encode_prompts(self.backbone, prompts, tokens, amp=self.amp, batch=self.text_batch,
                              checkpoint=self.grad_checkpoint)

    # ---- the equations ----------------------------------------------------------------------------------------
    def class_features(self, name: str) -> torch.Tensor:
        """CoOp's class text features of label set ``name``: norm t_c [N, C]."""
        cp = self.prompts(name)
        ctx = self.learner.context(rows=self.rows(name))
        return F.normalize(self._encode(cp.assemble(ctx), cp.tokens), dim=-1)

    def conditional_logits(self, feats: torch.Tensor, name: str) -> torch.Tensor:
        """CoCoOp: every image with its own class features; images go through in chunks of
        ``max(1, text_batch // N)`` so that one text-tower call holds at most ``text_batch`` sequences."""
        cp = self.prompts(name)
        f = F.normalize(feats.float(), dim=-1)  # [B, C]
        per = max(1, (self.text_batch or cp.n_cls) // cp.n_cls)
        scale = math.exp(self.logit_scale)
        out = []
        for i in range(0, f.shape[0], per):
            fb = f[i:i + per]
            ctx = self.learner.context(fb, rows=self.rows(name))  # [b, 1 or N, n_ctx, W]
            p = cp.assemble(ctx)  # [b, N, L, W]
            b = p.shape[0]
            t = self._encode(p.reshape(b * cp.n_cls, cp.length, -1), cp.tokens.repeat(b, 1))
            t = F.normalize(t, dim=-1).view(b, cp.n_cls, -1)  # [b, N, C]
            out.append(scale * torch.einsum("bc,bnc->bn", fb, t))
        return torch.cat(out)

    def forward_logits(self, feats: torch.Tensor, name: str, text: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditional:
            return self.conditional_logits(feats, name)
        text = self.class_features(name) if text is None else text
        return math.exp(self.logit_scale) * F.normalize(feats.float(), dim=-1) @ text.T

    # ---- training and evaluation ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        self._eval_cache.clear()
        x, y = batch
        feats = self.image_features(x).float()
        if self.conditional:
            logits = self.conditional_logits(feats, "train")
            loss = F.cross_entropy(logits, y)
        else:
            text = self.class_features("train")  # [N, C]
            logits = self.forward_logits(feats, "train", text)
            loss = F.cross_entropy(logits, y) + self.text_loss(text)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def text_loss(self, text: torch.Tensor) -> torch.Tensor | float:
        """Extra loss on the training classes' features (KgCoOp)."""
        return 0.0

    def on_train_epoch_end(self) -> None:
        self.epochs_trained = int(self.current_epoch) + 1  # validation may run only at the end: count epochs here

    def on_validation_epoch_start(self) -> None:
        self._eval_cache.clear()

    def on_test_epoch_start(self) -> None:
        self._eval_cache.clear()
        super().on_test_epoch_start()

    def logits(self, x, eval_set):
        feats = self.image_features(x).float()
        if self.conditional:
            return self.conditional_logits(feats, eval_set.name)
        if eval_set.name not in self._eval_cache:  # the context is fixed during an evaluation epoch
            self._eval_cache[eval_set.name] = self.class_features(eval_set.name).detach()
        return self.forward_logits(feats, eval_set.name, self._eval_cache[eval_set.name])

    # ---- results ----------------------------------------------------------------------------------------------
    def extra_results(self) -> dict:
        learner = getattr(self, "learner", None)
        return {
            "params": None if learner is None else sum(p.numel() for p in learner.parameters() if p.requires_grad),
            "n_ctx": self.n_ctx, "ctx_init": self.ctx_init, "position": self.position, "csc": self.csc,
            "conditional": self.conditional, "trim_context": self.trim_context, "amp": self.amp_name,
            "amp_applied": bool(self.amp is not None and self.device.type == "cuda"),  # autocast runs on CUDA only
            "epochs_trained": self.epochs_trained,
            "prompt_lengths": {n: getattr(self, a).length for n, a in self._sets.items()},
            "logit_scale": self.logit_scale,
            "test_epoch": self.test_epoch,
            **self.training_record("val/acc (best checkpoint restored)" if self.test_epoch == "best_val" else
                                   "last epoch (the released code's final model)"),
        }

    def on_fit_start(self) -> None:
        monitored = [cb.monitor for cb in self.trainer.checkpoint_callbacks if getattr(cb, "monitor", None)]
        if self.test_epoch == "last" and monitored:
            raise XmxError(f"method.test_epoch=last but a checkpoint callback monitors {monitored[0]} (its best epoch "
                           "would be tested); set callbacks.model_checkpoint=null, or method.test_epoch=best_val")
        if self.test_epoch == "best_val" and not monitored:
            log.warning("method.test_epoch=best_val but no checkpoint callback monitors val/acc: the final epoch is "
                        "tested")


class CoOpMethod(PromptLearningMethod):
    """CoOp: learned context shared by every class (or per class: ``csc``), CE over the training classes."""

    label = "CoOp"


class CoCoOpMethod(PromptLearningMethod):
    """CoCoOp: CoOp's context shifted per image by the Meta-Net (``meta_reduction`` = 16)."""

    label = "CoCoOp"
    conditional = True

    def __init__(self, meta_reduction: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.meta_reduction = int(meta_reduction)

    def make_learner(self, n_ctx, width, init, n_cls, embed_dim):
        return PromptLearner(n_ctx, width, init=init, n_cls=n_cls, std=self.init_std, meta_dim=embed_dim,
                             meta_reduction=self.meta_reduction)

    def extra_results(self) -> dict:
        return {**super().extra_results(), "meta_reduction": self.meta_reduction}


class KgCoOpMethod(PromptLearningMethod):
    """KgCoOp: CoOp + ``kg_weight``·(1 − mean cos(t_c, w_c^clip)), ``w^clip`` the training classes' hand-crafted
    classifier from ``kg_templates`` (null: the dataset's templates; the released code's per-dataset template table
    is ``kg_template_by_dataset`` in the config)."""

    label = "KgCoOp"

    def __init__(self, kg_weight: float = 8.0, kg_templates: list[str] | str | None = None,
                 kg_template_by_dataset: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        if float(kg_weight) < 0:
            raise XmxError(f"method.kg_weight={kg_weight}; the knowledge-guidance weight λ must be >= 0 (default 8)")
        if isinstance(kg_templates, str):
            kg_templates = [kg_templates]
        for t in kg_templates or []:
            if "{}" not in t:
                raise XmxError(f"method.kg_templates: {t!r} has no {{}} for the class name")
        self.kg_weight, self.kg_templates = float(kg_weight), list(kg_templates) if kg_templates else None

    def build_extra(self, dm) -> None:
        W = dm.text_classifier(list(dm.classnames), self.kg_templates or list(dm.templates)).detach().float()
        self.register_buffer("clip_text", F.normalize(W.T.contiguous(), dim=-1), persistent=False)  # [N, C]
        self._kg_templates_used = self.kg_templates or list(dm.templates)

    def text_loss(self, text):
        return self.kg_weight * (1.0 - (text * self.clip_text.to(text.dtype)).sum(-1).mean())

    def extra_results(self) -> dict:
        return {**super().extra_results(), "kg_weight": self.kg_weight,
                "kg_templates": getattr(self, "_kg_templates_used", self.kg_templates)}


# ============================================================================================ TPT (test-time tuning)
def tpt_avg_entropy(z: torch.Tensor) -> torch.Tensor:
    """TPT's loss per image: the entropy of the mean of ``softmax(z)`` over views; ``z [..., V, N]`` -> ``[...]``
    (the release's logsumexp form, ``tpt_classification.py`` ``avg_entropy``)."""
    lp = z - z.logsumexp(dim=-1, keepdim=True)
    avg = lp.logsumexp(dim=-2) - math.log(z.shape[-2])
    avg = torch.clamp(avg, min=torch.finfo(avg.dtype).min)
    return -(avg * avg.exp()).sum(-1)


class TPTMethod(PromptLearningMethod):
    """TPT (Shu et al., NeurIPS'22; azshue/TPT): per test image, the prompt context starts from its initial state
    (the hand-crafted ``ctx_init`` phrase, or a CoOp run's context through ``init_from``), takes ``steps`` AdamW steps
    on the entropy of the mean prediction over the ``top`` share of its V views with the lowest entropy (views: the
    image + 63 cached augmented views), and the image (view 0) is scored with the tuned prompt; then the context and
    the optimiser are reset. ``protocol=test_time``; docs/methods/test_time.md#tpt.

        S_i = the int(top V) views of lowest H(softmax z_iv),  z_iv = exp(s) norm f_iv . norm g(P(ctx))
        L_i(ctx) = H(mean_{v in S_i} softmax z_iv)            ctx_i = AdamW^steps(ctx_0; L_i)      y_i = z_i0(ctx_i)

    Images are independent (the reset), so ``images_per_step`` images are tuned at once with one context each: AdamW
    is elementwise and the summed loss separates, so this equals tuning them one by one."""

    label = "TPT"
    needs_fit = False

    def __init__(self, steps: int = 1, lr: float = 5e-3, weight_decay: float = 0.01, top: float = 0.1,
                 views: int = 64, view_presets: dict | None = None, default_view_preset: str = "augmix",
                 images_per_step: int = 1, checkpoint_every: int = 1000, device: str = "auto", **kwargs):
        super().__init__(**kwargs)
        if int(steps) < 1:
            raise XmxError(f"method.steps={steps}: TPT takes at least one step per image (release: 1)")
        if not float(lr) > 0:
            raise XmxError(f"method.lr={lr}: must be positive (release: 5e-3)")
        if not 0 < float(top) <= 1:
            raise XmxError(f"method.top={top}: the share of confident views kept must lie in (0, 1] (release: 0.1)")
        if int(views) < 1 or (int(views) > 1 and int(int(views) * float(top)) < 1):
            raise XmxError(f"method.views={views} keeps int({views} x {top}) = 0 confident views; use at least "
                           f"{math.ceil(1 / float(top))} views (release: 64) or 1")
        if int(images_per_step) < 1 or int(checkpoint_every) < 0:
            raise XmxError(f"method.images_per_step={images_per_step} must be >= 1 and method.checkpoint_every="
                           f"{checkpoint_every} >= 0")
        if kwargs.get("protocol") not in (None, "test_time"):
            raise XmxError(f"method=tpt runs on protocol=test_time (the test set as a stream); got "
                           f"protocol={kwargs.get('protocol')}")
        self.steps, self.lr, self.weight_decay, self.top = int(steps), float(lr), float(weight_decay), float(top)
        self.n_views, self.view_presets = int(views), dict(view_presets or {})
        self.default_view_preset, self.images_per_step = default_view_preset, int(images_per_step)
        self.checkpoint_every, self.device_choice = int(checkpoint_every), device
        self.stream_logits: dict[str, torch.Tensor] = {}
        self._cursor: dict[str, int] = {}

    def build_extra(self, dm) -> None:
        self._dm = dm

    def setup(self, stage: str) -> None:
        """Build, load ``init_from`` (a CoOp context), then tune every stream (before Lightning's test loop, which
        runs without gradients)."""
        super().setup(stage)
        if not self.stream_logits:
            self.run_streams(self._dm)

    def views_of(self, dm, s) -> torch.Tensor:
        f = dm.features_of(s)[None]
        if self.n_views == 1:
            return f
        preset = self.view_presets.get(s.dataset, self.default_view_preset)
        return torch.cat([f, dm.view_features_of(s, preset, self.n_views - 1)])  # [V, N, C]

    def tune(self, feats: torch.Tensor, name: str, ctx0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``feats [B, V, C]`` raw view features of B images -> (logits of view 0 with each image's tuned prompt
        ``[B, N]``, the tuned contexts ``[B, n_ctx, W]``)."""
        cp = self.prompts(name)
        f = F.normalize(feats.float(), dim=-1)
        B, V, _ = f.shape
        scale = math.exp(self.logit_scale)
        ctx = nn.Parameter(ctx0.detach().float().expand(B, *ctx0.shape).clone())  # reset: every image from ctx_0
        opt = torch.optim.AdamW([ctx], lr=self.lr, weight_decay=self.weight_decay)

        def text_of(c):  # [B, N, C]
            t = self._encode(cp.assemble(c[:, None]).flatten(0, 1), cp.tokens.repeat(B, 1))
            return F.normalize(t, dim=-1).view(B, cp.n_cls, -1)

        sel = None
        with torch.enable_grad():
            for _ in range(self.steps):
                z = scale * torch.einsum("bvc,bnc->bvn", f, text_of(ctx))  # [B, V, N]
                if sel is None:  # chosen once, on the initial prompt (the release reuses selected_idx)
                    k = int(V * self.top) if V > 1 else 1
                    ent = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
                    sel = torch.argsort(ent.detach(), dim=1, stable=True)[:, :k]  # [B, k]
                zs = z.gather(1, sel[..., None].expand(-1, -1, z.shape[-1]))
                loss = tpt_avg_entropy(zs).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            out = scale * torch.einsum("bc,bnc->bn", f[:, 0], text_of(ctx))
        return out, ctx.detach()

    def run_streams(self, dm) -> None:
        from xmx.methods.base import fit_device
        dev = fit_device(self.device_choice)
        self.to(dev)
        self.backbone.to(dev)
        ctx0 = self.learner.ctx.detach().clone()  # the initial state every image starts from
        if ctx0.dim() != 2:
            raise XmxError("method=tpt tunes one shared context; a class-specific (csc) context is not supported")
        path = self._checkpoint_path()
        saved = self._read_state(path)
        for s in dm.eval_sets:
            feats = self.views_of(dm, s).transpose(0, 1)  # [N, V, C]
            parts, done = [], 0
            if s.name in saved and saved[s.name]["n"] == len(feats):
                done = int(saved[s.name]["done"])
                parts = [saved[s.name]["logits"]] if done else []
                log.warning("TPT %s: resuming at image %d of %d (%s)", s.name, done, len(feats), path)
            last = done
            while done < len(feats):
                b = min(done + self.images_per_step, len(feats))
                out, _ = self.tune(feats[done:b].to(dev), s.name, ctx0.to(dev))
                parts.append(out.cpu())
                done = b
                if path is not None and self.checkpoint_every and (done - last >= self.checkpoint_every
                                                                   or done == len(feats)):
                    last = done
                    self.stream_logits[s.name] = torch.cat(parts)
                    self._write_state(path, {n: {"done": len(v), "n": len(v) if n != s.name else len(feats),
                                                 "logits": v} for n, v in self.stream_logits.items()})
            self.stream_logits[s.name] = torch.cat(parts) if parts else torch.zeros(0, len(s.classnames))
        self.learner.ctx.data.copy_(ctx0)

    # -- mid-stream checkpoints (checkpoints/last.ckpt: a killed run resumes where it stopped)
    def _checkpoint_path(self):
        from pathlib import Path
        trainer = getattr(self, "_trainer", None)
        root = getattr(trainer, "default_root_dir", None) if trainer is not None else None
        return Path(root) / "checkpoints" / "last.ckpt" if root else None

    def _read_state(self, path) -> dict:
        if path is None or not path.is_file():
            return {}
        try:
            raw = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - a truncated file is not resumed from
            return {}
        return (raw.get("xmx_stream") or {}).get("streams", {})

    def _write_state(self, path, streams: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state_dict": {k: v for k, v in self.state_dict().items() if k.startswith("learner.")},
                    "xmx_method": {"name": self.method_name, "family": "coop"},
                    "xmx_stream": {"version": 1, "streams": streams}}, tmp)
        tmp.replace(path)

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._cursor = {}

    def logits(self, x, eval_set):
        a = self._cursor.get(eval_set.name, 0)
        self._cursor[eval_set.name] = a + len(x)
        return self.stream_logits[eval_set.name][a:a + len(x)].to(x.device)

    def extra_results(self) -> dict:
        return {"n_ctx": self.n_ctx, "ctx_init": self.ctx_init, "steps": self.steps, "lr": self.lr,
                "weight_decay": self.weight_decay, "top": self.top, "views": self.n_views,
                "view_presets": {s.name: (self.view_presets.get(s.dataset, self.default_view_preset)
                                          if self.n_views > 1 else "none") for s in self._dm.eval_sets},
                "images_per_step": self.images_per_step, "logit_scale": self.logit_scale,
                "init": "init_from" if self.init_record else ("ctx_init" if self.ctx_init else "random")}
