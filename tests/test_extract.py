"""Image feature extraction: transforms, seeded views, worker independence, the fast path's tensor ops on CPU,
and the store helpers. The GPU comparison runs only where CUDA exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from xmx.backbones.clip import CLIPBackbone
from xmx.data.datasets import Datum
from xmx.errors import XmxError
from xmx.features import FeatureStore
from xmx.features.extract import (Preprocess, cached_image_features, embed_image_folder, extract_image_features,
                                  open_rgb)

FAST = dict(num_workers=0, progress=False, precision="fp32")


def _smooth_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Natural-ish content: a bicubic blow-up of a tiny random image plus mild grain."""
    small = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    a = np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.float32) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[str]]:
    """12 JPEGs of varying size under <root>/imgs, plus a CMYK JPEG, a greyscale JPEG and a PNG named .jpg."""
    root = tmp_path_factory.mktemp("data")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(0)
    rel = []
    for i in range(12):
        _smooth_image(rng, 60 + 7 * i, 45 + 3 * i).save(root / f"imgs/{i:02d}.jpg", quality=90)
        rel.append(f"imgs/{i:02d}.jpg")
    base = _smooth_image(rng, 64, 48)
    base.convert("CMYK").save(root / "imgs/cmyk.jpg", quality=90)
    base.convert("L").save(root / "imgs/grey.jpg", quality=90)
    base.save(root / "imgs/png.jpg", format="PNG")
    rel += ["imgs/cmyk.jpg", "imgs/grey.jpg", "imgs/png.jpg"]
    return root, rel


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Intra-op threads on a shared 2-core machine make the tiny encoder ~50x slower; one thread is plenty."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return CLIPBackbone("xmx-tiny", None)


def test_eval_transform_is_clips_and_deterministic(images, backbone):
    import open_clip
    root, rel = images
    ref = open_clip.image_transform(backbone.image_size, is_train=False, mean=backbone.image_mean,
                                    std=backbone.image_std)
    pp = Preprocess.from_backbone(backbone, "none")
    for r in rel:
        img = open_rgb(root / r)
        assert torch.equal(pp.pil_view(img, 0, 0), ref(img))
    a = extract_image_features(backbone, rel, root, preset="none", views=3, **FAST)
    b = extract_image_features(backbone, [str(root / r) for r in rel], preset="none", views=1, **FAST)
    assert a.shape == (3, len(rel), backbone.embed_dim) and a.dtype == torch.float32
    assert torch.equal(a[0], a[2]) and torch.equal(a[0], b[0])  # all eval views identical, whatever the count


