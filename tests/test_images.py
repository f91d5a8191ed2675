"""Image decoding (CMYK, greyscale, PNG bytes in a .jpg) and the unreadable-file policy."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from xmx.data.datasets import Datum
from xmx.data.images import ImageListDataset, collate_skip
from xmx.data.transforms import build_transform
from xmx.errors import XmxError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture
def tree(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    rgb.convert("CMYK").save(tmp_path / "cmyk.jpg")
    rgb.convert("L").save(tmp_path / "grey.jpg")
    rgb.save(tmp_path / "png_inside.jpg", format="PNG")  # PNG bytes behind a .jpg name
    rgb.save(tmp_path / "ok.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return tmp_path


def test_every_decodable_format_becomes_a_3_channel_tensor(tree):
    items = [Datum(n, i, "c") for i, n in enumerate(["cmyk.jpg", "grey.jpg", "png_inside.jpg", "ok.jpg"])]
    ds = ImageListDataset(tree, items, build_transform("none", 16, MEAN, STD))
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and y == i and torch.isfinite(x).all()


def test_unreadable_file_errors_by_default_naming_it(tree):
    ds = ImageListDataset(tree, [Datum("broken.jpg", 0, "c")], build_transform("none", 16, MEAN, STD))
    with pytest.raises(XmxError, match=r"unreadable image .*broken\.jpg.*data\.unreadable=skip"):
        ds[0]


def test_skip_policy_drops_and_counts(tree, caplog):
    items = [Datum("ok.jpg", 0, "c"), Datum("broken.jpg", 1, "c"), Datum("grey.jpg", 2, "c")]
    ds = ImageListDataset(tree, items, build_transform("none", 16, MEAN, STD), unreadable="skip")
    with caplog.at_level(logging.WARNING):
        x, y = collate_skip([ds[i] for i in range(3)])
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 2]
    assert "skipped 1 unreadable image" in caplog.text


def test_policy_and_preset_names_are_checked(tree):
    with pytest.raises(XmxError, match="valid choices: error, skip"):
        ImageListDataset(tree, [], None, unreadable="ignore")
    with pytest.raises(XmxError, match="valid choices: none, tip, coop"):
        build_transform("fancy", 16, MEAN, STD)
