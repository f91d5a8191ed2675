"""``python -m xmx.run``: compose the config, build backbone + datamodule + method, fit, test, write results.

With no arguments it runs ``experiment=demo`` (a synthetic CPU demo). ``results.json`` is written last and atomically:
its presence means the run finished. Schema: README "results.json".

Jobs (docs/sweeps.md): a run's identity ``job_id`` is a hash of its resolved config without what cannot change the
numbers (paths, loggers, progress bars, devices, worker counts, ``hydra``, ``notice``), plus the fingerprint of the
bytes of the images it reads (``xmx.data.fingerprint``; then ``data.root`` itself is left out). An index
``${paths.log_dir}/.index/<job_id>.json`` points at the folder of the job's latest attempt; with ``skip_done`` a job
whose attempt has a complete ``results.json`` is not recomputed, and with ``resume: auto`` an attempt that left
``checkpoints/last.ckpt`` but no results is continued in its own folder. In a multirun a failing job is recorded
(``xmx_job.json`` in its Hydra folder) and the others go on; :class:`SweepSummary` counts them at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from xmx.config import (build, check_config, check_devices, check_paths, check_targets, config_dir,
                        hydra_error_line, plan_run_threads)
from xmx.errors import XmxError
from xmx.utils import apply_threads, atomic_write_bytes, atomic_write_text, code_version, package_versions

# torch and Lightning load inside the run (first use), after the config is checked and the thread count is set:
# ``--help``, ``--cfg`` and config errors answer in about a second, and OpenMP/BLAS pools start with the right size.

log = logging.getLogger("xmx")
SCHEMA = "xmx.results/1"
SELECTION_MODES = ("val", "paper")  # results.json "selection"; a report never averages the two


def _output_dir(cfg: DictConfig) -> Path:
    out = cfg.paths.get("output_dir") if "paths" in cfg else None
    if out is None:
        out = HydraConfig.get().runtime.output_dir
    path = Path(str(out))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _instantiate_all(node) -> list:
    """A config group holding several ``_target_`` entries (loggers, callbacks) -> list of objects."""
    if not node:
        return []
    return [build(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def _cost(t0: float) -> dict:
    import torch
    if torch.cuda.is_available():
        device, peak = torch.cuda.get_device_name(), torch.cuda.max_memory_allocated() / 2**20
    else:
        device, peak = f"cpu ({platform.processor() or platform.machine()})", \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"wall_time_s": round(time.time() - t0, 3), "device": device, "peak_memory_mb": round(peak, 1)}


def check_dataset(cfg: DictConfig) -> None:
    """An image dataset's name and its ``$DATA`` folder, before torch loads (the readers need only numpy/PIL)."""
    target = str(OmegaConf.select(cfg, "data._target_", default="") or "")
    name = OmegaConf.select(cfg, "data.name", default=None)
    if not target.endswith("CLIPDataModule") or not isinstance(name, str):
        return
    from xmx.data.datasets import get_info
    info = get_info(name)
    root = Path(str(OmegaConf.select(cfg, "data.root"))).expanduser()
    if not root.is_dir() and not info.extra.get("generated"):
        raise XmxError(f"data root {root} does not exist; point paths.data_dir (or $DATA) at the folder that holds "
                       f"the datasets in CoOp layout, e.g. {root}/{info.dir}/")


# ---- job identity ----------------------------------------------------------------------------------------------
# Left out of a job's identity: where things are written and how fast/visibly they run, never what is computed.
_VOLATILE_TOP = ("paths", "hydra", "logger", "notice", "skip_done", "resume", "optimized_metric", "threads")
_VOLATILE_KEYS = {"num_workers", "device", "devices", "accelerator", "strategy", "num_nodes", "default_root_dir",
                  "enable_progress_bar", "enable_model_summary", "log_every_n_steps"}
