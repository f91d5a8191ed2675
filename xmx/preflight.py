"""``preflight(cfg)``: every check of a composed config before any work, in one order (docs/errors.md lists each case).

Used by ``xmx.run`` (before a job is identified), ``python -m xmx.features`` (before an encoder is built) and
``xmx.tables`` (``plan_only``: each job's config before anything is launched). Each failure is one
:class:`~xmx.errors.XmxError` line naming the key and how to fix it.

The order, cheapest first: the config's numbers and switches (no torch: ``check_config``), the folders a run writes,
the selection and resume modes, the thread plan (OpenMP/BLAS variables set before torch loads), the dataset's
folder; then torch loads and the checks that need classes or devices run: every ``_target_`` key, the devices, the
method's selection modes, ``init_from``'s checkpoint,
the declared domains of every value (``xmx.validate``) and the method's own constructor checks.

Why a module of its own and not a function in ``config.py``: two checks read rooms above the core (the dataset
registry in ``xmx.data``, the checkpoint reader in ``xmx.methods.base``); the core imports nothing above it. The
check functions themselves stay where they were (``config.py``, ``jobs.py``, ``results.py``): this file only fixes
their order.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from xmx.config import (check_config, check_devices, check_method, check_paths, check_targets,
                        plan_run_threads)
from xmx.errors import XmxError
from xmx.jobs import check_resume
from xmx.results import check_selection_mode
from xmx.validate import check_values


def check_dataset(cfg: DictConfig) -> None:
    """An image dataset's name and its ``$DATA`` folder, before torch loads (the readers need only numpy/PIL)."""
    target = str(OmegaConf.select(cfg, "data._target_", default="") or "")
    name = OmegaConf.select(cfg, "data.name", default=None)
    if not target.endswith("CLIPDataModule") or not isinstance(name, str):
        return
    from xmx.data.datasets import get_info
    info = get_info(name)
    root = Path(str(OmegaConf.select(cfg, "data.root"))).expanduser()
    if root.exists() and not root.is_dir():
        raise XmxError(f"data root {root} is a file, not a folder; point paths.data_dir (or $DATA) at the folder that "
                       f"holds the datasets in CoOp layout, e.g. {root.parent}/data with {info.dir}/ inside")
    if not root.is_dir() and not info.extra.get("generated"):
        raise XmxError(f"data root {root} does not exist; point paths.data_dir (or $DATA) at the folder that holds "
                       f"the datasets in CoOp layout, e.g. {root}/{info.dir}/")


def check_method_selection(cfg: DictConfig) -> None:
    """A method declares the selection modes it implements (``selection_modes``); refuse the others before any
    work (``paper`` only where a method reproduces its release's selection on the test set)."""
    selection = cfg.get("selection", "val")
    target = cfg.method.get("_target_") if cfg.get("method") is not None else None
    if selection == "val" or not target:
        return
    from hydra.utils import get_class
    try:
        modes = getattr(get_class(target), "selection_modes", ("val",))
    except Exception:  # noqa: BLE001 - a bad target is reported where the method is built
        return
    if selection not in modes:
        raise XmxError(f"selection={selection}: method {cfg.method.get('name')} implements no test-set selection of "
                       "its authors' code (it selects on validation); use selection=val")


def check_init_from(cfg: DictConfig) -> None:
    if cfg.get("init_from"):
        from xmx.methods.base import backbone_identity, check_checkpoint
        target = OmegaConf.select(cfg, "method._target_")
        hook = None
        if target:
            from hydra.utils import get_class
            try:
                hook = getattr(get_class(target), "check_init_from", None)  # a method composing on another (TDA)
            except Exception:  # noqa: BLE001 - a bad target is reported where the method is built
                hook = None
        if hook is not None:
            hook(cfg.init_from, cfg)
        else:
            check_checkpoint(cfg.init_from, target, backbone_identity(cfg.backbone))


def _hub_wanted(cfg: DictConfig) -> bool:
    """Whether the run may download from the Hugging Face Hub: a backbone tag (not a local file, not random init),
    an ``hf-hub:`` model, or a language model named by its hub id (not a local folder, not ``tiny``)."""
    weights = OmegaConf.select(cfg, "backbone.weights", default=None)
    if isinstance(weights, str) and weights and not Path(weights).expanduser().exists():
        return True
    plm = OmegaConf.select(cfg, "plm.name_or_path", default=None)
    return isinstance(plm, str) and plm not in ("tiny", "") and not Path(plm).expanduser().exists()


def hub_reachable(timeout: float = 3.0) -> bool:
    """One short probe (a TCP connection to the hub's host, name lookup included, in at most ``timeout`` s)."""
    import os
    import socket
    import threading
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    ok: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok and ok[0])


def check_hub(cfg: DictConfig) -> None:
    """Offline without ``HF_HUB_OFFLINE``: one short probe before any download is tried; when the hub is unreachable
    the run works offline (cached weights only; a missing one is then one line) instead of minutes of retries."""
    import logging
    import os
    if os.environ.get("HF_HUB_OFFLINE") or not _hub_wanted(cfg) or hub_reachable():
        return
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    logging.getLogger("xmx").warning("the Hugging Face Hub is unreachable: working offline (cached weights only; set "
                                     "HF_HUB_OFFLINE=1 to skip this check)")


def check_resume_schedule(cfg: DictConfig) -> None:
    """``callbacks.resume.every_minutes``: a positive number of minutes, or null (epoch ends only)."""
    every = OmegaConf.select(cfg, "callbacks.resume.every_minutes", default=None)
    if every is None:
        return
    import math
    if isinstance(every, bool) or not isinstance(every, (int, float)) or not math.isfinite(every) or every <= 0:
        raise XmxError(f"callbacks.resume.every_minutes={every!r}: must be a positive number of minutes (or null: "
                       "save the resume point at epoch ends only)")


def preflight(cfg: DictConfig, plan_only: bool = False) -> int | None:
    """Every check before work, in one order; returns the intra-op thread count it set (None with ``plan_only``).

    ``plan_only``: the checks that hold for a config wherever it will run (no folders, threads, data or devices of
    this machine): what ``xmx.tables`` asks of every job before it launches any."""
    check_config(cfg)  # numbers, switches, W&B login: before torch is even imported
    if not plan_only:
        check_paths(cfg)
    check_selection_mode(cfg.get("selection", "val"))
    check_resume(cfg)
    check_resume_schedule(cfg)
    if plan_only:
        check_targets(cfg)
        check_values(cfg)
        check_method_selection(cfg)
        return None
    threads = plan_run_threads(cfg)  # sets OMP_NUM_THREADS & co. before torch and numpy load
    check_dataset(cfg)
    check_hub(cfg)  # before huggingface_hub is imported (it reads HF_HUB_OFFLINE once)
    from xmx.utils import apply_threads
    apply_threads(threads)  # torch loads here
    check_targets(cfg)
    check_values(cfg)  # every declared domain (booleans, choices, ranges), before data or models
    check_devices(cfg)
    check_method_selection(cfg)
    check_init_from(cfg)
    check_method(cfg)  # the method's constructor checks too: every method key before the data or a model
    return threads
