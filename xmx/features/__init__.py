"""The on-disk feature store (``store``) and image feature extraction through CLIP (``extract``).

``FeatureStore`` imports only torch/safetensors/filelock; the extraction helpers (which pull in open_clip and
torchvision) load on first use.
"""

from xmx.features.store import FeatureStore, StoreEntry, canonical_json, key_digest, tensors_checksum

_EXTRACT = ("extract_image_features", "image_feature_key", "cached_image_features", "embed_image_folder",
            "list_image_folder", "PRESETS")

__all__ = ["FeatureStore", "StoreEntry", "canonical_json", "key_digest", "tensors_checksum", *_EXTRACT]


def __getattr__(name):
    if name in _EXTRACT:
        from xmx.features import extract
        return getattr(extract, name)
    raise AttributeError(f"module 'xmx.features' has no attribute {name!r}")
