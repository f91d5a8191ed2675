"""xmx: cross-modal adapters for CLIP and language models on Hydra + Lightning."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("xmx")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

from xmx.errors import XmxError  # noqa: E402

__all__ = ["XmxError", "__version__"]
