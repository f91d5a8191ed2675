"""Benchmark: training inside the encoders (issues 16, 25) — CLIP-LoRA's, CLIP-SVD's and 2SFS's training throughput
against the floor.

Parts:
  step   one CLIP-LoRA training step as ``ClipLoRAMethod.training_step`` runs it (images [B,3,224,224] through the
         adapted image tower, every class prompt through the adapted text tower, cross-entropy, backward, AdamW step),
         against a plain forward + backward through both towers of a second, un-adapted backbone, no optimiser
         (gradients flow back through every block to the positional embeddings, as they must to reach LoRA in the
         first blocks: the cost no method that adapts both encoders can avoid), same process, inputs and autocast.
         Reports images/s of each and ``ratio`` = LoRA images/s / plain images/s (target ≥ 0.80).
         In the same run and against the same plain step (``--methods``, default all): one CLIP-SVD step
         (``ClipSVDMethod.training_step``: every linear of both towers reparameterised, AdamW on the singular values)
         and the two 2SFS steps (stage 1: LayerNorms of both towers through both towers; stage 2: the classifier on
         image features computed without gradients), each with its ``*_ratio``.
  run    the wall time of one 16-shot ImageNet CLIP-LoRA run, projected from measured pieces: 500 × 16 training
         steps at N = 1000 classes, the 50,000 test images once through the adapted image tower (batch 256) and the
         1000 class prompts once. Decoding and augmentation are not timed (loader workers overlap them with the GPU).
  decode the online path's image loaders (``data.decode``, :mod:`xmx.features.online`) on generated JPEGs
         (``--decode-images`` of 500 x 375, ImageNet's typical size; the smoke mode: 16 of 64 x 48), ``augment=coop``
         (RandomResizedCrop 224, scale 0.08-1, bicubic, + flip), CLIP's normalisation, ``--workers`` loader
         workers, batch ``--batch``: training batches per second delivered on the device, for ``pil`` (PIL +
         torchvision in the workers, then the copy to the device) next to ``gpu`` (bytes + crop draws in the workers,
         nvjpeg decode and tensor resize/crop/flip/normalise on the GPU in the datamodule's hook; on CPU the same code
         runs as ``tensor``). One warm-up epoch, then the median of ``--decode-epochs`` timed epochs each.

Random-init ViT-B/16 (``--model``, open_clip architecture; the weights do not change the cost), random images already
on the device, bf16 autocast on CUDA (fp32 on CPU). Timings are medians after warm-up (CUDA events on a GPU); the two
steps of part ``step`` alternate.

    python bench/encoder_adapters.py                  # both parts on cuda if available
    python bench/encoder_adapters.py --smoke          # CPU, tiny model (xmx-tiny), tiny sizes
    python bench/encoder_adapters.py --out bench.json

``main(argv)`` returns the results dict (also printed as a table; ``--json`` prints it as JSON).
"""

from __future__ import annotations

# bench/gpu_all.py runs this on a GPU with these arguments, within this many seconds on one H200
GPU_COMMAND = ["--out", "{out}/bench.json"]
GPU_BUDGET_S = 420  # +60 s for the CLIP-SVD (its SVD on the GPU) and 2SFS steps

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from xmx.backbones.clip import CLIPBackbone
from xmx.methods.clip_lora import ClipLoRAMethod
from xmx.methods.clip_svd import ClipSVDMethod
from xmx.methods.twosfs import TwoSFSMethod
from xmx.methods._training import autocast_dtype

TARGET_RATIO = 0.80  # LoRA images/s over plain forward+backward images/s
IMAGENET = {"classes": 1000, "shots": 16, "iters_per_shot": 500, "test_images": 50_000, "eval_batch": 256}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def classnames(n: int) -> list[str]:
    return [f"class number {i}" for i in range(n)]


def lora_method(model: str, n_classes: int, device, amp: str = "auto", cls=ClipLoRAMethod, **kw):
    """A built ClipLoRAMethod (the release's defaults; or ``cls``) on a random-init backbone, as the trainer would
    have it."""
    torch.manual_seed(0)
    bb = CLIPBackbone(model, None)
    names = classnames(n_classes)
    es = SimpleNamespace(name="test", classnames=names, templates=["a photo of a {}."])
    dm = SimpleNamespace(backbone=bb, inputs="images", classnames=names, templates=["a photo of a {}."], val_set=es,
                         eval_sets=[es], logit_scale=bb.logit_scale, shots=IMAGENET["shots"], store=None)
    method = cls(amp=amp, **kw)
    method.build(dm)
    return method.to(device)


