"""MMRL (Guo & Gu, "MMRL: Multi-Modal Representation Learning for Vision-Language Models", CVPR'25), as its released
code (yunncheng/MMRL trainers/mmrl.py, clip/model_mmrl.py) trains it. The per-layer forward passes live in
:mod:`xmx.backbones.deep_tokens` (``mode="insert"``).

A shared representation space R ∈ R^{K×d} (K = 5 tokens, d = 512, N(0, 0.02²)) is projected into each listed layer
l ∈ A (1-based 6..12) of both towers by its own linear maps (the release clones one Linear per tower: they start
equal):

    R^t_l = F^t_l(R) ∈ R^{K×W_t},   R^v_l = F^v_l(R) ∈ R^{K×W_v}
    text:  "template(c)" tokens; before the first listed layer the K tokens are inserted after SOT, later listed
           layers replace them; causal attention; pooled at EOT (shifted by K);  t_c = norm g(c; R^t)
    image: inserted after the class token likewise;  v = norm(ln_post(x_cls) · P)         (P: CLIP's projection, frozen)
           v_r = norm(mean_k ln_post(x_k) · P_r)        (P_r ∈ R^{W_v×C} learned, init W_v^-½ · N(0, 1) as the release)
    logits  z = 100·v·tᵀ,  z_r = 100·v_r·tᵀ,  fused = α·z + (1 − α)·z_r                              α = 0.7
    L = α·CE(z) + (1 − α)·CE(z_r) + λ·(1 − mean_b cos(v_b, ṽ_b)) + λ·(1 − mean_c cos(t_c, t̃_c))
        ṽ, t̃: the frozen CLIP's image feature and template text features (normalised)

Inference (the release's ``test``): the fused logits on the label sets of the training task (base classes, the
few-shot test set, ImageNet in cross-dataset), the class-token logits z alone elsewhere (new classes, other
datasets): ``fusion_sets``.

λ: the released scripts use one weight per protocol (1.0 base-to-new, 0.5 few-shot, 0.2 cross-dataset); a per-dataset
table goes in ``reg_weight_by_dataset`` (``reg_weight`` resolves from it when the dataset is listed).

Trainable parameters, ViT-B/16: 5·512 + 7·(512·512 + 512) + 7·(512·768 + 768) + 768·512 = 4,992,256.
"""

from __future__ import annotations

import copy
import logging

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


class RepresentationSpace(nn.Module):
    """R [K, d], the per-layer maps ``to_text[i]`` (d → W_t) and ``to_vision[i]`` (d → W_v) for the i-th listed layer,
    and the representation-token head ``proj_rep`` [W_v, C]."""

    def __init__(self, n_tokens: int, dim: int, text_width: int, vision_width: int, embed_dim: int, n_layers: int,
                 std: float = 0.02):
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(n_tokens, dim).normal_(std=std))
        t, v = nn.Linear(dim, text_width), nn.Linear(dim, vision_width)
        self.to_text = nn.ModuleList([copy.deepcopy(t) for _ in range(n_layers)])
        self.to_vision = nn.ModuleList([copy.deepcopy(v) for _ in range(n_layers)])
        self.proj_rep = nn.Parameter(vision_width ** -0.5 * torch.randn(vision_width, embed_dim))

    def layers(self, blocks: list[int], tower: str) -> dict[int, torch.Tensor]:
        """{0-based block index: R_l [K, W]} for ``tower`` (``text`` | ``vision``)."""
        maps = self.to_text if tower == "text" else self.to_vision
        return {b: f(self.tokens) for b, f in zip(blocks, maps)}


