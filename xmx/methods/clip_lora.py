"""CLIP-LoRA (Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPRW'24), as its
released code (MaxZanella/CLIP-LoRA) trains it [code].

For every attention layer at ``position`` of the towers in ``encoder`` and every projection p in ``params``:

    p(x) = x W_pᵀ + b_p + (alpha / sqrt(r)) · drop(x) A_pᵀ B_pᵀ       r = 2, alpha = 1, dropout 0.25; B_p = 0 at init
    v    = norm(f_img(x)),  t_c = norm(f_txt("a photo of a {c}."))    # both towers adapted by default
    logit[b, c] = 100 · ⟨v_b, t_c⟩,   loss = CE                        # the release's fixed multiplier 100

The LoRA algebra and the injection live in :mod:`xmx.backbones.lora`; the online training path (images through the
image tower every step, autocast, cached frozen text when ``encoder=vision``) in ``xmx.methods._training.EncoderMethod``.

Recipe [code]: AdamW (lr 2e-4, weight decay 1e-2, betas 0.9/0.999), cosine to 1e-6 over 500 × K iterations stepped
per iteration, batch 32, fp16 autocast in the release (bf16 here where the GPU has it), RandomResizedCrop(224, scale
0.08–1, bicubic) + flip (``augment=coop``). The release trains without validation and keeps the final weights:
``keep: final`` (default, recorded in results.json); ``keep: best_val`` keeps the best validation epoch instead.
ViT-B/16 with the defaults: 12 × 3 × 2·2·512 (text) + 12 × 3 × 2·2·768 (image) = 184,320 trainable parameters.
"""

from __future__ import annotations

from typing import Annotated, Literal

from xmx.backbones.lora import ENCODERS, POSITIONS, check_lora_config, inject_lora
from xmx.methods._training import EncoderMethod
from xmx.validate import Interval, PosFloat, PosInt


class ClipLoRAMethod(EncoderMethod):
    """CLIP-LoRA (module docstring); the keys mirror the release's command-line arguments."""

    label = "CLIP-LoRA"

    def __init__(self, encoder: Literal[ENCODERS] = "both", position: Literal[POSITIONS] = "all", params=("q", "k", "v"),
                 r: PosInt = 2, alpha: PosFloat = 1.0, dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.25, **kwargs):
        # bad LoRA keys fail here, before the datamodule reads a single image
        params = check_lora_config(encoder, position, params, r, alpha, dropout)
        super().__init__(**kwargs)
        self.lora_config = dict(encoder=encoder, position=position, params=params, r=int(r), alpha=float(alpha),
                                dropout=float(dropout))
        self.adapts_text = encoder in ("text", "both")

    def adapt(self, backbone):
        self.lora_layers = inject_lora(backbone.model, **self.lora_config)
        return self.lora_layers

    def extra_results(self) -> dict:
        return {**super().extra_results(), **self.lora_config, "lora_layers": len(getattr(self, "lora_layers", []))}