def twosfs_step_fn(method, images, labels, stage: int):
    """One 2SFS step of ``stage`` as ``TwoSFSMethod.training_step`` runs it (its loss, backward, AdamW step)."""
    params = method.ln_params if stage == 1 else [method.classifier]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-2, fused=images.is_cuda)

    def step():
        loss = method.stage_loss(images, labels, stage)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def plain_step_fn(bb, images, tokens, labels, dtype):
    """Forward + backward through both towers of a frozen backbone without LoRA. The gradient flows back through
    every block to the positional embeddings (made trainable for this), as it must to reach LoRA in the first
    blocks, but not into the patch embedding or the pixels, which no adapted layer needs."""
    m = bb.model
    n = int(tokens.argmax(dim=-1).max()) + 1
    t = tokens[:, :n]
    eot = t.argmax(dim=-1)
    pos = [m.positional_embedding, m.visual.positional_embedding]
    for p in pos:
        p.requires_grad_(True)

    def step():
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            v = F.normalize(m.encode_image(images).float(), dim=-1)
            x = m.token_embedding(t) + m.positional_embedding[:n]
            x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:n, :n]))
            w = F.normalize(bb._project(x[torch.arange(x.shape[0], device=x.device), eot]).float(), dim=-1)
        loss = F.cross_entropy(100.0 * v @ w.T, labels)
        loss.backward()
        for p in pos:
            p.grad = None
    return step


