"""Shared fixtures: Hydra compose in-process (subprocesses cost ~10 s of imports each) and a session cache dir where
the synthetic dataset is generated once."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

from xmx.config import compose
from xmx.errors import XmxError

REPO = Path(__file__).resolve().parents[1]
# subprocesses (CLI, sweeps, Optuna) import the checkout under test, not whatever copy a reused venv points at
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


# ``make test-fast`` runs ``-m "not slow"``: the unit tests. Besides the tests that mark themselves (subprocesses),
# a module is slow when it runs whole experiments (it imports xmx.run), runs a benchmark's smoke mode, or is named here.
SLOW_MODULES = {"test_features_cli"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        mod = item.module
        name = mod.__name__.rpartition(".")[2]
        runs = any(getattr(v, "__module__", None) == "xmx.run" or getattr(v, "__name__", None) == "xmx.run"
                   for v in vars(mod).values())
        if runs or name.startswith("test_bench_") or name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def xmx_cache(tmp_path_factory):
    """A cache dir (synthetic data, feature store) shared by the whole session."""
    return tmp_path_factory.mktemp("xmx_cache")


@pytest.fixture
def make_cfg(xmx_cache, tmp_path):
    """make_cfg(overrides) -> a composed config writing into tmp_path, with the session cache."""

    def _make(overrides=(), output_dir=None):
        cfg = compose(list(overrides) + [f"paths.cache_dir={xmx_cache}"])  # the composer of xmx.features/tables
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir or tmp_path / "run")
        return cfg

    yield _make
    GlobalHydra.instance().clear()


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine (50x slower seen)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def capture_dm(monkeypatch):
    """Records the CLIP datamodule of a run (after its setup) so a test can recompute what the run computed."""
    from xmx.datamodules.clip import CLIPDataModule
    seen: list = []
    setup = CLIPDataModule.setup

    def spy(self, stage=None):
        setup(self, stage)
        if not seen or seen[-1] is not self:
            seen.append(self)

    monkeypatch.setattr(CLIPDataModule, "setup", spy)
    return seen


def load_bench(name: str):
    """Import ``bench/<name>.py`` (bench/ is a folder of scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def one_line_error(fn, *needles) -> str:
    """Call ``fn``; it must raise an XmxError whose message is one line containing every needle."""
    with pytest.raises(XmxError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


# one-step runs of the online training path (CLIP-LoRA, MMA-Yang, the byte loaders) on the tiny CLIP
ONLINE_TINY = ["backbone=tiny", "data=synthetic", "trainer.accelerator=cpu", "callbacks=final",
               "+trainer.limit_val_batches=0", "logger=none", "data.num_workers=0", "augment=coop", "shots=2"]


@pytest.fixture(scope="module")
def tiny_clip():
    """The tiny random-init CLIP, built once per test module (seeded: the same weights in every module)."""
    from xmx.backbones.clip import CLIPBackbone
    torch.manual_seed(0)
    return CLIPBackbone("xmx-tiny", None)
