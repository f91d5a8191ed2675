"""TDA (xmx/methods/tda.py) against an independent replay of the release's per-image loop (kdiAAA/TDA
tda_runner.py run_test_tda / update_cache / compute_cache_logits, utils.py get_clip_logits) on the same features and
order; the test_time protocol's seeded order; kill-and-resume mid-stream; one-line errors."""

from __future__ import annotations

import json
import math
import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from xmx.data.protocols import build_protocol, stream_order
from xmx.errors import XmxError
from xmx.methods import tda
from xmx.methods.tda import TDAConfig, TDAStream, summarize_views
from xmx.run import run

SCALE = 6.0  # a soft scale on random features: entropies spread over the negative cache's (0.2, 0.5) window


# ---- the release's loop, re-implemented per image on lists (as tda_runner.py) --------------------------------------
def release_clip(feats_i: torch.Tensor, W: torch.Tensor, scale: float):
    """utils.py get_clip_logits on one image's views [V,C] (raw)."""
    f = feats_i / feats_i.norm(dim=-1, keepdim=True)
    z = scale * f @ W
    if f.shape[0] > 1:
        ent = -(z.softmax(1) * z.log_softmax(1)).sum(1)
        idx = torch.argsort(ent, descending=False, stable=True)[:int(ent.shape[0] * 0.1)]
        out = z[idx]
        key, zi = f[idx].mean(0, keepdim=True), out.mean(0, keepdim=True)
        lp = out - out.logsumexp(-1, keepdim=True)
        avg = lp.logsumexp(0) - np.log(lp.shape[0])
        loss = -(avg * avg.exp()).sum(-1)
        prob = out.softmax(1).mean(0, keepdim=True)
        pred = int(out.mean(0).argmax())
    else:
        key, zi = f, z
        loss = -(z.softmax(1) * z.log_softmax(1)).sum(1)[0]
        prob, pred = z.softmax(1), int(z.argmax())
    return key, zi, loss, prob, pred


def release_update(cache, pred, item, cap):
    if pred in cache:
        if len(cache[pred]) < cap:
            cache[pred].append(item)
        elif item[1] < cache[pred][-1][1]:
            cache[pred][-1] = item
        cache[pred] = sorted(cache[pred], key=operator.itemgetter(1))
    else:
        cache[pred] = [item]


def release_cache_logits(key, cache, alpha, beta, K, neg_mask=None):
    keys, values = [], []
    for c in sorted(cache):
        for item in cache[c]:
            keys.append(item[0])
            values.append(item[2] if neg_mask else c)
    keys = torch.cat(keys, 0).T
    if neg_mask:
        v = torch.cat(values, 0)
        values = ((v > neg_mask[0]) & (v < neg_mask[1])).float()
    else:
        values = F.one_hot(torch.tensor(values), K).float()
    return alpha * ((-1) * (beta - beta * (key @ keys))).exp() @ values


def release_loop(feats: torch.Tensor, W: torch.Tensor, cfg: TDAConfig, scale: float):
    """-> (logits [N,K], preds, pos cache, neg cache); cache items carry the image index as their 4th field."""
    pos, neg, out = {}, {}, []
    K = W.shape[1]
    for i in range(feats.shape[1]):
        key, z, loss, prob, pred = release_clip(feats[:, i], W, scale)
        ent = float(loss / math.log2(K))
        release_update(pos, pred, [key, float(loss), None, i], cfg.pos_capacity)
        if cfg.entropy_lower < ent < cfg.entropy_upper:
            release_update(neg, pred, [key, float(loss), prob, i], cfg.neg_capacity)
        final = z.clone()
        if pos:
            final += release_cache_logits(key, pos, cfg.pos_alpha, cfg.pos_beta, K)
        if neg:
            final -= release_cache_logits(key, neg, cfg.neg_alpha, cfg.neg_beta, K,
                                          (cfg.mask_lower, cfg.mask_upper))
        out.append(final)
    logits = torch.cat(out)
    return logits, logits.argmax(1), pos, neg


def _data(V, N=90, K=6, C=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, N, C, generator=g), F.normalize(torch.randn(C, K, generator=g), dim=0)


@pytest.mark.parametrize("V", [1, 20])
@pytest.mark.parametrize("chunk", [1, 16, 1024])
def test_tda_equals_the_replayed_release_loop(V, chunk):
    feats, W = _data(V)
    cfg = TDAConfig(pos_capacity=2, neg_capacity=1, pos_alpha=2.0, pos_beta=5.0)
    ref_logits, ref_pred, ref_pos, ref_neg = release_loop(feats, W, cfg, SCALE)
    st = TDAStream(summarize_views(feats, W, SCALE, 0.1, chunk=7), cfg)
    st.run(chunk=chunk)
    # cache contents: the same images, in the same order, under the same classes (and a full, evicting cache)
    assert st.pos.contents() == {c: [it[3] for it in v] for c, v in sorted(ref_pos.items())}
    assert st.neg.contents() == {c: [it[3] for it in v] for c, v in sorted(ref_neg.items())}
    assert sum(map(len, ref_neg.values())) >= 2 and any(t < 1 << 62 for t in st.pos.t_out)  # both caches at work
    for c, v in ref_pos.items():  # keys and entropies of the entries
        for it, (loss, e) in zip(v, st.pos.slots[c]):
            assert torch.equal(st.s.key[st.pos.t_in[e]], it[0][0]) and loss == pytest.approx(it[1], abs=1e-6)
    # logits up to float summation order, predictions exactly
    assert torch.allclose(st.logits, ref_logits, atol=1e-5, rtol=1e-6)
    assert torch.equal(st.logits.argmax(1), ref_pred)
    assert not torch.allclose(st.logits, st.s.logits)  # the caches changed the logits


