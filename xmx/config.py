"""Where the Hydra configs live, and how objects are built from them.

A wheel carries them inside the package (``xmx/conf``); a source checkout (editable install, tests) has them in the
top-level ``conf/``. ``conf/sweep`` is a link to the top-level ``sweeps/`` folder, so sweeps form the ``sweep`` group.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from xmx.errors import XmxError

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

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, XmxError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


@contextlib.contextmanager
def config_context():
    """Hydra initialised on xmx's config folder for the block (several :func:`compose` calls share it)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    global _CONTEXTS
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            _CONTEXTS += 1
            try:
                yield
            finally:
                _CONTEXTS -= 1
    finally:
        GlobalHydra.instance().clear()


_CONTEXTS = 0  # open config_context blocks


def compose(overrides=()):
    """The config ``python -m xmx.run <overrides>`` composes (without Hydra's run folder: ``paths.output_dir`` is
    then set by the caller). The one composer of xmx: ``xmx.features``, ``xmx.tables`` and the tests use it. A Hydra
    composition error (unknown option, misspelt key) is the same one :class:`XmxError` line as on the command line.
    Inside :func:`config_context` it reuses that context."""
    from hydra import compose as hydra_compose
    try:
        if _CONTEXTS:
            return hydra_compose("config", overrides=list(overrides))
        with config_context():
            return hydra_compose("config", overrides=list(overrides))
    except Exception as e:  # noqa: BLE001
        line = hydra_error_line(e)
        if line is None:
            raise
        raise XmxError(line) from None


# ---- checks before any work ----------------------------------------------------------------------------------------
# Cheap checks of a composed config that need neither torch nor data: each failure is one XmxError line naming the
# key and how to fix it. ``xmx.preflight`` calls them first, in one order: bad input costs about a second.

def _select(cfg, key: str):
    from omegaconf import OmegaConf
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=True)
    except Exception as e:  # noqa: BLE001 - a broken interpolation is a config problem
        raise XmxError(f"{key}: cannot resolve its value ({str(e).splitlines()[0]})") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _whole(cfg, key: str, lo: int, allow_none: bool = False, also: tuple = (), hint: str = "") -> None:
    v = _select(cfg, key)
    if (v is None and allow_none) or v in also:
        return
    if not _is_int(v) or v < lo:
        what = "a whole number" if not _is_int(v) else f"at least {lo}"
        extra = f" or {', '.join(map(str, also))}" if also else ""
        raise XmxError(f"{key}={v!r}: must be {what}{extra}" + (f" ({hint})" if hint else "") + f"; set {key}=<n>")


def _learning_rates(node, prefix: str):
    """(key, value) of every learning rate under a config node: keys named ``lr`` or ending in ``_lr``."""
    from omegaconf import DictConfig
    if not isinstance(node, DictConfig):
        return
    for k in node.keys():
        full = f"{prefix}.{k}"
        try:
            v = node[k]
        except Exception:  # noqa: BLE001 - unresolvable values are checked where they are used
            continue
        if isinstance(v, DictConfig):
            yield from _learning_rates(v, full)
        elif str(k) == "lr" or str(k).endswith("_lr"):
            yield full, v


