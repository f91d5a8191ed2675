"""The results record of a run: ``results.json`` (schema :data:`SCHEMA`), its side files and the printed summary.

Every field a run writes is named in :data:`FIELDS` (README "results.json" and docs/architecture.md show them;
``tests/test_docs.py`` checks both tables against it). ``results.json`` is written last and atomically: its presence
with ``"status": "complete"`` means the run finished. ``selection`` is one of :data:`SELECTION_MODES`, the one
definition every other file imports (methods, the report, ``xmx.tables``).

This module sits with the core (it imports no room above it): it receives the objects of a run (trainer,
datamodule, method, encoders) as arguments. torch, safetensors and rich load inside the functions that need them.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from pathlib import Path

from xmx.errors import XmxError
from xmx.utils import atomic_write_bytes, atomic_write_text, code_version, package_versions

SCHEMA = "xmx.results/1"
# results.json "selection": val = nothing chosen on the test set (the default); paper = the authors' code where it
# selects on the test set (marked † in reports, never averaged with val)
SELECTION_MODES = ("val", "paper")

# Every top-level field of results.json, in the order written (``record``); optional ones at the end.
FIELDS = ("schema", "status", "job_id", "resumed", "experiment", "method", "dataset", "protocol", "shots", "seed",
          "selection", "metrics", "extra", "parameters", "data", "weights", "code", "packages", "cost", "trainer",
          "predictions", "init_from", "checkpoint", "recipe", "config")
OPTIONAL_FIELDS = ("weights_plm",)  # the language track: the PLM's weights


def check_selection_mode(selection, key: str = "selection") -> str:
    if selection not in SELECTION_MODES:
        raise XmxError(f"{key}={selection!r}; valid choices: {', '.join(SELECTION_MODES)} (val: nothing chosen "
                       "on test; paper: the authors' code where it selects on test)")
    return selection


def cost(t0: float) -> dict:
    """Wall time since ``t0``, the device and its peak memory (CUDA allocator, else the process's max RSS)."""
    import torch
    if torch.cuda.is_available():
        device, peak = torch.cuda.get_device_name(), torch.cuda.max_memory_allocated() / 2**20
    else:
        device, peak = f"cpu ({platform.processor() or platform.machine()})", \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"wall_time_s": round(time.time() - t0, 3), "device": device, "peak_memory_mb": round(peak, 1)}


def best_score(ckpt_cb, best: str) -> float | None:
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


def checkpoint_record(best: str, out: Path) -> str | None:
    """The checkpoint whose weights were tested: best.ckpt, else (no selection) the last epoch's resume point."""
    if not best:
        last = Path(out) / "checkpoints" / "last.ckpt"
        best = str(last) if last.is_file() else ""
    return str(Path(best).relative_to(out)) if best and Path(best).is_relative_to(out) else best or None


def record(cfg, *, jid: str, outcome: str, metrics: dict, method, datamodule, encoders: dict, trainer, t0: float,
           best: str, out: Path, resolved: dict, recipe: dict | None = None) -> dict:
    """The results dict of a finished run (every field of :data:`FIELDS`, plus ``weights_plm`` with a PLM)."""
    results = {
        "schema": SCHEMA, "status": "complete", "job_id": jid, "resumed": outcome == "resumed",
        "experiment": cfg.get("task_name"), "method": cfg.method.get("name"), "dataset": datamodule.name,
        "protocol": datamodule.protocol.name, "shots": datamodule.shots, "seed": int(cfg.seed),
        "selection": cfg.get("selection", "val"),
        "metrics": metrics, "extra": method.extra_results(),
        "parameters": method.parameter_counts(*encoders.values()),
        "data": {**datamodule.data_record(), "subset_file": "subset.json"},
        "weights": encoders["backbone"].describe(),
        "code": code_version(), "packages": package_versions(),
        "cost": cost(t0),
        "trainer": {"world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
                    "precision": str(trainer.precision)},
        "predictions": "predictions.safetensors" if method.predictions else None,
        "init_from": getattr(method, "init_record", None),
        "checkpoint": checkpoint_record(best, out),
        "recipe": recipe,  # the preset's recipe table and its named deviations (xmx.recipes.recipe_record)
        "config": resolved,
    }
    assert tuple(results) == FIELDS, "results.FIELDS lists every field record() writes, in order"
    if "plm" in encoders and hasattr(encoders["plm"], "describe"):
        results["weights_plm"] = encoders["plm"].describe()
    return results


def safetensors_bytes(tensors: dict) -> bytes:
    from safetensors.torch import save
    return save(tensors)


def write(out: Path, results: dict, datamodule, method) -> None:
    """``subset.json``, ``predictions.safetensors`` and, last, ``results.json``: each file atomic."""
    atomic_write_text(out / "subset.json", json.dumps(datamodule.subset_record()))
    if method.predictions:
        tensors = {f"{name}/{k}": v.contiguous() for name, p in method.predictions.items() for k, v in p.items()}
        atomic_write_bytes(out / "predictions.safetensors", safetensors_bytes(tensors))
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))


def read_complete(folder, jid: str) -> dict | None:
    """The results in ``folder`` when they are complete and belong to job ``jid``, else None."""
    if not folder:
        return None
    try:
        res = json.loads((Path(folder) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return res if res.get("status") == "complete" and res.get("job_id") == jid else None


def finish_loggers(loggers: list, results: dict) -> None:
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


def finish_wandb_on_error() -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1)


def print_summary(results: dict, out: Path) -> None:
    """The metrics as a table on the terminal, with a note for numbers that are not CLIP accuracies."""
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
