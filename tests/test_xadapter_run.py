"""X-adapter language track as xmx runs (spec §5): every ``xadapter_*`` preset runs one step on a tiny CLIP + tiny
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
