"""Frozen encoders built from a name + weights: open_clip CLIP backbones (and, in the language track, PLMs)."""

from xmx.backbones.clip import CLIPBackbone, resolve_clip_weights

__all__ = ["CLIPBackbone", "resolve_clip_weights"]
