"""Deep prompts in both CLIP towers: IVLP (independent vision-language prompting, Khattak et al., CVPR'23 baseline),
MaPLe (Khattak et al., CVPR'23) and PromptSRC (Khattak et al., ICCV'23), as their released code trains them
(muzairkhattak/multimodal-prompt-learning trainers/{independentVL,maple}.py, muzairkhattak/PromptSRC
trainers/promptsrc.py). The per-layer forward passes live in :mod:`xmx.backbones.deep_tokens`.

Prompts: P_l ∈ R^{n_t×W_t} for text layers l < J_t, V_l ∈ R^{n_v×W_v} for image layers l < J_v, replaced at every
layer (the outputs of the previous layer's prompt positions are dropped). The class prompt is the init phrase with
its first n_t tokens learned, then the class name: "[a photo] of a {c}." for MaPLe (n_t = 2), "[a photo of a] {c}."
for IVLP/PromptSRC (n_t = 4); P_0 = the phrase's token embeddings, P_{l≥1}, V_l ~ N(0, 0.02²).

    IVLP      V_l independent parameters
    MaPLe     n_v = n_t, J_v = J_t,  V_l = F_l(P_l),  F_l = Linear(W_t → W_v)   (coupling; the F_{l≥1} start equal)
    t_c = norm g(prompt_c; P),   v = norm f(x; V),   logit = exp(s)·⟨v, t_c⟩,   L = CE

PromptSRC = IVLP + self-regularisation against the frozen CLIP (t̃_c: the mean of the raw frozen text features of the
first 60 of CLIP's 80 ImageNet templates, normalised; ṽ = norm f_frozen(x); z̃ = exp(s)·ṽ·t̃ᵀ):

    L = CE + λ_t·mean|t − t̃| + λ_v·mean|v − ṽ| + Σ_{b,c} p̃ (log p̃ − log p) / (B·N)      λ_t = 25, λ_v = 10
    Gaussian prompt aggregation: θ_GPA = Σ_{e=1..E} w_e θ_e,  w_e ∝ N(e; μ, σ²) normalised over e = 1..E;
    θ_e the prompts after epoch e; θ_GPA replaces the prompts after the last epoch (what is tested).

Trainable parameters, ViT-B/16: IVLP/PromptSRC 4+4 tokens in 9 layers: 9·4·512 + 9·4·768 = 46,080;
MaPLe 2 tokens, depth 9: 9·2·512 + 9·(512·768 + 768) = 3,555,072.

Memory: every step encodes all class prompts through the prompted text tower. ``text_chunk`` encodes them that many
at a time with recomputation (torch.utils.checkpoint), each chunk cut after its last EOT (causal attention), so the
activation memory follows the chunk, not the class count; the gradients are the plain computation's.
"""

from __future__ import annotations

import copy
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from xmx.backbones.deep_tokens import (
    LabelSetPrompts,
    check_deep_towers,
    encode_class_prompts,
    encode_image_deep,
    tower_depth,
)
from xmx.errors import XmxError
from xmx.methods._training import EncoderMethod

log = logging.getLogger(__name__)

PROMPTSRC_TEMPLATES = 60  # the release's IMAGENET_TEMPLATES: the first 60 of CLIP's 80 ImageNet templates


