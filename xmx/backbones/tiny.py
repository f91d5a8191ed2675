"""Tiny random-init image towers of every CLIP family, registered with timm (``xmx_tiny_*``), for the
``xmx-tiny-*`` open_clip configs in ``model_configs/``: the same timm classes as the real models (SigLIP's MAP-pooled
ViT, EVA-02's rotary SwiGLU ViT, PE-Core's RoPE ViT with attention pooling, MobileCLIP's FastViT), two blocks of width
64 on 32x32 (FastViT: 64x64) images. Tests and benchmarks only: never an accuracy."""

from __future__ import annotations

from functools import partial

from timm.layers import LayerNorm
from timm.models import register_model
from timm.models.eva import Eva
from timm.models.fastvit import FastVit, RepConditionalPosEnc
from timm.models.vision_transformer import VisionTransformer

_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _clean(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in _TIMM_ONLY}


@register_model
def xmx_tiny_vit_siglip(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """SigLIP's tower: no class token, multi-head attention pooling (``map``)."""
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, class_token=False, global_pool="map")
    return VisionTransformer(**{**args, **_clean(kwargs)})


@register_model
def xmx_tiny_eva02(pretrained: bool = False, **kwargs) -> Eva:
    """EVA-02 CLIP's tower: rotary position embedding, SwiGLU MLP, sub-LN, class-token pooling."""
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, qkv_fused=False, mlp_ratio=4 * 2 / 3,
                swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4),
                global_pool="token")
    return Eva(**{**args, **_clean(kwargs)})


@register_model
def xmx_tiny_pe_core(pretrained: bool = False, **kwargs) -> Eva:
    """PE-Core's tower: 2-D RoPE attention, pre-transformer norm, attention pooling."""
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0, global_pool="map",
                attn_type="rope", use_pre_transformer_norm=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4),
                rope_grid_offset=1.0, rope_grid_indexing="xy", attn_pool_num_heads=2, attn_pool_mlp_ratio=4.0,
                norm_layer=partial(LayerNorm, eps=1e-5))
    return Eva(**{**args, **_clean(kwargs)})


@register_model
def xmx_tiny_fastvit_mci(pretrained: bool = False, **kwargs) -> FastVit:
    """MobileCLIP's MCi tower (FastViT): RepMixer stages, an attention stage with conditional positional encoding."""
    args = dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64), mlp_ratios=(3, 3, 3, 3),
                se_downsamples=(False, False, True, True),
                pos_embs=(None, None, None, partial(RepConditionalPosEnc, spatial_shape=(7, 7))),
                token_mixers=("repmixer", "repmixer", "repmixer", "attention"), lkc_use_act=True)
    return FastVit(**{**args, **_clean(kwargs)})
