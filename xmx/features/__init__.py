"""The on-disk feature store (``store``) and image feature extraction through CLIP (``extract``).

Nothing loads until first use: ``FeatureStore`` imports torch/safetensors/filelock, the extraction helpers
open_clip and torchvision.
"""

_STORE = ("FeatureStore", "StoreEntry", "canonical_json", "key_digest", "tensors_checksum")
_EXTRACT = ("extract_image_features", "image_feature_key", "cached_image_features", "embed_image_folder",
            "list_image_folder", "PRESETS")

__all__ = [*_STORE, *_EXTRACT]


def __getattr__(name):  # everything loads on first use: `python -m xmx.features --help` needs no torch
    if name in _STORE:
        from xmx.features import store
        return getattr(store, name)
    if name in _EXTRACT:
        from xmx.features import extract
        return getattr(extract, name)
    raise AttributeError(f"module 'xmx.features' has no attribute {name!r}")
