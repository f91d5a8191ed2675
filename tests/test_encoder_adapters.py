"""CLIP-LoRA and MMA of Yang et al.: adaptation inside the open_clip towers, trained online (images every step).

Zero-initialised LoRA leaves both towers bit for bit unchanged; the release's training path (dropout before each
branch, unmerged) computes the same function as the merged path; one optimiser step changes the adapters only; the
trainable counts are the releases' (ViT-B/16, random init); checkpoints hold only adapted tensors and reload to the
same logits; a run stopped mid-training resumes to the same numbers; bad input is one line."""

from __future__ import annotations

import copy

import pytest
from tiny_trainable import interrupted_at_epoch
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import ONLINE_TINY, one_line_error
from xmx.backbones.clip import CLIPBackbone
from xmx.backbones.lora import LoRAAttention, inject_lora, layer_indices
from xmx.methods.clip_lora import ClipLoRAMethod
from xmx.methods.mma_yang import MMAYangMethod, YangAdapters, attach_yang_adapters
from xmx.run import run

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ONLINE_TINY  # conftest.py


def _inputs(bb):
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, bb.image_size, bb.image_size, generator=g), bb.tokenize(["a photo of a cat.", "a dog"])


def _outputs(bb, img, tok):
    with torch.no_grad():
        return bb.encode_image(img), bb.encode_text(tok)


def test_zero_b_leaves_both_towers_bit_identical(tiny_clip):
    bb, img, tok = copy.deepcopy(tiny_clip), *_inputs(tiny_clip)
    ref_i, ref_t = _outputs(tiny_clip, img, tok)
    layers = inject_lora(bb.model, "both", "all", ["q", "k", "v", "o"], r=2, alpha=1, dropout=0.25)
    assert len(layers) == 4 and all(isinstance(b.attn, LoRAAttention) for b in bb.model.transformer.resblocks)
    out_i, out_t = _outputs(bb, img, tok)
    assert torch.equal(out_i, ref_i) and torch.equal(out_t, ref_t)
    for m in layers:  # a non-zero B does change both towers (the branches are wired in)
        for p in m.lora.values():
            nn.init.normal_(p.B, std=0.05)
    out_i, out_t = _outputs(bb, img, tok)
    assert not torch.allclose(out_i, ref_i, atol=1e-4) and not torch.allclose(out_t, ref_t, atol=1e-4)


def test_training_path_with_dropout_is_the_merged_function(tiny_clip):
    """The release's unmerged branch (dropout before each LoRA factor) equals the merged weights when no unit drops."""
    bb, img, tok = copy.deepcopy(tiny_clip), *_inputs(tiny_clip)
    layers = inject_lora(bb.model, "both", "all", ["q", "k", "v", "o"], r=2, alpha=1, dropout=1e-12)
    for m in layers:
        for p in m.lora.values():
            nn.init.normal_(p.B, std=0.05)
    merged = _outputs(bb, img, tok)
    for m in layers:
        m.train(True)
    assert all(m._dropout_active() for m in layers)
    unmerged = _outputs(bb, img, tok)
    for a, b in zip(merged, unmerged):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    for m in layers:  # real dropout makes the training output random
        for p in m.lora.values():
            p.drop.p = 0.5
    assert not torch.allclose(_outputs(bb, img, tok)[0], merged[0], atol=1e-5)


@pytest.mark.parametrize("position,depth,expected", [
    ("all", 12, list(range(12))), ("bottom", 12, [0, 1, 2, 3]), ("mid", 12, [4, 5, 6, 7]), ("up", 12, [8, 9, 10, 11]),
    ("half-up", 12, [6, 7, 8, 9, 10, 11]), ("half-bottom", 12, [0, 1, 2, 3, 4, 5]), ("top3", 12, [9, 10, 11]),
    ("half-up", 24, list(range(12, 24))),
])
def test_positions_follow_the_release_tables(position, depth, expected):
    assert layer_indices(position, depth) == expected


def test_vit_b16_trainable_counts_are_the_releases():
    torch.manual_seed(0)
    bb = CLIPBackbone("ViT-B-16", None)  # random init, offline
    inject_lora(bb.model, "both", "all", ["q", "k", "v"], r=2, alpha=1, dropout=0.25)
    assert sum(p.numel() for p in bb.parameters() if p.requires_grad) == 184_320
    tw, vw = bb.model.transformer.width, bb.model.visual.transformer.width
    assert sum(p.numel() for p in YangAdapters(tw, vw, list(range(5, 13))).parameters()) == 674_560


def _step(method, bb):
    """One AdamW step of ``method`` on a batch of images; returns every parameter before and after."""
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    method.train()
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    img = torch.randn(4, 3, bb.image_size, bb.image_size)
    loss = method.training_step((img, torch.tensor([0, 1, 2, 0])), 0)
    loss.backward()
    opt.step()
    return before, dict(method.named_parameters())


