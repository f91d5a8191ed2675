"""CoOp / CoCoOp / KgCoOp pieces (xmx.methods.coop) on a tiny random-init CLIP: the untrained "a photo of a" context
reproduces the frozen encoder's hand-written prompts, CoCoOp with a silent Meta-Net is CoOp, the middle/front layouts
match the released code's per-class concatenation, the cut after EOT changes nothing, Dassl's schedule, and bad input
stops with one line."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import one_line_error

from xmx.backbones.clip import CLIPBackbone
from xmx.data.protocols import EvalSet
from xmx.methods.coop import (
    ClassPrompts,
    CoCoOpMethod,
    CoOpMethod,
    KgCoOpMethod,
    PromptLearner,
    WarmupCosineLR,
    encode_prompts,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["red_circle", "golden retriever", "st. bernard", "airbus a380-800", "x", "kite (bird of prey)"]  # ")." is 1 token
NEW = ["blue square", "faded green jeans"]


@pytest.fixture(scope="module")
def bb():
    torch.manual_seed(0)
    return CLIPBackbone("xmx-tiny", None)


def _frozen(bb, texts):
    with torch.no_grad():
        return bb.encode_text(bb.tokenize(texts)).float()


def _init(bb, phrase="a photo of a"):
    with torch.no_grad():
        return bb.token_embedding(bb.tokenize([phrase]))[0, 1:1 + len(phrase.split())].float()


def fake_dm(bb, train, new=(), templates=("a photo of a {}.",)):
    """The datamodule surface ``build`` reads: training classes, a validation set and eval sets with their classes."""
    def es(name, classes, index):
        return EvalSet(name, [], list(classes), "fake", list(templates), list(index))
    sets = [es("test", train, range(len(train)))] + ([es("test_new", new, [None] * len(new))] if new else [])

    def text_classifier(classnames, tmpl=None):
        return bb.text_classifier(classnames, list(tmpl or templates))
    return SimpleNamespace(backbone=bb, classnames=list(train), val_set=es("val", train, range(len(train))),
                           eval_sets=sets, logit_scale=bb.logit_scale, templates=list(templates),
                           text_classifier=text_classifier, inputs="features")


# ------------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("trim", [True, False])
def test_untrained_photo_context_equals_the_frozen_encoder_of_the_written_prompt(bb, trim):
    cp = ClassPrompts(bb, NAMES, n_ctx=4, position="end", trim=trim)
    learner = PromptLearner(4, bb.text_width, init=_init(bb))
    with torch.no_grad():
        ours = encode_prompts(bb, cp.assemble(learner.context()), cp.tokens)  # [N, C]
    ref = _frozen(bb, [f"a photo of a {c.replace('_', ' ')}." for c in NAMES])
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-5
    assert cp.length == (int(bb.tokenize(["a photo of a airbus a380-800."]).argmax(-1)) + 1 if trim else 77)


def test_method_class_features_equal_the_frozen_prompt_and_new_classes_get_their_own(bb):
    m = CoOpMethod(n_ctx=4, ctx_init="a photo of a")
    m.build(fake_dm(bb, NAMES[:3], NEW))
    with torch.no_grad():
        for name, classes in (("train", NAMES[:3]), ("test_new", NEW)):
            ref = F.normalize(_frozen(bb, [f"a photo of a {c.replace('_', ' ')}." for c in classes]), dim=-1)
            assert (m.class_features(name) - ref).abs().max().item() <= 1e-5
    # the checkpointable state is the context alone (prompts, backbone: not persistent / left out)
    assert [k for k in m.state_dict() if not k.startswith("backbone.")] == ["learner.ctx"]


def test_cocoop_with_a_silent_meta_net_is_coop(bb):
    torch.manual_seed(1)
    coop, cocoop = CoOpMethod(n_ctx=4, ctx_init="a photo of a"), CoCoOpMethod(n_ctx=4, ctx_init="a photo of a")
    dm = fake_dm(bb, NAMES, NEW)
    coop.build(dm)
    cocoop.build(dm)
    with torch.no_grad():
        coop.learner.ctx.add_(0.05 * torch.randn_like(coop.learner.ctx))  # a trained-looking context, shared
        cocoop.learner.ctx.copy_(coop.learner.ctx)
        cocoop.learner.meta_net.linear2.weight.zero_()
        cocoop.learner.meta_net.linear2.bias.zero_()
    feats = torch.randn(6, bb.embed_dim)
    with torch.no_grad():
        for s in dm.eval_sets:
            a, b = coop.logits(feats, s), cocoop.logits(feats, s)
            assert a.shape == b.shape == (6, len(s.classnames))
            assert (a - b).abs().max().item() <= 1e-4  # logits are ~ exp(s)·cos: 1e-5 on the features
    # a live Meta-Net shifts the context per image: different images, different class features
    with torch.no_grad():
        cocoop.learner.meta_net.linear2.weight.normal_(std=0.5)
        per = max(1, 2)  # two images per text-tower call: chunking must not change the logits
        full = cocoop.conditional_logits(feats, "train")
        cocoop.text_batch = per * len(NAMES)
        chunked = cocoop.conditional_logits(feats, "train")
    assert (full - chunked).abs().max().item() <= 1e-4
    assert (full - coop.logits(feats, dm.eval_sets[0])).abs().max().item() > 1e-3
    assert sorted(k for k in cocoop.state_dict() if not k.startswith("backbone.")) == [
        "learner.ctx", "learner.meta_net.linear1.bias", "learner.meta_net.linear1.weight",
        "learner.meta_net.linear2.bias", "learner.meta_net.linear2.weight"]
    assert cocoop.learner.meta_net.linear1.out_features == bb.embed_dim // 16


@pytest.mark.parametrize("position", ["middle", "front"])
def test_middle_and_front_match_the_released_per_class_concatenation(bb, position):
    n_ctx = 5  # odd: the first half is n_ctx // 2
    cp = ClassPrompts(bb, NAMES, n_ctx=n_ctx, position=position, trim=False)
    end = ClassPrompts(bb, NAMES, n_ctx=n_ctx, position="end", trim=False)
    ctx = torch.randn(len(NAMES), n_ctx, bb.text_width)  # class-specific, so a mix-up of classes would show
    got = cp.assemble(ctx)
    for i, n in enumerate(cp.name_lens):  # CoOp's PromptLearner.forward, one class at a time
        pre, suf = end.prefix[i:i + 1], end.suffix[i:i + 1]
        name, rest = suf[:, :n], suf[:, n:]
        if position == "middle":
            h = n_ctx // 2
            ref = torch.cat([pre, ctx[i:i + 1, :h], name, ctx[i:i + 1, h:], rest], dim=1)
        else:
            ref = torch.cat([pre, name, ctx[i:i + 1], rest], dim=1)
        assert torch.equal(got[i], ref[0])
    # the token ids move with the embeddings: EOT stays where the features are pooled
    assert torch.equal(cp.tokens.argmax(-1), end.tokens.argmax(-1))
    # with the context set to "X" embeddings the layout is a plain prompt: "name X X X X X." (front)
    if position == "front":
        x = bb.token_embedding(bb.tokenize(["X"]))[0, 1].float()
        with torch.no_grad():
            ours = encode_prompts(bb, cp.assemble(x.expand(n_ctx, -1)), cp.tokens)
        ref = _frozen(bb, [c.replace("_", " ") + " X X X X X." for c in NAMES])
        plain = [i for i, c in enumerate(NAMES) if not c.endswith(")")]  # "prey)." keeps its merged full stop
        assert len(plain) == len(NAMES) - 1 and (ours - ref)[plain].abs().max().item() <= 1e-5
        assert cp.name_lens[-1] == int(bb.tokenize(["kite (bird of prey)."]).argmax(-1)) - 1  # ")." moves with it


def test_gradients_reach_only_the_context(bb):
    m = KgCoOpMethod(n_ctx=4, ctx_init="a photo of a", kg_weight=8.0)
    m.build(fake_dm(bb, NAMES))
    text = m.class_features("train")
    # untrained, the prompts are the hand-crafted ones: the knowledge-guidance term starts at 0
    assert float(m.text_loss(text).detach()) == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        m.learner.ctx.add_(0.3 * torch.randn_like(m.learner.ctx))
    text = m.class_features("train")
    kg = m.text_loss(text)
    ref = 8.0 * 0.5 * ((text - m.clip_text) ** 2).sum(-1).mean()  # λ/2·mean‖t − w‖² for unit vectors
    kg_value = float(kg.detach())
    assert kg_value == pytest.approx(float(ref), rel=1e-4) and kg_value > 0
    kg.backward()
    assert m.learner.ctx.grad is not None and m.learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.parameters())


def test_chunked_and_checkpointed_cocoop_gives_the_same_gradients(bb):
    torch.manual_seed(2)
    dm = fake_dm(bb, NAMES)
    grads = []
    for text_batch, ckpt in ((None, False), (len(NAMES), True)):  # all at once | one image per call, recomputed
        torch.manual_seed(3)
        m = CoCoOpMethod(n_ctx=4, ctx_init="a photo of a", text_batch=text_batch, grad_checkpoint=ckpt)
        m.build(dm)
        feats = torch.randn(3, bb.embed_dim)
        F.cross_entropy(m.conditional_logits(feats, "train"), torch.tensor([0, 2, 4])).backward()
        grads.append([p.grad.clone() for p in m.learner.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------- schedule
def _dassl_lrs(epochs, base=0.002, warm=1, cons=1e-5):
    """Dassl's build_lr_scheduler(cosine) + ConstantWarmupScheduler, replayed with torch's CosineAnnealingLR."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    succ = torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(epochs))
    lrs, last = [], 0  # the wrapper's own epoch counter
    for e in range(epochs):
        lrs.append(cons if last < warm else succ.get_last_lr()[0])
        opt.step()
        if last >= warm:
            succ.step()
        else:
            last += 1
    return lrs


