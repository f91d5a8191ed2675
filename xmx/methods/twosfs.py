"""2SFS (Farina, Mancini, Iacca & Ricci, "Rethinking Few-Shot Adaptation of Vision-Language Models in Two Stages",
CVPR'25), as its released code (FarinaMatteo/rethinking_fewshot_vlms, ``--mode twostage --peft ln``) trains it [code].

One budget of T = M · K steps (M = 300, K shots), split at T₁ = ⌊α·T⌋ (α = 0.6):

    stage 1, steps 0 … T₁−1:   only the LayerNorms (γ, β) inside the transformer blocks of both towers train
        logit[b, c] = exp(τ) · ⟨norm(f_img(x_b; γ,β)), norm(f_txt("a photo of a {c}."; γ,β))⟩,  loss = CE
    stage 2, steps T₁ … T−1:   the towers are frozen (image features under no_grad); a linear classifier
        W ∈ R^{N×C}, initialised with the stage-1 text features of the N training classes, trains alone
        logit[b, c] = exp(τ) · ⟨norm(f_img(x_b)), norm(W_c)⟩,  loss = CE
    inference ("selective"): a class seen in training is scored with its row of W; any other class (base-to-new's
        new classes) with norm(f_txt("a photo of a {c}.")) through the stage-1 text tower.

τ is CLIP's own logit scale (frozen). Each stage has its own AdamW (lr 2e-4, wd 0.01, betas 0.9/0.999) and its own
cosine to 1e-6 over its own steps, stepped per iteration. The same fixed hyper-parameters for every dataset and
shot count: that is the method's claim. Batch 32, RandomResizedCrop(224, 0.08–1, bicubic) + flip, fp16 autocast +
GradScaler in the release (bf16 here where the GPU has it; the release does not count a step whose fp16 loss scale
overflowed, bf16 has none), final weights, no validation.

Which LayerNorms: the release's ``trainable_norm_params`` (fs/utils/model_utils.py) marks every ``nn.LayerNorm`` at or
after ``--ln_{vision,text}_start`` trainable, but ``named_modules_with_index`` yields ``ln_pre``, ``ln_post`` and
``ln_final`` twice, the second time with block index −1, which sets them back to ``requires_grad=False``: what trains
is the LayerNorms *inside* the residual blocks (``ln_scope: blocks``, the default; ``all`` adds the ones outside).
ViT-B/16: 12 × 2 × 2·768 + 12 × 2 × 2·512 = 61,440 parameters in stage 1, N × 512 in stage 2.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from xmx.backbones.blocks import tower_of, towers
from xmx.errors import XmxError
from xmx.methods._training import EncoderMethod

log = logging.getLogger(__name__)

ENCODERS = ("text", "vision", "both")
SCOPES = ("blocks", "all")


def layernorms(model: nn.Module, encoder: str = "both", scope: str = "blocks", text_start: int = 0,
               vision_start: int = 0) -> tuple[list[tuple[str, nn.LayerNorm]], list[str]]:
    """The LayerNorms 2SFS tunes ``[(qualified name, module)]`` and one note per tower on what it leaves frozen.
    Raises one line when a selected tower has none."""
    tw = towers(model)
    chosen = ["text", "vision"] if encoder == "both" else [encoder]
    start = {"text": int(text_start), "vision": int(vision_start)}
    out, notes = [], []
    for t in chosen:
        tower = tw[t]
        mine, other_norms = [], 0
        for i, (bname, block) in enumerate(tower.blocks):
            for sub, mod in block.named_modules():
                if isinstance(mod, nn.LayerNorm):
                    if i >= start[t]:
                        mine.append((f"{bname}.{sub}", mod))
                elif isinstance(mod, nn.modules.batchnorm._BatchNorm) or type(mod).__name__.endswith("Norm"):
                    other_norms += 1
        outside = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.LayerNorm) and tower_of(n) == t
                   and not any(n.startswith(b + ".") for b, _ in tower.blocks)]
        if scope == "all":
            mine += outside
        if not mine:
            raise XmxError(f"2SFS: the {t} tower of this backbone ({tower.kind}) has no LayerNorm to tune "
                           f"({len(tower.blocks)} blocks{', BatchNorm only' if other_norms else ''}); tune the other "
                           f"tower (method.encoder={'vision' if t == 'text' else 'text'})")
        left = []
        if other_norms:
            left.append(f"{other_norms} non-LayerNorm norms (BatchNorm, RMSNorm) in blocks")
        if scope == "blocks" and outside:
            left.append(f"{len(outside)} LayerNorms outside the blocks ({', '.join(n for n, _ in outside)})")
        notes.append(f"{t} tower ({tower.kind}): {len(mine)} LayerNorms" + (f"; left frozen: {', '.join(left)}"
                                                                             if left else ""))
        out += mine
    return out, notes


class TwoSFSMethod(EncoderMethod):
    """2SFS with LayerNorm tuning in stage 1 (module docstring); keys mirror the release's arguments
    (``n_iters`` = ``iters_per_shot``, ``n_iters_frac`` = ``stage1_fraction``, ``ln_modality`` = ``encoder``,
    ``ln_{text,vision}_start``)."""

    label = "2SFS"

    def __init__(self, stage1_fraction: float = 0.6, encoder: str = "both", ln_scope: str = "blocks",
                 ln_text_start: int = 0, ln_vision_start: int = 0, peft: str = "ln", **kwargs):
        if peft != "ln":
            raise XmxError(f"method.peft={peft!r}: only ln (LayerNorm tuning, the release's default and the paper's "
                           "2SFS) is implemented here")
        if encoder not in ENCODERS:
            raise XmxError(f"method.encoder={encoder!r} is unknown; valid choices: {', '.join(ENCODERS)}")
        if ln_scope not in SCOPES:
            raise XmxError(f"method.ln_scope={ln_scope!r} is unknown; valid choices: {', '.join(SCOPES)}")
        try:
            frac = float(stage1_fraction)
        except (TypeError, ValueError):
            frac = float("nan")
        if not 0.0 < frac < 1.0:
            raise XmxError(f"method.stage1_fraction={stage1_fraction}: the share of the steps given to stage 1 must "
                           "be in (0, 1) (the release: 0.6)")
        for key, v in (("ln_text_start", ln_text_start), ("ln_vision_start", ln_vision_start)):
            if isinstance(v, bool) or int(v) != v or int(v) < 0:
                raise XmxError(f"method.{key}={v}: must be a block index >= 0 (the release: 0)")
        kwargs.setdefault("iters_per_shot", 300)
        super().__init__(**kwargs)
        if self.iters_per_shot is None:
            raise XmxError("method.iters_per_shot=null: 2SFS splits an iteration budget (M x K steps, M = 300) "
                           "between its stages; set method.iters_per_shot")
        self.automatic_optimization = False
        self.stage1_fraction, self.encoder, self.ln_scope = frac, encoder, ln_scope
        self.ln_start = {"text": int(ln_text_start), "vision": int(ln_vision_start)}
        self.adapts_text = encoder in ("text", "both")
        self.stage1_steps: int | None = None
        self._selective: dict[str, torch.Tensor] = {}

    # ---- construction -----------------------------------------------------------------------------------------
    def adapt(self, backbone):
        norms, notes = layernorms(backbone.model, self.encoder, self.ln_scope, self.ln_start["text"],
                                  self.ln_start["vision"])
        log.warning("2SFS: %s", "; ".join(notes))
        for _, m in norms:
            m.requires_grad_(True)
        self.ln_names = [n for n, _ in norms]
        self.ln_params = [p for _, m in norms for p in m.parameters()]
        return []

    def build(self, dm) -> None:
        super().build(dm)
        self.stage1_steps = int(self.total_steps * self.stage1_fraction)  # int(), as the release
        if not 0 < self.stage1_steps < self.total_steps:
            raise XmxError(f"2SFS: {self.total_steps} steps split at {self.stage1_fraction} leave a stage empty; raise "
                           "method.iters_per_shot or shots")
        classes = self.label_sets["train"][0]
        with torch.no_grad():  # replaced at the stage switch by the stage-1 text features (as the release)
            W = self._encode_classes(self.backbone, *self.label_sets["train"], grad=False)
        self.classifier = nn.Parameter(W.detach().clone())  # [N, C]
        self.class_index = {c: i for i, c in enumerate(classes)}

    def configure_optimizers(self):
        opt1 = self.optimizer_factory(params=self.ln_params)
        opt2 = self.optimizer_factory(params=[self.classifier])
        if self.scheduler_factory is None:
            return [opt1, opt2]
        s1 = self.scheduler_factory(optimizer=opt1, T_max=self.stage1_steps)
        s2 = self.scheduler_factory(optimizer=opt2, T_max=self.total_steps - self.stage1_steps)
        return [opt1, opt2], [s1, s2]

    # ---- training ---------------------------------------------------------------------------------------------
    def stage(self) -> int:
        return 1 if self.global_step < self.stage1_steps else 2

    def start_stage2(self) -> None:
        """The classifier becomes the stage-1 text features of the training classes."""
        with torch.no_grad():
            self.classifier.copy_(self._encode_classes(self.backbone, *self.label_sets["train"], grad=False))
        log.info("2SFS: stage 2 from step %d: classifier initialised from the stage-1 text tower", self.global_step)

    def stage_loss(self, x, y, stage: int) -> torch.Tensor:
        """The cross-entropy of one batch in stage 1 (through both adapted towers) or 2 (the classifier on image
        features computed without gradients)."""
        if stage == 1:
            logits = self.scale() * self.image_features(x) @ self.text_features("train").T
        else:
            with torch.no_grad():
                v = self.image_features(x)
            logits = self.scale() * v @ F.normalize(self.classifier, dim=-1).T
        return F.cross_entropy(logits, y)

    def training_step(self, batch, batch_idx):
        if batch is None:
            return None
        x, y = batch
        opts, scheds = self.optimizers(), self.lr_schedulers()
        scheds = scheds if isinstance(scheds, list) else [scheds] if scheds is not None else [None, None]
        stage = self.stage()
        if stage == 2 and self.global_step == self.stage1_steps:
            self.start_stage2()
        loss = self.stage_loss(x, y, stage)
        k = stage - 1
        opt = opts[k]
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt.step()
        if scheds[k] is not None:
            scheds[k].step()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        self.log("train/stage", float(k + 1), batch_size=len(y))
        return loss

    # ---- evaluation: selective inference ----------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self._selective.clear()
        return self

    def eval_classifier(self, name: str) -> torch.Tensor:
        """Normalised class vectors [N, C] of label set ``name``: the classifier's row for a training class, the
        stage-1 text tower's feature for any other."""
        if name in self._selective:
            return self._selective[name]
        classnames, templates = self.label_sets[name]
        rows = [self.class_index.get(c) for c in classnames]
        W = torch.empty(len(classnames), self.classifier.shape[1], device=self.classifier.device)
        known = [i for i, r in enumerate(rows) if r is not None]
        if known:
            W[known] = self.classifier.detach()[[rows[i] for i in known]].float()
        new = [i for i, r in enumerate(rows) if r is None]
        if new:
            W[new] = self._encode_classes(self.backbone, [classnames[i] for i in new], templates, grad=False).to(W)
        self._selective[name] = W = F.normalize(W, dim=-1)
        return W

    def logits(self, x, eval_set):
        return self.scale() * self.image_features(x) @ self.eval_classifier(eval_set.name).T

    # ---- results ----------------------------------------------------------------------------------------------
    def extra_results(self) -> dict:
        return {**super().extra_results(), "stage1_fraction": self.stage1_fraction, "stage1_steps": self.stage1_steps,
                "stage2_steps": None if self.stage1_steps is None else self.total_steps - self.stage1_steps,
                "encoder": self.encoder, "ln_scope": self.ln_scope, "ln_start": self.ln_start,
                "layernorms": len(getattr(self, "ln_names", [])),
                "stage1_parameters": sum(p.numel() for p in getattr(self, "ln_params", [])),
                "classifier_parameters": None if not hasattr(self, "classifier") else self.classifier.numel()}