# ===================================================================================================== the prompts
class DeepPrompts(nn.Module):
    """The learned tokens: ``text[l]`` [n_t, W_t] for l < J_t; ``vision[l]`` [n_v, W_v] for l < J_v (IVLP), or
    ``coupling[l]`` = Linear(W_t → W_v) with V_l = coupling[l](text[l]) (MaPLe). ``init`` [n_t, W_t] sets P_0."""

    def __init__(self, text_width: int, vision_width: int, n_text: int, n_vision: int, depth_text: int,
                 depth_vision: int, coupled: bool = False, init: torch.Tensor | None = None, std: float = 0.02):
        super().__init__()
        self.coupled = bool(coupled)

        def normal(n, w):
            return nn.Parameter(torch.empty(n, w).normal_(std=std))

        self.text = nn.ParameterList([normal(n_text, text_width) for _ in range(depth_text)])
        if init is not None and depth_text:
            with torch.no_grad():
                self.text[0].copy_(init)
        self.vision = nn.ParameterList([] if coupled else [normal(n_vision, vision_width) for _ in range(depth_vision)])
        self.coupling = nn.ModuleList()
        if coupled and depth_text:  # the release: proj for layer 0, deep copies of one Linear for the deeper layers
            first = nn.Linear(text_width, vision_width)
            deep = nn.Linear(text_width, vision_width)
            self.coupling = nn.ModuleList([first, *(copy.deepcopy(deep) for _ in range(depth_text - 1))])

    def text_layers(self) -> dict[int, torch.Tensor]:
        return dict(enumerate(self.text))

    def vision_layers(self) -> dict[int, torch.Tensor]:
        if self.coupled:
            return {l: f(self.text[l]) for l, f in enumerate(self.coupling)}
        return dict(enumerate(self.vision))


# ======================================================================================================= GPA
def gaussian_weights(mean: float, std: float, epochs: int) -> list[float]:
    """PromptSRC's epoch weights: N(e; mean, std²) for e = 1..epochs, normalised to sum 1."""
    g = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
    s = sum(g)
    if not s > 0:
        raise XmxError(f"method.gpa_mean={mean}, method.gpa_std={std}: the Gaussian weights of epochs 1..{epochs} "
                       "are all zero; pick a mean within the epochs or a larger std")
    return [w / s for w in g]


