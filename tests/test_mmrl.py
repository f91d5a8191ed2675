"""MMRL (xmx.methods.mmrl): the representation tokens enter both towers as a hand computation says; the base (fused)
and new (class-token) inference rules; the loss is the release's formula; the ViT-B/16 trainable count; checkpoints
hold only the learned tensors and a stopped run resumes to the same numbers; bad input is one line."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from tiny_trainable import interrupted_at_epoch
import torch
import torch.nn.functional as F
from conftest import ONLINE_TINY, one_line_error
from safetensors.torch import load_file
from torch import nn

from xmx.backbones.clip import CLIPBackbone
from xmx.methods.mmrl import MMRLMethod
from xmx.run import run

pytestmark = pytest.mark.usefixtures("one_thread")
BASE, NEW = ["cat", "dog", "sea lion"], ["bird", "fish"]
TPL = ["a photo of a {}."]


def _method(bb, **kw):
    base = SimpleNamespace(name="test_base", classnames=BASE, templates=TPL)
    new = SimpleNamespace(name="test_new", classnames=NEW, templates=["{} texture."])
    dm = SimpleNamespace(backbone=bb, inputs="images", classnames=BASE, templates=TPL, val_set=base,
                         eval_sets=[base, new], logit_scale=bb.logit_scale, shots=2)
    m = MMRLMethod(amp="none", **kw)
    m.build(dm)
    with torch.no_grad():  # move the maps away from their (equal) init so each layer differs
        for p in m.rep.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _hand_text(bb, texts, R: dict, K: int):
    """The release's TextEncoder_MMRL written out: insert after SOT at the first listed block, replace later."""
    tok = bb.tokenize(texts)
    t = bb.model
    x = t.token_embedding(tok) + t.positional_embedding
    first = min(R)
    for i, blk in enumerate(t.transformer.resblocks):
        if i in R:
            rest = x[:, 1:] if i == first else x[:, 1 + K:]
            x = torch.cat([x[:, :1], R[i].expand(len(texts), -1, -1), rest], 1)
        L = x.shape[1]
        x = blk(x, attn_mask=torch.full((L, L), float("-inf")).triu(1))
    x = t.ln_final(x)
    return x[torch.arange(len(texts)), tok.argmax(-1) + K] @ t.text_projection


def _hand_image(visual, x, R: dict, K: int, proj_rep):
    t = visual.conv1(x).flatten(2).transpose(1, 2)
    t = visual.ln_pre(torch.cat([visual.class_embedding.expand(len(x), 1, -1), t], 1) + visual.positional_embedding)
    first = min(R)
    for i, blk in enumerate(visual.transformer.resblocks):
        if i in R:
            rest = t[:, 1:] if i == first else t[:, 1 + K:]
            t = torch.cat([t[:, :1], R[i].expand(len(x), -1, -1), rest], 1)
        t = blk(t)
    t = visual.ln_post(t)
    return t[:, 0] @ visual.proj, t[:, 1:1 + K].mean(1) @ proj_rep