_VOLATILE_CALLBACK = re.compile(r"(ProgressBar|ModelSummary|LearningRateMonitor|DeviceStatsMonitor|RNGState|ResumeCheckpoint)$")


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in _VOLATILE_KEYS}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def job_identity(cfg: DictConfig) -> dict:
    """The resolved config minus what cannot change the numbers. ``paths.*`` become placeholders before resolving,
    so keys that interpolate them (``data.root``, checkpoint folders) do not depend on where the job runs."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    paths = raw.get("paths") or {}
    raw["paths"] = {k: f"<paths.{k}>" for k in paths}
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except Exception as e:  # noqa: BLE001 - any resolver failure is a config problem
        raise XmxError(f"cannot resolve the config to identify the job: {str(e).splitlines()[0]}") from None
    for k in _VOLATILE_TOP:
        resolved.pop(k, None)
    cbs = resolved.get("callbacks") or {}
    resolved["callbacks"] = {k: v for k, v in cbs.items()
                             if not (isinstance(v, dict) and _VOLATILE_CALLBACK.search(str(v.get("_target_", ""))))}
    return _strip(resolved)


def job_id(cfg: DictConfig, data: dict | None = None) -> str:
    """16 hex digits of sha256 over the canonical JSON of :func:`job_identity` and, when given, the fingerprint of
    the image files the job reads (``data["digest"]``, :mod:`xmx.data.fingerprint`): a run on other bytes (another
    ``$DATA`` copy with one image changed) is another job, never "already complete"."""
    ident = job_identity(cfg)
    if data is not None:  # the bytes decide, not where they are: the same files under another root are the same job
        ident["data_content"] = data["digest"]
        if isinstance(ident.get("data"), dict):
            ident["data"].pop("root", None)
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _early_datamodule(cfg: DictConfig):
    """(datamodule without encoders, fingerprint of its images) when the data module can fingerprint its files
    before any encoder is built (``data_fingerprint``), else (None, None)."""
    target = OmegaConf.select(cfg, "data._target_")
    try:
        cls = hydra.utils.get_class(str(target)) if target else None
    except Exception:  # noqa: BLE001 - an unknown target fails later, with Hydra's own message
        return None, None
    if cls is None or not hasattr(cls, "data_fingerprint"):
        return None, None
    dm = build(cfg.data, backbone=None, _convert_="all")
    return dm, dm.data_fingerprint()


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


class JobIndex:
    """``<log_dir>/.index/<job_id>.json`` -> {"status": running|complete|failed, "output_dir", ...}, written
    atomically (the status is for people and tools; planning reads only the output folder and its files).

    It covers the runs whose output folder lies under ``paths.log_dir`` (every Hydra run and multirun folder by
    default); a run written to an explicit folder elsewhere is not indexed (only its own folder is checked)."""

    def __init__(self, log_dir: Path):
        self.root = log_dir / ".index"

    @classmethod
    def for_run(cls, cfg: DictConfig, out: Path) -> "JobIndex | None":
        log_dir = cfg.paths.get("log_dir") if "paths" in cfg else None
        if log_dir is None:
            return None
        log_dir = Path(str(log_dir)).expanduser().resolve()
        return cls(log_dir) if out.resolve().is_relative_to(log_dir) else None

    def read(self, jid: str) -> dict | None:
        try:
            return json.loads((self.root / f"{jid}.json").read_text())
        except (OSError, ValueError):
            return None

    def write(self, jid: str, status: str, out: Path, error: str | None = None) -> None:
        entry = {"job_id": jid, "status": status, "output_dir": str(out.resolve()),
                 "results": str((out / "results.json").resolve()) if status == "complete" else None,
                 **({"error": error} if error else {}),
                 "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(), "pid": os.getpid()}
        atomic_write_text(self.root / f"{jid}.json", json.dumps(entry, indent=1))


def _complete_results(folder, jid: str) -> dict | None:
    """The results in ``folder`` when they are complete and belong to job ``jid``."""
    if not folder:
        return None
    try:
        res = json.loads((Path(folder) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return res if res.get("status") == "complete" and res.get("job_id") == jid else None


def _readable_checkpoint(path: Path) -> bool:
    """A SIGKILL during a save can leave a truncated file: such a last.ckpt is not resumed from."""
    import torch
    try:
        torch.load(path, map_location="cpu", weights_only=False)
        return True
    except Exception as e:  # noqa: BLE001
        log.warning("resume: %s is unreadable (%s); starting afresh", path, type(e).__name__)
        return False


def __getattr__(name):
    if name == "RNGState":  # configs written before it moved (``_target_: xmx.run.RNGState``)
        from xmx.methods.base import RNGState
        return RNGState
    raise AttributeError(f"module 'xmx.run' has no attribute {name!r}")


# ---- the run ---------------------------------------------------------------------------------------------------
def run(cfg: DictConfig) -> dict:
    """One experiment; returns the results dict that was written to ``results.json`` (or, for a job that was
    already complete, the one found on disk)."""
    return _run(cfg)[0]


def _resume_mode(cfg: DictConfig):
    resume = cfg.get("resume", "auto")
    if resume not in ("auto", "never", None, False):
        raise XmxError(f"resume={resume!r}; valid choices: auto, never")
    return resume


def _plan(cfg: DictConfig, out: Path, jid: str) -> tuple[str, Path, dict | None, Path | None]:
    """-> (outcome, output folder, results of a complete job, checkpoint to resume from)."""
    skip_done, resume = bool(cfg.get("skip_done", True)), _resume_mode(cfg)
    index = JobIndex.for_run(cfg, out)
    prev = index.read(jid) if index else None
    candidates = [out] + ([Path(prev["output_dir"])] if prev and prev.get("output_dir") else [])
    if skip_done:
        for folder in candidates:
            done = _complete_results(folder, jid)
            if done is not None:
                return "skipped", folder, done, None
    if resume == "auto":
        for folder in candidates:
            last = folder / "checkpoints" / "last.ckpt"
            if last.is_file() and _complete_results(folder, jid) is None and _readable_checkpoint(last):
                return "resumed", folder, None, last
    return "done", out, None, None


def _check_selection(cfg: DictConfig, selection: str) -> None:
    """A method declares the selection modes it implements (``selection_modes``); refuse the others before any
    work (``paper`` only where a method reproduces its release's selection on the test set)."""
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


_JOB: dict = {}  # the job this process runs: "id" once its data is fingerprinted, "indexed" once it is in the index


def _run(cfg: DictConfig) -> tuple[dict, str]:
    """-> (results, outcome) with outcome one of done | resumed | skipped. A job that fails after it was indexed as
    running is indexed as failed (its checkpoints stay: the next attempt resumes from them)."""
    _JOB.clear()
    try:
        return _run_job(cfg)
    except Exception as e:
        if "indexed" in _JOB:
            index, jid, out = _JOB["indexed"]
            index.write(jid, "failed", out, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        raise


def _run_job(cfg: DictConfig) -> tuple[dict, str]:
    t0 = time.time()
    check_config(cfg)  # numbers, switches, W&B login, writable folders: before torch is even imported
    check_paths(cfg)
    selection = cfg.get("selection", "val")
    if selection not in SELECTION_MODES:
        raise XmxError(f"selection={selection!r}; valid choices: {', '.join(SELECTION_MODES)} (val: nothing chosen "
                       "on test; paper: the authors' code where it selects on test)")
    threads = plan_run_threads(cfg)
    check_dataset(cfg)
    import lightning as L
    import torch
    from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
    apply_threads(threads)
    check_targets(cfg)
    check_devices(cfg)
    _check_selection(cfg, selection)
    if cfg.get("init_from"):
        from xmx.methods.base import check_checkpoint
        check_checkpoint(cfg.init_from, OmegaConf.select(cfg, "method._target_"))
    out = _output_dir(cfg)
    _resume_mode(cfg)  # refused before the data is listed and fingerprinted
    datamodule, data_fp = _early_datamodule(cfg)  # lists + one stat per image (content hashes cached)
    jid = job_id(cfg, data_fp)
    _JOB["id"] = jid  # a job that fails from here on is recorded under its real identity (config + data)
    outcome, folder, done, ckpt = _plan(cfg, out, jid)
    if outcome == "skipped":
        log.info("skip: job %s is already complete: %s", jid, folder / "results.json")
        return done, outcome
    if folder != out:
        with open_dict(cfg):
            cfg.paths.output_dir = str(folder)
        out = folder
    if outcome == "resumed":
        log.info("resume: job %s continues from %s", jid, ckpt)
    index = JobIndex.for_run(cfg, out)
    if index and _is_rank_zero():
        index.write(jid, "running", out)
        _JOB["indexed"] = (index, jid, out)
    if cfg.get("notice"):
        log.warning(cfg.notice)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    encoders = {"backbone": build(cfg.backbone)}
    if cfg.get("plm") is not None:
        encoders["plm"] = build(cfg.plm)
    if datamodule is None:
        datamodule = build(cfg.data, **encoders, _convert_="all")
    else:
        datamodule.backbone, datamodule.plm = encoders["backbone"], encoders.get("plm")
    method = build(cfg.method, _convert_="partial")  # before any extraction: a bad method config costs nothing
    method.init_from = cfg.get("init_from")
    # Set the data up now (feature extraction on a cold cache draws from the global RNG: loader seeds) and put the
    # RNG back, so that training sees the same random numbers whether the features were cached or not.
    devices = cfg.trainer.get("devices") if "trainer" in cfg else None
    if torch.cuda.is_available() and OmegaConf.is_list(devices) and len(devices) == 1:
        torch.cuda.set_device(int(devices[0]))  # one GPU chosen for this job (trainer=gpu_slot): features too
    rng = _collect_rng_states(include_cuda=torch.cuda.is_available())
    datamodule.setup("fit")
    _set_rng_states(rng)
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = build(cfg.trainer, logger=loggers or False, callbacks=_instantiate_all(cfg.get("callbacks")))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for lg in loggers:
        lg.log_hyperparams(resolved)

    if cfg.get("train", True) and method.needs_fit:
        trainer.fit(method, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    metrics: dict = {}
    ckpt_cb = trainer.checkpoint_callback
    best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb else ""
    score = _best_score(ckpt_cb, best)
    if score is not None:
        metrics[ckpt_cb.monitor] = score  # the best validation score, under the monitored metric's name
    if cfg.get("test", True):
        for d in trainer.test(method, datamodule=datamodule, ckpt_path=best or None, verbose=False):
            metrics.update({k: float(v) for k, v in d.items()})
        metrics.update(datamodule.summarize(metrics))

    results = {
        "schema": SCHEMA, "status": "complete", "job_id": jid, "resumed": outcome == "resumed",
        "experiment": cfg.get("task_name"), "method": cfg.method.get("name"), "dataset": datamodule.name,
        "protocol": datamodule.protocol.name, "shots": datamodule.shots, "seed": int(cfg.seed),
        "selection": selection,
        "metrics": metrics, "extra": method.extra_results(),
        "parameters": method.parameter_counts(*encoders.values()),
        "data": {**datamodule.data_record(), "subset_file": "subset.json"},
        "weights": encoders["backbone"].describe(),
        "code": code_version(), "packages": package_versions(),
        "cost": _cost(t0),
        "trainer": {"world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
                    "precision": str(trainer.precision)},
        "predictions": "predictions.safetensors" if method.predictions else None,
        "init_from": getattr(method, "init_record", None),
        "checkpoint": _checkpoint_record(best, out),
        "config": resolved,
    }
    if "plm" in encoders and hasattr(encoders["plm"], "describe"):
        results["weights_plm"] = encoders["plm"].describe()
    if not trainer.is_global_zero:  # DDP: rank 0 writes
        return results, outcome
    atomic_write_text(out / "subset.json", json.dumps(datamodule.subset_record()))
    if method.predictions:
        tensors = {f"{name}/{k}": v.contiguous() for name, p in method.predictions.items() for k, v in p.items()}
        atomic_write_bytes(out / "predictions.safetensors", _safetensors_bytes(tensors))
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    if index:
        index.write(jid, "complete", out)
    _finish_loggers(loggers, results)
    _print_summary(results, out)
    return results, outcome


def _checkpoint_record(best: str, out: Path) -> str | None:
    """The checkpoint whose weights were tested: best.ckpt, else (no selection) the last epoch's resume point."""
    if not best:
        last = out / "checkpoints" / "last.ckpt"
        best = str(last) if last.is_file() else ""
    return str(Path(best).relative_to(out)) if best and Path(best).is_relative_to(out) else best or None


def _best_score(ckpt_cb, best: str) -> float | None:
    """The monitored best score; under ddp_spawn the main process only gets the best path back, so the score is read
    from the ModelCheckpoint state saved in that checkpoint."""
    if ckpt_cb is None:
        return None
    import torch
    if getattr(ckpt_cb, "best_model_score", None) is not None:
        return float(ckpt_cb.best_model_score)
    if best and Path(best).is_file():
        states = torch.load(best, map_location="cpu", weights_only=False).get("callbacks", {})
        for key, st in states.items():
            if key.startswith("ModelCheckpoint") and st.get("best_model_score") is not None:
                return float(st["best_model_score"])
    return None


def _finish_loggers(loggers: list, results: dict) -> None:
    """Final numbers into every logger; W&B also gets them as run summary and a one-row results table, and its run
    is finished so that the next job of a multirun is a run of its own."""
    row = {"job_id": results["job_id"], "experiment": results["experiment"], "method": results["method"],
           "dataset": results["dataset"], "shots": results["shots"], "seed": results["seed"], **results["metrics"]}
    for lg in loggers:
        if hasattr(lg, "log_table"):  # WandbLogger
            exp = lg.experiment
            exp.summary.update({**results["metrics"], "job_id": results["job_id"]})
            lg.log_table(key="results", columns=list(row), data=[list(row.values())])
            exp.finish()
        lg.finalize("success")


def _finish_wandb_on_error() -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1)


def _safetensors_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save
    return save(tensors)


def _print_summary(results: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"{results['experiment']} · {results['method']} · {results['dataset']} · "
                        f"{results['shots']} shots · seed {results['seed']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in results["metrics"].items():
        table.add_row(k, f"{v:.2f}")
    console = Console(stderr=False)
    console.print(table)
    if results["weights"].get("random_init") or results["dataset"] == "synthetic" or \
            (results.get("data") or {}).get("synthetic"):  # the generated set or a `xmx.data fake` tree
        console.print("[yellow]note: random-init weights and/or synthetic data — these numbers test the pipeline; "
                      "they are not CLIP accuracies[/yellow]")
    if results.get("selection") == "paper":
        console.print("[yellow]selection: paper — chosen on the test set as the authors' code does (marked † in "
                      "reports; never averaged with selection=val)[/yellow]")
    console.print(f"results: {out / 'results.json'}")


def _optimized(cfg: DictConfig, results: dict):
    """The value a hyper-parameter sweeper optimises (``optimized_metric``, e.g. ``val/acc``), or None."""
    key = cfg.get("optimized_metric")
    if not key:
        return None
    if key not in results.get("metrics", {}):
        raise XmxError(f"optimized_metric={key!r} is not among this run's metrics: "
                       f"{', '.join(sorted(results.get('metrics', {}))) or 'none'}")
    return float(results["metrics"][key])


def _write_job_status(status: str, cfg: DictConfig, jid: str | None, results: dict | None = None,
                      error: str | None = None, job_id_of: str = "config+data") -> None:
    """``xmx_job.json`` in the Hydra folder of this attempt: what :class:`SweepSummary` counts."""
    try:
        hc = HydraConfig.get()
    except ValueError:
        return
    folder = Path(hc.runtime.output_dir)
    where = (cfg.paths.get("output_dir") if "paths" in cfg else None) or str(folder)
    atomic_write_text(folder / "xmx_job.json", json.dumps({
        "job_id": jid, "job_id_of": job_id_of, "status": status, "error": error, "overrides": list(hc.overrides.task),
        "output_dir": str(where), "metrics": (results or {}).get("metrics")}, indent=1))


def _log_to_files(msg: str) -> None:
    rec = log.makeRecord(log.name, logging.ERROR, __file__, 0, msg, (), None)
    for h in logging.getLogger().handlers + log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(rec)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _hydra_main(cfg: DictConfig):
    global _TASK_STARTED
    _TASK_STARTED = True
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    jid = None
    _JOB.clear()  # _run clears it too; a failure in job_id below must not see a former job's
    try:
        jid = job_id(cfg)  # config only: what a job that fails before its data is fingerprinted is recorded under
        results, outcome = _run(cfg)
        value = _optimized(cfg, results)
    except Exception as e:  # noqa: BLE001
        _finish_wandb_on_error()
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, XmxError):
            _log_to_files(f"error: {e}")  # the run's log file; the terminal gets the line once, below
            print(f"error: {e}", file=sys.stderr)
        jid = _JOB.get("id", jid)
        if not isinstance(e, XmxError) and multirun:
            log.exception("job %s failed: %s: %s", jid, type(e).__name__, line)
        if not multirun:
            if isinstance(e, XmxError):
                raise SystemExit(2) from None
            raise
        if _is_rank_zero():
            _write_job_status("failed", cfg, jid, error=f"{type(e).__name__}: {line}",
                              job_id_of="config+data" if "id" in _JOB else "config (failed before the data was read)")
        return float("nan") if cfg.get("optimized_metric") else None  # a sweeper records the trial as failed
    if _is_rank_zero():
        _write_job_status(outcome, cfg, results.get("job_id", jid), results)
    return value


class SweepSummary(HydraCallback):
    """Registered in ``conf/hydra/default.yaml``. Before a multirun: creates the folder of an sqlite Optuna storage.
    After it: one line ``sweep: N jobs - done D (resumed R), skipped S, failed F`` (+ the failed jobs), read from the
    ``xmx_job.json`` of every job folder (so it works for launchers that run jobs elsewhere); exits with status 1
    when a job failed."""

    def __init__(self, fail_exit_code: int = 1):
        self.fail_exit_code = fail_exit_code
        self._t0 = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._t0 = time.time() - 1.0
        storage = OmegaConf.select(config, "hydra.sweeper.storage", default=None)
        if isinstance(storage, str) and storage.startswith("sqlite:///"):
            Path(storage[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        counts = {"done": 0, "resumed": 0, "skipped": 0, "failed": 0}
        failed, unfinished = [], 0
        for job_cfg in sorted(sweep_dir.rglob(".hydra/config.yaml")):
            folder = job_cfg.parent.parent
            if job_cfg.stat().st_mtime < self._t0:
                continue  # a job of an earlier multirun into the same folder
            try:
                st = json.loads((folder / "xmx_job.json").read_text())
            except (OSError, ValueError):
                unfinished += 1
                continue
            counts[st["status"]] = counts.get(st["status"], 0) + 1
            if st["status"] == "failed":
                failed.append(f"{folder.name}: {' '.join(st.get('overrides') or [])} -> {st.get('error')}")
        total = sum(counts.values()) + unfinished
        line = (f"sweep: {total} jobs - done {counts['done'] + counts['resumed']} (resumed {counts['resumed']}), "
                f"skipped {counts['skipped']}, failed {counts['failed']}"
                + (f", unfinished {unfinished}" if unfinished else "") + f" ({sweep_dir})")
        log.info(line)
        print(line)
        for f in failed:
            print(f"  failed {f}")
        if counts["failed"] and self.fail_exit_code:
            raise SystemExit(self.fail_exit_code)


def _gpu_slot() -> int:
    """The GPU of this job when several jobs share a node (``hydra/launcher=local_gpus``): job number modulo the
    visible GPUs."""
    import torch
    return int(HydraConfig.get().job.num) % max(torch.cuda.device_count(), 1)


if not OmegaConf.has_resolver("xmx.gpu_slot"):
    OmegaConf.register_new_resolver("xmx.gpu_slot", _gpu_slot, use_cache=False)
if not OmegaConf.has_resolver("xmx.num_gpus"):
    OmegaConf.register_new_resolver("xmx.num_gpus", lambda: _num_gpus())


def _num_gpus() -> int:
    import torch
    return max(torch.cuda.device_count(), 1)


_TASK_STARTED = False  # set when Hydra hands over to the task: OSErrors before that are Hydra's folder creation


HELP = """xmx: cross-modal adapters for CLIP and language models (Hydra + Lightning).

Usage: python -m xmx.run [KEY=VALUE ...]              one run (no arguments: the synthetic CPU demo)
       python -m xmx.run -m KEY=A,B ...                a multirun over the values (sweep=<name>: a preset grid)
       python -m xmx.run experiment=<name> --cfg job   print the composed config and exit

Examples: python -m xmx.run experiment=tip_adapter_f_16shot data=oxford_pets seed=2
          python -m xmx.run experiment=mma_b2n data=dtd trainer=gpu

Config groups (GROUP=OPTION):
{groups}

Everything else is KEY=VALUE on the composed config (`--cfg job` lists the keys). Bad input is one `error:` line
and exit code 2 (docs/errors.md). Outputs: $XMX_LOG_DIR or ./outputs/<task_name>/... (results.json written last).
Hydra's own options: --hydra-help."""


def help_text() -> str:
    """The ``--help`` page, from the config folders themselves (Hydra's own listing composes the config once per
    group option: seconds)."""
    root = config_dir()
    groups = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p.name != "hydra"):
        opts = sorted(f.stem for f in d.glob("*.yaml") if not f.stem.startswith("_"))
        if opts:
            groups.append(f"{d.name}: {', '.join(opts)}")
    return HELP.format(groups="\n".join(groups))


def main() -> None:
    """``python -m xmx.run``: Hydra's command line; errors in the command line and the config are one ``error:`` line
    and exit code 2 (Hydra would print several lines and exit 1)."""
    if len(sys.argv) == 1:  # no arguments: the embedded default is the synthetic demo
        sys.argv.append("experiment=demo")
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        print(help_text())
        return
    global _TASK_STARTED
    _TASK_STARTED = False
    import hydra._internal.utils as hydra_utils
    report = hydra_utils.run_and_report
    hydra_utils.run_and_report = lambda func: func()  # let errors reach us instead of Hydra's multi-line report
    try:
        _hydra_main()
    except Exception as e:  # noqa: BLE001
        line = hydra_error_line(e, before_task=not _TASK_STARTED)
        if line is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        hydra_utils.run_and_report = report


if __name__ == "__main__":
    main()
