"""Sweeps and jobs: every sweep/launcher/search preset composes; a multirun run twice recomputes nothing; a failing job
leaves the others done and is counted; a SIGKILLed run resumes from last.ckpt to the same numbers; W&B offline;
a job through submitit's local executor; DDP (ddp_spawn, 2 CPU processes) equals one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import load_file

import xmx.run as xrun
from tiny_trainable import OVERRIDES as TINY
from xmx.config import config_dir

CONF = config_dir()
SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))
QUIET = ["logger=none", "callbacks.rich_progress_bar=null"]


def _compose(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def _hydra(args, cache, log_dir) -> int:
    """``python -m xmx.run <args>`` in-process (Hydra's own multirun machinery); returns the exit code."""
    GlobalHydra.instance().clear()
    argv = sys.argv
    sys.argv = ["xmx.run", *args, f"paths.cache_dir={cache}", f"paths.log_dir={log_dir}", *QUIET]
    try:
        xrun._hydra_main()
        return 0
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()


def _statuses(sweep_dir: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/xmx_job.json")}


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_composes_with_its_grid(name):
    assert {"shots", "b2n_all", "mma_lambda", "xmadapter_gamma", "xadapter_mask_ratio"} <= set(SWEEPS)
    cfg = _compose([f"sweep={name}"])
    params = cfg.hydra.sweeper.params
    assert params and all(len(str(v).split(",")) >= 2 for v in params.values()), params
    text = (CONF / "sweep" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_") and "python -m xmx.run -m" in text
    assert name in (CONF / "sweep" / "README.md").read_text()
    if name == "xmadapter_gamma":
        assert cfg.method.gamma_mode == "fixed" and "method.gamma" in params
    if name == "b2n_all":
        assert cfg.protocol.name == "base2new" and len(params["data"].split(",")) == 11


def test_launchers_and_search_presets_compose(tmp_path):
    slurm = _compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"]).hydra.launcher
    assert slurm._target_.endswith("submitit_launcher.SlurmLauncher")
    assert slurm.gpus_per_node == 1 and slurm.max_num_timeout > 0 and slurm.partition == "gpu"
    assert {"timeout_min", "array_parallelism", "cpus_per_task", "mem_gb"} <= set(slurm)
    local = _compose(["hydra/launcher=local_gpus", "trainer=gpu_slot"])
    assert local.hydra.launcher._target_.endswith("submitit_launcher.LocalLauncher")
    assert local.hydra.sweeper.max_batch_size >= 1 and local.hydra.launcher.gpus_per_node >= 1
    assert local.trainer.accelerator == "gpu" and len(local.trainer.devices) == 1
    for preset, key in [("mma_optuna", "method.lam"), ("tip_adapter_f_optuna", "method.optimizer.lr")]:
        cfg = _compose([f"hparams_search={preset}", f"paths.log_dir={tmp_path}"])
        sw = cfg.hydra.sweeper
        assert sw._target_.endswith("optuna_sweeper.OptunaSweeper") and key in sw.params
        assert sw.storage.startswith(f"sqlite:///{tmp_path}/optuna/") and cfg.optimized_metric == "val/acc"
    ddp = _compose(["trainer=ddp"]).trainer
    assert ddp.strategy == "ddp" and ddp.use_distributed_sampler is False


def test_multirun_twice_recomputes_nothing_and_failures_are_counted(xmx_cache, tmp_path, capsys):
    log_dir = tmp_path / "logs"  # the sweep folders lie under it, as by default
    tmp_path = log_dir
    grid = ["-m", "method=zeroshot", "seed=1,2", "shots=1,2"]
    assert _hydra([*grid, f"hydra.sweep.dir={tmp_path}/m1"], xmx_cache, log_dir) == 0
    first = _statuses(tmp_path / "m1")
    assert sorted(s["status"] for s in first.values()) == ["done"] * 4
    ids = {s["job_id"] for s in first.values()}
    assert len(ids) == 4 and ids == {p.stem for p in (log_dir / ".index").glob("*.json")}
    res = [json.loads(p.read_text()) for p in (tmp_path / "m1").glob("*/results.json")]
    assert {r["job_id"] for r in res} == ids
    assert "done 4 (resumed 0), skipped 0, failed 0" in capsys.readouterr().out

    assert _hydra([*grid, f"hydra.sweep.dir={tmp_path}/m2"], xmx_cache, log_dir) == 0
    second = _statuses(tmp_path / "m2")
    assert sorted(s["status"] for s in second.values()) == ["skipped"] * 4
    assert not list((tmp_path / "m2").glob("*/results.json"))  # nothing recomputed, nothing rewritten
    assert {s["metrics"]["test/acc"] for s in second.values()} == {s["metrics"]["test/acc"] for s in first.values()}
    out = capsys.readouterr().out  # Hydra's job logging prints to stdout: one line per skipped job
    assert out.count("skip: job") == 4 and "done 0 (resumed 0), skipped 4, failed 0" in out

    # one failing job (50 shots > images per class) does not stop the others; the summary counts it, exit status 1
    code = _hydra(["-m", "method=zeroshot", "seed=1", "shots=50,2,3", f"hydra.sweep.dir={tmp_path}/m3"], xmx_cache,
                  log_dir)
    assert code == 1
    third = {s["overrides"][2]: s for s in _statuses(tmp_path / "m3").values()}
    assert third["shots=50"]["status"] == "failed" and "shots=50 but class" in third["shots=50"]["error"]
    assert third["shots=50"]["job_id_of"].startswith("config (failed before the data was read)")
    assert third["shots=3"]["job_id_of"] == "config+data"
    assert third["shots=2"]["status"] == "skipped" and third["shots=3"]["status"] == "done"
    out = capsys.readouterr().out
    assert "done 1 (resumed 0), skipped 1, failed 1" in out and "shots=50" in out

    # a job that fails after its data was read is recorded under its real identity (config + image content)
    code = _hydra(["-m", "method=lpp", "seed=1", "shots=2", "method.train_view=0,7", f"hydra.sweep.dir={tmp_path}/m4"],
                  xmx_cache, log_dir)
    assert code == 1
    fourth = {next(o for o in s["overrides"] if o.startswith("method.train_view")): s
              for s in _statuses(tmp_path / "m4").values()}
    bad, good = fourth["method.train_view=7"], fourth["method.train_view=0"]
    assert bad["status"] == "failed" and "only 1 views are cached" in bad["error"]
    assert bad["job_id_of"] == "config+data" and good["status"] == "done"
    index = json.loads((log_dir / ".index" / f"{bad['job_id']}.json").read_text())  # the index knows that id
    assert index["status"] == "failed" and "only 1 views are cached" in index["error"]


def test_killed_run_resumes_from_last_ckpt_to_identical_numbers(xmx_cache, tmp_path):
    args = [*TINY, "method.epochs=6", "method.step_sleep=0.08"]
    log_dir = tmp_path / "logs"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    # the uninterrupted reference (own log dir) also fills the feature cache for the killed run
    assert _hydra([*args, f"hydra.run.dir={tmp_path}/ref"], xmx_cache, tmp_path / "ref_logs") == 0
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert ref["resumed"] is False and ref["metrics"]["test/acc"] > 0

    cmd = [sys.executable, "-m", "xmx.run", *args, f"paths.cache_dir={xmx_cache}", f"paths.log_dir={log_dir}",
           *QUIET, f"hydra.run.dir={log_dir}/attempt1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = log_dir / "attempt1" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if last.is_file():
            try:
                torch.load(last, map_location="cpu", weights_only=False)
                break
            except Exception:  # noqa: BLE001 - still being written
                pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch_killed = torch.load(last, map_location="cpu", weights_only=False)["epoch"]
    assert epoch_killed < 5 and not (log_dir / "attempt1" / "results.json").exists()

    # the same command again (a new Hydra folder): the index sends it back to attempt1, which it finishes
    assert _hydra([*args, f"hydra.run.dir={log_dir}/attempt2"], xmx_cache, log_dir) == 0
    assert json.loads((log_dir / "attempt2" / "xmx_job.json").read_text())["status"] == "resumed"
    res = json.loads((log_dir / "attempt1" / "results.json").read_text())
    assert res["resumed"] is True and res["job_id"] == ref["job_id"]
    assert res["metrics"] == ref["metrics"]
    a, b = load_file(log_dir / "attempt1" / "predictions.safetensors"), load_file(tmp_path / "ref" / "predictions.safetensors")
    assert torch.equal(a["test/logits"], b["test/logits"])
    index = json.loads((log_dir / ".index" / f"{res['job_id']}.json").read_text())
    assert index["status"] == "complete" and index["output_dir"] == str((log_dir / "attempt1").resolve())


def test_wandb_offline_run_has_summary_metrics(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg(["method=zeroshot", "logger=wandb", "callbacks.rich_progress_bar=null"], output_dir=tmp_path / "wb")
    res = xrun.run(cfg)
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    (table,) = runs[0].glob("files/media/table/results_*.table.json")  # the results table
    t = json.loads(table.read_text())
    row = dict(zip(t["columns"], t["data"][0]))
    assert row["test/acc"] == pytest.approx(res["metrics"]["test/acc"]) and row["job_id"] == res["job_id"]
    # the run summary (job_id is logged nowhere else) is in the offline transaction log, synced by `wandb sync`
    assert res["job_id"].encode() in next(runs[0].glob("run-*.wandb")).read_bytes()
    import wandb
    assert wandb.run is None  # finished: the next job of a multirun is a run of its own


def test_job_through_submitit_local_executor(xmx_cache, tmp_path, capsys):
    code = _hydra(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "method=zeroshot",
                   "shots=1", "seed=5", f"hydra.sweep.dir={tmp_path}/sub"], xmx_cache, tmp_path)
    assert code == 0
    (status,) = _statuses(tmp_path / "sub").values()
    assert status["status"] == "done" and (tmp_path / "sub" / "0" / "results.json").is_file()
    assert list((tmp_path / "sub" / ".submitit").glob("*/*_result.pkl"))  # it ran in a submitit job
    assert "done 1 (resumed 0), skipped 0, failed 0" in capsys.readouterr().out


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_equals_one_process(make_cfg, tmp_path, monkeypatch):
    # ddp_fork: the ranks are forked from this process (3 s); ddp_spawn re-imports torch and Lightning in two fresh
    # interpreters for fit and again for test (35 s on 2 cores). The gradient averaging under test is the same.
    # no dropout and a deterministic start: the ranks' mean gradient over their halves of each global batch of 32
    # equals the one-process gradient over the batch, so the two runs agree up to float rounding
    import torch.distributed as dist
    init = dist.init_process_group

    def init_and_record(*args, **kwargs):  # the forked ranks inherit this patch: each leaves a file
        (tmp_path / f"rank{kwargs.get('rank')}-of-{kwargs.get('world_size')}").touch()
        return init(*args, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", init_and_record)
    base = [*TINY, "method.epochs=2", "method.dropout=0.0", "callbacks.rich_progress_bar=null", "logger=none"]
    one = xrun.run(make_cfg(base, output_dir=tmp_path / "one"))
    assert not list(tmp_path.glob("rank*"))
    two = xrun.run(make_cfg([*base, "trainer=ddp", "trainer.strategy=ddp_fork", "trainer.accelerator=cpu",
                             "trainer.devices=2", "method.step_sleep=0"], output_dir=tmp_path / "two"))
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0-of-2", "rank1-of-2"]  # two ranks really ran
    assert (one["trainer"]["world_size"], two["trainer"]["world_size"]) == (1, 2)
    assert two["trainer"]["strategy"] == "DDPStrategy"
    assert set(two["metrics"]) == set(one["metrics"])
    for k, v in one["metrics"].items():
        assert two["metrics"][k] == pytest.approx(v, abs=0.51), k  # test set of 200: one sample = 0.5 %
