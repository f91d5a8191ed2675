"""CLIP-SVD and 2SFS: fine-tuning a few generic tensors of the whole model, on every tower family.

CLIP-SVD at s = s₀ is the frozen model on every tiny tower (open_clip: OpenAI-style, SigLIP, EVA-02, PE, MobileCLIP;
transformers CLIP and SigLIP); with s moved it computes the release's thin form ((x V) ⊙ s) Uᵀ + b; one step changes
only s; the SVD is cached in the feature store on the weights' hash. 2SFS tunes the LayerNorms the release tunes,
then only the classifier; inference is selective. Counts for ViT-B/16 are the releases'; checkpoints hold only the
trained tensors; a killed run resumes to the same numbers; bad values are one line."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_trainable import interrupted_at_epoch
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from conftest import ONLINE_TINY, one_line_error
from xmx.backbones.blocks import block_range, towers
from xmx.backbones.clip import CLIPBackbone
from xmx.features.store import FeatureStore
from xmx.methods.clip_svd import ClipSVDMethod, inject_svd, singular_value_count, svd_targets
from xmx.methods.twosfs import TwoSFSMethod, layernorms
from xmx.run import run

sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import save_tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

OPEN_CLIP = ["xmx-tiny", "xmx-tiny-sigmoid", "xmx-tiny-eva02", "xmx-tiny-pe", "xmx-tiny-mobileclip"]
FAMILIES = OPEN_CLIP + ["hf:clip", "hf:siglip"]


def _backbone(family: str, tmp_path_factory=None):
    torch.manual_seed(0)
    if family.startswith("hf:"):
        from xmx.backbones.hf_clip import HFCLIPBackbone
        kind = family[3:]
        return HFCLIPBackbone(str(save_tiny(tmp_path_factory.mktemp(kind), kind)))
    return CLIPBackbone(family, None)


def _io(bb):
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, bb.image_size, bb.image_size, generator=g), bb.tokenize(["a photo of a red circle.",
                                                                                      "a blue square"])


def _out(bb, img, tok):
    with torch.no_grad():
        return bb.encode_image(img), bb.encode_text(tok)


@pytest.mark.parametrize("family", FAMILIES)
def test_svd_at_pretrained_values_is_the_frozen_model_and_moves_as_the_release_computes(family, tmp_path_factory):
    bb = _backbone(family, tmp_path_factory)
    img, tok = _io(bb)
    ref = _out(bb, img, tok)
    frozen = {n: p.detach().clone() for n, p in bb.model.named_parameters()}
    layers = inject_svd(bb.model)
    assert layers and all(p.requires_grad for m in layers for p in m.s)
    out = _out(bb, img, tok)
    for a, b in zip(out, ref):  # W + U diag(s0 - s0) Vᵀ is W itself: equal, not merely close
        assert torch.equal(a, b)
    # with s moved, every adapted weight is the release's U diag(s) Vᵀ, computed here from its own SVD
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in layers:
            for p in m.s:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    checked = 0
    for mod in bb.model.modules():
        params = getattr(mod, "parametrizations", None)
        if params is None:
            continue
        for attr, plist in params.items():
            p = plist[0]
            W0 = plist.original.detach().double()
            C = p.U.shape[0]
            s = p.s0.clone().double()
            for j, i in enumerate(p.trained):
                s[i] = p.s[j].detach().double()
            chunks = W0.reshape(C, W0.shape[0] // C, -1)
            U, _, Vh = torch.linalg.svd(chunks, full_matrices=False)  # an SVD of its own (signs may differ per pair)
            want = (U * s.unsqueeze(1)) @ Vh  # the release: fc_U(s * fc_V(x)) = x (U diag(s) Vᵀ)ᵀ
            torch.testing.assert_close(getattr(mod, attr).double().reshape(C, -1, W0.shape[1]), want,
                                       atol=2e-5, rtol=1e-4)
            checked += 1
    assert checked == len(layers)
    moved = _out(bb, img, tok)
    # wired in: both towers move (FastViT's random-init layer scale of 1e-5 keeps its image change small)
    assert not torch.equal(moved[0], ref[0]) and (moved[1] - ref[1]).abs().max() > 1e-3 * ref[1].abs().max()
    still = {n: p for n, p in bb.model.named_parameters() if not n.endswith(tuple(f".s.{i}" for i in range(3)))}
    for n, p in still.items():  # the frozen weights themselves never change
        key = n.replace(".parametrizations.", ".").replace(".original", "")
        assert torch.equal(p, frozen[key]), n


def test_thin_form_of_the_release_equals_the_merged_layer():
    """The release's SVD_Linear computes fc_U(fc_V(x) * s): the same numbers as our merged weight, per token."""
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    x = torch.randn(5, 24)
    ref = lin(x)
    model = nn.Module()
    model.visual = nn.Module()
    model.visual.blocks = nn.ModuleList([nn.Module()])
    model.visual.blocks[0].mlp = nn.Module()
    model.visual.blocks[0].mlp.fc1 = lin
    (p,) = inject_svd(model, encoder="vision", announce=None)
    with torch.no_grad():
        p.s[0].mul_(torch.linspace(0.5, 1.5, 24))
    U, Vh, s = p.U[0], p.Vh[0], p.s[0]
    release = F.linear(F.linear(x, Vh) * s, U, lin.bias)  # fc_V: weight Vᵀᵀ = Vh, fc_U: weight U
    torch.testing.assert_close(lin(x), release, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(lin(x), ref, atol=1e-3)


def test_one_step_changes_only_the_singular_values(tiny_clip):
    bb = copy.deepcopy(tiny_clip)
    names = ["cat", "dog", "bird"]
    es = SimpleNamespace(name="test", classnames=names, templates=["a photo of a {}."])
    dm = SimpleNamespace(backbone=bb, inputs="images", classnames=names, templates=["a photo of a {}."], val_set=es,
                         eval_sets=[es], logit_scale=bb.logit_scale, shots=2, store=None)
    method = ClipSVDMethod(amp="none")
    method.build(dm)
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    method.train()
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    img = torch.randn(4, 3, bb.image_size, bb.image_size)
    method.training_step((img, torch.tensor([0, 1, 2, 0])), 0).backward()
    opt.step()
    after = dict(method.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert changed == trainable and len(trainable) == 24  # 2 + 2 blocks x (q, k, v, out_proj, c_fc, c_proj)
    assert all(".parametrizations." in n and ".s." in n for n in trainable)


def test_vit_b16_trainable_counts_are_the_releases():
    torch.manual_seed(0)
    bb = CLIPBackbone("ViT-B-16", None)  # random init, offline; the SVD itself is not needed to count
    targets, _ = svd_targets(bb.model)
    # release: every nn.Linear of PlainMultiHeadAttention (q,k,v,proj) + mlp (c_fc, c_proj), 12 blocks per tower,
    # full rank: 12 x 6 x 768 + 12 x 6 x 512
    assert singular_value_count(targets) == 92_160
    norms, _ = layernorms(bb.model)
    assert sum(p.numel() for _, m in norms for p in m.parameters()) == 61_440  # ln_1, ln_2 of the 24 blocks
    assert {n.rsplit(".", 1)[-1] for n, _ in norms} == {"ln_1", "ln_2"}


def test_svd_is_cached_in_the_feature_store_on_the_weights_hash(tiny_clip, tmp_path):
    store = FeatureStore(tmp_path)
    a = inject_svd(copy.deepcopy(tiny_clip).model, store=store, announce=None)
    assert store.last_outcome == "miss"
    b = inject_svd(copy.deepcopy(tiny_clip).model, store=store, announce=None)
    assert store.last_outcome == "hit" and all(torch.equal(x.U, y.U) and torch.equal(x.s0, y.s0) for x, y in zip(a, b))
    other = copy.deepcopy(tiny_clip)
    with torch.no_grad():
        other.model.transformer.resblocks[0].mlp.c_fc.weight.add_(1e-3)
    inject_svd(other.model, store=store, announce=None)
    assert store.last_outcome == "miss"  # other weights, another entry


def test_layer_and_projection_choices_follow_the_release():
    assert block_range("top_bottom", 12) == [0, 1, 2, 3, 8, 9, 10, 11]
    assert block_range("top_middle", 12) == list(range(4, 12)) and block_range("middle", 12) == [4, 5, 6, 7]
    torch.manual_seed(0)
    bb = CLIPBackbone("xmx-tiny", None)
    targets, _ = svd_targets(bb.model, encoder="vision", layers=[1], params=["q", "v"])
    assert [(q.split("resblocks.")[1], roles, train) for _, _, q, roles, train in targets] == [
        ("1.attn.in_proj_weight", ("q", "k", "v"), [True, False, True])]
    (p,) = inject_svd(bb.model, encoder="vision", layers=[1], params=["q", "v"], announce=None)
    assert sum(x.numel() for x in bb.parameters() if x.requires_grad) == 2 * 64


def test_towers_without_adaptable_parts_are_one_line(tiny_clip, caplog):
    bb = copy.deepcopy(tiny_clip)
    bb.model.visual = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1))  # like a ResNet tower
    one_line_error(lambda: inject_svd(bb.model), "CLIP-SVD", "vision tower", "method.encoder=text")
    assert not any(hasattr(m, "parametrizations") for m in bb.model.modules())  # nothing injected on the way
    one_line_error(lambda: layernorms(bb.model), "2SFS", "vision tower", "method.encoder=text")
    torch.manual_seed(0)
    mobile = CLIPBackbone("xmx-tiny-mobileclip", None)
    one_line_error(lambda: layernorms(mobile.model), "2SFS", "vision tower", "BatchNorm")
    with caplog.at_level("WARNING"):  # parts left frozen are said in one line before any work
        inject_svd(mobile.model)
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CLIP-SVD:")]
    assert len(line) == 1 and "timm:FastVit" in line[0] and "without linear layers" in line[0]


