"""Nothing runs silently for minutes: every long loop (Tip-Adapter's alpha/beta search, GDA, LP++, ProLIP, the
linear probe's C search, feature extraction, the online path's image check) logs a line at least every 10 s. The
clock is patched so that each step of a loop looks 11 s long: every step must then say where it is."""

from __future__ import annotations

import functools
import logging
import time

import numpy as np
import pytest
import torch

from xmx import utils


@pytest.fixture
def slow_clock(monkeypatch):
    """time.monotonic advancing 11 s per call (Heartbeat reads it once per step)."""
    now = [0.0]

    def tick():
        now[0] += 11.0
        return now[0]

    monkeypatch.setattr(time, "monotonic", tick)


def _beats(caplog, what: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(what)]


def test_tip_search_beats_inside_the_beta_loop_when_all_rows_fit_one_chunk(slow_clock, caplog):
    from xmx.methods.tip_adapter import search_alpha_beta
    g = torch.Generator().manual_seed(0)
    f, W = torch.randn(30, 8, generator=g), torch.randn(8, 4, generator=g)
    keys, y = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1), torch.arange(30) % 4
    values = torch.nn.functional.one_hot(torch.arange(12) % 4, 4).float()
    # a chunk budget that holds all 30 rows but one beta at a time: 6 beta chunks, one row chunk
    per_row = 12 + 4 + 3 * 4
    with caplog.at_level(logging.INFO, logger="xmx"):
        search_alpha_beta(f, y, W, keys, values, 5.0, 5.0, n_beta=6, n_alpha=3, max_elements=30 * per_row)
    lines = _beats(caplog, "alpha/beta search")
    assert len(lines) == 6, lines  # one per beta chunk (it was one per row chunk: a single line at the very end)
    assert lines[0].startswith("alpha/beta search (6x3 on 30 images), betas: 1/6")


def test_feature_method_loops_beat(slow_clock, caplog):
    from xmx.methods.gda import class_mean_precision, search_alpha, synthesize_new_classes
    from xmx.methods.lpp import fit_lpp
    from xmx.methods.prolip import fit_projection
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(24, 6, generator=g), dim=1)
    y = torch.arange(24) % 3
    T = torch.nn.functional.normalize(torch.randn(6, 3, generator=g), dim=0)
    with caplog.at_level(logging.INFO, logger="xmx"):
        fit_lpp(x, y, T, 3, epochs=5)
        mu = torch.stack([x[y == k].mean(0) for k in range(3)])
        class_mean_precision(x.double(), y, mu.double())
        synthesize_new_classes(x, T, topk=4, chunk=1)
        search_alpha(torch.randn(24, 3), torch.randn(24, 3), y, alphas=[0.1, 1.0, 10.0])
        P0 = torch.randn(6, 6, generator=g)
        fit_projection(x[None], y, P0, None, T, 1e-3, 0.1, epochs=4)
    assert len(_beats(caplog, "LP++ fit")) == 5
    assert len(_beats(caplog, "GDA class covariances")) == 3
    assert len(_beats(caplog, "GDA new-class Gaussians")) == 3
    assert len(_beats(caplog, "GDA alpha search")) == 3
    assert len(_beats(caplog, "ProLIP fit")) == 4


def test_an_opaque_fit_beats_from_a_thread(monkeypatch, caplog):
    """The linear probe's C fits run inside scikit-learn: a background heartbeat speaks while each one runs."""
    import xmx.methods.linear_probe as lp
    monkeypatch.setattr(lp, "Heartbeat", functools.partial(utils.Heartbeat, every_s=0.05))

    def slow_fit(X, y, k, C):
        time.sleep(0.3)
        return np.zeros((X.shape[1], k)), np.zeros(k)

    X, yv = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    with caplog.at_level(logging.INFO, logger="xmx"):
        lp.lpclip_search(slow_fit, X, yv, X, yv, 2, grid=[1.0], steps=0)
    lines = _beats(caplog, "linear probe coarse C=1")
    assert len(lines) >= 2 and lines[0].startswith("linear probe coarse C=1: fitting ("), lines


def test_extraction_without_a_bar_and_the_image_check_beat(slow_clock, caplog, tmp_path):
    from PIL import Image

    from xmx.backbones.clip import CLIPBackbone
    from xmx.data.datasets import Datum
    from xmx.data.images import find_unreadable
    from xmx.features.extract import extract_image_features
    paths = []
    for i in range(5):
        Image.new("RGB", (20, 20), (40 * i, 10, 10)).save(tmp_path / f"{i}.jpg")
        paths.append(Datum(f"{i}.jpg", 0, "a"))
    torch.manual_seed(0)
    bb = CLIPBackbone("xmx-tiny", None)
    with caplog.at_level(logging.INFO, logger="xmx"):
        extract_image_features(bb, paths, tmp_path, batch_size=2, num_workers=0, progress=False, decode="pil",
                               device="cpu")
        find_unreadable(tmp_path, paths, 0, what="test")
    assert len(_beats(caplog, "image features")) == 3  # 3 batches of 2, 2, 1 images
    assert _beats(caplog, "checking test images: 5/5")