def check_writable_dir(key: str, path) -> Path:
    """``path`` (which may not exist yet) must end up a folder this process can write: the nearest existing part
    must be a folder, and a probe file must be creatable there. Creates nothing but the folder itself."""
    import errno
    import tempfile

    p = Path(str(path)).expanduser()
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise XmxError(f"{key}={path}: {existing} is a file, not a folder; point {key} at a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        why = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "read-only file system", errno.ENOSPC: "disk full"}.get(e.errno, e.strerror)
        raise XmxError(f"{key}={path}: cannot write there ({why}); point {key} at a writable folder") from None
    return p


def _wandb_has_key() -> bool:
    import netrc
    import os
    from urllib.parse import urlparse
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


DECODES = ("pil", "auto", "gpu", "tensor")  # data.decode / features.decode (xmx.features.online, xmx.features.extract)


def check_decode(value, key: str = "data.decode") -> str:
    if value not in DECODES:
        raise XmxError(f"{key}={value!r}; valid choices: {', '.join(DECODES)} (auto: gpu on a CUDA device, else pil)")
    return value


def check_config(cfg) -> None:
    """Numbers and switches that would otherwise fail late (or not at all): shots, seed, epochs, batch sizes, learning
    rates, workers, threads, the W&B login. Raises :class:`xmx.errors.XmxError`."""
    import os

    from omegaconf import DictConfig

    if "shots" in cfg:
        _whole(cfg, "shots", 1, hint="labelled images per class")
    if "seed" in cfg:
        _whole(cfg, "seed", 0, hint="an integer random seed")
    if "data" in cfg and "subset_seed" in cfg.data:
        _whole(cfg, "data.subset_seed", 0, allow_none=True)
    if "method" in cfg:
        _whole(cfg, "method.epochs", 1, allow_none=True, hint="training epochs")
        _whole(cfg, "method.batch_size", 1, allow_none=True)
        for key, v in _learning_rates(cfg.method, "method"):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise XmxError(f"{key}={v!r}: a learning rate is a number; set {key}=<lr>, e.g. 1e-3")
            if not v > 0:
                raise XmxError(f"{key}={v!r}: a learning rate must be positive; set {key}=<lr>, e.g. 1e-3")
    if "trainer" in cfg and cfg.get("train", True):
        _whole(cfg, "trainer.max_epochs", 1, allow_none=True, also=(-1,), hint="-1: no limit, with max_steps")
        if "max_steps" in cfg.trainer:
            _whole(cfg, "trainer.max_steps", 1, allow_none=True, also=(-1,))
    if "data" in cfg:
        for k in ("eval_batch_size",):
            if k in cfg.data:
                _whole(cfg, f"data.{k}", 1)
        if "num_workers" in cfg.data:
            _whole(cfg, "data.num_workers", 0)
        if "decode" in cfg.data:
            check_decode(_select(cfg, "data.decode"), "data.decode")
        if "source" in cfg.data and _select(cfg, "data.source") not in ("files", "hf"):
            raise XmxError(f"data.source={_select(cfg, 'data.source')!r}; valid choices: files, hf (files: data.root; "
                           "hf: the Hugging Face Hub repository data.hf.path at data.hf.revision)")
    if "features" in cfg:
        for k, lo in (("batch_size", 1), ("num_workers", 0)):
            if k in cfg.features:
                _whole(cfg, f"features.{k}", lo)
        if "decode" in cfg.features:
            check_decode(_select(cfg, "features.decode"), "features.decode")
    threads = _select(cfg, "threads") if "threads" in cfg else "auto"
    if threads != "auto" and (not _is_int(threads) or threads < 1):
        raise XmxError(f"threads={threads!r}: must be auto or a whole number >= 1 (intra-op CPU threads)")
    for name, lg in (cfg.get("logger") or {}).items():
        if not isinstance(lg, DictConfig) or not str(lg.get("_target_", "")).endswith("WandbLogger"):
            continue
        offline = bool(lg.get("offline")) or os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled",
                                                                                            "dryrun")
        if not offline and not _wandb_has_key():
            raise XmxError(f"logger.{name}: W&B has no API key here; log offline with WANDB_MODE=offline (or "
                           f"logger.{name}.offline=true, then `wandb sync`), or set WANDB_API_KEY / run `wandb login`")


def check_paths(cfg) -> None:
    """Every folder a run writes (output, cache, feature store) is a writable folder, before any work."""
    paths = cfg.get("paths") or {}
    keys = [("paths.output_dir", paths.get("output_dir") if "output_dir" in paths else None),
            ("paths.cache_dir", _select(cfg, "paths.cache_dir") if "cache_dir" in paths else None)]
    feats = cfg.get("features")
    if feats is not None and feats.get("enabled", True) and "root" in feats:
        keys.append(("features.root", _select(cfg, "features.root")))
    for key, value in keys:
        if value:
            check_writable_dir(key, value)


# ---- threads, config keys, devices --------------------------------------------------------------
def plan_run_threads(cfg) -> int:
    """Intra-op CPU threads for this run, from the cores it may use (affinity, cgroup quota) and its DataLoader
    workers (``data.num_workers``, ``features.num_workers``, capped so that workers x threads <= cores). Sets the
    OpenMP/BLAS variables before torch and numpy load."""
    from omegaconf import OmegaConf, open_dict

    from xmx.utils import plan_threads, set_thread_env, usable_cores
    keys = [k for k in ("data.num_workers", "features.num_workers") if OmegaConf.select(cfg, k) is not None]
    asked = {k: int(OmegaConf.select(cfg, k)) for k in keys}
    cores = usable_cores()
    threads, workers = plan_threads(cfg.get("threads", "auto"), max(asked.values(), default=0), cores)
    with open_dict(cfg):
        for k, n in asked.items():
            if n > workers:
                OmegaConf.update(cfg, k, workers)
    logging.getLogger("xmx").info("cpu: %d usable cores -> %d intra-op threads, at most %d DataLoader workers",
                                  cores, threads, workers)
    set_thread_env(threads)
    return threads