def test_twosfs_tunes_the_layernorms_the_release_tunes():
    torch.manual_seed(0)
    bb = CLIPBackbone("xmx-tiny", None)
    norms, notes = layernorms(bb.model)
    assert sorted(n for n, _ in norms) == sorted(f"{p}transformer.resblocks.{i}.ln_{j}" for p in ("", "visual.")
                                                 for i in (0, 1) for j in (1, 2))
    assert "ln_final" in notes[0] and "visual.ln_pre" in notes[1]  # left frozen, as the release ends up doing
    everything, _ = layernorms(bb.model, scope="all")
    assert len(everything) == len(norms) + 3
    late, _ = layernorms(bb.model, vision_start=1)
    assert sum("visual." in n for n, _ in late) == 2


def _dm(bb, names, eval_sets, shots=2):
    return SimpleNamespace(backbone=bb, inputs="images", classnames=names, templates=["a photo of a {}."],
                           val_set=eval_sets[0], eval_sets=eval_sets, logit_scale=bb.logit_scale, shots=shots)


def test_twosfs_stage_one_changes_only_layernorms_stage_two_only_the_classifier(tiny_clip):
    bb = copy.deepcopy(tiny_clip)
    names = ["cat", "dog", "bird"]
    es = SimpleNamespace(name="test", classnames=names, templates=None)
    method = TwoSFSMethod(amp="none", iters_per_shot=2)  # 4 steps: 2 + 2
    method.build(_dm(bb, names, [es]))
    assert (method.total_steps, method.stage1_steps) == (4, 2)
    opts = [torch.optim.AdamW(method.ln_params, lr=1e-2), torch.optim.AdamW([method.classifier], lr=1e-2)]
    step = {"n": 0}
    method.optimizers = lambda: opts
    method.lr_schedulers = lambda: [None, None]
    method.manual_backward = lambda loss: loss.backward()
    method.log = lambda *a, **k: None
    type(method).global_step = property(lambda self: step["n"])
    try:
        img = torch.randn(4, 3, bb.image_size, bb.image_size)
        y = torch.tensor([0, 1, 2, 0])
        method.train()
        ln = {n for n, p in method.named_parameters() if ".resblocks." in n and ".ln_" in n}
        snap = lambda: {n: p.detach().clone() for n, p in method.named_parameters()}  # noqa: E731
        for k in range(4):
            before = snap()
            if k == 2:  # the stage switch: the classifier becomes the stage-1 text features
                method.training_step((img, y), k)
                want = method._encode_classes(method.backbone, names, ["a photo of a {}."], grad=False)
            else:
                method.training_step((img, y), k)
            changed = {n for n, p in snap().items() if not torch.equal(p, before[n])}
            if k < 2:
                assert changed == ln and len(ln) == 16  # 8 LayerNorms x (weight, bias)
            else:
                assert changed == {"classifier"}
            step["n"] += 1
        # the switch happened before stage 2's first update: one AdamW step away from the stage-1 text features
        assert not torch.equal(method.classifier.detach(), want)
    finally:
        del type(method).global_step


