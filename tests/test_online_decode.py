"""The online training path's device-side decode (``data.decode``, :mod:`xmx.features.online`): the byte loaders
(``tensor`` = the GPU path's code on the CPU) hand the method the same crops, flips, noise and labels as the PIL
loaders for the same global seed, up to the resize rounding ``tests/test_extract.py`` accepts; a PNG in the dataset
goes through PIL; a CLIP-LoRA run trains on it; ``gpu`` without CUDA falls back to PIL; bad values are one line."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ONLINE_TINY, one_line_error
from xmx.data.images import ImageListDataset
from xmx.datamodules.clip import CLIPDataModule
from xmx.features.online import OnlineBytes
from xmx.run import run

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ONLINE_TINY  # conftest.py


@pytest.fixture(scope="module")
def tree(tmp_path_factory, tiny_clip):
    """The synthetic dataset in its own root, with training images of varied sizes (so crops differ from image to
    image) and one training image rewritten as a PNG under its .jpg name."""
    root = tmp_path_factory.mktemp("online")
    dm = _dm(tiny_clip, root, "pil")
    dm.prepare_lists()
    rng = np.random.default_rng(0)
    for k, d in enumerate(dm.protocol.train):
        p = root / d.path
        w, h = 40 + 5 * (k % 7), 36 + 3 * (k % 5)
        img = Image.open(p).convert("RGB").resize((w, h), Image.BICUBIC)
        a = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (h, w, 3))
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(p, format="PNG" if k == 0 else "JPEG", quality=90)
    return root, dm.protocol.train[0].path


def _dm(bb, root, decode, noise=0.05, workers=0):
    return CLIPDataModule("synthetic", str(root), bb, shots=2, inputs="images", batch_size=64, eval_batch_size=64,
                          augment={"preset": "coop", "noise_std": noise, "noise_on_eval": True},
                          num_workers=workers, features={"enabled": False}, decode=decode)


def _levels(a, b, bb):
    """|a - b| of normalised images in uint8 levels."""
    return ((a - b) * torch.tensor(bb.image_std).view(1, 3, 1, 1) * 255).abs()


@pytest.mark.parametrize("workers", [0, 1])
def test_byte_loader_gives_the_pil_batches(tiny_clip, tree, workers):
    root, png = tree
    pil, fast = _dm(tiny_clip, root, "pil", workers=workers), _dm(tiny_clip, root, "tensor", workers=workers)
    pil.setup(), fast.setup()
    assert isinstance(pil.train_dataloader().dataset, ImageListDataset)
    assert isinstance(fast.train_dataloader().dataset, OnlineBytes)
    torch.manual_seed(3)
    xa, ya = next(iter(pil.train_dataloader()))
    torch.manual_seed(3)
    raw = next(iter(fast.train_dataloader()))
    # the PNG (named .jpg) came through PIL in the worker; every JPEG as bytes for the batched decoder
    fallback = [fast.protocol.train[int(i)].path for i, im in zip(raw["index"], raw["images"]) if im is not None]
    assert fallback == [png] and len(raw["images"]) == len(ya) == len(pil.protocol.train)
    xb, yb = fast.decode_batch(raw, "cpu")
    assert xb.shape == xa.shape and xb.dtype == torch.float32 and torch.equal(ya, yb)
    d = _levels(xa, xb, tiny_clip)  # same crops, flips and noise: only the resize rounding differs (test_extract's bound)
    assert d.mean() < 1.0 and d.max() <= 12, (d.mean(), d.max())
    torch.manual_seed(4)  # the draws come from the global RNG (RNGState checkpoints it): another seed, other crops
    xc, _ = fast.decode_batch(next(iter(fast.train_dataloader())), "cpu")
    assert _levels(xa, xc, tiny_clip).mean() > 5
    # evaluation loaders (eval transform + data.augment.noise_on_eval) agree the same way
    torch.manual_seed(5)
    ea, la = next(iter(pil.test_dataloader()[0]))
    torch.manual_seed(5)
    eb, lb = fast.decode_batch(next(iter(fast.test_dataloader()[0])), "cpu")
    d = _levels(ea, eb, tiny_clip)
    assert torch.equal(la, lb) and d.mean() < 1.0 and d.max() <= 12, (d.mean(), d.max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg decode)")
def test_gpu_byte_loader_gives_the_pil_batches(tiny_clip, tree):
    root, png = tree
    pil, gpu = _dm(tiny_clip, root, "pil", workers=1), _dm(tiny_clip, root, "gpu", workers=1)
    pil.setup(), gpu.setup()
    torch.manual_seed(3)
    xa, ya = next(iter(pil.train_dataloader()))
    torch.manual_seed(3)
    xb, yb = gpu.decode_batch(next(iter(gpu.train_dataloader())), "cuda")
    assert xb.is_cuda and torch.equal(ya, yb.cpu())
    d = _levels(xa, xb.cpu(), tiny_clip)
    assert d.mean() < 1.0 and d.max() <= 12, (d.mean(), d.max())
    counts = gpu._online["train"].counts  # every JPEG through nvjpeg, the PNG through PIL
    assert counts == {"gpu_decoded": len(ya) - 1, "cpu_decoded": 1}


def test_unreadable_file_is_one_line_or_skipped(tiny_clip, tree, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tree[0], root)
    dm = _dm(tiny_clip, root, "tensor", noise=0.0)
    dm.prepare_lists()
    bad = dm.protocol.train[3].path
    dm.setup()
    (root / bad).write_bytes(b"\xff\xd8\xffnot really a jpeg")  # a JPEG header, no decodable body
    raw = next(iter(dm.train_dataloader()))  # broken after the check: the decoder still names it in one line
    one_line_error(lambda: dm.decode_batch(raw, "cpu"), "cannot read image", bad.split("/")[-1], "data.unreadable=skip")
    fresh = _dm(tiny_clip, root, "tensor", noise=0.0)  # broken before the run: refused before training
    one_line_error(fresh.setup, "unreadable image", bad.split("/")[-1], "before training", "data.unreadable=skip")
    skip = CLIPDataModule("synthetic", str(root), tiny_clip, shots=2, inputs="images", batch_size=64, num_workers=0,
                          augment={"preset": "coop"}, features={"enabled": False}, decode="tensor", unreadable="skip")
    skip.setup()
    x, y = skip.decode_batch(next(iter(skip.train_dataloader())), "cpu")
    assert skip.skipped == {"train": [bad]} and len(x) == len(y) == len(dm.protocol.train) - 1
    shutil.copy(tree[0] / bad, root / bad)
    probe = _dm(tiny_clip, root, "pil", noise=0.0)
    probe.prepare_lists()
    test_img = probe.eval_sets[-1].items[-1].path  # the last image of the last test set, read only after training
    (root / test_img).write_bytes(b"not an image")
    one_line_error(_dm(tiny_clip, root, "pil", noise=0.0).setup, "unreadable image", test_img.split("/")[-1],
                   f"in the {probe.eval_sets[-1].name} set, found before training")


def test_clip_lora_trains_on_the_byte_path(make_cfg, tmp_path):
    """A CLIP-LoRA run with data.decode=tensor trains (the LoRA factors move) and tests like the PIL run: the crops
    are the same, the pixels differ by rounding only."""
    args = [*TINY, "method=clip_lora", "method.iters_per_shot=1", "method.optimizer.lr=0.05"]
    ref = run(make_cfg(args, output_dir=tmp_path / "pil"))
    res = run(make_cfg([*args, "data.decode=tensor"], output_dir=tmp_path / "tensor"))
    assert res["config"]["data"]["decode"] == "tensor" and res["extra"]["total_steps"] == 2
    dec = res["data"]["decode"]  # what ran is recorded: the training and test loaders on the byte path
    assert dec["setting"] == "tensor" and dec["used"]["train"] == dec["used"]["test"] == "tensor"
    assert dec["cpu_decoded"] > 0 and dec["gpu_decoded"] == 0
    assert ref["data"]["decode"] == {"setting": "pil", "used": {"train": "pil", "test": "pil"}}
    sd = torch.load(tmp_path / "tensor" / "checkpoints" / "last.ckpt", map_location="cpu",
                    weights_only=False)["state_dict"]
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith(".B"))  # trained away from zero
    a = load_file(tmp_path / "pil" / "predictions.safetensors")["test/logits"].float()
    b = load_file(tmp_path / "tensor" / "predictions.safetensors")["test/logits"].float()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    torch.testing.assert_close(b, a, atol=0.5, rtol=0.05)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_gpu_without_cuda_falls_back_to_pil_with_one_line(tiny_clip, tree, caplog):
    dm = _dm(tiny_clip, tree[0], "gpu")
    dm.setup()
    with caplog.at_level(logging.WARNING):
        loader = dm.train_dataloader()
    assert isinstance(loader.dataset, ImageListDataset)
    lines = [r.getMessage() for r in caplog.records if "data.decode=gpu" in r.getMessage()]
    assert len(lines) == 1 and "needs a CUDA device" in lines[0] and "\n" not in lines[0]
    auto = _dm(tiny_clip, tree[0], "auto")
    auto.setup()
    assert isinstance(auto.train_dataloader().dataset, ImageListDataset)


def test_bad_decode_is_one_line(make_cfg):
    one_line_error(lambda: run(make_cfg([*TINY, "method=clip_lora", "data.decode=nvjpeg"])),
                   "data.decode='nvjpeg'", "pil, auto, gpu, tensor")
