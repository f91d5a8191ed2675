"""CLIP-family backbones (issue: any open_clip model, transformers folders): every tower family as a tiny random-init
model offline (timm ViT for SigLIP, EVA-02 and PE, FastViT for MobileCLIP; bidirectional / last-token / end-of-text
text towers) computes what open_clip / transformers compute, runs zero-shot, Tip-Adapter and MMA end to end, keys
its features apart from every other backbone, and refuses bad input in one line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from xmx.backbones import CLIPBackbone, HFCLIPBackbone
from xmx.backbones.clip import StandInTokenizer
from xmx.data.transforms import build_transform
from xmx.features.extract import Preprocess, image_feature_key
from xmx.methods.base import MeanPerClassRecall
from xmx.run import run

sys.path.insert(0, str(Path(__file__).parent))
from conftest import one_line_error  # noqa: E402
from hf_tiny import save_tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# tiny model -> (image tower class, text pooling, sigmoid scores)
FAMILIES = {
    "xmx-tiny": ("VisionTransformer", "argmax", False),            # OpenAI CLIP layout (also DFN, MetaCLIP)
    "xmx-tiny-sigmoid": ("timm:VisionTransformer", "last", True),   # SigLIP: MAP-pooled timm ViT, bidirectional text
    "xmx-tiny-eva02": ("timm:Eva", "argmax", False),                # EVA-02: rotary SwiGLU timm ViT
    "xmx-tiny-pe": ("timm:Eva", "argmax", False),                   # PE-Core: RoPE timm ViT, attention pooling
    "xmx-tiny-mobileclip": ("timm:FastVit", "argmax", False),       # MobileCLIP: FastViT MCi, bidirectional text
}
TEXTS = ["a photo of a red circle.", "a blue square", "a photo of a small yellow shape, large"]


def _bb(model: str, **kw) -> CLIPBackbone:
    torch.manual_seed(0)
    return CLIPBackbone(model, None, **kw)


@pytest.mark.parametrize("model", list(FAMILIES))
def test_each_family_computes_what_open_clip_computes(model):
    bb = _bb(model)
    tower, pool, sigmoid = FAMILIES[model]
    d = bb.describe()
    assert d["image_tower"] == tower and d["text_pool"] == pool and (d["score"] == "sigmoid") == sigmoid
    assert (bb.logit_bias is not None) == sigmoid
    assert bb.causal_text == (model not in ("xmx-tiny-sigmoid", "xmx-tiny-mobileclip"))  # bidirectional text towers
    tokens = bb.tokenize(TEXTS)
    images = torch.randn(2, 3, bb.image_size, bb.image_size)
    with torch.no_grad():
        ref_img, ref_txt, ref_scale, *ref_bias = bb.model(images, tokens)  # open_clip's own forward (normalised)
        txt = bb.encode_text(tokens)
        img = bb.encode_image(images)
        # the generic text path (prompt learning) equals open_clip's encode_text on every tower layout
        torch.testing.assert_close(bb.encode_text_from_embeddings(bb.token_embedding(tokens), tokens), txt)
        torch.testing.assert_close(txt, bb.model.encode_text(tokens))
        feats, valid = bb.encode_text_tokens(tokens)
    assert feats.shape == (*tokens.shape, bb.embed_dim) and valid[:, 0].all() and (valid.sum(1) < tokens.shape[1]).all()
    torch.testing.assert_close(F.normalize(img, dim=-1), ref_img)
    torch.testing.assert_close(F.normalize(txt, dim=-1), ref_txt)
    # logits with the model's own scale and bias, as open_clip's SigLIP / CLIP forward defines them
    ref_logits = ref_scale * ref_img @ ref_txt.T + (ref_bias[0] if ref_bias else 0.0)
    torch.testing.assert_close(bb.logits(img, F.normalize(txt, dim=-1).T), ref_logits)


def _check_classification(res: dict, out: Path, model: str) -> None:
    m, w = res["metrics"], res["weights"]
    assert w["arch"] == model and w["random_init"] is True
    assert {"test/acc", "test/acc5", "test/mean_per_class_recall"} <= set(m)
    assert m["test/acc"] <= m["test/acc5"] <= 100.0
    preds = load_file(out / "predictions.safetensors")
    logits, labels = preds["test/logits"].float(), preds["test/labels"]
    top5 = (logits.topk(5, dim=-1).indices == labels[:, None]).any(-1).float().mean().item() * 100
    assert top5 == pytest.approx(m["test/acc5"], abs=1.0)  # stored logits are fp16: rare ties


def _family(model: str) -> list[str]:
    return ["backbone=open_clip", f"backbone.model={model}", "backbone.weights=null", "data=synthetic", "shots=4",
            "trainer.accelerator=cpu", "callbacks.rich_progress_bar=null", "logger=none"]


def test_siglip_family_runs_zeroshot_tip_adapter_and_mma_with_its_bias(make_cfg, tmp_path):
    model = "xmx-tiny-sigmoid"
    runs = {"zeroshot": ["method=zeroshot"],
            "tip_adapter": ["method=tip_adapter", "augment=tip", "augment.views=2"],
            "mma": ["method=mma", "method.epochs=2"]}
    for method, extra in runs.items():
        res = run(make_cfg(_family(model) + ["backbone.resize_mode=squash"] + extra, output_dir=tmp_path / method))
        _check_classification(res, tmp_path / method, model)
        assert res["weights"]["preprocess"]["resize_mode"] == "squash" and res["weights"]["score"] == "sigmoid"
        if method != "tip_adapter":  # Tip-Adapter's equation has its own fixed scale 100 and no bias (its docs)
            assert res["extra"]["logit_bias"] == res["weights"]["logit_bias"] == -10.0


@pytest.mark.parametrize("model", ["xmx-tiny-eva02", "xmx-tiny-pe", "xmx-tiny-mobileclip"])
def test_each_family_runs_mma_then_zeroshot_and_tip_adapter_on_its_features(make_cfg, tmp_path, model, monkeypatch):
    from xmx.datamodules.clip import CLIPDataModule
    from xmx.methods.tip_adapter import build_cache, search_alpha_beta, tip_logits
    from xmx.methods.zeroshot import zeroshot_logits
    seen = []
    setup = CLIPDataModule.setup
    monkeypatch.setattr(CLIPDataModule, "setup", lambda self, stage=None: (setup(self, stage), seen.append(self))[0])
    res = run(make_cfg(_family(model) + ["method=mma", "method.epochs=2"], output_dir=tmp_path))
    _check_classification(res, tmp_path, model)
    assert res["extra"]["logit_bias"] is None and res["extra"]["logit_scale"] == res["weights"]["logit_scale"]
    dm = seen[-1]  # zero-shot and Tip-Adapter on the very features and classifier the run used
    test = dm.eval_sets[0]
    f, y = dm.features_of(test).float(), torch.tensor([d.label for d in test.items])
    W = dm.text_classifier(test.classnames, test.templates)
    zs = zeroshot_logits(f, W, dm.logit_scale, dm.logit_bias)
    torch.testing.assert_close(zs, dm.backbone.logits(f, W))
    keys, values = build_cache(dm.train_features, dm.train_labels, len(dm.classnames))
    fv, yv = dm.features_of(dm.val_set).float(), torch.tensor([d.label for d in dm.val_set.items])
    s = search_alpha_beta(fv, yv, W, keys, values, beta_max=5.0, alpha_max=5.0, n_beta=10, n_alpha=5)
    assert tip_logits(f, W, keys, values, s.alpha, s.beta).shape == zs.shape == (len(y), len(test.classnames))


def test_the_siglip_preset_names_its_architecture_preprocessing_and_bias(make_cfg):
    cfg = make_cfg(["backbone=siglip_vit_b16", "backbone.weights=null"])
    assert cfg.backbone.model == "ViT-B-16-SigLIP" and cfg.backbone.preprocess_tag == "webli"
    for preset, model in [("siglip2_vit_b16", "ViT-B-16-SigLIP2"), ("eva02_vit_b16", "EVA02-B-16"),
                          ("mobileclip_s2", "MobileCLIP-S2"), ("dfn_vit_h14", "ViT-H-14-quickgelu"),
                          ("metaclip_vit_b16", "ViT-B-16-quickgelu"), ("pe_core_b16", "PE-Core-B-16")]:
        c = make_cfg([f"backbone={preset}"]).backbone
        assert c.model == model and (model, c.weights) in open_clip.list_pretrained()  # names open_clip knows
        assert c.preprocess_tag == c.weights


def test_preprocessing_comes_from_the_weights_and_keys_the_features():
    from xmx.backbones.clip import resolve_preprocess
    pp, src = resolve_preprocess("ViT-B-16-SigLIP", {"random_init": True}, "webli")
    assert (pp["resize_mode"], tuple(pp["mean"]), pp["interpolation"]) == ("squash", (0.5, 0.5, 0.5), "bicubic")
    assert src == "tag webli"
    pp, _ = resolve_preprocess("MobileCLIP-S2", {"random_init": True}, "auto")
    assert (tuple(pp["std"]), pp["interpolation"]) == ((1.0, 1.0, 1.0), "bilinear")
    a, b = _bb("xmx-tiny"), _bb("xmx-tiny", resize_mode="squash")
    c = _bb("xmx-tiny-sigmoid")
    key = dict(dataset="d", split="test", subset_digest="x", n=3)
    keys = [image_feature_key(bb, **key) for bb in (a, b, c)]
    assert keys[1]["resize_mode"] == "squash" and keys[0]["resize_mode"] == "shortest"
    assert keys[0] != keys[1] != keys[2] != keys[0]  # the same images under two backbones never share features
    assert keys[0]["backbone"] != keys[2]["backbone"]
    assert keys[0]["backbone"] == keys[1]["backbone"]  # same weights; only the preprocessing differs


@pytest.mark.parametrize("mode", ["squash", "longest", "shortest"])
def test_resize_modes_match_open_clip_and_both_decode_paths(mode):
    img = Image.fromarray((torch.rand(30, 50, 3) * 255).byte().numpy())
    pp = Preprocess(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize_mode=mode)
    x = pp.pil_view(img, 0, 0)
    ref = build_transform("none", 16, (0.5,) * 3, (0.5,) * 3, "bicubic", resize_mode=mode)(img)
    oc = open_clip.image_transform(16, is_train=False, mean=(0.5,) * 3, std=(0.5,) * 3, resize_mode=mode)(img)
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x, ref, atol=0.02, rtol=0)  # PIL vs tensor resize rounding
    torch.testing.assert_close(ref, oc, atol=1e-6, rtol=0)  # the image path is open_clip's own transform
    t = pp.tensor_view(torch.from_numpy(__import__("numpy").asarray(img)).permute(2, 0, 1).contiguous(), 0, 0)
    assert (t - x).abs().mean() < 0.05
    if mode == "longest":  # 30x50 fit into 16: rows outside the 10-row band are zero padding (-1 after normalising)
        assert (x[:, :3] == -1).all() and (x[:, 13:] == -1).all()


def test_mean_per_class_recall_is_clip_benchmarks_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    p = torch.tensor([0, 3, 1, 2, 2, 2, 0])  # class 3 is predicted but absent from the targets
    m = MeanPerClassRecall(5)
    m.update(F.one_hot(p, 5).float(), y)
    assert m.compute().item() == pytest.approx(balanced_accuracy_score(y.numpy(), p.numpy()))


def test_hf_clip_folders_equal_transformers_forward(tmp_path, make_cfg):
    for kind in ("clip", "siglip"):
        bb = HFCLIPBackbone(str(save_tiny(tmp_path / kind, kind)))
        tokens = bb.tokenize(TEXTS)
        images = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            ref = bb.model(input_ids=tokens, pixel_values=images)
            txt, img = bb.encode_text(tokens), bb.encode_image(images)
            torch.testing.assert_close(bb.encode_text_from_embeddings(bb.token_embedding(tokens), tokens), txt)
            ours = bb.logits(img, F.normalize(txt, dim=-1).T)
        torch.testing.assert_close(ours, ref.logits_per_image)
        torch.testing.assert_close(F.normalize(txt, dim=-1), ref.text_embeds)
        d = bb.describe()
        assert d["preprocess"]["resize_mode"] == ("shortest" if kind == "clip" else "squash")
        assert (d["score"], d["logit_bias"] is None) == (("softmax", True) if kind == "clip" else ("sigmoid", False))
    res = run(make_cfg(["backbone=hf_clip", f"backbone.name_or_path={tmp_path / 'siglip'}", "method=zeroshot",
                        "logger=none", "callbacks.rich_progress_bar=null"]))
    assert res["weights"]["loader"] == "transformers" and res["weights"]["logit_bias"] == pytest.approx(-12.9)
    assert res["extra"]["logit_bias"] == pytest.approx(-12.9) and len(res["weights"]["sha256"]) == 64


def test_random_init_without_its_tokenizer_uses_a_stand_in_trained_weights_refuse(tmp_path):
    cfg = json.loads((Path(open_clip.__file__).parent / "model_configs" / "ViT-B-16-SigLIP.json").read_text())
    tiny = json.loads((Path(__file__).parents[1] / "xmx/backbones/model_configs/xmx-tiny-sigmoid.json").read_text())
    tiny["text_cfg"].update(hf_tokenizer_name=str(tmp_path / "no-such-tokenizer"), vocab_size=300,
                            tokenizer_kwargs=cfg["text_cfg"]["tokenizer_kwargs"])
    path = tmp_path / "xmx-tiny-hftok.json"
    path.write_text(json.dumps(tiny))
    bb = CLIPBackbone(str(path), None)
    assert isinstance(bb.tokenizer, StandInTokenizer) and bb.describe()["tokenizer"].startswith("stand-in")
    assert bb.tokenize(TEXTS).max() < 300 and bb.encode_text(bb.tokenize(TEXTS)).shape == (3, 64)
    ckpt = tmp_path / "w.pt"
    torch.save(bb.model.state_dict(), ckpt)
    one_line_error(lambda: CLIPBackbone(str(path), str(ckpt)), "backbone.tokenizer", "no-such-tokenizer")


def test_bad_backbones_are_refused_in_one_line_quickly(tmp_path):
    t0 = time.perf_counter()
    msg = one_line_error(lambda: CLIPBackbone("ViT-B-16-SigLIPP", None), "backbone.model", "ViT-B-16-SigLIP")
    assert "close matches" in msg
    one_line_error(lambda: CLIPBackbone("ViT-B-16-SigLIP", "openai"), "backbone.weights", "webli")
    ckpt = tmp_path / "tiny.pt"
    torch.save(_bb("xmx-tiny").model.state_dict(), ckpt)
    one_line_error(lambda: CLIPBackbone("xmx-tiny-eva02", str(ckpt)), "does not fit", "xmx-tiny-eva02")
    one_line_error(lambda: CLIPBackbone("xmx-tiny", None, resize_mode="stretch"), "backbone.resize_mode", "squash")
    one_line_error(lambda: HFCLIPBackbone(str(tmp_path)), "backbone.name_or_path", "config.json")
    assert time.perf_counter() - t0 < 10.0


def _open_clip_folder(folder: Path, bb: CLIPBackbone) -> Path:
    """An open_clip hub-style folder: open_clip_config.json (architecture + preprocessing) + safetensors weights."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((Path(__file__).parents[1] / "xmx/backbones/model_configs/xmx-tiny-sigmoid.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash",
                                              "interpolation": "bilinear"}}))
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def test_hub_ids_and_open_clip_folders_load_architecture_weights_and_preprocessing(tmp_path):
    src = _bb("xmx-tiny-sigmoid")
    with torch.no_grad():
        src.model.logit_bias.fill_(-12.5)
    tokens = src.tokenize(TEXTS)
    # a local open_clip folder, and the same files as a cached hf-hub repository (offline: read from the cache only)
    folder = _open_clip_folder(tmp_path / "folder", src)
    snap = _open_clip_folder(tmp_path / "hub" / "models--xmx--tiny" / "snapshots" / "abc123", src)
    (tmp_path / "hub" / "models--xmx--tiny" / "refs").mkdir(parents=True)
    (tmp_path / "hub" / "models--xmx--tiny" / "refs" / "main").write_text("abc123")
    assert snap.is_dir()
    for weights in (str(folder), "hf-hub:xmx/tiny"):
        bb = CLIPBackbone("ignored-for-hub-weights", weights, cache_dir=str(tmp_path / "hub"))
        d = bb.describe()
        assert (d["preprocess"]["resize_mode"], d["preprocess"]["interpolation"]) == ("squash", "bilinear")
        assert d["logit_bias"] == pytest.approx(-12.5) and d["random_init"] is False and len(d["sha256"]) == 64
        with torch.no_grad():
            torch.testing.assert_close(bb.encode_text(tokens), src.encode_text(tokens))
    one_line_error(lambda: CLIPBackbone("x", "hf-hub:xmx/not-cached", cache_dir=str(tmp_path / "hub")),
                   "hf-hub:xmx/not-cached", "local folder")


