"""Training loops shared by several method families (the room's common ground; no family imports another's file).

``AdapterMethod``: a small adapter trained with cross-entropy over the training classes on top of frozen CLIP
features (cached, or images through the frozen encoder) and scored against each label set's frozen zero-shot
classifier. CLIP-Adapter (``clip_adapter.py``) and MMA (``mma.py``) are its subclasses.

``EncoderMethod``: the online training path of the methods that change the encoders themselves (CLIP-LoRA in
``clip_lora.py``, MMA of Yang et al. in ``mma_yang.py``): images through the adapted towers at every step.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from xmx.errors import XmxError
from xmx.methods.base import XmxModule

log = logging.getLogger(__name__)


class AdapterMethod(XmxModule):
    """A small adapter trained with cross-entropy over the training classes, on top of frozen CLIP features.

    ``build(dm)`` computes the zero-shot text classifier `W [C, N]` of every label set once — the training classes,
    the validation set and each eval set with its *own* classes and templates (base-to-new: ``test_new`` has the new
    classes only) — and keeps them as non-persistent buffers (they follow the module to its device and are never
    written into checkpoints: only the adapter's weights are). The backbone's ``logit_scale`` (and ``logit_bias``,
    SigLIP) are read from ``dm`` and stay frozen. Subclasses implement ``make_adapter(dim)`` and
    ``adapter_logits(feats [B, C], W [C, N]) -> [B, N]``.

    The recipe (optimizer partial, batch size, epochs) comes from the method config; early stopping and the
    best-checkpoint restore come from the ``callbacks`` group (``callbacks=early_stopping``)."""

    label = "adapter"  # the method's name in error messages

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._text_buffers: dict[str, str] = {}
        self.logit_scale: float | None = None
        self.logit_bias: float | None = None

    # ---- construction -----------------------------------------------------------------------------------------
    def make_adapter(self, dim: int) -> nn.Module:
        raise NotImplementedError

    def adapter_logits(self, feats: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def build(self, dm) -> None:
        dim = int(dm.backbone.embed_dim)
        label_sets = [("train", dm.classnames, dm.templates), *((s.name, s.classnames, s.templates)
                                                                 for s in [dm.val_set, *dm.eval_sets])]
        for name, classnames, _ in label_sets:
            if not classnames:
                raise XmxError(f"{self.label}: the class list of {name!r} is empty; every label set needs at least one "
                               "class (check protocol.base_ratio / the dataset's class names)")
        if dm.inputs == "features":  # every cached tensor is validated once here (not per batch)
            self._check_features(dm.train_features, dim, "training")
            for s in [dm.val_set, *dm.eval_sets]:
                self._check_features(dm.features_of(s), dim, repr(s.name))
        self.adapter = self.make_adapter(dim)
        self.logit_scale = float(dm.logit_scale)  # the backbone's own, frozen (log of the multiplier)
        bias = getattr(dm, "logit_bias", None)
        self.logit_bias = None if bias is None else float(bias)  # SigLIP's learned bias, frozen
        for name, classnames, templates in label_sets:
            W = dm.text_classifier(list(classnames), list(templates or dm.templates)).detach().float()  # [C, N]
            if W.shape[0] != dim:
                raise XmxError(f"{self.label}: the text classifier of {name!r} has width {W.shape[0]} but the backbone's "
                               f"embed_dim is {dim}; clear the stale text entries of the feature store")
            if not bool(torch.isfinite(W).all()):
                raise XmxError(f"{self.label}: the text classifier of {name!r} contains NaN or inf; clear its "
                               "feature-store entry and recompute it")
            attr = "text_" + name.replace(".", "_")
            self.register_buffer(attr, W.clone(), persistent=False)
            self._text_buffers[name] = attr
        # cached features and text were validated above, once: no per-batch NaN check (a device sync per step);
        # images (inputs=images) go through the encoder every step, so their features keep being checked
        self.adapter.check_finite = dm.inputs != "features"
        log.info("%s: %d trainable parameters, %d training classes, eval sets %s", self.label,
                 sum(p.numel() for p in self.adapter.parameters() if p.requires_grad), len(dm.classnames),
                 ", ".join(f"{s.name} ({len(s.classnames)} classes)" for s in dm.eval_sets))

    def _check_features(self, feats: torch.Tensor, dim: int, what: str) -> None:
        if feats.shape[-1] != dim:
            raise XmxError(f"{self.label}: the cached {what} features have width {feats.shape[-1]} but the backbone's "
                           f"embed_dim is {dim}; they come from another backbone - clear those feature-store "
                           "entries or pick the matching backbone")
        if not bool(torch.isfinite(feats).all()):
            raise XmxError(f"{self.label}: the cached {what} features contain NaN or inf; recompute them (clear their "
                           "feature-store entries)")

    def text(self, name: str) -> torch.Tensor:
        """The frozen zero-shot classifier `W [C, N]` of label set ``name`` (``train`` = the training classes)."""
        return getattr(self, self._text_buffers[name])

    # ---- training and evaluation ------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.adapter_logits(self.image_features(x).float(), self.text("train"))  # [B, N_train]
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def logits(self, x, eval_set):
        return self.adapter_logits(self.image_features(x).float(), self.text(eval_set.name))  # [B, N_set]

    # ---- results ----------------------------------------------------------------------------------------------
    def extra_results(self) -> dict:
        adapter = getattr(self, "adapter", None)
        return {
            "params": None if adapter is None else sum(p.numel() for p in adapter.parameters() if p.requires_grad),
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
            **self.training_record(),
        }


# ==============================================================================================================
# The online training path (images through the adapted encoders every step)
# ==============================================================================================================

AMP = ("auto", "bf16", "fp16", "none")
KEEP = ("final", "best_val")


def encode_text_trimmed(bb, tokens: torch.Tensor) -> torch.Tensor:
    """``bb.encode_text(tokens)`` computed on the first ``max(EOT)+1`` positions only: CLIP's text attention is
    causal, so the padding after the last end-of-text token never reaches a pooled feature; "a photo of a {}."
    prompts are ~10 of 77 positions, so this cuts the text tower's cost (forward and backward) several-fold."""
    m = bb.model
    mask = getattr(m, "attn_mask", None)
    if mask is None or getattr(m, "text_pool_type", "argmax") != "argmax":
        return bb.encode_text(tokens)  # not a causal argmax-pooled CLIP text tower: nothing to trim safely
    tokens = tokens.to(bb.device)
    n = int(tokens.argmax(dim=-1).max()) + 1
    t = tokens[:, :n]
    cast = m.transformer.get_cast_dtype()
    x = m.token_embedding(t).to(cast) + m.positional_embedding[:n].to(cast)
    x = m.ln_final(m.transformer(x, attn_mask=mask[:n, :n]))
    return bb._project(x[torch.arange(x.shape[0], device=x.device), t.argmax(dim=-1)])


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None: no autocast)."""
    if amp == "none":
        return None
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


class EncoderMethod(XmxModule):
    """The online training path: methods that change the CLIP encoders themselves (CLIP-LoRA, MMA of Yang et al.), so
    that every training image goes through the image tower at every step.

        v   = norm(f_img(x; θ))                  # x decoded and augmented on the fly (data.augment), θ the adapted encoder
        t_c = norm(f_txt(prompt_c; θ))           # recomputed each step when the text tower is adapted; otherwise the
                                                 # frozen zero-shot classifier W
                                                 (docs/methods/shared.md#zero-shot-classifier), computed once before
                                                 injection
        logit[b, c] = s · ⟨v_b, t_c⟩             # s = exp(CLIP's logit_scale), or a fixed multiplier (method.logit_scale)
        loss = CE(logit, y)

    :class:`EncoderMethod` is the LightningModule every such method shares. A subclass implements ``adapt(backbone)``
    (inject its parameters into the frozen open_clip model, return the modules whose train/eval mode must follow
    training) and says through ``adapts_text`` whether the text tower changes. The shared part:

    - the backbone becomes a submodule (it moves with the method; its frozen weights are still left out of checkpoints:
      only parameters that require grad are kept, see ``XmxModule.on_save_checkpoint``);
    - autocast (``amp``: ``auto`` = bf16 on a CUDA device that supports it, else fp32; ``bf16`` | ``fp16`` | ``none``);
      channels-last image batches on CUDA; open_clip's activation checkpointing (``grad_checkpointing``, for ViT-L/14);
    - frozen text features cached when the text tower is not adapted; adapted ones cached per label set in evaluation
      and dropped whenever training resumes; the text tower runs on the prompts' used positions only (``trim_text``:
      causal attention makes the padding irrelevant to the pooled feature);
    - an iteration budget (``iters_per_shot`` × shots steps, CLIP-LoRA's 500 × K) that sets the trainer's ``max_steps``;
    - DDP through ``trainer=ddp`` (the image loader shards with a distributed sampler; ``batch_size`` stays global)."""

    label = "encoder method"
    adapts_text: bool = True  # subclasses: whether the text tower changes (else its features are cached once)

    def __init__(self, amp: str = "auto", grad_checkpointing: bool = False, logit_scale: float | None = None,
                 prompt: str | None = None, iters_per_shot: int | None = None, keep: str = "final",
                 trim_text: bool = True, **kwargs):
        kwargs.setdefault("inputs", "images")
        super().__init__(**kwargs)
        if self.inputs != "images":
            raise XmxError(f"{self.label}: method.inputs={self.inputs!r}; methods that adapt the encoders train on "
                           "images (method.inputs=images)")
        if amp not in AMP:
            raise XmxError(f"method.amp={amp!r} is unknown; valid choices: {', '.join(AMP)}")
        if keep not in KEEP:
            raise XmxError(f"method.keep={keep!r} is unknown; valid choices: {', '.join(KEEP)}")
        if iters_per_shot is not None and int(iters_per_shot) <= 0:
            raise XmxError(f"method.iters_per_shot={iters_per_shot}: must be a positive integer (or null: epochs)")
        if logit_scale is not None and float(logit_scale) <= 0:
            raise XmxError(f"method.logit_scale={logit_scale}: the logit multiplier must be positive (or null: "
                           "CLIP's own exp(logit_scale))")
        self.amp, self.grad_checkpointing, self.keep = amp, bool(grad_checkpointing), keep
        self.trim_text = bool(trim_text)
        self.fixed_logit_scale = None if logit_scale is None else float(logit_scale)
        self.prompt, self.iters_per_shot = prompt, None if iters_per_shot is None else int(iters_per_shot)
        self.total_steps: int | None = None
        self.step_budget: int | None = None  # total_steps when this run keeps the budget itself (see setup)
        self.logit_scale: float | None = None  # CLIP's, read in build
        self._text_frozen: dict[str, str] = {}
        self._text_eval: dict[str, torch.Tensor] = {}
        self._mode_modules: list[nn.Module] = []

    # ---- the method's part ------------------------------------------------------------------------------------
    def adapt(self, backbone) -> list[nn.Module]:
        """Inject the method's parameters into ``backbone.model``; return the modules whose train/eval mode follows
        training (dropout inside the frozen backbone)."""
        raise NotImplementedError

    def train_text_prompts(self, classnames: list[str], templates: list[str]) -> list[list[str]]:
        """Per class, the prompts whose normalised features are averaged
        (docs/methods/shared.md#zero-shot-classifier); ``method.prompt`` overrides the
        dataset templates (MMA-Yang: ``a photo of a {}.``)."""
        templates = [self.prompt] if self.prompt else list(templates)
        return [[t.format(c.replace("_", " ")) for t in templates] for c in classnames]

    # ---- construction -----------------------------------------------------------------------------------------
    def _check_trainer(self, t) -> None:
        """What the run records must be what it does: ``keep`` against the checkpoint callbacks, fp16
        autocast against the trainer's loss scaling."""
        from lightning.pytorch.callbacks import ModelCheckpoint
        best = [c for c in t.callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
        if self.keep == "final" and best:
            raise XmxError(f"method.keep=final keeps the final weights, but a checkpoint callback monitoring "
                           f"{best[0].monitor} would restore the best epoch; use callbacks=final (the presets do) or "
                           "method.keep=best_val")
        if self.keep == "best_val" and (not best or not t.limit_val_batches):
            raise XmxError("method.keep=best_val needs validation and a best-checkpoint callback: use "
                           "callbacks=default and trainer.limit_val_batches=1.0")
        if self.amp == "fp16" and "16-mixed" not in str(t.precision) and "16" != str(t.precision):
            raise XmxError("method.amp=fp16 needs loss scaling: set trainer.precision=16-mixed (or use method.amp=bf16)")

    def setup(self, stage: str) -> None:
        t = self.trainer
        if t is not None and stage == "fit" and not self._built:
            self._check_trainer(t)
        super().setup(stage)
        self.step_budget = None
        if self.total_steps and stage == "fit" and t is not None and not t.fast_dev_run and t.max_steps == -1:
            # an iteration budget instead of epochs (CLIP-LoRA: 500 × K steps), kept by the method rather than by
            # trainer.max_steps: Lightning resumes an iteration-based run from an epoch-end checkpoint by replaying
            # that epoch's tail, which breaks resumed == uninterrupted. Epochs = ceil(budget / batches per epoch)
            # (set in on_train_start, once the loader is known); the last one stops at the budget. An explicit
            # trainer.max_steps or a fast_dev_run wins. The cosine T_max is the budget.
            self.step_budget = self.total_steps
            t.fit_loop.max_epochs = -1

    def on_train_start(self) -> None:
        if self.step_budget:
            nb = self.trainer.num_training_batches
            if not math.isfinite(nb) or nb < 1:
                raise XmxError(f"{self.label}: the training loader has no length; method.iters_per_shot needs a "
                               "sized loader (or set method.iters_per_shot=null and method.epochs)")
            self.trainer.fit_loop.max_epochs = -(-self.step_budget // int(nb))

    def on_train_batch_start(self, batch, batch_idx):
        if self.step_budget and self.global_step >= self.step_budget:
            return -1  # the budget is spent: skip the rest of the last epoch
        return None

    def build(self, dm) -> None:
        bb = dm.backbone
        if dm.inputs != "images":
            raise XmxError(f"{self.label}: data.inputs must be images (method.inputs=images)")
        label_sets = [("train", dm.classnames, dm.templates),
                      *((s.name, s.classnames, s.templates or dm.templates) for s in [dm.val_set, *dm.eval_sets])]
        for name, classnames, _ in label_sets:
            if not classnames:
                raise XmxError(f"{self.label}: the class list of {name!r} is empty; check protocol.base_ratio / the "
                               "dataset's class names")
        self.label_sets = {name: (list(c), list(t)) for name, c, t in label_sets}
        if not self.adapts_text:  # frozen text: computed once, before anything is injected into the towers
            for name, (classnames, templates) in self.label_sets.items():
                attr = "text_" + name.replace(".", "_")
                W = self._encode_classes(bb, classnames, templates, grad=False).detach()  # [N, C]
                self.register_buffer(attr, W, persistent=False)
                self._text_frozen[name] = attr
        self._mode_modules = list(self.adapt(bb))
        self.backbone = bb  # a submodule now: moved with the method; frozen weights stay out of checkpoints
        if self.grad_checkpointing:
            bb.model.set_grad_checkpointing(True)
        self.logit_scale = float(dm.logit_scale)
        self.total_steps = self.iters_per_shot * int(dm.shots) if self.iters_per_shot else None
        counts = self.parameter_counts()
        log.info("%s: %d trainable / %d frozen parameters; %s", self.label, counts["trainable"], counts["frozen"],
                 f"{self.total_steps} steps" if self.total_steps else f"{self.epochs} epochs")

    # ---- encoders ---------------------------------------------------------------------------------------------
    def _autocast(self):
        dt = autocast_dtype(self.amp, self.device)
        if dt is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dt)

    def _encode_classes(self, bb, classnames: list[str], templates: list[str], grad: bool) -> torch.Tensor:
        """Normalised class text features [N, C]: per class, the mean of its normalised prompt features, normalised."""
        prompts = self.train_text_prompts(classnames, templates)
        per = len(prompts[0])
        tokens = bb.tokenize([p for ps in prompts for p in ps]).to(bb.device)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()), self._autocast():
            enc = encode_text_trimmed(bb, tokens) if self.trim_text else bb.encode_text(tokens)
            feats = F.normalize(enc.float(), dim=-1)  # [N·T, C]
        return F.normalize(feats.view(len(classnames), per, -1).mean(dim=1), dim=-1)

    def text_features(self, name: str) -> torch.Tensor:
        """Normalised text features [N, C] of label set ``name`` (``train`` = the training classes)."""
        if name in self._text_frozen:
            return getattr(self, self._text_frozen[name])
        if self.training:
            return self._encode_classes(self.backbone, *self.label_sets[name], grad=True)
        if name not in self._text_eval:
            self._text_eval[name] = self._encode_classes(self.backbone, *self.label_sets[name], grad=False)
        return self._text_eval[name]

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised image features [B, C] through the (adapted) image tower."""
        if x.dim() != 4:
            raise XmxError(f"{self.label}: expected images [B,3,H,W], got shape {tuple(x.shape)}; set "
                           "method.inputs=images")
        bb = self.backbone
        x = x.to(bb.device, bb.dtype)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return F.normalize(bb.model.encode_image(x).float(), dim=-1)

    def scale(self) -> float:
        return self.fixed_logit_scale if self.fixed_logit_scale is not None else float(torch.tensor(
            self.logit_scale).exp())

    def logits(self, x, eval_set):
        return self.scale() * self.image_features(x) @ self.text_features(eval_set.name).T  # [B, N_set]

    # ---- training ---------------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)  # the frozen backbone forces itself back to eval ...
        for m in self._mode_modules:  # ... and the method's own modules inside it follow training
            m.train(mode)
        if mode:
            self._text_eval.clear()
        return self

    def training_step(self, batch, batch_idx):
        if batch is None:
            return None
        x, y = batch
        logits = self.scale() * self.image_features(x) @ self.text_features("train").T  # [B, N_train]
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    # ---- results ----------------------------------------------------------------------------------------------
    def extra_results(self) -> dict:
        sel = ("final weights (no validation during training, as the release)" if self.keep == "final"
               else "val/acc (best checkpoint restored)")
        return {"amp": self.amp, "logit_scale": self.scale() if self.logit_scale is not None else None,
                "adapts_text": self.adapts_text, "total_steps": self.total_steps, "keep": self.keep,
                **self.training_record(selected_by=sel)}