@pytest.mark.parametrize("layers", [[1, 2], [2]])
def test_base_and_new_inference_rules_by_hand(tiny_clip, layers):
    bb = copy.deepcopy(tiny_clip)
    m = _method(bb, n_rep_tokens=3, rep_layers=layers, rep_dim=16)
    m.eval()
    x = torch.randn(4, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        R = m.rep.tokens
        Rt = {l - 1: f(R) for l, f in zip(layers, m.rep.to_text)}
        Rv = {l - 1: f(R) for l, f in zip(layers, m.rep.to_vision)}
        v, vr = (F.normalize(a, dim=-1) for a in _hand_image(bb.model.visual, x, Rv, 3, m.rep.proj_rep))
        out = {}
        for name, names, tpl in (("test_base", BASE, TPL[0]), ("test_new", NEW, "{} texture.")):
            t = F.normalize(_hand_text(bb, [tpl.format(c) for c in names], Rt, 3), dim=-1)
            z, zr = 100 * v @ t.T, 100 * vr @ t.T
            out[name] = (z, zr, 0.7 * z + 0.3 * zr)
        got_base = m.logits(x, SimpleNamespace(name="test_base"))
        got_new = m.logits(x, SimpleNamespace(name="test_new"))
    torch.testing.assert_close(got_base, out["test_base"][2], atol=1e-4, rtol=1e-5)  # base: fused
    torch.testing.assert_close(got_new, out["test_new"][0], atol=1e-4, rtol=1e-5)  # new: class token only
    assert not torch.allclose(out["test_base"][0], out["test_base"][2], atol=1e-3)  # the two rules differ here


def test_loss_is_the_release_formula(tiny_clip):
    bb = copy.deepcopy(tiny_clip)
    m = _method(bb, n_rep_tokens=2, rep_layers=[2], rep_dim=8, reg_weight=0.5)
    m.train()
    x, y = torch.randn(4, 3, bb.image_size, bb.image_size), torch.tensor([0, 1, 2, 1])
    loss = m.training_step((x, y), 0)
    with torch.no_grad():
        z, zr, _ = m.heads(x, "train")
        v = m.image_features(x)
        t = m.text_features("train")
        v0 = F.normalize(bb.encode_image(x), dim=-1)
        t0 = F.normalize(bb.encode_text(bb.tokenize([f"a photo of a {c}." for c in BASE])), dim=-1)
        ref = (0.7 * F.cross_entropy(z, y) + 0.3 * F.cross_entropy(zr, y)
               + 0.5 * (1 - (v * v0).sum(1).mean()) + 0.5 * (1 - (t * t0).sum(1).mean()))
    torch.testing.assert_close(loss.detach(), ref, atol=1e-5, rtol=1e-5)


def test_vit_b16_trainable_count():
    torch.manual_seed(0)
    bb = CLIPBackbone("ViT-B-16", None)
    es = SimpleNamespace(name="test", classnames=BASE, templates=TPL)
    m = MMRLMethod(amp="none")
    m.build(SimpleNamespace(backbone=bb, inputs="images", classnames=BASE, templates=TPL, val_set=es, eval_sets=[es],
                            logit_scale=bb.logit_scale, shots=2))
    assert m.parameter_counts()["trainable"] == 5 * 512 + 7 * (512 * 512 + 512) + 7 * (512 * 768 + 768) + 768 * 512
    assert m.parameter_counts()["trainable"] == 4_992_256


MMRL = [*ONLINE_TINY, "method=mmrl", "method.rep_layers=[2]", "method.rep_dim=16"]


def test_checkpoint_holds_only_learned_tensors_and_resumes(make_cfg, tmp_path, monkeypatch):
    args = [*MMRL, "method.epochs=3", "method.batch_size=8", "method.optimizer.lr=0.01",
            f"paths.log_dir={tmp_path / 'logs'}"]
    ref = run(make_cfg(args, output_dir=tmp_path / "ref"))
    sd = torch.load(tmp_path / "ref" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert sd and all(k.startswith("rep.") for k in sd)
    assert sum(v.numel() for v in sd.values()) == ref["parameters"]["trainable"]

    with interrupted_at_epoch(monkeypatch, MMRLMethod):
        run(make_cfg(args, output_dir=tmp_path / "logs" / "run"))
    res = run(make_cfg(args, output_dir=tmp_path / "logs" / "run"))
    assert res["resumed"] is True and res["metrics"] == ref["metrics"]
    a = load_file(tmp_path / "logs" / "run" / "predictions.safetensors")
    b = load_file(tmp_path / "ref" / "predictions.safetensors")
    assert torch.equal(a["test/logits"], b["test/logits"])


@pytest.mark.parametrize("overrides,needles", [
    (["method=mmrl"], ["method.rep_layers=", "1..2"]),
    (["method=mmrl", "method.n_rep_tokens=0"], ["method.n_rep_tokens=0"]),
    (["method=mmrl", "method.rep_layers=[2,1]"], ["method.rep_layers=[2, 1]", "increasing"]),
    (["method=mmrl", "method.alpha=1.5"], ["method.alpha=1.5"]),
])
def test_bad_values_are_one_line(make_cfg, overrides, needles):
    one_line_error(lambda: run(make_cfg([*ONLINE_TINY, *overrides])), *needles)


def test_image_tower_without_a_vit_refuses(tiny_clip):
    bb = copy.deepcopy(tiny_clip)
    bb.model.visual = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1))
    one_line_error(lambda: _method(bb, rep_layers=[2]), "MMRL", "VisionTransformer")


def test_presets_compose():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from xmx.config import config_dir
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for name, data, want in [("mmrl_b2n", "caltech101", (4, 10, 1.0, "base2new")),
                                 ("mmrl_b2n", "imagenet", (32, 5, 1.0, "base2new")),
                                 ("mmrl_16shot", "dtd", (32, 50, 0.5, "fewshot")),
                                 ("mmrl_16shot", "imagenet", (32, 5, 1.0, "fewshot")),
                                 ("mmrl_domain_shift", "imagenet", (32, 1, 0.2, "domain_shift"))]:
            c = compose("config", overrides=[f"experiment={name}", f"data={data}"])
            assert (c.method.batch_size, c.method.epochs, c.method.reg_weight, c.protocol.name) == want
            assert c.augment.preset == "tip" and c.method.name == "mmrl" and c.method.logit_scale == 100
    GlobalHydra.instance().clear()
