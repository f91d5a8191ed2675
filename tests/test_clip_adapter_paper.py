"""clip_adapter_paper_16shot follows the released CLIP-Adapter code (CoOp's RN50 trainer configs), and the RN50
CLIP-Adapter reference rows are compared only with runs of that preset."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from test_report import write_result

from xmx.methods.clip_adapter import ConstantWarmupCosine
from xmx.report import main as report_main
from xmx.run import run


def test_coop_schedule_one_constant_warmup_epoch_then_cosine():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.002)
    sched = ConstantWarmupCosine(opt, T_max=200, warmup_epochs=1, warmup_lr=1e-5)
    lrs = []
    for _ in range(201):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-5)  # Dassl's constant warm-up
    assert lrs[1] == pytest.approx(0.002)  # the cosine's step 0 right after the warm-up (Dassl's recount)
    assert lrs[2] == pytest.approx(0.002 * (1 + math.cos(math.pi / 200)) / 2)
    assert lrs[101] == pytest.approx(0.001) and lrs[199] == pytest.approx(0.001 * (1 + math.cos(math.pi * 198 / 200)))


@pytest.mark.parametrize("overrides,epochs", [([], 200), (["shots=1"], 50), (["shots=4"], 100),
                                              (["data=imagenet"], 50)])
def test_preset_is_the_released_recipe(make_cfg, overrides, epochs):
    cfg = make_cfg(["experiment=clip_adapter_paper_16shot", *overrides])
    m = cfg.method
    assert m.name == "clip_adapter" and m.ratio == 0.2 and m.reduction == 4 and m.batch_size == 32
    assert m.epochs == epochs and cfg.augment.views == epochs and cfg.data.view_sampling == "cycle"
    assert m.optimizer._target_ == "torch.optim.SGD" and (m.optimizer.lr, m.optimizer.momentum,
                                                          m.optimizer.weight_decay) == (0.002, 0.9, 5e-4)
    assert m.scheduler.warmup_lr == 1e-5 and m.scheduler.warmup_epochs == 1
    assert cfg.augment.preset == "coop" and cfg.callbacks.model_checkpoint is None  # last epoch, no val selection
    assert "early_stopping" not in cfg.callbacks


def test_preset_tests_the_last_epoch(make_cfg, tmp_path):
    cfg = make_cfg(["experiment=clip_adapter_paper_16shot", "backbone=tiny", "data=synthetic", "method.epochs=3",
                    "logger=none", "callbacks.rich_progress_bar=null", "trainer.accelerator=cpu"],
                   output_dir=tmp_path / "ca")
    res = run(cfg)
    ex = res["extra"]
    assert ex["epochs_run"] == 3 and ex["selected_epoch"] == 2 and ex["selected_by"].startswith("last epoch")
    assert res["checkpoint"].endswith("last.ckpt") and not (tmp_path / "ca" / "checkpoints" / "best.ckpt").exists()


def test_clip_adapter_references_compare_only_with_the_paper_preset(tmp_path):
    r = tmp_path / "r"
    write_result(r, method="clip_adapter", experiment="clip_adapter_16shot", dataset="dtd", acc=60.0)  # MMA recipe
    write_result(r, method="clip_adapter", experiment="clip_adapter_paper_16shot", dataset="dtd", acc=70.0)
    out = tmp_path / "o"
    assert report_main([str(r), "--out", str(out), "--no-plots", "--compare"]) == 0
    cmp = pd.read_csv(out / "compare.csv")
    ca = cmp[cmp.reference == 74.44]
    assert len(ca) == 1 and ca.iloc[0].ours == pytest.approx(70.0)