def test_twosfs_selective_inference(tiny_clip):
    """Base classes from the classifier rows, new classes through the stage-1 text tower."""
    bb = copy.deepcopy(tiny_clip)
    base = SimpleNamespace(name="test_base", classnames=["cat", "dog"], templates=None)
    new = SimpleNamespace(name="test_new", classnames=["bird", "fish", "cat"], templates=None)
    method = TwoSFSMethod(amp="none", iters_per_shot=2)
    method.build(_dm(bb, ["cat", "dog"], [base, new]))
    with torch.no_grad():
        method.classifier.copy_(torch.randn_like(method.classifier) * 3)
    method.eval()
    W = method.eval_classifier("test_new")
    text = method._encode_classes(bb, ["bird", "fish"], ["a photo of a {}."], grad=False)
    torch.testing.assert_close(W[:2], F.normalize(text, dim=-1))
    torch.testing.assert_close(W[2], F.normalize(method.classifier[0].detach(), dim=-1))
    torch.testing.assert_close(method.eval_classifier("test_base"), F.normalize(method.classifier.detach(), dim=-1))


@pytest.mark.parametrize("family", ["hf:clip", "xmx-tiny-eva02"])
def test_both_methods_run_end_to_end_on_other_towers(make_cfg, tmp_path, family, tmp_path_factory):
    if family.startswith("hf:"):
        folder = save_tiny(tmp_path_factory.mktemp("hfclip"), "clip")
        bb = ["backbone=hf_clip", f"backbone.name_or_path={folder}"]
    else:
        bb = [f"backbone.model={family}"]
    for m, extra in (("clip_svd", "method.iters_per_shot=1"), ("twosfs", "method.iters_per_shot=2")):
        res = run(make_cfg([*ONLINE_TINY, *bb, f"method={m}", extra], output_dir=tmp_path / m))
        assert res["status"] == "complete" and res["parameters"]["trainable"] > 0


