"""TPT (xmx.methods.coop.TPTMethod): one test-time step equals a hand computation (entropy of the averaged confident
views, AdamW's first step written out), images tuned together equal images tuned one by one, the stream through the
run loop (hand-crafted and CoOp-initialised prompts), one-line errors."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from xmx.errors import XmxError
from xmx.methods.coop import TPTMethod, encode_prompts
from xmx.run import build, run

BASE = ["backbone=tiny", "data=synthetic", "protocol=test_time", "trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A TPT method built on the tiny backbone and the synthetic stream (no tuning run yet)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from xmx.config import config_dir
    cache = tmp_path_factory.mktemp("tpt_cache")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=BASE + ["method=tpt", "method.views=20", f"paths.cache_dir={cache}"])
    GlobalHydra.instance().clear()
    L.seed_everything(1, verbose=False)
    dm = build(cfg.data, backbone=build(cfg.backbone), _convert_="all")
    dm.setup("test")
    m = build(cfg.method, _convert_="partial")
    m.build(dm)
    return m, dm


def _views(V=20, B=1, seed=0, C=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, C, generator=g)


def test_one_step_equals_the_hand_computation(built):
    m, dm = built
    name = dm.eval_sets[0].name
    cp = m.prompts(name)
    ctx0 = m.learner.ctx.detach().clone()
    f = _views(C=dm.backbone.embed_dim)
    out, ctx1 = m.tune(f, name, ctx0)

    # by hand: text features of the initial prompt, logits of the 20 views, the 2 of lowest entropy
    ctx = ctx0.clone().requires_grad_(True)
    t = F.normalize(encode_prompts(dm.backbone, cp.assemble(ctx), cp.tokens), dim=-1)  # [N, C]
    s = math.exp(m.logit_scale)
    z = s * F.normalize(f[0], dim=-1) @ t.T  # [V, N]
    p = z.softmax(-1)
    ent = [-(p[v] * p[v].log()).sum().item() for v in range(20)]
    S = sorted(range(20), key=lambda v: ent[v])[:2]  # int(20 x 0.1)
    pbar = p[S].mean(0)
    H = -(pbar * pbar.log()).sum()
    (g,) = torch.autograd.grad(H, ctx)
    # AdamW, first step: decoupled decay, then m/(sqrt(v)+eps) with bias-corrected m = g, v = g^2
    want = ctx0 * (1 - m.lr * m.weight_decay) - m.lr * g / (g.abs() + 1e-8)
    assert torch.allclose(ctx1[0], want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(ctx1[0], ctx0)
    t1 = F.normalize(encode_prompts(dm.backbone, cp.assemble(want), cp.tokens), dim=-1)
    assert torch.allclose(out[0], s * F.normalize(f[0, 0], dim=-1) @ t1.T, atol=1e-4, rtol=1e-5)
    assert torch.equal(m.learner.ctx.detach(), ctx0)  # the method's own context is never moved


def test_images_tuned_together_equal_one_by_one(built):
    m, dm = built
    name = dm.eval_sets[0].name
    ctx0 = m.learner.ctx.detach().clone()
    f = _views(B=3, seed=1, C=dm.backbone.embed_dim)
    together, ctx_t = m.tune(f, name, ctx0)
    for b in range(3):
        alone, ctx_a = m.tune(f[b:b + 1], name, ctx0)
        assert torch.allclose(together[b], alone[0], atol=1e-5, rtol=1e-5)
        assert torch.allclose(ctx_t[b], ctx_a[0], atol=1e-6, rtol=1e-5)


def test_tpt_through_the_run_hand_crafted_and_coop_initialised(make_cfg, tmp_path):
    hand = run(make_cfg(BASE + ["method=tpt", "method.views=1"], output_dir=tmp_path / "hand"))
    assert hand["extra"]["init"] == "ctx_init" and 0 <= hand["metrics"]["test/acc"] <= 100
    coop = run(make_cfg(["backbone=tiny", "data=synthetic", "trainer.accelerator=cpu", "method=coop",
                         "method.n_ctx=4", "method.epochs=1", "shots=2", "method.optimizer.lr=0.5"],
                        output_dir=tmp_path / "coop"))
    assert coop["status"] == "complete"
    init = run(make_cfg(BASE + ["method=tpt", "method.views=1", f"init_from={tmp_path / 'coop'}"],
                        output_dir=tmp_path / "tpt_coop"))
    assert init["extra"]["init"] == "init_from" and init["init_from"]["loaded"] >= 1
    assert init["init_from"]["method"] == "coop" and "learner.ctx" not in init["init_from"]["not_in_checkpoint"]


def test_bad_values_are_one_line_errors():
    for kw, phrase in [({"steps": 0}, "at least one step"), ({"lr": 0}, "must be positive"),
                       ({"views": 5}, "keeps int"), ({"top": 2}, "share of confident views"),
                       ({"protocol": "fewshot"}, "runs on protocol=test_time")]:
        with pytest.raises(XmxError, match=phrase):
            TPTMethod(**kw)
