"""Where the Hydra configs live, and how objects are built from them.

A wheel carries them inside the package (``xmx/conf``); a source checkout (editable install, tests) has them in the
top-level ``conf/``. ``conf/sweep`` is a link to the top-level ``sweeps/`` folder, so sweeps form the ``sweep`` group.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def config_dir() -> Path:
    for candidate in (_PKG / "conf", _PKG.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"xmx: no Hydra configs found next to {_PKG} (looked for xmx/conf/config.yaml and ../conf/config.yaml); "
        "reinstall xmx with `pip install .` from a full checkout"
    )


def build(node, **kwargs):
    """``hydra.utils.instantiate`` that lets an XmxError through as itself (Hydra wraps it otherwise), so the user
    sees its one line."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from xmx.errors import XmxError
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, XmxError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
