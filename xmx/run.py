"""``python -m xmx.run``: compose the config, check it, build backbone + datamodule + method, fit, test, write results.

With no arguments it runs ``experiment=demo`` (a synthetic CPU demo). The story of a run, one room each:
compose (``xmx.config.compose`` / Hydra's command line) -> :func:`xmx.preflight.preflight` (every check before work)
-> job identity, skip or resume (:mod:`xmx.jobs`) -> build, fit, test (here) -> ``results.json`` (:mod:`xmx.results`,
written last and atomically: its presence means the run finished). Jobs and sweeps: docs/sweeps.md.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from xmx import jobs, results as record
from xmx.config import build, compose, config_dir, hydra_error_line
from xmx.errors import XmxError
from xmx.jobs import JobIndex, job_id
from xmx.preflight import preflight
from xmx.recipes import recipe_record
from xmx.results import SCHEMA, SELECTION_MODES  # noqa: F401 - the names this module always offered

# torch and Lightning load inside the run (first use), after the config is checked and the thread count is set:
# ``--help``, ``--cfg`` and config errors answer in about a second, and OpenMP/BLAS pools start with the right size.

log = logging.getLogger("xmx")


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


def __getattr__(name):
    if name == "RNGState":  # configs written before it moved (``_target_: xmx.run.RNGState``)
        from xmx.methods.base import RNGState
        return RNGState
    if name == "SweepSummary":  # Hydra configs written before it moved (``xmx.run.SweepSummary``)
        return jobs.SweepSummary
    raise AttributeError(f"module 'xmx.run' has no attribute {name!r}")


# ---- the run ---------------------------------------------------------------------------------------------------
def run(cfg: DictConfig | list[str]) -> dict:
    """One experiment (a composed config, or the overrides of the command line); returns the results dict that was
    written to ``results.json`` (or, for a job that was already complete, the one found on disk)."""
    return _run(compose(cfg) if isinstance(cfg, (list, tuple)) else cfg)[0]


_JOB: dict = {}  # the job this process runs: "id" once its data is fingerprinted, "indexed" once it is in the index


def _run(cfg: DictConfig) -> tuple[dict, str]:
    """-> (results, outcome) with outcome one of done | resumed | skipped. A job that fails after it was indexed as
    running is indexed as failed (its checkpoints stay: the next attempt resumes from them)."""
    _JOB.clear()
    try:
        return _run_job(cfg)
    except BaseException as e:  # also Ctrl-C / SIGTERM (Lightning exits through SystemExit): never left "running"
        full = jobs.disk_full(e)
        if "indexed" in _JOB:
            index, jid, out = _JOB["indexed"]
            why = "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else \
                f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
            try:
                index.write(jid, "failed", out, error=why)
            except OSError as w:  # the index lives on the full disk too
                log.warning("could not mark job %s failed in the index (%s)", jid, w)
        if full is not None:
            out = _JOB["indexed"][2] if "indexed" in _JOB else cfg.paths.get("output_dir")
            raise XmxError(f"no space left on the device writing {full.filename or out}: the run stopped and kept "
                           "nothing half-written (checkpoints/last.ckpt is the last complete resume point); free "
                           "space or set paths.log_dir to another disk, then run the same command again to "
                           "resume") from None
        raise
    finally:
        lock = _JOB.pop("lock", None)
        if lock is not None:
            lock.release()


def _run_job(cfg: DictConfig) -> tuple[dict, str]:
    t0 = time.time()
    preflight(cfg)  # every check before work, in one order; sets the thread plan before torch loads
    import lightning as L
    import torch
    from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states

    from xmx.utils import quiet_logs
    quiet_logs()  # each message once, only those that matter (after Lightning's import added its handler)
    out = _output_dir(cfg)
    datamodule, data_fp = jobs.early_datamodule(cfg)  # lists + one stat per image (content hashes cached)
    jid = job_id(cfg, data_fp)
    _JOB["id"] = jid  # a job that fails from here on is recorded under its real identity (config + data)
    _JOB["lock"] = jobs.lock_job(cfg, out, jid)  # a second identical run refuses instead of writing into our files
    outcome, folder, done, ckpt = jobs.plan(cfg, out, jid)
    if outcome == "skipped":
        log.info("skip: job %s is already complete: %s", jid, folder / "results.json")
        if jobs.is_rank_zero():
            record.print_summary(done, folder)  # a second `make run`: the finished run's numbers, not nothing
        return done, outcome
    if folder != out:
        with open_dict(cfg):
            cfg.paths.output_dir = str(folder)
        out = folder
    if outcome == "resumed":
        log.info("resume: job %s continues from %s", jid, ckpt)
    index = JobIndex.for_run(cfg, out)
    if index and jobs.is_rank_zero():
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
    from xmx.methods.base import backbone_identity
    method.backbone_identity = backbone_identity(cfg.backbone)  # recorded in its checkpoints (init_from checks it)
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
    score = record.best_score(ckpt_cb, best)
    if score is not None:
        metrics[ckpt_cb.monitor] = score  # the best validation score, under the monitored metric's name
    if cfg.get("test", True):
        for d in trainer.test(method, datamodule=datamodule, ckpt_path=best or None, verbose=False):
            metrics.update({k: float(v) for k, v in d.items()})
        metrics.update(datamodule.summarize(metrics))

    results = record.record(cfg, jid=jid, outcome=outcome, metrics=metrics, method=method, datamodule=datamodule,
                            encoders=encoders, trainer=trainer, t0=t0, best=best, out=out, resolved=resolved,
                            recipe=recipe_record(cfg))  # the preset's deviations from its release (xmx/recipes/)
    if not trainer.is_global_zero:  # DDP: rank 0 writes
        return results, outcome
    record.write(out, results, datamodule, method)
    if index:
        index.write(jid, "complete", out)
    record.finish_loggers(loggers, results)
    record.print_summary(results, out)
    return results, outcome


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
        value = jobs.optimized(cfg, results)
    except Exception as e:  # noqa: BLE001
        record.finish_wandb_on_error()
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
        if jobs.is_rank_zero():
            of = "config+data" if "id" in _JOB else "config (failed before the data was read)"
            jobs.write_job_status("failed", cfg, jid, error=f"{type(e).__name__}: {line}", job_id_of=of)
        return float("nan") if cfg.get("optimized_metric") else None  # a sweeper records the trial as failed
    if jobs.is_rank_zero():
        jobs.write_job_status(outcome, cfg, results.get("job_id", jid), results)
    return value


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