@pytest.mark.parametrize("kind", ["clip_lora", "mma_yang"])
def test_one_step_changes_only_the_adapters(tiny_clip, kind, make_cfg):
    from types import SimpleNamespace
    bb = copy.deepcopy(tiny_clip)
    names = ["cat", "dog", "bird"]
    es = SimpleNamespace(name="test", classnames=names, templates=["a photo of a {}."])
    dm = SimpleNamespace(backbone=bb, inputs="images", classnames=names, templates=["a photo of a {}."], val_set=es,
                         eval_sets=[es], logit_scale=bb.logit_scale, shots=2)
    method = (ClipLoRAMethod(amp="none") if kind == "clip_lora"
              else MMAYangMethod(layers=[1, 2], amp="none"))
    method.build(dm)
    if kind == "clip_lora":  # B = 0 at init: give B a value so that A gets a gradient too
        for m in method.lora_layers:
            for p in m.lora.values():
                nn.init.normal_(p.B, std=0.05)
    before, after = _step(method, bb)
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert changed == trainable and changed
    marker = "lora" if kind == "clip_lora" else "adapters."
    assert all(marker in n for n in trainable)
    assert not any(p.requires_grad for n, p in method.named_parameters() if marker not in n)


def test_frozen_text_is_cached_when_only_the_image_tower_adapts(make_cfg, tmp_path):
    res = run(make_cfg([*TINY, "method=clip_lora", "method.encoder=vision", "method.iters_per_shot=2"]))
    assert res["extra"]["adapts_text"] is False and res["extra"]["lora_layers"] == 2
    # tiny ViT: 2 image blocks x 3 projections x 2·2·64
    assert res["parameters"]["trainable"] == 2 * 3 * 4 * 64
    assert res["parameters"]["frozen"] == sum(p.numel() for p in CLIPBackbone("xmx-tiny", None).parameters())


def test_checkpoint_holds_only_adapted_tensors_and_reloads_to_identical_logits(make_cfg, tmp_path):
    first = run(make_cfg([*TINY, "method=clip_lora", "method.iters_per_shot=3"], output_dir=tmp_path / "a"))
    assert first["extra"]["total_steps"] == 6 and first["parameters"]["trainable"] == 3072
    sd = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert sd and all(".lora." in k for k in sd) and sum(v.numel() for v in sd.values()) == 3072
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith(".B"))  # trained away from zero
    again = run(make_cfg([*TINY, "method=clip_lora", "train=false", f"init_from={tmp_path / 'a'}"],
                         output_dir=tmp_path / "b"))
    a, b = load_file(tmp_path / "a" / "predictions.safetensors"), load_file(tmp_path / "b" / "predictions.safetensors")
    assert torch.equal(a["test/logits"], b["test/logits"])
    assert again["metrics"] == first["metrics"]
    run(make_cfg([*TINY, "method=clip_lora", "train=false"], output_dir=tmp_path / "c"))  # B = 0: the frozen model
    c = load_file(tmp_path / "c" / "predictions.safetensors")
    assert not torch.allclose(c["test/logits"].float(), a["test/logits"].float(), atol=1e-2)  # the reload did load


@pytest.mark.parametrize("kind,decode", [("mma_yang", "pil"), ("clip_lora", "pil"), ("clip_lora", "tensor")])
def test_stopped_run_resumes_to_the_same_numbers(make_cfg, tmp_path, monkeypatch, kind, decode):
    """Also with data.decode=tensor: its workers draw the crops from the global RNG that RNGState checkpoints."""
    method = ["method=mma_yang", "method.layers=[1,2]", "method.epochs=4", "method.scale=1.0", "method.optimizer.lr=0.5"] if kind == "mma_yang" else \
        ["method=clip_lora", "method.iters_per_shot=5", "method.optimizer.lr=0.05"]  # 10 steps, 3 per epoch
    args = [*TINY, *method, "method.batch_size=8", f"paths.log_dir={tmp_path / 'logs'}", f"data.decode={decode}"]
    ref = run(make_cfg(args, output_dir=tmp_path / "ref"))

    with interrupted_at_epoch(monkeypatch, MMAYangMethod if kind == "mma_yang" else ClipLoRAMethod):
        run(make_cfg(args, output_dir=tmp_path / "logs" / "run"))
    ckpt = tmp_path / "logs" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"] == 1
    res = run(make_cfg(args, output_dir=tmp_path / "logs" / "run"))
    assert res["resumed"] is True and res["metrics"] == ref["metrics"]
    a = load_file(tmp_path / "logs" / "run" / "predictions.safetensors")
    b = load_file(tmp_path / "ref" / "predictions.safetensors")
    assert torch.equal(a["test/logits"], b["test/logits"])


