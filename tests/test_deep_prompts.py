"""IVLP, MaPLe and PromptSRC: deep prompts in both open_clip towers (xmx.methods.deep_prompts).

Zero depth is the frozen zero-shot model; IVLP with text prompts in the first layer only is CoOp with the same
context; MaPLe's vision prompts are its coupling layers applied to the text prompts and enter the image tower as a hand
computation says; PromptSRC's aggregated prompts are the hand-computed Gaussian-weighted mean; chunked, recomputed
class encoding gives the plain gradients; the trainable counts are the releases' (ViT-B/16, random init); checkpoints
hold only the prompts; a stopped run resumes to the same numbers; bad input is one line."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
from tiny_trainable import interrupted_at_epoch
import torch
import torch.nn.functional as F
from conftest import ONLINE_TINY, one_line_error
from safetensors.torch import load_file
from torch import nn

from xmx.backbones.clip import CLIPBackbone
from xmx.backbones.deep_tokens import LabelSetPrompts, encode_class_prompts
from xmx.methods.deep_prompts import DeepPromptMethod, PromptSRCMethod, gaussian_weights
from xmx.run import run

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ["cat", "dog", "sea lion"]


def _dm(bb, names=NAMES):
    es = SimpleNamespace(name="test", classnames=names, templates=["a photo of a {}."])
    return SimpleNamespace(backbone=bb, inputs="images", classnames=names, templates=["a photo of a {}."], val_set=es,
                           eval_sets=[es], logit_scale=bb.logit_scale, shots=2,
                           text_classifier=lambda c, t, normalize=True: bb.text_classifier(c, t, normalize=normalize))


def _method(bb, cls=DeepPromptMethod, **kw):
    m = cls(amp="none", **kw)
    m.build(_dm(bb))
    return m


def _images(bb, n=3, seed=1):
    return torch.randn(n, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(seed))


def test_zero_depth_is_the_frozen_zero_shot_model(tiny_clip):
    bb = copy.deepcopy(tiny_clip)
    m = _method(bb, depth_text=0, depth_vision=0)
    m.eval()
    x = _images(bb)
    es = SimpleNamespace(name="test")
    with torch.no_grad():
        got = m.logits(x, es)
        v = F.normalize(bb.encode_image(x), dim=-1)
        t = F.normalize(bb.encode_text(bb.tokenize([f"a photo of a {c}." for c in NAMES])), dim=-1)
        ref = math.exp(bb.logit_scale) * v @ t.T
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in m.prompts.parameters()) == 0


def test_ivlp_text_prompts_in_layer_one_equal_coop(tiny_clip):
    from xmx.methods.coop import ClassPrompts, encode_prompts
    bb = copy.deepcopy(tiny_clip)
    m = _method(bb, depth_text=1, depth_vision=0)
    with torch.no_grad():
        nn.init.normal_(m.prompts.text[0], std=0.1)  # any context
    m.eval()
    ctx = m.prompts.text[0].detach()
    cp = ClassPrompts(bb, NAMES, n_ctx=4)
    with torch.no_grad():
        coop = F.normalize(encode_prompts(bb, cp.assemble(ctx), cp.tokens), dim=-1)
        ours = m.text_features("test")
    torch.testing.assert_close(ours, coop, atol=1e-5, rtol=1e-5)
    x = _images(bb)
    with torch.no_grad():  # no image prompts: the image side is the frozen tower
        torch.testing.assert_close(m.image_features(x), F.normalize(bb.encode_image(x), dim=-1), atol=1e-6, rtol=1e-5)


def _hand_prompted_image(visual, x, vision_layers: dict):
    """The MaPLe release's image forward written out: prompts appended before ln_pre, replaced before deeper blocks."""
    t = visual.conv1(x).flatten(2).transpose(1, 2)
    t = torch.cat([visual.class_embedding.expand(len(x), 1, -1), t], 1) + visual.positional_embedding
    n = vision_layers[0].shape[0]
    t = visual.ln_pre(torch.cat([t, vision_layers[0].expand(len(x), -1, -1)], 1))
    for i, blk in enumerate(visual.transformer.resblocks):
        if i > 0 and i in vision_layers:
            t = torch.cat([t[:, :-n], vision_layers[i].expand(len(x), -1, -1)], 1)
        t = blk(t)
    return visual.ln_post(t[:, 0]) @ visual.proj


def test_maple_vision_prompts_are_the_coupling_of_the_text_prompts(tiny_clip):
    bb = copy.deepcopy(tiny_clip)
    m = _method(bb, n_ctx_text=2, n_ctx_vision=2, depth_text=2, depth_vision=2, coupling=True)
    assert len(m.prompts.coupling) == 2 and len(m.prompts.vision) == 0
    # the release clones one Linear for the deeper layers: they start equal
    vl = m.prompts.vision_layers()
    for l, f in enumerate(m.prompts.coupling):
        torch.testing.assert_close(vl[l], m.prompts.text[l] @ f.weight.T + f.bias)
    x = _images(bb)
    with torch.no_grad():
        ref = F.normalize(_hand_prompted_image(bb.model.visual, x, {k: v.detach() for k, v in vl.items()}), dim=-1)
        torch.testing.assert_close(m.image_features(x), ref, atol=1e-5, rtol=1e-5)
    # the text prompt keeps "of a" as words: "[a photo] of a {c}." with the first two tokens learned
    assert m.phrase == "a photo of a"
    lp = getattr(m, m._label_prompts[tuple(NAMES)])
    assert torch.equal(lp.tokens[:, :6], bb.tokenize([f"a photo of a {c}." for c in NAMES])[:, :6])
    # the gradient reaches the couplings through the image tower
    m.train()
    m.training_step((x, torch.tensor([0, 1, 2])), 0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.prompts.parameters())


