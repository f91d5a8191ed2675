"""Jobs (docs/sweeps.md): a run's identity, the job index, skip/resume planning, job status and the sweep summary.

A run's identity ``job_id`` is a hash of its resolved config without what cannot change the numbers (paths, loggers,
progress bars, devices, worker counts, ``hydra``, ``notice``), plus the fingerprint of the bytes of the images it
reads (``xmx.data.fingerprint``; then ``data.root`` itself is left out). An index
``${paths.log_dir}/.index/<job_id>.json`` points at the folder of the job's latest attempt; with ``skip_done`` a job
whose attempt has a complete ``results.json`` is not recomputed, and with ``resume: auto`` an attempt that left
``checkpoints/last.ckpt`` but no results is continued in its own folder. In a multirun a failing job is recorded
(``xmx_job.json`` in its Hydra folder) and the others go on; :class:`SweepSummary` counts them at the end.

This module sits with the core: the datamodule is built from its ``_target_`` (Hydra), torch loads only to read a
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from xmx.config import build
from xmx.errors import XmxError
from xmx.results import read_complete
from xmx.utils import atomic_write_text
from xmx.validate import missing_line

log = logging.getLogger("xmx")
RESUME_MODES = ("auto", "never")

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
        raise XmxError(missing_line(e) or f"cannot resolve the config to identify the job: {str(e).splitlines()[0]}") \
            from None
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


def early_datamodule(cfg: DictConfig):
    """(datamodule without encoders, fingerprint of its images) when the data module can fingerprint its files
    before any encoder is built (``data_fingerprint``), else (None, None)."""
    import hydra
    target = OmegaConf.select(cfg, "data._target_")
    try:
        cls = hydra.utils.get_class(str(target)) if target else None
    except Exception:  # noqa: BLE001 - an unknown target fails later, with Hydra's own message
        return None, None
    if cls is None or not hasattr(cls, "data_fingerprint"):
        return None, None
    dm = build(cfg.data, backbone=None, _convert_="all")
    return dm, dm.data_fingerprint()


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


# ---- the index and planning ------------------------------------------------------------------------------------
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

    def complete(self, jid: str) -> Path | None:
        """The complete results.json of job ``jid`` that the index points at, else None."""
        entry = self.read(jid)
        if entry and entry.get("output_dir") and read_complete(entry["output_dir"], jid) is not None:
            return Path(entry["output_dir"]) / "results.json"
        return None


def lock_job(cfg: DictConfig, out: Path, jid: str):
    """An exclusive lock on job ``jid`` for this process (``<log_dir>/.index/<jid>.lock``, else in the output
    folder), released when the run ends or the process dies. A second identical run started meanwhile refuses in
    one line naming the first, instead of writing into its files."""
    if not is_rank_zero():
        return None
    from filelock import FileLock, Timeout
    log_dir = cfg.paths.get("log_dir") if "paths" in cfg else None
    folder = Path(str(log_dir)).expanduser() / ".index" if log_dir is not None else out
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / f"{jid}.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = JobIndex(Path(str(log_dir)).expanduser()).read(jid) if log_dir is not None else None
        who = f" (pid {holder.get('pid')} on {holder.get('host')}, writing {holder.get('output_dir')})" \
            if holder and holder.get("status") == "running" else ""
        raise XmxError(f"job {jid} is already running{who}: an identical run never writes into another's files; "
                       "wait for it to finish (the same command then reports its results) or change the config "
                       "(e.g. seed=) to make it another job") from None
    return lock


def disk_full(e: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT error behind ``e`` (itself, its cause or context), if a full disk is why it failed."""
    import errno
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


def readable_checkpoint(path: Path) -> bool:
    """A SIGKILL during a save can leave a truncated file: such a last.ckpt is not resumed from."""
    import torch
    try:
        torch.load(path, map_location="cpu", weights_only=False)
        return True
    except Exception as e:  # noqa: BLE001
        log.warning("resume: %s is unreadable (%s); starting afresh", path, type(e).__name__)
        return False


def check_resume(cfg: DictConfig):
    resume = cfg.get("resume", "auto")
    if resume not in (*RESUME_MODES, None, False):
        raise XmxError(f"resume={resume!r}; valid choices: {', '.join(RESUME_MODES)}")
    return resume


def plan(cfg: DictConfig, out: Path, jid: str) -> tuple[str, Path, dict | None, Path | None]:
    """-> (outcome, output folder, results of a complete job, checkpoint to resume from); outcome is one of
    skipped | resumed | done."""
    skip_done, resume = bool(cfg.get("skip_done", True)), check_resume(cfg)
    index = JobIndex.for_run(cfg, out)
    prev = index.read(jid) if index else None
    candidates = [out] + ([Path(prev["output_dir"])] if prev and prev.get("output_dir") else [])
    if skip_done:
        for folder in candidates:
            done = read_complete(folder, jid)
            if done is not None:
                return "skipped", folder, done, None
    if resume == "auto":
        for folder in candidates:
            last = folder / "checkpoints" / "last.ckpt"
            if last.is_file() and read_complete(folder, jid) is None and readable_checkpoint(last):
                return "resumed", folder, None, last
    return "done", out, None, None


# ---- multiruns -------------------------------------------------------------------------------------------------
def optimized(cfg: DictConfig, results: dict):
    """The value a hyper-parameter sweeper optimises (``optimized_metric``, e.g. ``val/acc``), or None."""
    key = cfg.get("optimized_metric")
    if not key:
        return None
    if key not in results.get("metrics", {}):
        raise XmxError(f"optimized_metric={key!r} is not among this run's metrics: "
                       f"{', '.join(sorted(results.get('metrics', {}))) or 'none'}")
    return float(results["metrics"][key])


def write_job_status(status: str, cfg: DictConfig, jid: str | None, results: dict | None = None,
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


# ---- GPUs of the jobs of a node (resolvers used by conf/trainer and conf/hydra/launcher) -------------------------
def _gpu_slot() -> int:
    """The GPU of this job when several jobs share a node (``hydra/launcher=local_gpus``): job number modulo the
    visible GPUs."""
    import torch
    return int(HydraConfig.get().job.num) % max(torch.cuda.device_count(), 1)


def _num_gpus() -> int:
    import torch
    return max(torch.cuda.device_count(), 1)


if not OmegaConf.has_resolver("xmx.gpu_slot"):
    OmegaConf.register_new_resolver("xmx.gpu_slot", _gpu_slot, use_cache=False)
if not OmegaConf.has_resolver("xmx.num_gpus"):
    OmegaConf.register_new_resolver("xmx.num_gpus", lambda: _num_gpus())