# ================================================================================================== LightningModules
class DeepPromptMethod(EncoderMethod):
    """IVLP / MaPLe (``coupling: true``) on the online path; keys mirror the releases' ``TRAINER.IVLP`` /
    ``TRAINER.MAPLE`` configs."""

    label = "deep prompts"
    adapts_text = True

    def __init__(self, n_ctx_text: int = 4, n_ctx_vision: int = 4, depth_text: int = 9, depth_vision: int = 9,
                 coupling: bool = False, ctx_init: str | None = "a photo of a", init_max_tokens: int = 4,
                 init_std: float = 0.02, text_chunk: int | None = None, **kwargs):
        for key, v in (("n_ctx_text", n_ctx_text), ("n_ctx_vision", n_ctx_vision)):
            if int(v) < 1:
                raise XmxError(f"method.{key}={v}: at least one prompt token per layer (release: 2 MaPLe, 4 IVLP)")
        for key, v in (("depth_text", depth_text), ("depth_vision", depth_vision)):
            if int(v) < 0:
                raise XmxError(f"method.{key}={v}: the prompt depth is a number of layers >= 0")
        if coupling and int(n_ctx_vision) != int(n_ctx_text):
            raise XmxError(f"method.coupling=true maps each text prompt to the image tower: method.n_ctx_vision="
                           f"{n_ctx_vision} must equal method.n_ctx_text={n_ctx_text}")
        if coupling and int(depth_vision) != int(depth_text):
            raise XmxError(f"method.coupling=true: method.depth_vision={depth_vision} must equal method.depth_text="
                           f"{depth_text} (MaPLe's one PROMPT_DEPTH)")
        if text_chunk is not None and int(text_chunk) < 1:
            raise XmxError(f"method.text_chunk={text_chunk}: a positive number of classes per pass (or null: all)")
        super().__init__(**kwargs)
        self.n_text, self.n_vision = int(n_ctx_text), int(n_ctx_vision)
        self.depth_text, self.depth_vision, self.coupled = int(depth_text), int(depth_vision), bool(coupling)
        self.ctx_init, self.init_max_tokens, self.init_std = ctx_init or None, int(init_max_tokens), float(init_std)
        self.text_chunk = None if text_chunk is None else int(text_chunk)
        self._label_prompts: dict[tuple, str] = {}

    # ---- construction -----------------------------------------------------------------------------------------
    def adapt(self, bb):
        vision = self.coupled or self.depth_vision > 0
        if self.coupled and self.depth_text > 0:
            check_deep_towers(bb, f"{self.label} (method.coupling=true)", text=True, vision=True)
        check_deep_towers(bb, self.label, text=True, vision=vision)
        for tower, key, depth in (("text", "method.depth_text", self.depth_text),
                                  ("vision", "method.depth_vision", self.depth_vision if vision else 0)):
            blocks = tower_depth(bb, tower)
            if depth > blocks:
                raise XmxError(f"{key}={depth} goes beyond the {blocks} layers of the {tower} tower; "
                               f"pick a depth within 0..{blocks}")
        phrase, init = " ".join(["X"] * self.n_text), None
        if self.ctx_init and self.n_text <= self.init_max_tokens:  # the release: phrase init only for n_ctx <= 4
            phrase = self.ctx_init.replace("_", " ")
            tok = bb.tokenize([phrase])
            if int(tok.argmax(-1)[0]) - 1 < self.n_text:
                raise XmxError(f"method.ctx_init={self.ctx_init!r} has fewer than method.n_ctx_text={self.n_text} "
                               "tokens; use a longer phrase or fewer tokens")
            with torch.no_grad():
                init = bb.token_embedding(tok)[0, 1:1 + self.n_text].float().cpu()
        self.phrase = phrase
        tw = int(bb.text_width)
        vw = int(bb.model.visual.transformer.width) if vision else 1
        self.prompts = DeepPrompts(tw, vw, self.n_text, self.n_vision, self.depth_text,
                                   self.depth_vision if vision else 0, self.coupled, init, self.init_std)
        for classnames, _ in self.label_sets.values():
            key = tuple(classnames)
            if key not in self._label_prompts:
                attr = f"label_prompts_{len(self._label_prompts)}"
                texts = [f"{phrase} {c.replace('_', ' ')}." for c in classnames]
                self.add_module(attr, LabelSetPrompts(bb, texts, self.n_text, self.trim_text))
                self._label_prompts[key] = attr
        return []

    # ---- encoders ---------------------------------------------------------------------------------------------
    def _encode_classes(self, bb, classnames, templates, grad: bool) -> torch.Tensor:
        lp = getattr(self, self._label_prompts[tuple(classnames)])
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()), self._autocast():
            feats = encode_class_prompts(bb.model, lp, self.prompts.text_layers(), self.text_chunk)
        return F.normalize(feats, dim=-1)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise XmxError(f"{self.label}: expected images [B,3,H,W], got shape {tuple(x.shape)}")
        bb = self.backbone
        x = x.to(bb.device, bb.dtype)
        with self._autocast():
            pooled, _ = encode_image_deep(bb.model.visual, x, self.prompts.vision_layers())
        return F.normalize(pooled.float(), dim=-1)

    def extra_results(self) -> dict:
        return {**super().extra_results(), "n_ctx_text": self.n_text, "n_ctx_vision": self.n_vision,
                "depth_text": self.depth_text, "depth_vision": self.depth_vision, "coupling": self.coupled,
                "ctx_init": self.ctx_init, "prompt_phrase": getattr(self, "phrase", None),
                "text_chunk": self.text_chunk,
                "prompt_parameters": (sum(p.numel() for p in self.prompts.parameters())
                                      if hasattr(self, "prompts") else None)}