def test_vit_b16_trainable_counts_are_the_releases():
    torch.manual_seed(0)
    bb = CLIPBackbone("ViT-B-16", None)  # random init, offline
    ivlp = _method(bb, n_ctx_text=4, n_ctx_vision=4, depth_text=9, depth_vision=9)
    assert ivlp.parameter_counts()["trainable"] == 46_080
    maple = _method(bb, n_ctx_text=2, n_ctx_vision=2, depth_text=9, depth_vision=9, coupling=True)
    assert maple.parameter_counts()["trainable"] == 3_555_072  # 9·2·512 + 9·(512·768 + 768)
    assert maple.parameter_counts()["frozen"] == sum(p.numel() for p in bb.parameters())


def test_gaussian_weights_and_aggregate_are_the_hand_computation(tiny_clip):
    mu, sd, E = 15, 1, 20
    e = np.arange(1, E + 1)
    g = np.exp(-0.5 * ((e - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(gaussian_weights(mu, sd, E), g / g.sum(), rtol=1e-12)
    bb = copy.deepcopy(tiny_clip)
    m = _method(bb, cls=PromptSRCMethod, depth_text=2, depth_vision=2, gpa_mean=2, gpa_std=1.5, epochs=3)
    w = gaussian_weights(2, 1.5, 3)
    seen = []
    for epoch in (1, 2, 3):
        with torch.no_grad():
            for p in m.prompts.parameters():
                p.normal_()
        seen.append({n: p.detach().clone() for n, p in m.prompts.named_parameters()})
        m.gpa_add(epoch)
    m.gpa_load()
    for n, p in m.prompts.named_parameters():
        hand = w[0] * seen[0][n] + w[1] * seen[1][n] + w[2] * seen[2][n]
        torch.testing.assert_close(p.detach(), hand, atol=1e-6, rtol=1e-6)


def test_promptsrc_loss_is_the_release_formula(tiny_clip):
    bb = copy.deepcopy(tiny_clip)
    m = _method(bb, cls=PromptSRCMethod, depth_text=2, depth_vision=2, teacher_templates=3)
    with torch.no_grad():
        for p in m.prompts.parameters():
            p.normal_(std=0.2)
    m.train()
    x, y = _images(bb, 4), torch.tensor([0, 1, 2, 0])
    loss = m.training_step((x, y), 0)
    with torch.no_grad():
        s = math.exp(bb.logit_scale)
        t, v = m.text_features("train"), m.image_features(x)
        raw = torch.stack([bb.encode_text(bb.tokenize([tpl.format(c) for c in NAMES])) for tpl in m._templates()])
        t0 = F.normalize(raw.mean(0), dim=-1)  # mean of raw features over templates, then normalised
        v0 = F.normalize(bb.encode_image(x), dim=-1)
        logits, z0 = s * v @ t.T, s * v0 @ t0.T
        p0, logp = z0.softmax(1), logits.log_softmax(1)
        kl = (p0 * (p0.log() - logp)).sum() / logits.numel()
        ref = F.cross_entropy(logits, y) + 25 * (t - t0).abs().mean() + 10 * (v - v0).abs().mean() + kl
    torch.testing.assert_close(loss.detach(), ref, atol=1e-5, rtol=1e-5)


def test_chunked_recomputed_class_encoding_gives_the_plain_gradients(tiny_clip):
    bb = copy.deepcopy(tiny_clip)
    names = ["cat", "dog", "sea lion", "a very long class name indeed", "x"]
    lp = LabelSetPrompts(bb, [f"a photo of a {c}." for c in names], 4)
    g = torch.Generator().manual_seed(0)
    layers = {i: nn.Parameter(torch.randn(4, bb.text_width, generator=g) * 0.1) for i in range(2)}
    target = torch.randn(len(names), bb.embed_dim, generator=g)
    out = {}
    for chunk in (None, 2):
        for p in layers.values():
            p.grad = None
        f = encode_class_prompts(bb.model, lp, layers, chunk=chunk)
        (f * target).sum().backward()
        out[chunk] = (f.detach(), [p.grad.clone() for p in layers.values()])
    torch.testing.assert_close(out[2][0], out[None][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(out[2][1], out[None][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


PSRC = [*ONLINE_TINY, "method=promptsrc", "method.depth_text=2", "method.depth_vision=2", "method.teacher_templates=2"]


def test_checkpoint_holds_only_the_prompts_and_reloads(make_cfg, tmp_path):
    args = [*PSRC, "method.epochs=2", "method.gpa_mean=2", "method.optimizer.lr=0.5"]
    first = run(make_cfg(args, output_dir=tmp_path / "a"))
    assert first["parameters"]["trainable"] == 2 * 4 * 64 * 2 and first["extra"]["gpa_epochs"] == [1, 2]
    ck = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    sd = ck["state_dict"]
    assert sd and all(k.startswith("prompts.") for k in sd) and sum(v.numel() for v in sd.values()) == 1024
    again = run(make_cfg([*PSRC, "train=false", f"init_from={tmp_path / 'a'}"], output_dir=tmp_path / "b"))
    a, b = load_file(tmp_path / "a" / "predictions.safetensors"), load_file(tmp_path / "b" / "predictions.safetensors")
    assert torch.equal(a["test/logits"], b["test/logits"]) and again["metrics"] == first["metrics"]


def test_stopped_run_resumes_to_the_same_numbers(make_cfg, tmp_path, monkeypatch):
    """PromptSRC: the Gaussian aggregate so far travels in the checkpoint, so the resumed run aggregates the same."""
    args = [*PSRC, "method.epochs=4", "method.gpa_mean=3", "method.gpa_std=2", "method.optimizer.lr=0.5",
            "method.batch_size=8", f"paths.log_dir={tmp_path / 'logs'}"]
    ref = run(make_cfg(args, output_dir=tmp_path / "ref"))

    with interrupted_at_epoch(monkeypatch, PromptSRCMethod):
        run(make_cfg(args, output_dir=tmp_path / "logs" / "run"))
    res = run(make_cfg(args, output_dir=tmp_path / "logs" / "run"))
    assert res["resumed"] is True and res["metrics"] == ref["metrics"]
    assert res["extra"]["gpa_epochs"] == [1, 2, 3, 4]
    a = load_file(tmp_path / "logs" / "run" / "predictions.safetensors")
    b = load_file(tmp_path / "ref" / "predictions.safetensors")
    assert torch.equal(a["test/logits"], b["test/logits"])


@pytest.mark.parametrize("overrides,needles", [
    (["method=maple"], ["method.depth_text=9", "2 layers"]),
    (["method=ivlp", "method.depth_text=2", "method.depth_vision=3"], ["method.depth_vision=3", "0..2"]),
    (["method=ivlp", "method.n_ctx_text=0"], ["method.n_ctx_text=0", "at least one"]),
    (["method=maple", "method.depth_text=2", "method.depth_vision=1"], ["method.coupling=true", "depth_vision"]),
    (["method=promptsrc", "method.gpa_std=0"], ["method.gpa_std=0"]),
])
def test_bad_values_are_one_line(make_cfg, overrides, needles):
    one_line_error(lambda: run(make_cfg([*ONLINE_TINY, *overrides])), *needles)


def test_towers_without_per_layer_tokens_refuse_before_any_work(tiny_clip):
    bb = copy.deepcopy(tiny_clip)
    bb.model.visual = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1))  # like a timm / ResNet image tower
    one_line_error(lambda: _method(bb, coupling=True, n_ctx_text=2, n_ctx_vision=2, depth_text=1, depth_vision=1),
                   "coupling=true", "not open_clip's VisionTransformer")
    one_line_error(lambda: _method(bb, depth_text=1, depth_vision=1), "VisionTransformer")
    _method(bb, depth_text=1, depth_vision=0)  # text-only prompts need no vision transformer


def test_presets_compose():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from xmx.config import config_dir
    GlobalHydra.instance().clear()
    expect = {"ivlp_b2n": ("ivlp", "base2new", 9, 20), "maple_b2n": ("maple", "base2new", 9, 5),
              "maple_cross_dataset": ("maple", "cross_dataset", 3, 2),
              "maple_domain_shift": ("maple", "domain_shift", 3, 2),
              "promptsrc_b2n": ("promptsrc", "base2new", 9, 20), "promptsrc_16shot": ("promptsrc", "fewshot", 9, 50),
              "promptsrc_domain_shift": ("promptsrc", "domain_shift", 3, 20),
              "promptsrc_cross_dataset": ("promptsrc", "cross_dataset", 3, 20)}
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for name, (method, protocol, depth, epochs) in expect.items():
            cfg = compose("config", overrides=[f"experiment={name}"])
            assert (cfg.method.name, cfg.protocol.name, cfg.method.depth_text, cfg.method.epochs) == \
                (method, protocol, depth, epochs)
            assert cfg.backbone.model == "ViT-B-16" and cfg.method.batch_size == 4 and cfg.method.keep == "final"
        cfg = compose("config", overrides=["experiment=promptsrc_16shot", "data=dtd"])
        assert (cfg.method.gpa_mean, cfg.method.gpa_std) == (45, 5)
        cfg = compose("config", overrides=["experiment=promptsrc_16shot", "data=food101"])
        assert (cfg.method.gpa_mean, cfg.method.gpa_std) == (30, 30)
    GlobalHydra.instance().clear()