def test_a_stream_resumed_from_its_saved_state_is_identical(tmp_path):
    feats, W = _data(1, N=120)
    cfg = TDAConfig(pos_capacity=2, neg_capacity=1)
    s = summarize_views(feats, W, SCALE)
    whole = TDAStream(s, cfg)
    whole.run(chunk=16)
    part = TDAStream(s, cfg)
    part.run(until=48, chunk=16)
    torch.save(part.state(), tmp_path / "state.pt")
    resumed = TDAStream(s, cfg)
    resumed.load(torch.load(tmp_path / "state.pt", weights_only=False))
    resumed.run(chunk=16)
    assert torch.equal(resumed.logits, whole.logits)
    assert resumed.pos.contents() == whole.pos.contents() and resumed.neg.contents() == whole.neg.contents()


def test_stream_order_is_a_function_of_the_seed_alone(make_cfg, xmx_cache):
    assert stream_order(50, 3) == stream_order(50, 3) != stream_order(50, 4)
    first = stream_order(50, 3)
    torch.manual_seed(123)  # the global RNG does not enter it
    assert stream_order(50, 3) == first and sorted(first) == list(range(50))
    from pathlib import Path

    from xmx.data.datasets import load_dataset
    from xmx.data.synthetic import ensure
    root = Path(str(make_cfg(["data=synthetic"]).data.root))
    ensure(root)
    splits = load_dataset("synthetic", root)
    a = build_protocol({"name": "test_time"}, splits, shots=16, seed=2, templates=["a {}"])
    b = build_protocol({"name": "test_time"}, splits, shots=1, seed=2, templates=["b {}"], subset_seed=9)
    (ta,), (tb,) = a.eval_sets, b.eval_sets
    assert ta.order == tb.order == stream_order(len(splits.test), 2)
    assert [d.path for d in ta.items] == [splits.test[i].path for i in ta.order]
    assert a.train == [] and a.val.items == []


# ---- through the run loop: the order in subset.json, kill and resume -------------------------------------------
RUN = ["backbone=tiny", "data=synthetic", "protocol=test_time", "method=tda", "trainer.accelerator=cpu",
       "method.checkpoint_every=40", "method.chunk=20", "method.logit_scale=8"]


def test_a_killed_run_resumes_mid_stream_to_identical_numbers(make_cfg, tmp_path, monkeypatch):
    whole = run(make_cfg(RUN, output_dir=tmp_path / "whole"))
    sub = json.loads((tmp_path / "whole" / "subset.json").read_text())
    order = sub["streams"]["test"]["order"]
    assert sorted(order) == list(range(len(order))) and sub["streams"]["test"]["seed"] == 1

    real, calls = tda.TDA._write_state, []

    def killed(self, path):
        real(self, path)
        calls.append(self.streams["test"].done)
        if len(calls) == 2:
            raise RuntimeError("killed mid-stream")

    monkeypatch.setattr(tda.TDA, "_write_state", killed)
    with pytest.raises(RuntimeError, match="killed mid-stream"):
        run(make_cfg(RUN, output_dir=tmp_path / "cut"))
    assert calls == [40, 80]
    monkeypatch.setattr(tda.TDA, "_write_state", real)
    resumed_at = []
    load = TDAStream.load
    monkeypatch.setattr(TDAStream, "load", lambda self, st: (resumed_at.append(int(st["done"])), load(self, st)))
    again = run(make_cfg(RUN, output_dir=tmp_path / "cut"))
    assert again["resumed"] and resumed_at == [80]
    assert again["metrics"] == whole["metrics"]
    a, b = load_file(tmp_path / "whole" / "predictions.safetensors"), load_file(tmp_path / "cut" /
                                                                                "predictions.safetensors")
    assert torch.equal(a["test/logits"], b["test/logits"]) and torch.equal(a["test/labels"], b["test/labels"])


# ---- one-line errors ---------------------------------------------------------------------------------------------
def test_bad_values_are_one_line_errors(make_cfg, tmp_path):
    with pytest.raises(XmxError, match="keeps int"):
        tda.TDA(views=5).n_views("x")
    with pytest.raises(XmxError, match="shot_capacity=0 must be >= 1"):
        TDAConfig.from_table({"positive": {"shot_capacity": 0}})
    with pytest.raises(XmxError, match="lower must be below upper"):
        TDAConfig.from_table({"negative": {"entropy_threshold": {"lower": 0.6, "upper": 0.5}}})
    with pytest.raises(XmxError, match="share of confident views"):
        tda.TDA(top=0)
    with pytest.raises(XmxError, match="runs on protocol=test_time"):
        run(make_cfg(["backbone=tiny", "data=synthetic", "method=tda", "trainer.accelerator=cpu"],
                     output_dir=tmp_path / "few"))


def test_augmix_views_are_seeded_per_view_and_image():
    from xmx.data.augmix import augmix_view
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))

    def pre(im):
        return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 255

    a = augmix_view(img, pre, np.random.default_rng(5))
    assert torch.equal(a, augmix_view(img, pre, np.random.default_rng(5)))
    assert not torch.equal(a, augmix_view(img, pre, np.random.default_rng(6)))
    assert a.shape == (3, 32, 32) and not torch.equal(a, pre(img))
