"""Frozen encoders built from a name + weights: CLIP-family backbones through open_clip (``CLIPBackbone``) or
transformers (``HFCLIPBackbone``), and, in the language track, PLMs."""

from xmx.backbones.clip import CLIPBackbone, ClipLikeBackbone, resolve_clip_weights
from xmx.backbones.hf_clip import HFCLIPBackbone

__all__ = ["CLIPBackbone", "ClipLikeBackbone", "HFCLIPBackbone", "resolve_clip_weights"]
