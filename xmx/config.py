"""Where the Hydra configs live.

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
