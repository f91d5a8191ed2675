"""The tree ``python -m xmx.data fake`` writes is one a preset runs on as it is: ``check`` passes (exit 0) on it,
fake ImageNet holds the files the shipped CoOp subsets name (1-8-shot runs read them; 16 shots sample), and the
X-adapter presets run on its COCO captions, WikiText-103 and GLUE."""

from __future__ import annotations

import json

import pytest

from xmx.data.__main__ import main as data_main
from xmx.run import run

TINY_TEXT = ["backbone=tiny", "plm=tiny", "trainer.accelerator=cpu", "trainer.precision=32-true",
             "data.num_workers=0", "data.index.num_workers=0", "data.index.batch_size=16", "method.adapter.heads=4",
             "logger=none", "callbacks.rich_progress_bar=null", "debug=fdr", "method.batch_size=4"]


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fake")
    assert data_main(["fake", str(root), "--datasets", "imagenet,dtd,coco_captions,wikitext103,glue"]) == 0
    return root


@pytest.mark.slow
def test_check_passes_on_the_fake_tree(fake_root, capsys):
    capsys.readouterr()
    assert data_main(["check", str(fake_root), "--datasets", "imagenet,dtd"]) == 0
    out = capsys.readouterr().out
    assert "imagenet         found" in out and "fake data" in out and "spec" not in out
    marker = json.loads((fake_root / "imagenet" / "xmx_fake_data.json").read_text())
    assert marker["train"] > 20 * 1000  # the subsets' files besides the 20 per class


@pytest.mark.slow
@pytest.mark.parametrize("shots", [1, 16])
def test_imagenet_runs_on_the_fake_tree(make_cfg, fake_root, tmp_path, shots):
    res = run(make_cfg(["experiment=tip_adapter_16shot", "data=imagenet", f"shots={shots}", "backbone=tiny",
                        f"paths.data_dir={fake_root}", "augment.views=1", "method.n_beta=2", "method.n_alpha=2",
                        "logger=none", "callbacks.rich_progress_bar=null", f"paths.log_dir={tmp_path / 'logs'}"],
                       output_dir=tmp_path / "run"))
    assert res["data"]["synthetic"] is True and res["shots"] == shots
    # 1-8 shots: the shipped CoOp subset (the files real ImageNet runs read); 16: sampled from the fake folders
    source = str(res["data"]["subset_source"])
    assert source.startswith("coop:imagenet/shot_") == (shots < 16), source


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["xadapter_vexpert_coco", "xadapter_texpert_wiki", "xadapter_color",
                                    "xadapter_glue"])
def test_xadapter_presets_run_on_the_fake_tree(make_cfg, fake_root, tmp_path, preset):
    res = run(make_cfg([f"experiment={preset}", *TINY_TEXT, f"paths.data_dir={fake_root}",
                        f"paths.log_dir={tmp_path / 'logs'}"], output_dir=tmp_path / "run"))
    assert res["metrics"], res