@pytest.mark.parametrize("override,needles", [
    ("method.params=[q,x]", ["method.params", "q, k, v, o"]),
    ("method.r=0", ["method.r=0", "whole number >= 1"]),
    ("method.position=middle", ["method.position='middle'", "top3"]),
])
def test_bad_lora_keys_are_one_line(make_cfg, override, needles):
    one_line_error(lambda: run(make_cfg([*TINY, "method=clip_lora", override])), *needles)


@pytest.mark.parametrize("overrides,needles", [
    (["callbacks=default"], ["method.keep=final", "callbacks=final"]),
    (["method.keep=best_val"], ["method.keep=best_val", "callbacks=default"]),
    (["method.amp=fp16"], ["method.amp=fp16", "trainer.precision=16-mixed"]),
])
def test_what_is_recorded_is_what_runs(make_cfg, overrides, needles):
    one_line_error(lambda: run(make_cfg([*TINY, "method=clip_lora", *overrides])), *needles)


def test_trainer_max_steps_is_what_is_recorded_and_scheduled(make_cfg, tmp_path):
    """An explicit trainer.max_steps replaces the method's budget (iters_per_shot x shots): results.json records and
    the cosine schedule spans the steps that ran, not the budget."""
    res = run(make_cfg([*TINY, "method=clip_lora", "+trainer.max_steps=3"], output_dir=tmp_path / "r"))
    ex = res["extra"]
    assert ex["total_steps"] == 3 and ex["steps_run"] == 3
    assert ex["schedule_length"] == {"T_max": 3, "unit": "step"}


def test_activation_checkpointing_gives_the_same_gradients(tiny_clip):
    from types import SimpleNamespace
    names = ["cat", "dog", "bird"]
    es = SimpleNamespace(name="test", classnames=names, templates=["a photo of a {}."])
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        bb = copy.deepcopy(tiny_clip)
        dm = SimpleNamespace(backbone=bb, inputs="images", classnames=names, templates=["a photo of a {}."],
                             val_set=es, eval_sets=[es], logit_scale=bb.logit_scale, shots=2)
        method = MMAYangMethod(layers=[1, 2], amp="none", grad_checkpointing=ckpt)
        method.build(dm)
        method.train()
        img = torch.randn(4, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(3))
        method.training_step((img, torch.tensor([0, 1, 2, 0])), 0).backward()
        grads.append({n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad})
    assert bb.model.transformer.grad_checkpointing and grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_backbone_without_attention_layers_is_one_line(tiny_clip):
    bb = copy.deepcopy(tiny_clip)
    bb.model.visual = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1))  # like a ResNet image tower
    one_line_error(lambda: inject_lora(bb.model, "vision"), "vision tower", "no transformer attention layers")
    one_line_error(lambda: inject_lora(bb.model, "both"), "vision tower")  # nothing injected on the way
    assert not any(isinstance(b.attn, LoRAAttention) for b in bb.model.transformer.resblocks)
    one_line_error(lambda: attach_yang_adapters(bb.model, YangAdapters(64, 64, [1])), "MMA-Yang", "vision tower")


def test_bad_mma_yang_keys_are_one_line(make_cfg):
    one_line_error(lambda: run(make_cfg([*TINY, "method=mma_yang", "method.layers=[0,12]"])), "method.layers")
    one_line_error(lambda: run(make_cfg([*TINY, "method=mma_yang"])), "method.layers", "past the 2 blocks")


def test_presets_compose():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from xmx.config import config_dir
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for name, method, protocol in [("clip_lora_16shot", "clip_lora", "fewshot"),
                                       ("clip_lora_b2n", "clip_lora", "base2new"),
                                       ("clip_lora_domain_shift", "clip_lora", "domain_shift"),
                                       ("mma_yang_b2n", "mma_yang", "base2new"),
                                       ("mma_yang_16shot", "mma_yang", "fewshot")]:
            cfg = compose("config", overrides=[f"experiment={name}"])
            assert cfg.method.name == method and cfg.protocol.name == protocol and cfg.augment.preset == "coop"
            assert cfg.backbone.model == "ViT-B-16" and cfg.trainer.limit_val_batches == 0
    GlobalHydra.instance().clear()


def test_trimmed_text_equals_the_full_context(tiny_clip):
    from xmx.methods._training import encode_text_trimmed
    bb = copy.deepcopy(tiny_clip)
    inject_lora(bb.model, "text", "all", ["q", "v"], r=2, alpha=1, dropout=0.0)
    for b in bb.model.transformer.resblocks:
        for p in b.attn.lora.values():
            nn.init.normal_(p.B, std=0.05)
    tok = bb.tokenize(["a photo of a cat.", "a photo of a very large dog, a type of pet.", "x"])
    with torch.no_grad():
        full, trimmed = bb.encode_text(tok), encode_text_trimmed(bb, tok)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)
