"""Interrupted work is not lost: ``last.ckpt`` is written on a schedule independent of validation (every epoch end and
every ``callbacks.resume.every_minutes`` inside an epoch), atomically, and a run resumed from it (in the middle of an
epoch too) ends with the numbers of the uninterrupted run. Every trained family is killed (SIGINT, SIGKILL) and
resumed in a subprocess (slow)."""

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
from safetensors.torch import load_file

import tiny_trainable
from tiny_trainable import OVERRIDES as TINY
from xmx.errors import XmxError
from xmx.methods.base import ResumeCheckpoint
from xmx.run import run


class Stop(Exception):
    pass


def _logits(folder: Path) -> torch.Tensor:
    return load_file(folder / "predictions.safetensors")["test/logits"]


@pytest.mark.parametrize("every", [None, 1e-9])
def test_stopped_mid_epoch_resumes_to_the_same_numbers(make_cfg, tmp_path, monkeypatch, every):
    """every=1e-9: a timed save after every batch, the run stops in the middle of epoch 2 and resumes from the batch
    after the last one saved; every=None: epoch ends only, it resumes from the end of epoch 1 (the batches of epoch 2
    it had done are redone)."""
    args = [*TINY, "method.batch_size=8", "method.epochs=3", "trainer.check_val_every_n_epoch=3",
            f"callbacks.resume.every_minutes={'null' if every is None else every}",
            "logger=none", "callbacks.rich_progress_bar=null", f"paths.log_dir={tmp_path / 'logs'}"]
    ref = run(make_cfg(args, output_dir=tmp_path / "ref"))
    step = tiny_trainable.TinyTrainable.training_step

    def stop_mid_epoch_1(self, batch, i):
        if self.current_epoch == 1 and i == 2:
            raise Stop()
        return step(self, batch, i)

    with monkeypatch.context() as m:
        m.setattr(tiny_trainable.TinyTrainable, "training_step", stop_mid_epoch_1)
        with pytest.raises(Stop):
            run(make_cfg(args, output_dir=tmp_path / "logs" / "run"))
    last = torch.load(tmp_path / "logs" / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # validation runs only at the end (check_val_every_n_epoch=3), yet a resume point exists
    assert last["epoch"] == (1 if every else 0)
    if every:
        assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches_done": 2}]
    assert not list((tmp_path / "logs" / "run" / "checkpoints").glob(".*tmp"))  # no temporary file left
    res = run(make_cfg(args, output_dir=tmp_path / "logs" / "run"))
    assert res["resumed"] is True and res["metrics"] == ref["metrics"]
    assert torch.equal(_logits(tmp_path / "logs" / "run"), _logits(tmp_path / "ref"))


@pytest.mark.parametrize("bad", [0, -1, "soon", True])
def test_every_minutes_must_be_positive(bad, tmp_path):
    with pytest.raises(XmxError, match="callbacks.resume.every_minutes"):
        ResumeCheckpoint(tmp_path, every_minutes=bad)


# one preset of every family that trains through Lightning, on the tiny CLIP and generated data, a few epochs of a few
# batches each (the sleep between batches comes from $XMX_TEST_STEP_SLEEP in the killed subprocess only)
QUICK = ["backbone=tiny", "data=synthetic", "trainer.accelerator=cpu", "logger=none", "callbacks.rich_progress_bar=null",
         "threads=1", "+callbacks.slow._target_=tiny_trainable.SlowSteps", "data.num_workers=0"]
FAMILIES = {
    "coop": ["experiment=coop_16shot", "shots=2", "augment.views=2", "method.epochs=4", "method.batch_size=8"],
    "mma": ["experiment=mma_16shot", "shots=4", "method.epochs=4", "method.batch_size=16"],
    "clip_adapter": ["experiment=clip_adapter_16shot", "shots=4", "method.epochs=4", "method.batch_size=16"],
    "tip_adapter_f": ["experiment=tip_adapter_f_16shot", "shots=4", "augment.views=2", "method.epochs=4",
                      "method.batch_size=16", "method.n_alpha=3", "method.n_beta=3"],
    "xmadapter": ["experiment=xmadapter_16shot", "shots=4", "augment.views=2", "method.epochs=4",
                  "method.batch_size=16", "method.n_alpha=3", "method.n_beta=3"],
    "taskres": ["experiment=taskres_16shot", "shots=4", "augment.views=2", "method.epochs=4", "method.batch_size=16"],
    "clip_lora": ["experiment=clip_lora_16shot", "shots=2",
                  "method.iters_per_shot=6", "method.batch_size=8", "method.optimizer.lr=0.05"],
}


def kill_then_resume(args, make_cfg, xmx_cache, tmp_path, sig) -> tuple[dict, dict, Path]:
    """An uninterrupted reference run; the same run as a subprocess stopped by ``sig`` once its first last.ckpt
    exists; then that run resumed in its folder. Returns (reference results, resumed results, resumed folder)."""
    ref = run(make_cfg([*args, f"paths.log_dir={tmp_path / 'ref_logs'}"], output_dir=tmp_path / "ref"))
    assert ref["resumed"] is False

    folder, logs = tmp_path / "logs" / "run", tmp_path / "logs"
    env = dict(os.environ, XMX_TEST_STEP_SLEEP="0.25", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "xmx.run", *args, f"paths.cache_dir={xmx_cache}", f"paths.log_dir={logs}",
           f"hydra.run.dir={folder}"]
    # SIGINT as a terminal's Ctrl-C delivers it: a test run in the background inherits SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler (the run would not be stopped at all)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    last = folder / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not last.is_file():
        time.sleep(0.05)  # the file appears whole (renamed into place) or not at all
    assert proc.poll() is None, f"the run ended before it could be stopped: {proc.stderr.read()[-2000:]}"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    assert not (folder / "results.json").exists()
    saved = torch.load(last, map_location="cpu", weights_only=False)  # whole, never truncated
    assert saved["global_step"] >= 1

    res = run(make_cfg([*args, f"paths.log_dir={logs}"], output_dir=folder))
    assert res["resumed"] is True and res["job_id"] == ref["job_id"]
    assert res["metrics"] == ref["metrics"]
    return ref, res, folder


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_killed_run_of_every_family_resumes_to_the_same_numbers(make_cfg, xmx_cache, tmp_path, family, sig):
    _, _, folder = kill_then_resume([*QUICK, *FAMILIES[family]], make_cfg, xmx_cache, tmp_path, sig)
    assert torch.equal(_logits(folder), _logits(tmp_path / "ref"))


def test_full_disk_is_one_line_leaves_no_truncated_checkpoint_and_marks_the_job_failed(make_cfg, tmp_path,
                                                                                       monkeypatch):
    """The disk fills while a checkpoint is written (half its bytes land, then ENOSPC): one line, the index says
    failed, every checkpoint on disk loads (the previous whole ones), no temporary file is left; the same command
    then resumes."""
    import errno

    from fsspec.implementations.local import LocalFileOpener
    args = [*TINY, "method.epochs=3", "logger=none", "callbacks.rich_progress_bar=null",
            f"paths.log_dir={tmp_path / 'logs'}"]
    write, calls = LocalFileOpener.write, {"n": 0}

    def filling(self, data):
        calls["n"] += 1
        if calls["n"] > 3:  # best.ckpt and last.ckpt of epoch 0 and best.ckpt of epoch 1 fit, then the disk is full
            write(self, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device", self.path)
        return write(self, data)

    folder = tmp_path / "logs" / "run"
    with monkeypatch.context() as m:
        m.setattr(LocalFileOpener, "write", filling)
        with pytest.raises(XmxError) as e:
            run(make_cfg(args, output_dir=folder))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("no space left on the device") and "paths.log_dir" in msg
    index = [json.loads(p.read_text()) for p in (tmp_path / "logs" / ".index").glob("*.json")]
    assert [i["status"] for i in index] == ["failed"] and "No space left" in index[0]["error"]
    ckpts = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert ckpts == ["best.ckpt", "last.ckpt"], ckpts  # no temporary or truncated file
    for name in ckpts:
        torch.load(folder / "checkpoints" / name, map_location="cpu", weights_only=False)
    res = run(make_cfg(args, output_dir=folder))
    assert res["resumed"] is True


def test_a_second_identical_run_refuses_while_the_first_holds_the_job(make_cfg, tmp_path):
    from filelock import FileLock
    args = [*TINY, "method.epochs=1", "logger=none", "callbacks.rich_progress_bar=null", "skip_done=false",
            f"paths.log_dir={tmp_path / 'logs'}"]
    first = run(make_cfg(args, output_dir=tmp_path / "logs" / "a"))
    held = FileLock(str(tmp_path / "logs" / ".index" / f"{first['job_id']}.lock"), timeout=0)
    held.acquire()  # as a first run still going would
    try:
        with pytest.raises(XmxError, match=rf"job {first['job_id']} is already running.*wait for it"):
            run(make_cfg(args, output_dir=tmp_path / "logs" / "b"))
        assert not (tmp_path / "logs" / "b" / "checkpoints").exists()
    finally:
        held.release()
    assert run(make_cfg(args, output_dir=tmp_path / "logs" / "b"))["job_id"] == first["job_id"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_killed_xadapter_pretraining_resumes_to_the_same_numbers(make_cfg, xmx_cache, tmp_path, sig):
    """The language track's family (X-adapter's T-expert MLM pre-training, step-based) on generated WikiText."""
    from test_xadapter_run import _sentence
    wiki = tmp_path / "data" / "wikitext-103-raw"
    wiki.mkdir(parents=True)
    for split, n in (("train", 40), ("valid", 6), ("test", 6)):
        (wiki / f"wiki.{split}.raw").write_text(
            " \n = Heading = \n \n" + "".join(f" {_sentence(i, 12)} . \n \n" for i in range(n)))
    args = ["experiment=xadapter_texpert_wiki", "backbone=tiny", "plm=tiny", f"paths.data_dir={tmp_path / 'data'}",
            "trainer.accelerator=cpu", "trainer.precision=32-true", "data.num_workers=0", "method.adapter.heads=4",
            "logger=none", "callbacks.rich_progress_bar=null", "threads=1", "method.batch_size=8", "method.steps=24",
            "+callbacks.slow._target_=tiny_trainable.SlowSteps"]
    kill_then_resume(args, make_cfg, xmx_cache, tmp_path, sig)
