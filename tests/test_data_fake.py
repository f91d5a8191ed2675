"""``python -m xmx.data fake``: a small CoOp-layout tree from the shipped split files that the real readers, the
checker and a preset run accept end to end, marked as fake so that no number from it passes as an accuracy."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from conftest import one_line_error
from test_data_coop import fake_coop_tree
from xmx.data.__main__ import main as data_main
from xmx.data.datasets import load_dataset
from xmx.data.fake import MARKER, class_colour, write_fake_dataset
from xmx.run import run


def test_cli_writes_trees_the_checker_finds_complete(tmp_path, capsys):
    root = tmp_path / "DATA"
    assert data_main(["fake", str(root), "--datasets", "dtd"]) == 0
    assert "dtd" in capsys.readouterr().out
    assert data_main(["check", str(root), "--datasets", "dtd", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dtd"] == {"train": 2820, "val": 1128, "test": 1692, "classes": 47,
                                                          "status": "found"}
    s = load_dataset("dtd", root)
    first = {d.label: d for d in s.train}
    pixels = {y: np.asarray(Image.open(root / d.path)).reshape(-1, 3).mean(0) for y, d in first.items()}
    assert len(pixels) == 47 and Image.open(root / first[0].path).size == (8, 8)
    for y, px in pixels.items():  # one plain colour per class, told apart from every other class
        assert np.abs(px - np.array(class_colour(y, 47))).max() < 12, y
    assert len({tuple(np.round(px / 8)) for px in pixels.values()}) == 47
    assert json.loads((root / "dtd" / MARKER).read_text())["fake"] is True


def test_bad_requests_are_one_line_and_real_folders_are_never_touched(tmp_path, capsys):
    one_line_error(lambda: write_fake_dataset(tmp_path, "food101"), "food101", "fakeable datasets:", "dtd")
    one_line_error(lambda: write_fake_dataset(tmp_path, "imagenette"), "unknown dataset 'imagenette'")
    (tmp_path / "dtd").mkdir()
    (tmp_path / "dtd" / "mine.jpg").write_bytes(b"a real image")
    one_line_error(lambda: write_fake_dataset(tmp_path, "dtd"), "is not a fake tree", "refusing")
    assert (tmp_path / "dtd" / "mine.jpg").read_bytes() == b"a real image"
    assert data_main(["fake", str(tmp_path), "--datasets", "dtd,food101"]) == 2
    assert capsys.readouterr().err.count("error:") == 1 and not (tmp_path / "dtd" / "images").exists()


def test_a_preset_runs_end_to_end_on_the_fake_tree_and_says_so(make_cfg, tmp_path_factory, one_thread):
    root = fake_coop_tree(tmp_path_factory, "caltech101")
    res = run(make_cfg(["experiment=zeroshot_16shot", "backbone=tiny", f"data.root={root}", "shots=1",
                        "trainer.accelerator=cpu"]))
    assert res["dataset"] == "caltech101" and res["data"]["splits"]["test"]["n"] == 2465
    assert res["data"]["synthetic"] is True and res["weights"]["random_init"] is True
    assert 0 <= res["metrics"]["test/acc"] <= 100


def test_imagenet_family_one_colour_per_class_across_variants(tmp_path):
    from xmx.data import coop
    write_fake_dataset(tmp_path, "imagenet", per_class=1)
    write_fake_dataset(tmp_path, "imagenet_a", per_class=1)
    inet, a = load_dataset("imagenet", tmp_path), load_dataset("imagenet_a", tmp_path)
    # 1 per class + every file the shipped CoOp subsets name (1-8-shot runs read those)
    assert len(inet.train) > 100_000 and (len(inet.test), len(inet.classnames)) == (1000, 1000)
    assert (len(a.test), len(a.classnames)) == (200, 200)
    j = 7  # ImageNet-A's 8th class is ImageNet's class idx[7]: the same colour in both trees
    idx = coop.imagenet_indices("imagenet_a")[j]
    src = next(d for d in inet.train if d.label == idx)
    tgt = next(d for d in a.test if d.label == j)
    assert (Image.open(tmp_path / src.path).getpixel((4, 4)) == Image.open(tmp_path / tgt.path).getpixel((4, 4)))