class PromptSRCMethod(DeepPromptMethod):
    """PromptSRC (module docstring): IVLP + L1 feature / KL logit self-regularisation + Gaussian prompt aggregation;
    keys mirror ``TRAINER.PROMPTSRC``."""

    label = "PromptSRC"

    def __init__(self, text_loss_weight: float = 25.0, image_loss_weight: float = 10.0, gpa_mean: float = 15.0,
                 gpa_std: float = 1.0, teacher_templates: int | list | None = PROMPTSRC_TEMPLATES,
                 gpa_by_dataset: dict | None = None, **kwargs):
        if float(gpa_std) <= 0:
            raise XmxError(f"method.gpa_std={gpa_std}: the Gaussian's standard deviation must be positive")
        if float(text_loss_weight) < 0 or float(image_loss_weight) < 0:
            raise XmxError("method.text_loss_weight / method.image_loss_weight must be >= 0 (release: 25 / 10)")
        super().__init__(**kwargs)
        self.text_loss_weight, self.image_loss_weight = float(text_loss_weight), float(image_loss_weight)
        self.gpa_mean, self.gpa_std = float(gpa_mean), float(gpa_std)
        self.teacher_templates = teacher_templates
        self._gpa: dict[str, torch.Tensor] | None = None
        self._gpa_epochs: list[int] = []

    def _templates(self) -> list[str]:
        t = self.teacher_templates
        if isinstance(t, int) or t is None:
            from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
            return [f("{}") for f in OPENAI_IMAGENET_TEMPLATES[:int(t or PROMPTSRC_TEMPLATES)]]
        return [str(s) for s in t]

    def build(self, dm) -> None:
        with torch.no_grad():  # the frozen teacher text, before the prompts exist (the plain tower)
            W = dm.text_classifier(list(dm.classnames), self._templates(), normalize=False).float()  # [C, N] raw mean
        self.register_buffer("teacher_text", F.normalize(W.T.contiguous(), dim=-1), persistent=False)
        super().build(dm)
        self.gpa_weights = gaussian_weights(self.gpa_mean, self.gpa_std, int(self.epochs or 1))

    def training_step(self, batch, batch_idx):
        if batch is None:
            return None
        x, y = batch
        t = self.text_features("train")  # [N, C] normalised
        v = self.image_features(x)  # [B, C]
        scale = self.scale()
        logits = scale * v @ t.T
        with torch.no_grad(), self._autocast():
            bb = self.backbone
            v0 = F.normalize(bb.model.encode_image(x.to(bb.device, bb.dtype)).float(), dim=-1)
        t0 = self.teacher_text.to(v.device)
        z0 = scale * v0 @ t0.T
        ce = F.cross_entropy(logits, y)
        l_text = F.l1_loss(t, t0) * self.text_loss_weight
        l_img = F.l1_loss(v, v0) * self.image_loss_weight
        kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(z0, 1), reduction="sum", log_target=True) / logits.numel()
        loss = ce + l_text + l_img + kl
        self.log_dict({"train/loss": loss, "train/ce": ce, "train/scl_text": l_text, "train/scl_image": l_img,
                       "train/scl_logits": kl}, prog_bar=False, batch_size=len(y))
        return loss

    # ---- Gaussian prompt aggregation ---------------------------------------------------------------------------
    def gpa_add(self, epoch: int) -> None:
        """After epoch ``epoch`` (1-based): θ_GPA += w_epoch · θ_epoch."""
        w = self.gpa_weights[epoch - 1]
        cur = {n: p.detach().float().clone() for n, p in self.prompts.named_parameters()}
        self._gpa = ({n: w * v for n, v in cur.items()} if self._gpa is None
                     else {n: self._gpa[n] + w * cur[n] for n in cur})
        self._gpa_epochs.append(int(epoch))

    def gpa_load(self) -> None:
        with torch.no_grad():
            for n, p in self.prompts.named_parameters():
                p.copy_(self._gpa[n].to(p.device, p.dtype))

    def on_train_epoch_end(self) -> None:
        epoch = int(self.current_epoch) + 1
        if epoch > len(self.gpa_weights):
            return
        self.gpa_add(epoch)
        if epoch == len(self.gpa_weights):
            self.gpa_load()  # the release tests the aggregated prompts (they are also what the last checkpoint holds)
            self._text_eval.clear()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._gpa is not None:  # training state for resume, outside the state dict of learned tensors
            checkpoint["promptsrc_gpa"] = {"sum": {k: v.cpu() for k, v in self._gpa.items()},
                                           "epochs": list(self._gpa_epochs)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        g = checkpoint.get("promptsrc_gpa")
        if g:
            self._gpa, self._gpa_epochs = dict(g["sum"]), list(g["epochs"])

    def extra_results(self) -> dict:
        return {**super().extra_results(), "text_loss_weight": self.text_loss_weight,
                "image_loss_weight": self.image_loss_weight, "gpa_mean": self.gpa_mean, "gpa_std": self.gpa_std,
                "gpa_weights": getattr(self, "gpa_weights", None), "gpa_epochs": list(self._gpa_epochs),
                "teacher_templates": len(self._templates())}
