"""``python -m xmx.run``: compose the config, build backbone + datamodule + method, fit, test, write results.

With no arguments it runs ``experiment=demo`` (a synthetic CPU demo). ``results.json`` is written last and atomically:
its presence means the run finished. Schema: README "results.json".
"""

from __future__ import annotations

import json
import logging
import platform
import resource
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from xmx.config import config_dir
from xmx.errors import XmxError
from xmx.utils import atomic_write_bytes, atomic_write_text, code_version, package_versions

log = logging.getLogger("xmx")
SCHEMA = "xmx.results/1"


def _output_dir(cfg: DictConfig) -> Path:
    out = cfg.paths.get("output_dir") if "paths" in cfg else None
    if out is None:
        out = HydraConfig.get().runtime.output_dir
    path = Path(str(out))
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(node, **kwargs):
    """``hydra.utils.instantiate`` that lets an XmxError through as itself (Hydra wraps it otherwise), so the user
    sees its one line."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, XmxError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def _instantiate_all(node) -> list:
    """A config group holding several ``_target_`` entries (loggers, callbacks) -> list of objects."""
    if not node:
        return []
    return [build(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def _cost(t0: float) -> dict:
    if torch.cuda.is_available():
        device, peak = torch.cuda.get_device_name(), torch.cuda.max_memory_allocated() / 2**20
    else:
        device, peak = f"cpu ({platform.processor() or platform.machine()})", \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"wall_time_s": round(time.time() - t0, 3), "device": device, "peak_memory_mb": round(peak, 1)}


def run(cfg: DictConfig) -> dict:
    """One experiment; returns the results dict that was written to ``results.json``."""
    t0 = time.time()
    out = _output_dir(cfg)
    if cfg.get("notice"):
        log.warning(cfg.notice)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    encoders = {"backbone": build(cfg.backbone)}
    if cfg.get("plm") is not None:
        encoders["plm"] = build(cfg.plm)
    datamodule = build(cfg.data, **encoders, _convert_="all")
    method = build(cfg.method, _convert_="partial")
    method.init_from = cfg.get("init_from")
    trainer: L.Trainer = build(cfg.trainer, logger=_instantiate_all(cfg.get("logger")) or False,
                                     callbacks=_instantiate_all(cfg.get("callbacks")))

    if cfg.get("train", True) and method.needs_fit:
        trainer.fit(method, datamodule=datamodule)
    metrics: dict = {}
    ckpt_cb = trainer.checkpoint_callback
    best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb else ""
    if ckpt_cb is not None and getattr(ckpt_cb, "best_model_score", None) is not None:
        metrics["val/acc"] = float(ckpt_cb.best_model_score)
    if cfg.get("test", True):
        for d in trainer.test(method, datamodule=datamodule, ckpt_path=best or None, verbose=False):
            metrics.update({k: float(v) for k, v in d.items()})
        metrics.update(datamodule.summarize(metrics))

    results = {
        "schema": SCHEMA, "status": "complete",
        "experiment": cfg.get("task_name"), "method": cfg.method.get("name"), "dataset": datamodule.name,
        "protocol": datamodule.protocol.name, "shots": datamodule.shots, "seed": int(cfg.seed),
        "metrics": metrics, "extra": method.extra_results(),
        "data": {**datamodule.data_record(), "subset_file": "subset.json"},
        "weights": encoders["backbone"].describe(),
        "code": code_version(), "packages": package_versions(),
        "cost": _cost(t0),
        "predictions": "predictions.safetensors" if method.predictions else None,
        "checkpoint": str(Path(best).relative_to(out)) if best and Path(best).is_relative_to(out) else best or None,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if "plm" in encoders and hasattr(encoders["plm"], "describe"):
        results["weights_plm"] = encoders["plm"].describe()
    atomic_write_text(out / "subset.json", json.dumps(datamodule.subset_record()))
    if method.predictions:
        tensors = {f"{name}/{k}": v.contiguous() for name, p in method.predictions.items() for k, v in p.items()}
        atomic_write_bytes(out / "predictions.safetensors", _safetensors_bytes(tensors))
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    _print_summary(results, out)
    return results


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
    if results["weights"].get("random_init") or results["dataset"] == "synthetic":
        console.print("[yellow]note: random-init weights and/or synthetic data — these numbers test the pipeline; "
                      "they are not CLIP accuracies[/yellow]")
    console.print(f"results: {out / 'results.json'}")


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _hydra_main(cfg: DictConfig):
    try:
        return run(cfg)
    except XmxError as e:
        log.error("error: %s", e)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    if len(sys.argv) == 1:  # no arguments: the embedded default is the synthetic demo
        sys.argv.append("experiment=demo")
    _hydra_main()


if __name__ == "__main__":
    main()