class MMRLMethod(EncoderMethod):
    """MMRL (module docstring); keys mirror the release's ``TRAINER.MMRL`` config."""

    label = "MMRL"
    adapts_text = True

    def __init__(self, n_rep_tokens: int = 5, rep_layers=(6, 7, 8, 9, 10, 11, 12), rep_dim: int = 512,
                 alpha: float = 0.7, reg_weight: float = 1.0, reg_weight_by_dataset: dict | None = None,
                 fusion_sets=("val", "test", "test_base"), init_std: float = 0.02, text_chunk: int | None = None,
                 batch_by_dataset: dict | None = None, epochs_by_dataset: dict | None = None,
                 reg_by_protocol_dataset: dict | None = None, **kwargs):
        # batch_by_dataset / epochs_by_dataset / reg_by_protocol_dataset: recipe tables the presets resolve
        # batch_size / epochs / reg_weight from (kept in the resolved config); nothing to do here
        if int(n_rep_tokens) < 1:
            raise XmxError(f"method.n_rep_tokens={n_rep_tokens}: at least one representation token (release: 5)")
        layers = list(rep_layers)
        if not layers or any(not isinstance(v, int) or v < 1 for v in layers) or layers != sorted(set(layers)):
            raise XmxError(f"method.rep_layers={layers}: increasing 1-based layer numbers (release: [6, ..., 12])")
        if int(rep_dim) < 1:
            raise XmxError(f"method.rep_dim={rep_dim}: a positive width (release: 512)")
        if not 0.0 <= float(alpha) <= 1.0:
            raise XmxError(f"method.alpha={alpha}: the fusion weight lies in [0, 1] (release: 0.7)")
        if float(reg_weight) < 0:
            raise XmxError(f"method.reg_weight={reg_weight}: the regularisation weight must be >= 0")
        if text_chunk is not None and int(text_chunk) < 1:
            raise XmxError(f"method.text_chunk={text_chunk}: a positive number of classes per pass (or null: all)")
        kwargs.setdefault("logit_scale", 100.0)
        super().__init__(**kwargs)
        self.n_rep, self.rep_layers, self.rep_dim = int(n_rep_tokens), layers, int(rep_dim)
        self.alpha, self.reg_weight = float(alpha), float(reg_weight)
        self.reg_weight_by_dataset = dict(reg_weight_by_dataset or {})
        self.fusion_sets, self.init_std = list(fusion_sets), float(init_std)
        self.text_chunk = None if text_chunk is None else int(text_chunk)
        self._label_prompts: dict[str, str] = {}

    # ---- construction -----------------------------------------------------------------------------------------
    def prompt_texts(self, classnames, templates) -> list[str]:
        template = self.prompt or templates[0]  # the release: the dataset's one CoOp template (CUSTOM_TEMPLATES)
        return [template.format(c.replace("_", " ")) for c in classnames]

    def adapt(self, bb):
        check_deep_towers(bb, self.label, text=True, vision=True)
        for tower in ("text", "vision"):
            blocks = tower_depth(bb, tower)
            if max(self.rep_layers) > blocks:
                raise XmxError(f"method.rep_layers={self.rep_layers} go beyond the {blocks} layers of the {tower} "
                               f"tower; pick layers within 1..{blocks}")
        self.blocks = [l - 1 for l in self.rep_layers]
        self.rep = RepresentationSpace(self.n_rep, self.rep_dim, int(bb.text_width),
                                       int(bb.model.visual.transformer.width), int(bb.embed_dim),
                                       len(self.rep_layers), self.init_std)
        seen: dict[tuple, str] = {}
        for name, (classnames, templates) in self.label_sets.items():
            texts = self.prompt_texts(classnames, templates)
            key = tuple(texts)
            if key not in seen:
                seen[key] = f"label_prompts_{len(seen)}"
                self.add_module(seen[key], LabelSetPrompts(bb, texts, 0, self.trim_text))
            self._label_prompts[name] = seen[key]
        with torch.no_grad():  # the frozen CLIP's text features of the training classes (the text regulariser)
            lp = getattr(self, self._label_prompts["train"])
            t0 = encode_class_prompts(bb.model, lp, {}, self.text_chunk)
        self.register_buffer("clip_text", F.normalize(t0, dim=-1), persistent=False)
        return []

    # ---- encoders ---------------------------------------------------------------------------------------------
    def text_features(self, name: str) -> torch.Tensor:
        if self.training:
            return self._encode_set(name, grad=True)
        if name not in self._text_eval:
            self._text_eval[name] = self._encode_set(name, grad=False)
        return self._text_eval[name]

    def _encode_set(self, name: str, grad: bool) -> torch.Tensor:
        lp = getattr(self, self._label_prompts[name])
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()), self._autocast():
            layers = self.rep.layers(self.blocks, "text")
            feats = encode_class_prompts(self.backbone.model, lp, layers, self.text_chunk, mode="insert")
        return F.normalize(feats, dim=-1)

    def image_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v, v_r): normalised class-token and representation-token features [B, C]."""
        if x.dim() != 4:
            raise XmxError(f"{self.label}: expected images [B,3,H,W], got shape {tuple(x.shape)}")
        bb = self.backbone
        x = x.to(bb.device, bb.dtype)
        with self._autocast():
            v, tokens = encode_image_deep(bb.model.visual, x, self.rep.layers(self.blocks, "vision"), mode="insert")
            v_r = tokens[:, 1:1 + self.n_rep].mean(dim=1) @ self.rep.proj_rep.to(tokens.dtype)
        return F.normalize(v.float(), dim=-1), F.normalize(v_r.float(), dim=-1)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_both(x)[0]

    def heads(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, z_r, fused) logits [B, N] of label set ``name``."""
        v, v_r = self.image_both(x)
        t = self.text_features(name)
        s = self.scale()
        z, z_r = s * v @ t.T, s * v_r @ t.T
        return z, z_r, self.alpha * z + (1 - self.alpha) * z_r

    def logits(self, x, eval_set):
        z, _, fused = self.heads(x, eval_set.name)
        return fused if eval_set.name in self.fusion_sets else z

    # ---- training ---------------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        if batch is None:
            return None
        x, y = batch
        v, v_r = self.image_both(x)
        t = self.text_features("train")
        s = self.scale()
        z, z_r = s * v @ t.T, s * v_r @ t.T
        with torch.no_grad(), self._autocast():
            bb = self.backbone
            v0 = F.normalize(bb.model.encode_image(x.to(bb.device, bb.dtype)).float(), dim=-1)
        ce = self.alpha * F.cross_entropy(z, y) + (1 - self.alpha) * F.cross_entropy(z_r, y)
        reg_img = 1 - F.cosine_similarity(v, v0, dim=1).mean()
        reg_txt = 1 - F.cosine_similarity(t, self.clip_text.to(t.device), dim=1).mean()
        loss = ce + self.reg_weight * reg_img + self.reg_weight * reg_txt
        self.log_dict({"train/loss": loss, "train/ce": ce, "train/reg_image": reg_img, "train/reg_text": reg_txt},
                      batch_size=len(y))
        return loss

    def extra_results(self) -> dict:
        return {**super().extra_results(), "n_rep_tokens": self.n_rep, "rep_layers": self.rep_layers,
                "rep_dim": self.rep_dim, "alpha": self.alpha, "reg_weight": self.reg_weight,
                "reg_weight_by_dataset": self.reg_weight_by_dataset, "fusion_sets": self.fusion_sets,
                "text_chunk": self.text_chunk}