def test_warmup_cosine_is_dassls_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.002)
    sched = WarmupCosineLR(opt, T_max=10)
    got = []
    for _ in range(10):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx(_dassl_lrs(10), rel=1e-9)
    assert got[0] == 1e-5 and got[1] == pytest.approx(0.002) and got[-1] == pytest.approx(
        0.001 * (1 + math.cos(math.pi * 8 / 10)))


# ------------------------------------------------------------------------------------------------------ bad input
def test_bad_input_is_one_line(bb):
    one_line_error(lambda: CoOpMethod(n_ctx=16, ctx_init="a photo of a"), "method.ctx_init", "4 tokens",
                   "method.n_ctx=4")
    one_line_error(lambda: CoOpMethod(n_ctx=80), "method.n_ctx=80", "method.n_ctx<=73")
    one_line_error(lambda: CoOpMethod(n_ctx=4, csc=True, protocol="base2new"), "method.csc=true", "base2new",
                   "method.csc=false")
    one_line_error(lambda: CoOpMethod(position="left"), "method.position", "end, middle, front")
    # the exact limit needs the class names: 70 context tokens leave no room for an 8-token name
    m = CoOpMethod(n_ctx=70)
    one_line_error(lambda: m.build(fake_dm(bb, NAMES)), "method.n_ctx=70 is too long", "'airbus a380-800'",
                   "method.n_ctx<=")
    # csc on any label set with classes never trained on (whatever the protocol key says)
    m = CoOpMethod(n_ctx=4, csc=True)
    one_line_error(lambda: m.build(fake_dm(bb, NAMES, NEW)), "'test_new'", "never trained", "method.csc=false")