_CALL_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


def _accepted_keys(target: str) -> set[str] | None:
    """The keyword arguments a ``_target_`` accepts (following ``**kwargs`` up the class hierarchy), or None when
    it takes any."""
    import inspect

    from hydra._internal.utils import _locate
    try:
        obj = _locate(target)
    except Exception:  # noqa: BLE001 - Hydra reports a missing target itself
        return None
    classes = obj.__mro__ if inspect.isclass(obj) else (obj,)
    names: set[str] = set()
    for c in classes:
        fn = c.__init__ if inspect.isclass(obj) else c
        if inspect.isclass(obj) and "__init__" not in vars(c):
            continue
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return None
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
        if c is object or not inspect.isclass(obj):
            return None
    return None


def check_targets(cfg) -> None:
    """Every key of every ``_target_`` node (method, data, backbone, trainer, optimiser, ...) is one its class
    accepts: ``+method.<typo>=...`` is an error naming the valid keys, not a TypeError after the data is loaded."""
    from omegaconf import DictConfig

    def walk(node, prefix: str):
        if isinstance(node, DictConfig):
            target = node.get("_target_") if "_target_" in node else None
            if isinstance(target, str):
                ok = _accepted_keys(target)
                extra = sorted(str(k) for k in node.keys() if str(k) not in _CALL_KEYS and ok is not None
                               and str(k) not in ok)
                if extra:
                    k = f"{prefix}.{extra[0]}" if prefix else extra[0]
                    raise XmxError(f"{k}: not a setting of {target}; its settings: "
                                   f"{', '.join(sorted(ok)) or 'none'} (fix the spelling, or drop the override)")
            for k in node.keys():
                if not str(k).startswith("_") or str(k) not in _CALL_KEYS:
                    try:
                        child = node._get_node(k)
                    except Exception:  # noqa: BLE001
                        continue
                    if isinstance(child, DictConfig):
                        walk(child, f"{prefix}.{k}" if prefix else str(k))
    for top in cfg.keys():
        if str(top) != "hydra":
            child = cfg._get_node(top)
            if isinstance(child, DictConfig):
                walk(child, str(top))


def check_devices(cfg) -> None:
    """A GPU asked for on a machine without one is one line, not Lightning's MisconfigurationException."""
    import torch
    from omegaconf import OmegaConf

    wants = [k for k in ("trainer.accelerator", "features.device")
             if str(OmegaConf.select(cfg, k, default="") or "").split(":")[0] in ("gpu", "cuda")]
    if wants and not torch.cuda.is_available():
        fix = ("trainer=default (accelerator auto) or trainer=cpu" if wants[0].startswith("trainer")
               else "features.device=auto")
        raise XmxError(f"{wants[0]}={OmegaConf.select(cfg, wants[0])} but this machine has no CUDA GPU; use {fix}")


def hydra_error_line(e: BaseException, before_task: bool = True) -> str | None:
    """One line for an error Hydra raises while reading the command line or composing the config (unknown
    experiment, misspelt key, bad override syntax), or while creating the run folder; None for anything else."""
    import re

    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in str(e.missing_cfg_file):
        group, _, name = str(e.missing_cfg_file).rpartition("/")
        return (f"unknown {group} {name!r} ({group}={name}); valid choices: "
                f"{', '.join(sorted(e.options or [])) or 'none'}")
    if isinstance(e, OSError) and not isinstance(e, HydraException) and e.filename and before_task:
        return (f"cannot create the run folder {e.filename} ({e.strerror}); set paths.log_dir (or XMX_LOG_DIR) "
                "to a writable folder")
    if not isinstance(e, (HydraException, OmegaConfBaseException)):
        return None
    text = str(e)
    m = re.match(r"Could not override '([^']+)'", text)
    cause = e.__cause__
    if m and isinstance(cause, OmegaConfBaseException):
        key, parent = m.group(1), getattr(cause, "parent_node", None)
        keys = sorted(str(k) for k in parent.keys() if not str(k).startswith("_")) \
            if isinstance(parent, DictConfig) else []
        where = key.rpartition(".")[0] or "the config"
        return (f"{key}: no such key in {where}" + (f"; its keys: {', '.join(keys)}" if keys else "")
                + " (check the spelling; `python -m xmx.run --cfg job` prints the whole config)")
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    if isinstance(cause, OmegaConfBaseException):
        lines += [l.strip() for l in str(cause).splitlines()[:1] if l.strip()]
    return " ".join(lines).replace("\t", " ") if lines else type(e).__name__