def test_clip_svd_checkpoint_holds_only_singular_values_and_reloads(make_cfg, tmp_path):
    first = run(make_cfg([*ONLINE_TINY, "method=clip_svd", "method.iters_per_shot=2"], output_dir=tmp_path / "a"))
    assert first["parameters"]["trainable"] == 1536 == first["extra"]["singular_values"]  # 16 weights x 64 + ...
    sd = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert sd and all(".parametrizations." in k and ".s." in k for k in sd)
    assert sum(v.numel() for v in sd.values()) == 1536
    again = run(make_cfg([*ONLINE_TINY, "method=clip_svd", "train=false", f"init_from={tmp_path / 'a'}"],
                         output_dir=tmp_path / "b"))
    a, b = load_file(tmp_path / "a" / "predictions.safetensors"), load_file(tmp_path / "b" / "predictions.safetensors")
    assert torch.equal(a["test/logits"], b["test/logits"]) and again["metrics"] == first["metrics"]


def test_twosfs_checkpoint_holds_layernorms_and_classifier(make_cfg, tmp_path):
    res = run(make_cfg([*ONLINE_TINY, "method=twosfs", "method.iters_per_shot=2"], output_dir=tmp_path / "a"))
    n_cls = res["extra"]["classifier_parameters"]
    assert res["extra"]["stage1_parameters"] == 8 * 2 * 64 and res["extra"]["stage1_steps"] == 2
    assert res["parameters"]["trainable"] == 8 * 2 * 64 + n_cls
    sd = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert set(sd) == {"classifier"} | {k for k in sd if ".resblocks." in k and ".ln_" in k} and len(sd) == 17


@pytest.mark.parametrize("kind", ["clip_svd", "twosfs"])
def test_stopped_run_resumes_to_the_same_numbers(make_cfg, tmp_path, monkeypatch, kind):
    """2SFS: stopped in stage 1, resumed across the stage switch."""
    method = (["method=clip_svd", "method.iters_per_shot=5", "method.optimizer.lr=0.05"] if kind == "clip_svd" else
              ["method=twosfs", "method.iters_per_shot=5", "method.optimizer.lr=0.05"])  # 10 steps, 3 per epoch
    args = [*ONLINE_TINY, *method, "method.batch_size=8", f"paths.log_dir={tmp_path / 'logs'}"]
    ref = run(make_cfg(args, output_dir=tmp_path / "ref"))

    cls = ClipSVDMethod if kind == "clip_svd" else TwoSFSMethod
    with interrupted_at_epoch(monkeypatch, cls):
        run(make_cfg(args, output_dir=tmp_path / "logs" / "run"))
    ckpt = tmp_path / "logs" / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 1 and saved["global_step"] == 6
    res = run(make_cfg(args, output_dir=tmp_path / "logs" / "run"))
    assert res["resumed"] is True and res["metrics"] == ref["metrics"]
    a = load_file(tmp_path / "logs" / "run" / "predictions.safetensors")
    b = load_file(tmp_path / "ref" / "predictions.safetensors")
    assert torch.equal(a["test/logits"], b["test/logits"])


