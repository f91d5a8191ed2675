"""The transformer blocks of a CLIP-family model's two towers, found by name on any open_clip or transformers model,
and the generic tensors inside them that whole-model fine-tuning methods adapt (CLIP-SVD: the linear weights; 2SFS:
the LayerNorms).

A *block* is a module whose qualified name ends in ``resblocks.<i>``, ``blocks.<i>``, ``layers.<i>`` or
``layer.<i>`` and that is not inside another block: open_clip's ``(visual.)transformer.resblocks.<i>`` and
``text.transformer.resblocks.<i>``, timm's ``visual.trunk.blocks.<i>`` (SigLIP, EVA-02, PE) and
``visual.trunk.stages.<s>.blocks.<i>`` (FastViT / MobileCLIP), transformers' ``vision_model.encoder.layers.<i>`` and
``text_model.encoder.layers.<i>``. A tower's blocks are numbered 0.. in module order (a FastViT's stages one after
the other). Everything under ``visual``/``vision_model``/``visual_projection`` is the vision tower, the rest the text
tower.

Linear weights in a block are classified by their module's name, so that a method can pick projections the way the
CLIP-SVD release does (``q``, ``k``, ``v``, ``o``, ``mlp``):

    nn.MultiheadAttention.in_proj_weight [3E, E]  -> q, k, v (three row chunks)    its out_proj -> o
    *.qkv [3E, E] (timm)                           -> q, k, v (three row chunks)    *.kv [2E, E] -> k, v
    *.q_proj / k_proj / v_proj (EVA, transformers) -> q / k / v                      *.proj / out_proj -> o
    any linear under an ``mlp`` module              -> mlp                            anything else -> other
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

VISION_PREFIXES = ("visual", "vision_model", "visual_projection")
_BLOCK = re.compile(r"(?:^|\.)(?:resblocks|blocks|layers|layer)\.\d+$")
TOWERS = ("text", "vision")


def tower_of(name: str) -> str:
    return "vision" if name.split(".", 1)[0] in VISION_PREFIXES else "text"


@dataclass
class Tower:
    """One tower: its blocks ``[(qualified name, module)]`` in order and the modules outside them."""
    name: str
    blocks: list[tuple[str, nn.Module]] = field(default_factory=list)
    kind: str = ""  # the class of the tower's root (for messages)


def towers(model: nn.Module) -> dict[str, Tower]:
    """``{"text": Tower, "vision": Tower}`` of an open_clip ``CLIP``/``CustomTextCLIP`` or a transformers
    ``CLIPModel``/``SiglipModel``."""
    out = {t: Tower(t) for t in TOWERS}
    roots = {"vision": getattr(model, "visual", None) or getattr(model, "vision_model", None),
             "text": getattr(model, "text", None) or getattr(model, "text_model", None) or getattr(model, "transformer",
                                                                                                  None)}
    for t, r in roots.items():
        out[t].kind = type(r).__name__ if r is not None else "none"
        trunk = getattr(r, "trunk", None)
        if trunk is not None:
            out[t].kind = f"timm:{type(trunk).__name__}"
    taken: list[str] = []
    for name, mod in model.named_modules():
        if _BLOCK.search(name) and not any(name.startswith(p + ".") for p in taken):
            taken.append(name)
            out[tower_of(name)].blocks.append((name, mod))
    return out


def block_range(layers, depth: int) -> list[int]:
    """Indices of the blocks a method adapts: ``all``, the CLIP-SVD release's thirds (``bottom``, ``middle``,
    ``top``, ``top_bottom``, ``top_middle``, ``bottom_middle``; 0-3 / 4-7 / 8-11 on 12 blocks, boundaries at
    round(depth/3) and round(2·depth/3) otherwise) or an explicit list of 0-based indices."""
    a, b = round(depth / 3), round(2 * depth / 3)
    thirds = {"bottom": range(0, a), "middle": range(a, b), "top": range(b, depth)}
    if isinstance(layers, str):
        if layers == "all":
            return list(range(depth))
        parts = layers.split("_")
        return sorted({i for p in parts for i in thirds[p]})
    return sorted({int(i) for i in layers if 0 <= int(i) < depth})


LAYER_CHOICES = ("all", "bottom", "middle", "top", "top_bottom", "top_middle", "bottom_middle")


def linear_role(qual: str, module: nn.Module) -> tuple[str, ...]:
    """The projections a linear weight holds (one role per row chunk): ``("q","k","v")`` for a fused qkv,
    ``("o",)``, ``("mlp",)``, ``("other",)``."""
    parts = qual.split(".")
    last = parts[-1]
    if isinstance(module, nn.MultiheadAttention):
        return ("q", "k", "v")
    if last == "qkv" and module.out_features == 3 * module.in_features:
        return ("q", "k", "v")
    if last == "kv" and module.out_features == 2 * module.in_features:
        return ("k", "v")
    if last in ("q_proj", "q", "query"):
        return ("q",)
    if last in ("k_proj", "k", "key"):
        return ("k",)
    if last in ("v_proj", "v", "value"):
        return ("v",)
    if "mlp" in parts[:-1] or last in ("c_fc", "c_proj", "fc1", "fc2", "fc1_g", "fc1_x"):
        return ("mlp",)
    if last in ("out_proj", "proj", "o_proj"):
        return ("o",)
    return ("other",)