def test_raw_features_are_the_encoder_output(images, backbone):
    root, rel = images
    feats = extract_image_features(backbone, rel[:3], root, **FAST)  # [1,3,C]
    pp = Preprocess.from_backbone(backbone, "none")
    x = torch.stack([pp.pil_view(open_rgb(root / r), i, 0) for i, r in enumerate(rel[:3])])
    with torch.no_grad():
        ref = backbone.encode_image(x)
    torch.testing.assert_close(feats[0], ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(feats[0].norm(dim=-1), torch.ones(3))  # raw, not normalised (docs/methods/shared.md#features)


@pytest.mark.parametrize("preset", ["tip", "coop"])
def test_augmented_views_reproducible_and_distinct(images, backbone, preset):
    root, rel = images
    a = extract_image_features(backbone, rel, root, preset=preset, views=4, seed=3, **FAST)
    b = extract_image_features(backbone, rel, root, preset=preset, views=4, seed=3, **FAST)
    c = extract_image_features(backbone, rel, root, preset=preset, views=4, seed=4, **FAST)
    assert torch.equal(a, b)
    for v in range(4):
        for w in range(v + 1, 4):
            assert not torch.allclose(a[v], a[w])
    assert not torch.allclose(a, c)


def test_worker_count_and_batch_size_do_not_change_results(images, backbone):
    root, rel = images
    a = extract_image_features(backbone, rel, root, preset="tip", views=3, noise_std=0.1, batch_size=64, **FAST)
    b = extract_image_features(backbone, rel, root, preset="tip", views=3, noise_std=0.1, batch_size=6,
                               num_workers=2, progress=False, precision="fp32")
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # only the encoder's batch size differs


def test_noise_is_seeded_and_changes_features(images, backbone):
    root, rel = images
    clean = extract_image_features(backbone, rel[:4], root, **FAST)
    noisy = extract_image_features(backbone, rel[:4], root, noise_std=0.5, **FAST)
    again = extract_image_features(backbone, rel[:4], root, noise_std=0.5, **FAST)
    assert torch.equal(noisy, again) and not torch.allclose(clean, noisy, atol=1e-3)


def test_tensor_ops_match_the_pil_path_on_cpu(images, backbone):
    """The fast path's per-image tensor resize/crop (run here on CPU tensors) against PIL. Tolerance: both use
    antialiased bicubic (a=-0.5) and round to uint8, so pixels differ by rounding only; we allow a mean absolute
    difference of 1/255 in [0,1] units per pixel (≈0.015 after CLIP's std) and a few levels at worst."""
    root, rel = images
    for preset in ("none", "tip", "coop"):
        pp = Preprocess.from_backbone(backbone, preset, seed=1)
        for i, r in enumerate(rel):
            img = open_rgb(root / r)
            a = pp.pil_view(img, i, 0)
            b = pp.tensor_view(TF.pil_to_tensor(img), i, 0)
            diff = ((a - b) * torch.tensor(pp.std).view(3, 1, 1) * 255).abs()  # in uint8 levels
            assert diff.mean() < 1.0 and diff.max() <= 12, (preset, r, diff.mean(), diff.max())


def test_fast_path_code_on_cpu_agrees_with_pil_path(images, backbone):
    """decode='tensor': the GPU path's code (byte reading, batched decode, PIL fallback for CMYK/PNG, tensor ops,
    noise) on CPU; features agree with the PIL path (cosine >= 0.999 on average)."""
    root, rel = images
    stats = {}
    a = extract_image_features(backbone, rel, root, preset="coop", views=2, noise_std=0.05, **FAST)
    b = extract_image_features(backbone, rel, root, preset="coop", views=2, noise_std=0.05, decode="tensor",
                               stats=stats, **FAST)
    cos = F.cosine_similarity(a, b, dim=-1)
    assert cos.mean() >= 0.999 and cos.min() >= 0.99, cos
    assert stats["decode"] == "tensor" and stats["images"] == len(rel)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg decode)")