# ------------------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("overrides, expect", [
    (["experiment=coop_16shot", "shots=1"], dict(epochs=50, batch_size=32, n_ctx=16, ctx_init=None, views=50)),
    (["experiment=coop_16shot", "shots=16"], dict(epochs=200, views=200)),  # one fresh crop per epoch
    (["experiment=coop_16shot", "data=imagenet", "shots=2"], dict(epochs=50, batch_size=32, n_ctx=16, views=50)),
    (["experiment=coop_b2n"], dict(epochs=200, batch_size=32, n_ctx=4, ctx_init="a photo of a", views=200)),
    (["experiment=cocoop_b2n"], dict(epochs=10, batch_size=1, n_ctx=4, ctx_init="a photo of a", views=10)),
    (["experiment=kgcoop_b2n", "data=dtd"], dict(epochs=100, batch_size=128, n_ctx=4, kg_weight=8.0,
                                                 kg_templates=["a photo of a {}, a type of texture."])),
    (["experiment=coop_domain_shift"], dict(epochs=50, batch_size=32, n_ctx=4, views=50)),
])
def test_presets_carry_the_released_recipes(make_cfg, overrides, expect):
    cfg = make_cfg(overrides)
    m = cfg.method
    for k, v in expect.items():
        got = cfg.augment.views if k == "views" else m.get(k)
        assert (list(got) if hasattr(got, "__len__") and not isinstance(got, str) else got) == v, (k, got)
    assert m.optimizer.lr == 0.002 and m.optimizer.momentum == 0.9 and m.optimizer.weight_decay == 5e-4
    assert m.scheduler.warmup_epochs == 1 and m.scheduler.warmup_lr == 1e-5 and m.view_sampling == "cycle"
    assert m.test_epoch == "last" and cfg.callbacks.get("model_checkpoint") is None  # the release tests the last epoch
    assert cfg.augment.preset == "coop"
