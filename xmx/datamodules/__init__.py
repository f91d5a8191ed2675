"""DataModules: the room that composes the data layer (readers, protocols, transforms) with the feature store.

``clip.py``: :class:`CLIPDataModule` (few-shot / base-to-new / domain shift / cross-dataset batches of images or
cached features). ``text.py``: the language-track DataModules (COCO captions, WikiText-103, object colour, GLUE).
"""

from xmx.datamodules.clip import CLIPDataModule

__all__ = ["CLIPDataModule"]
