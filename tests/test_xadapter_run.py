"""X-adapter language track as xmx runs (docs/methods/xadapter.md#design): every ``xadapter_*`` preset runs one step
on a tiny CLIP + tiny
PLM over small generated files in the real formats; pre-training -> ``init_from`` colour probe; GLUE metric names;
checkpoints without the frozen encoders; seeded masking."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from xmx.errors import XmxError
from xmx.run import run

WORDS = ("man woman dog cat horse bus train car red blue green white black sitting standing riding street beach "
         "snow table pizza cake banana apple kitchen field water tree sky").split()


def _sentence(i: int, n: int = 7) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


def _coco(root: Path, split: str, n_images: int, first_id: int) -> None:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n_images):
        iid = first_id + i
        name = f"{iid:012d}.jpg"
        colour = ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256)
        Image.new("RGB", (24 + i % 3, 20), colour).save(root / split / name, quality=90)
        images.append({"id": iid, "file_name": name, "height": 20, "width": 24 + i % 3})
        anns += [{"id": 1000 * iid + j, "image_id": iid, "caption": f"A {_sentence(iid + j)}."} for j in range(2)]
    (root / "annotations" / f"captions_{split}.json").write_text(
        json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))


def _glue(root: Path) -> None:
    sst = root / "SST-2"
    sst.mkdir(parents=True)
    for split, n in (("train", 24), ("dev", 10)):
        rows = ["sentence\tlabel"] + [f"{_sentence(i)}\t{i % 2}" for i in range(n)]
        (sst / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    cola = root / "CoLA"
    cola.mkdir()
    for split, n in (("train", 16), ("dev", 8)):
        (cola / f"{split}.tsv").write_text("".join(f"src\t{i % 2}\t\t{_sentence(i)}\n" for i in range(n)))
    sts = root / "STS-B"
    sts.mkdir()
    for split, n in (("train", 16), ("dev", 8)):
        rows = ["index\tgenre\tsentence1\tsentence2\tscore"] + [
            f"{i}\tmain\t{_sentence(i)}\t{_sentence(i + 1)}\t{(i * 0.7) % 5:.2f}" for i in range(n)]
        (sts / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    mnli = root / "MNLI"
    mnli.mkdir()
    labels = ("contradiction", "entailment", "neutral")
    for split, n in (("train", 12), ("dev_matched", 6), ("dev_mismatched", 5)):
        rows = ["index\tsentence1\tsentence2\tgold_label"] + [
            f"{i}\t{_sentence(i)}\t{_sentence(i + 2)}\t{labels[i % 3]}" for i in range(n)]
        (mnli / f"{split}.tsv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """$DATA with coco/ (captions JSON + tiny JPEGs), wikitext-103-raw/ and glue/ in their distributed layouts."""
    root = tmp_path_factory.mktemp("xadapter_data")
    _coco(root / "coco", "train2017", 10, 9)
    _coco(root / "coco", "val2017", 3, 500)
    wiki = root / "wikitext-103-raw"
    wiki.mkdir()
    for split, n in (("train", 20), ("valid", 6), ("test", 6)):
        (wiki / f"wiki.{split}.raw").write_text(
            " \n = Heading = \n \n" + "".join(f" {_sentence(i, 12)} . \n \n" for i in range(n)))
    _glue(root / "glue")
    return root


def tiny(data_dir: Path, *extra: str) -> list[str]:
    return ["backbone=tiny", "plm=tiny", f"paths.data_dir={data_dir}", "trainer.accelerator=cpu",
            "trainer.precision=32-true", "data.num_workers=0", "data.index.num_workers=0", "data.eval_batch_size=64",
            "data.index.batch_size=16", "method.adapter.heads=4", "logger=none", "callbacks.rich_progress_bar=null",
            *extra]


PRESETS = {  # preset -> (metrics it must write, its tiny-data overrides)
    "xadapter_vexpert_coco": (("test/mlm_loss", "test/mlm_acc"), ["data.val_images=3"]),
    "xadapter_texpert_wiki": (("test/mlm_loss", "test/mlm_acc"), []),
    "xadapter_color": (("test_memory_color/acc", "test_color_terms/acc"), []),
    "xadapter_glue": (("test/acc",), []),
}


def test_every_xadapter_preset_is_covered():
    from xmx.config import config_dir
    presets = sorted(p.stem for p in (config_dir() / "experiment").glob("xadapter_*.yaml"))
    assert presets == sorted(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_runs_one_step(make_cfg, data_dir, preset):
    metrics, extra = PRESETS[preset]
    cfg = make_cfg([f"experiment={preset}", *tiny(data_dir, "debug=fdr", "method.batch_size=4", *extra)])
    res = run(cfg)
    assert res["status"] == "complete" and res["shots"] == 0
    assert set(metrics) <= set(res["metrics"]), res["metrics"]
    assert all(v == v for v in res["metrics"].values())  # no NaN
    assert res["weights_plm"]["name"] == "tiny-bert"
    for split in res["data"]["splits"].values():
        assert split["n"] > 0 and len(split["sha256"]) == 64
    out = Path(cfg.paths.output_dir)
    assert json.loads((out / "results.json").read_text())["metrics"] == res["metrics"]


def _state(run_dir: Path) -> dict:
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts, f"no checkpoint in {run_dir}"
    return {p.name: torch.load(p, map_location="cpu", weights_only=False)["state_dict"] for p in ckpts}


def test_pretrain_then_colour_probe_loads_the_adapter(make_cfg, data_dir, tmp_path, caplog):
    pre = tmp_path / "pre"
    res = run(make_cfg(["experiment=xadapter_vexpert_coco", *tiny(
        data_dir, "data.val_images=3", "method.batch_size=4", "method.steps=4", "method.lr=0.05",
        "method.warmup=0.0", "method.decay=constant", "+trainer.limit_val_batches=1")], output_dir=pre))
    assert res["metrics"]["test/mlm_loss"] > 0 and 0 <= res["metrics"]["test/mlm_acc"] <= 100
    assert res["metrics"]["val/acc"] == pytest.approx(res["extra"]["val_curve"][-1]["val/mlm_acc"])
    gate = res["extra"]["gates"]["layer2"]  # placement last_two on 3 layers: after layer 2
    assert gate != 0.0  # only the gate moves on the first step, and it did move
    for name, sd in _state(pre).items():  # adapter only: the frozen encoders stay out of the checkpoint
        assert sd and all(k.startswith("adapter.") for k in sd), (name, [k for k in sd][:5])
    assert torch.load(pre / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"][
        "adapter.blocks.1.gate"].item() == pytest.approx(gate)

    probe = ["experiment=xadapter_color", *tiny(data_dir)]
    base = run(make_cfg(probe, output_dir=tmp_path / "bare"))
    caplog.set_level(logging.INFO, logger="xmx.methods.base")
    loaded = run(make_cfg(probe + ["data.sets=[color_terms]", f"init_from={pre}"], output_dir=tmp_path / "probe"))
    assert any("loaded" in r.getMessage() and "tensors" in r.getMessage() and "loaded 0 " not in r.getMessage()
               for r in caplog.records)
    assert loaded["extra"]["init_from"]["tensors_loaded"] == len(_state(pre)["last.ckpt"])
    assert loaded["extra"]["gates"]["layer2"] == pytest.approx(gate)
    assert base["extra"]["expert"] == "none" and loaded["extra"]["expert"] == "v"
    from safetensors.torch import load_file
    for name in ("test_color_terms",):
        a = load_file(tmp_path / "bare" / "predictions.safetensors")[f"{name}/logits"]
        b = load_file(tmp_path / "probe" / "predictions.safetensors")[f"{name}/logits"]
        assert a.shape == b.shape and a.shape[0] == {"test_memory_color": 9 * 109, "test_color_terms": 9 * 52}[name]
        assert not torch.equal(a, b)  # the adapter (gate != 0, retrieved images) changes the colour logits
    # full probes: accuracy pooled over 9 templates x items, per template in extra
    assert {"test_memory_color/acc", "test_color_terms/acc"} <= set(base["metrics"])
    assert set(loaded["metrics"]) == {"test_color_terms/acc"}
    assert len(base["extra"]["per_template"]["test_memory_color"]) == 9


def test_init_from_with_another_adapter_shape_is_one_line(make_cfg, data_dir, tmp_path):
    pre = tmp_path / "pre"
    run(make_cfg(["experiment=xadapter_texpert_wiki", *tiny(data_dir, "method.batch_size=8", "method.steps=1",
                                                             "+trainer.limit_val_batches=1")], output_dir=pre))
    assert all(k.startswith("adapter.blocks.1.") for k in _state(pre)["last.ckpt"])
    cfg = make_cfg(["experiment=xadapter_color", *tiny(data_dir, "method.adapter.placement=every",
                                                       f"init_from={pre}")])
    with pytest.raises(XmxError, match=r"init_from=.*lacks .* adapter tensors.*same method.adapter"):
        run(cfg)


@pytest.mark.parametrize("task,names", [
    ("cola", {"test/mcc"}), ("stsb", {"test/pearson", "test/spearman"}),
    ("mnli", {"test_matched/acc", "test_mismatched/acc"})])
def test_glue_writes_the_task_metrics(make_cfg, data_dir, task, names):
    res = run(make_cfg(["experiment=xadapter_glue", f"glue_task={task}",
                        *tiny(data_dir, "debug=fdr", "method.batch_size=4")]))
    assert names <= set(res["metrics"]) and res["extra"]["task"] == task
    assert res["experiment"] == f"xadapter_glue_{task}"
    assert not any(k.startswith("test/") for k in res["metrics"]) if task == "mnli" else True


@pytest.mark.parametrize("variant,plm_in_ckpt", [([], False), (["method.adapter=null"], False),
                                                 (["method.finetune_plm=true", "method.adapter=null"], True)])
def test_glue_checkpoints_and_baselines(make_cfg, data_dir, tmp_path, variant, plm_in_ckpt):
    out = tmp_path / "glue"
    res = run(make_cfg(["experiment=xadapter_glue", *tiny(data_dir, "method.batch_size=8", "trainer.max_epochs=1",
                                                          "data.train_size=8", *variant)], output_dir=out))
    assert "test/acc" in res["metrics"] and res["extra"]["finetune_plm"] == plm_in_ckpt
    sd = _state(out)["last.ckpt"]
    assert any(k.startswith("head.") for k in sd)
    assert not any(k.startswith("backbone.") for k in sd)
    assert any(k.startswith("plm.") for k in sd) == plm_in_ckpt
    assert any(k.startswith("adapter.") for k in sd) == (not variant)


def test_masking_is_seeded_by_seed_and_epoch(data_dir):
    from xmx.backbones.clip import CLIPBackbone
    from xmx.backbones.plm import build_plm
    from xmx.datamodules.text import WikiTextDataModule
    clip, plm = CLIPBackbone("xmx-tiny", None), build_plm("tiny")

    def batches(seed, epoch):
        dm = WikiTextDataModule("wikitext103", data_dir / "wikitext-103-raw", clip, plm, seed=seed, batch_size=8,
                                num_workers=0, mask_ratio=0.3)
        dm.setup()
        dl = dm.train_dataloader()
        dl.sampler.set_epoch(epoch)
        return list(dl)

    a, b, c, d = batches(1, 0), batches(1, 0), batches(1, 1), batches(2, 0)
    assert len(a) == 3 and all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
                               for x, y in zip(a, b))
    assert not torch.equal(a[0]["labels"], c[0]["labels"]) and not torch.equal(a[0]["labels"], d[0]["labels"])
    for x in a:  # every batch predicts something and carries its CLIP query (the PLM's view) per sentence
        assert (x["labels"] != -100).any() and x["clip_tokens"].shape == (x["input_ids"].shape[0], 77)
    mask_ratio = torch.cat([(x["labels"] != -100)[x["attention_mask"].bool()].float() for x in a]).mean()
    assert 0.15 < float(mask_ratio) < 0.45
    with pytest.raises(XmxError, match="needs a PLM"):
        WikiTextDataModule("wikitext103", data_dir / "wikitext-103-raw", clip, None)