def lora_step_fn(method, images, labels):
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=2e-4, weight_decay=1e-2,
                            fused=images.is_cuda)

    def step():
        loss = method.training_step((images, labels), 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def part_step(args, device) -> dict:
    method = lora_method(args.model, args.classes, device)
    bb = method.backbone
    g = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, bb.image_size, bb.image_size, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    tokens = bb.tokenize([f"a photo of a {c}." for c in classnames(args.classes)]).to(device)
    dtype = autocast_dtype("auto", device)
    torch.manual_seed(0)
    plain = CLIPBackbone(args.model, None).to(device)  # the same towers without LoRA
    method.train()
    lora_fn, plain_fn = lora_step_fn(method, images, labels), plain_step_fn(plain, images, tokens, labels, dtype)
    time_calls(lora_fn, device, args.warmup, 0)
    time_calls(plain_fn, device, args.warmup, 0)
    lora_t, plain_t = [], []
    for _ in range(args.repeats):  # interleaved, so that a busy machine slows both alike
        lora_t += time_calls(lora_fn, device, 0, 1)
        plain_t += time_calls(plain_fn, device, 0, 1)
    lora_ips, plain_ips = args.batch / statistics.median(lora_t), args.batch / statistics.median(plain_t)
    ratio = lora_ips / plain_ips
    extra = {}
    if any(m in args.methods for m in ("svd", "twosfs")):
        fns = {}
        if "svd" in args.methods:
            svd = lora_method(args.model, args.classes, device, cls=ClipSVDMethod)
            svd.train()
            fns["svd"] = lora_step_fn(svd, images, labels)
            extra["svd_trainable_params"] = sum(p.numel() for p in svd.parameters() if p.requires_grad)
        if "twosfs" in args.methods:
            tw = lora_method(args.model, args.classes, device, cls=TwoSFSMethod)
            tw.train()
            fns["twosfs_stage1"] = twosfs_step_fn(tw, images, labels, 1)
            fns["twosfs_stage2"] = twosfs_step_fn(tw, images, labels, 2)
            extra["twosfs_stage1_params"] = sum(p.numel() for p in tw.ln_params)
        for fn in fns.values():
            time_calls(fn, device, args.warmup, 0)
        times = {k: [] for k in fns}
        plain_more = []
        for _ in range(args.repeats):  # interleaved with the plain step again, so that load hits all alike
            for k, fn in fns.items():
                times[k] += time_calls(fn, device, 0, 1)
            plain_more += time_calls(plain_fn, device, 0, 1)
        # the new steps' ratios are against the plain timings interleaved with them (the same load)
        whole_ips = args.batch / statistics.median(plain_more)
        extra.update({"plain_whole_step_s": statistics.median(plain_more), "plain_whole_step_s_all": plain_more,
                      "plain_whole_images_per_s": whole_ips})
        for k, t in times.items():
            ips = args.batch / statistics.median(t)
            extra.update({f"{k}_step_s": statistics.median(t), f"{k}_step_s_all": t, f"{k}_images_per_s": ips,
                          f"{k}_ratio": ips / whole_ips,
                          f"{k}_meets_target": ips / whole_ips >= TARGET_RATIO if device.type == "cuda" else None})
    return {"model": args.model, "batch": args.batch, "classes": args.classes, **extra,
            "autocast": None if dtype is None else str(dtype).replace("torch.", ""),
            "trainable_params": sum(p.numel() for p in method.parameters() if p.requires_grad),
            "lora_step_s": statistics.median(lora_t), "lora_step_s_all": lora_t, "lora_images_per_s": lora_ips,
            "plain_step_s": statistics.median(plain_t), "plain_step_s_all": plain_t, "plain_images_per_s": plain_ips,
            "ratio": ratio, "target_ratio": TARGET_RATIO,
            "meets_target": ratio >= TARGET_RATIO if device.type == "cuda" else None}


def part_run(args, device) -> dict:
    cfg = dict(IMAGENET) if not args.smoke else {"classes": 10, "shots": 2, "iters_per_shot": 3, "test_images": 40,
                                                 "eval_batch": 8}
    method = lora_method(args.model, cfg["classes"], device)
    bb = method.backbone
    g = torch.Generator().manual_seed(2)
    images = torch.randn(args.batch, 3, bb.image_size, bb.image_size, generator=g).to(device)
    labels = torch.randint(0, cfg["classes"], (args.batch,), generator=g).to(device)
    method.train()
    step_t = statistics.median(time_calls(lora_step_fn(method, images, labels), device, args.warmup,
                                          max(args.repeats // 2, 2)))
    method.eval()
    ev = torch.randn(cfg["eval_batch"], 3, bb.image_size, bb.image_size, generator=g).to(device)

    def eval_batch():
        with torch.no_grad():
            method.image_features(ev)

    def text_once():
        with torch.no_grad():
            method._text_eval.clear()
            method.text_features("test")

    eval_t = statistics.median(time_calls(eval_batch, device, 1, 3))
    text_t = statistics.median(time_calls(text_once, device, 1, 3))
    steps = cfg["iters_per_shot"] * cfg["shots"]
    train_s, test_s = steps * step_t, cfg["test_images"] / cfg["eval_batch"] * eval_t + text_t
    return {"dataset": "imagenet" if not args.smoke else "smoke", **cfg, "steps": steps, "batch": args.batch,
            "step_s": step_t, "eval_batch_s": eval_t, "text_once_s": text_t,
            "projected_train_s": train_s, "projected_test_s": test_s, "projected_wall_s": train_s + test_s}


def decode_files(folder, n: int, size: tuple[int, int]) -> list:
    """``n`` JPEGs of ``size`` (w, h) with natural-ish content (a bicubic blow-up of a tiny random image + grain)."""
    import numpy as np
    from PIL import Image
    from xmx.data.datasets import Datum
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        a = np.asarray(small.resize(size, Image.BICUBIC), dtype=np.float32) + rng.normal(0, 6, (size[1], size[0], 3))
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
        items.append(Datum(f"{i:05d}.jpg", i % 10, f"c{i % 10}"))
    return items


def part_decode(args, device) -> dict:
    import tempfile
    from pathlib import Path
    from torch.utils.data import DataLoader
    from xmx.features.online import OnlineImages
    bb = SimpleNamespace(image_size=32 if args.smoke else 224, interpolation="bicubic", resize_mode="shortest",
                         image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711))
    n, size = (16, (64, 48)) if args.smoke else (args.decode_images, (500, 375))
    out = {"images": n, "image_size": list(size), "crop": bb.image_size, "workers": args.workers,
           "batch": args.batch, "preset": "coop"}
    with tempfile.TemporaryDirectory() as tmp:
        items = decode_files(Path(tmp), n, size)
        for mode in ("pil", "gpu" if device.type == "cuda" else "tensor"):
            online = OnlineImages(tmp, items, bb, preset="coop", noise_std=0.0, decode=mode, device=device,
                                  split="train")
            loader = DataLoader(online.dataset(), batch_size=args.batch, shuffle=True, num_workers=args.workers,
                                collate_fn=online.collate(), persistent_workers=args.workers > 0)

            def epoch():
                for batch in loader:
                    x, _ = online.decode(batch, device) if online.pp is not None else (
                        batch[0].to(device, non_blocking=True), batch[1])
                _sync(device)

            epoch()  # warm-up: workers start, caches fill
            times = []
            for _ in range(args.decode_epochs):
                t0 = time.perf_counter()
                epoch()
                times.append(time.perf_counter() - t0)
            out[mode] = {"epoch_s": statistics.median(times), "epoch_s_all": times,
                         "images_per_s": n / statistics.median(times), "resolved": online.mode}
    fast = "gpu" if device.type == "cuda" else "tensor"
    out["speedup"] = out[fast]["images_per_s"] / out["pil"]["images_per_s"]
    return out


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, xmx-tiny, tiny sizes (what the test suite runs)")
    p.add_argument("--device", default=None)
    p.add_argument("--model", default=None, help="open_clip architecture (default ViT-B-16; smoke: xmx-tiny)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 32, the release's)")
    p.add_argument("--classes", type=int, default=None, help="classes in part step (default 100)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--part", choices=["step", "run", "decode", "all"], default="all")
    p.add_argument("--methods", default="lora,svd,twosfs",
                   help="part step: which methods' steps next to the plain one (lora is always timed)")
    p.add_argument("--decode-images", type=int, default=2048, help="part decode: JPEGs generated (500 x 375)")
    p.add_argument("--decode-epochs", type=int, default=None, help="part decode: timed epochs (default 3)")
    p.add_argument("--workers", type=int, default=None, help="part decode: loader workers (default 8; smoke 0)")
    p.add_argument("--out", default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    smoke = a.smoke
    a.device = a.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    a.model = a.model or ("xmx-tiny" if smoke else "ViT-B-16")
    a.batch = a.batch or (4 if smoke else 32)
    a.classes = a.classes or (5 if smoke else 100)
    a.warmup = a.warmup if a.warmup is not None else (1 if smoke else 5)
    a.repeats = a.repeats or (3 if smoke else 20)
    a.decode_epochs = a.decode_epochs or (2 if smoke else 3)
    a.workers = a.workers if a.workers is not None else (0 if smoke else 8)
    a.methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    return a


def main(argv=None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", message=".*self.log.*")
    res = {"benchmark": "encoder_adapters", "smoke": args.smoke, "device": device.type,
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
           "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if args.part in ("step", "all"):
        res["step"] = part_step(args, device)
    if args.part in ("run", "all"):
        res["run"] = part_run(args, device)
    if args.part in ("decode", "all"):
        res["decode"] = part_decode(args, device)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        _table(res)
    return res


def _table(res: dict) -> None:
    print(f"encoder adapters benchmark on {res['device']} ({res['device_name']}), torch {res['torch']}")
    if "step" in res:
        s = res["step"]
        print(f"  step  {s['model']} batch {s['batch']}, {s['classes']} classes, autocast {s['autocast']}: "
              f"CLIP-LoRA {s['lora_images_per_s']:.1f} img/s, plain fwd+bwd {s['plain_images_per_s']:.1f} img/s, "
              f"ratio {s['ratio']:.2f} (target ≥ {s['target_ratio']:.2f}; met: {s['meets_target']})")
        for k, name in (("svd", "CLIP-SVD"), ("twosfs_stage1", "2SFS stage 1"), ("twosfs_stage2", "2SFS stage 2")):
            if f"{k}_ratio" in s:
                print(f"        {name} {s[f'{k}_images_per_s']:.1f} img/s, ratio {s[f'{k}_ratio']:.2f} "
                      f"(met: {s[f'{k}_meets_target']})")
    if "run" in res:
        r = res["run"]
        print(f"  run   {r['dataset']} {r['shots']}-shot, {r['steps']} steps × {r['step_s'] * 1e3:.1f} ms + test "
              f"{r['projected_test_s']:.1f} s = projected {r['projected_wall_s'] / 60:.1f} min")
    if "decode" in res:
        d = res["decode"]
        fast = "gpu" if "gpu" in d else "tensor"
        print(f"  decode {d['images']} JPEGs {d['image_size'][0]}x{d['image_size'][1]} -> coop {d['crop']}, "
              f"{d['workers']} workers, batch {d['batch']}: pil {d['pil']['images_per_s']:.0f} img/s, "
              f"{fast} {d[fast]['images_per_s']:.0f} img/s (x{d['speedup']:.2f})")


if __name__ == "__main__":
    main()