def test_gpu_path_agrees_with_pil_path(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(48):
        p = tmp_path / f"{i}.jpg"
        _smooth_image(rng, 500 - i, 375).save(p, quality=90)
        paths.append(str(p))
    _smooth_image(rng, 320, 240).convert("L").save(tmp_path / "grey.jpg")  # nvjpeg, RGB output
    _smooth_image(rng, 320, 240).convert("CMYK").save(tmp_path / "cmyk.jpg")  # PIL fallback
    paths += [str(tmp_path / "grey.jpg"), str(tmp_path / "cmyk.jpg")]
    torch.manual_seed(0)
    bb = CLIPBackbone("ViT-B-16", None)
    for preset in ("none", "tip"):
        stats = {}
        ref = extract_image_features(bb, paths, preset=preset, views=2, device="cuda", decode="pil", num_workers=2,
                                     progress=False, precision="fp32")
        gpu = extract_image_features(bb, paths, preset=preset, views=2, device="cuda", decode="gpu", num_workers=2,
                                     progress=False, precision="fp32", stats=stats)
        assert stats["decode"] == "gpu" and stats["gpu_decoded"] == 49 and stats["cpu_decoded"] == 1
        cos = F.cosine_similarity(ref, gpu, dim=-1)  # [V,N]
        assert cos.mean() >= 0.999 and cos.min() >= 0.99, (preset, cos.min(), cos.argmin())


def test_datums_relative_to_root(images, backbone):
    root, rel = images
    items = [Datum(r, i % 3, f"c{i % 3}") for i, r in enumerate(rel[:4])]
    a = extract_image_features(backbone, items, root, **FAST)
    b = extract_image_features(backbone, [str(root / r) for r in rel[:4]], **FAST)
    assert torch.equal(a, b)
    with pytest.raises(XmxError, match="no data root"):
        extract_image_features(backbone, items, None, **FAST)


def test_bad_inputs_raise_one_line_errors(images, backbone, tmp_path):
    root, rel = images
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xffnot really a jpeg")
    for decode in ("pil", "tensor"):
        with pytest.raises(XmxError, match="cannot read image .*broken.jpg") as e:
            extract_image_features(backbone, [str(tmp_path / "broken.jpg")], decode=decode, **FAST)
        assert "\n" not in str(e.value)
    with pytest.raises(XmxError, match="cannot read image .*missing.jpg"):
        extract_image_features(backbone, [str(tmp_path / "missing.jpg")], **FAST)
    with pytest.raises(XmxError, match="unknown augmentation preset"):
        extract_image_features(backbone, rel, root, preset="randaugment", **FAST)
    with pytest.raises(XmxError, match="views"):
        extract_image_features(backbone, rel, root, views=0, **FAST)
    with pytest.raises(XmxError, match="precision"):
        extract_image_features(backbone, rel, root, num_workers=0, progress=False, precision="int8")


def test_cached_features_hit_miss_and_key(images, backbone, tmp_path):
    root, rel = images
    items = [Datum(r, i % 3, f"c{i % 3}") for i, r in enumerate(rel[:5])]
    store = FeatureStore(tmp_path / "store")
    kw = dict(dataset="toy", split="train", num_workers=0, progress=False)
    a = cached_image_features(store, backbone, items, root, preset="tip", views=2, seed=1, **kw)
    assert store.last_outcome == "miss" and a.shape == (2, 5, backbone.embed_dim) and a.dtype == torch.float16
    b = cached_image_features(store, backbone, items, root, preset="tip", views=2, seed=1, **kw)
    assert store.last_outcome == "hit" and torch.equal(a, b)
    for change in (dict(seed=2), dict(views=3), dict(preset="coop"), dict(noise_std=0.1), dict(precision="fp32")):
        cached_image_features(store, backbone, items, root, **{**dict(preset="tip", views=2, seed=1), **change}, **kw)
        assert store.last_outcome == "miss", change
    cached_image_features(store, backbone, items[:4], root, preset="tip", views=2, seed=1, **kw)
    assert store.last_outcome == "miss"  # another subset
    cached_image_features(store, backbone, items, root, **kw)
    cached_image_features(store, backbone, items, root, seed=9, **kw)
    assert store.last_outcome == "hit"  # eval features do not depend on the seed
    torch.manual_seed(1)
    other = CLIPBackbone("xmx-tiny", None)  # another random init: same name, different numbers
    cached_image_features(store, other, items, root, **kw)
    assert store.last_outcome == "miss"


def test_embed_image_folder_through_the_store(images, backbone, tmp_path):
    root, rel = images
    folder = tmp_path / "index"
    (folder / "sub").mkdir(parents=True)
    for r in rel[:3]:
        (folder / "sub" / Path(r).name).write_bytes((root / r).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    store = FeatureStore(tmp_path / "store")
    feats, names = embed_image_folder(store, backbone, folder, num_workers=0, progress=False)
    assert names == ["sub/00.jpg", "sub/01.jpg", "sub/02.jpg"] and feats.shape == (3, backbone.embed_dim)
    assert store.last_outcome == "miss"
    again, _ = embed_image_folder(store, backbone, folder, num_workers=0, progress=False)
    assert store.last_outcome == "hit" and torch.equal(feats, again)
    (folder / "extra.jpg").write_bytes((root / rel[3]).read_bytes())
    more, names = embed_image_folder(store, backbone, folder, num_workers=0, progress=False)
    assert store.last_outcome == "miss" and names[0] == "extra.jpg" and len(names) == 4
    torch.testing.assert_close(more[1:], feats, rtol=1e-3, atol=1e-3)
    with pytest.raises(XmxError, match="does not exist"):
        embed_image_folder(store, backbone, tmp_path / "nowhere", progress=False)