@pytest.mark.parametrize("model", ["xmx-tiny", "xmx-tiny-sigmoid"])
def test_half_precision_runs_both_tower_kinds(model):
    """open_clip keeps some embeddings fp32 under fp16: inputs follow the image tower's conv / linear weights."""
    torch.manual_seed(0)
    ref, half = CLIPBackbone(model, None), None
    torch.manual_seed(0)
    half = CLIPBackbone(model, None, precision="bf16")
    images = torch.randn(2, 3, ref.image_size, ref.image_size)
    with torch.no_grad():
        a, b = ref.encode_image(images), half.encode_image(images)
        t = half.encode_text(half.tokenize(TEXTS))
    assert b.dtype == t.dtype == torch.bfloat16
    assert F.cosine_similarity(a, b.float()).min() > 0.95


def test_pre_projection_features_exist_where_the_tower_has_a_final_projection(tmp_path):
    """ProLIP's input: open_clip ViT and transformers CLIP give raw = pre @ P (+ b); timm / SigLIP towers refuse."""
    images = torch.randn(2, 3, 32, 32)
    for bb in (_bb("xmx-tiny"), HFCLIPBackbone(str(save_tiny(tmp_path / "clip", "clip")))):
        P, b = bb.image_projection()
        with torch.no_grad():
            pre, raw = bb.encode_image(images, project=False), bb.encode_image(images)
        assert pre.shape == (2, bb.pre_projection_dim)
        torch.testing.assert_close(pre @ P + (0 if b is None else b), raw, atol=1e-5, rtol=1e-4)
    one_line_error(lambda: _bb("xmx-tiny-sigmoid").encode_image(images, project=False), "pre-projection",
                   "timm:VisionTransformer")
    siglip = HFCLIPBackbone(str(save_tiny(tmp_path / "siglip", "siglip")))
    one_line_error(lambda: siglip.pre_projection_dim, "pre-projection", "SiglipModel")


def test_lora_finds_the_text_blocks_of_every_family_and_refuses_timm_image_towers():
    """CLIP-LoRA's needs (nn.MultiheadAttention blocks): open_clip text towers have them in every family (also in
    CustomTextCLIP's ``.text``); timm image towers (SigLIP, EVA-02, PE, MobileCLIP) do not: one line."""
    from xmx.backbones.lora import tower_blocks
    for model in ("xmx-tiny-sigmoid", "xmx-tiny-eva02"):
        bb = _bb(model)
        assert len(tower_blocks(bb.model, "text")) == 2
        one_line_error(lambda: tower_blocks(bb.model, "vision"), "vision tower", "TimmModel")