@pytest.mark.parametrize("overrides,needles", [
    (["method=clip_svd", "method.params=[q,x]"], ["method.params", "mlp"]),
    (["method=clip_svd", "method.layers=upper"], ["method.layers='upper'", "top_bottom"]),
    (["method=clip_svd", "method.layers=[-1]"], ["method.layers", "0-based"]),
    (["method=clip_svd", "method.encoder=image"], ["method.encoder='image'", "vision"]),
    (["method=twosfs", "method.stage1_fraction=1.0"], ["method.stage1_fraction=1.0", "(0, 1)"]),
    (["method=twosfs", "method.peft=lora"], ["method.peft='lora'", "only ln"]),
    (["method=twosfs", "method.ln_scope=some"], ["method.ln_scope='some'", "blocks, all"]),
    (["method=twosfs", "method.ln_vision_start=-1"], ["method.ln_vision_start=-1", ">= 0"]),
    (["method=twosfs", "method.iters_per_shot=null"], ["method.iters_per_shot=null", "300"]),
])
def test_bad_values_are_one_line(make_cfg, overrides, needles):
    one_line_error(lambda: run(make_cfg([*ONLINE_TINY, *overrides])), *needles)


def test_presets_compose():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from xmx.config import config_dir
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for name, method, protocol in [("clip_svd_16shot", "clip_svd", "fewshot"),
                                       ("clip_svd_b2n", "clip_svd", "base2new"),
                                       ("clip_svd_domain_shift", "clip_svd", "domain_shift"),
                                       ("twosfs_16shot", "twosfs", "fewshot"), ("twosfs_b2n", "twosfs", "base2new")]:
            cfg = compose("config", overrides=[f"experiment={name}"])
            assert cfg.method.name == method and cfg.protocol.name == protocol and cfg.augment.preset == "coop"
            assert cfg.backbone.model == "ViT-B-16" and cfg.trainer.limit_val_batches == 0
        dtd = compose("config", overrides=["experiment=clip_svd_16shot", "data=dtd"])
        assert list(dtd.data.templates) == ["{} texture."] and dtd.method.iters_per_shot == 200
        b2n = compose("config", overrides=["experiment=clip_svd_b2n", "data=food101"])
        assert (b2n.method.epochs, b2n.method.scheduler.T_max, b2n.method.optimizer.lr) == (10, 10, 4e-4)
        assert list(b2n.data.templates) == ["a photo of {}, a type of food."] and b2n.trainer.max_epochs == 10
        tw = compose("config", overrides=["experiment=twosfs_b2n", "data=dtd"])
        assert tw.method.prompt == "a photo of a {}." and tw.method.iters_per_shot == 300
    GlobalHydra.instance().clear()


def test_towers_are_found_in_every_family(tmp_path_factory):
    for family in FAMILIES:
        bb = _backbone(family, tmp_path_factory)
        tw = towers(bb.model)
        assert len(tw["text"].blocks) == 2 and len(tw["vision"].blocks) in (2, 4), family


@pytest.mark.parametrize("method", ["clip_svd", "twosfs"])
def test_recipe_tables_match_the_presets(method):
    """Every row of xmx/recipes/<method>.yaml holds in every preset it covers (the 11 datasets)."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from xmx.config import config_dir
    table = yaml.safe_load((Path(__file__).parents[1] / "xmx" / "recipes" / f"{method}.yaml").read_text())
    datasets = ["caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "imagenet", "oxford_flowers",
                "oxford_pets", "stanford_cars", "sun397", "ucf101"]
    GlobalHydra.instance().clear()
    checked = 0
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for preset in table["presets"]:
            for ds in (["imagenet"] if preset.endswith("domain_shift") else datasets):
                cfg = compose("config", overrides=[f"experiment={preset}", f"data={ds}"])
                case = {"preset": preset, "dataset": ds, "protocol": cfg.protocol.name, "shots": cfg.shots}
                for row in table["settings"]:
                    if row["key"] is None or any(case.get(k) != v for k, v in (row.get("when") or {}).items()):
                        continue
                    got = OmegaConf.select(cfg, row["key"])
                    got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
                    assert got == row.get("xmx", row["release"]), (preset, ds, row["key"], got)
                    checked += 1
    GlobalHydra.instance().clear()
    assert checked > 50
