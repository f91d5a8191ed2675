"""Image feature extraction throughput: GPU fast path vs the PIL DataLoader baseline vs the encoder alone.

    python bench/extract.py                      # 10,000 JPEGs (~500x375), ViT-B-16 and RN50, random-init weights
    python bench/extract.py --markdown           # + a Markdown section to paste into docs/benchmarks.md
    python bench/extract.py --smoke --out /tmp/b # xmx-tiny, 32 small JPEGs, a few seconds, CPU is fine

The image folder is generated once (smooth random content at natural size, JPEG q=90, several processes) into
``<out>/images-<n>-<w>x<h>`` and reused. Random-init weights cost the same as real ones, so no download is needed.
Rows: ``gpu`` = decode="gpu" (nvjpeg + tensor transforms + fp16 autocast), ``pil`` = the PIL DataLoader baseline
(same encoder and device), ``encoder`` = random input tensors straight into the encoder (fp16 on CUDA): the ceiling.
Without CUDA the ``gpu`` row is the same code on the CPU (``decode="tensor"``) and everything runs fp32.
"""

from __future__ import annotations

# bench/gpu_all.py runs this (see its header for the convention); budget = expected seconds on one H200
GPU_COMMAND = ["--out", "{out}", "--markdown"]
GPU_BUDGET_S = 180
GPU_RESULT = "{out}/results.json"
SMOKE_COMMAND = ["--smoke", "--out", "{out}"]

import argparse
import json
import os
import platform
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

# ---- the image folder ---------------------------------------------------------------------------------------------


def _write_images(args) -> int:
    folder, start, stop, width, height = args
    from PIL import Image
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        w = int(width * rng.uniform(0.85, 1.15))
        h = int(height * rng.uniform(0.85, 1.15))
        small = Image.fromarray(rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3),
                                             dtype=np.uint8))
        img = np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.int16)
        img += rng.integers(-12, 13, (h, w, 1), dtype=np.int16)  # grain, so the JPEGs are not trivially small
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(Path(folder) / f"{i:06d}.jpg", quality=90)
    return stop - start


def make_images(root: Path, n: int, width: int, height: int, workers: int | None = None) -> tuple[Path, list[str]]:
    """``n`` JPEGs under ``root/images-<n>-<w>x<h>`` (generated once, renamed into place when complete)."""
    folder = root / f"images-{n}-{width}x{height}"
    if not (folder / "done.json").is_file():
        tmp = root / f".{folder.name}.{os.getpid()}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        workers = workers or max(1, min(16, os.cpu_count() or 1))
        chunk = max(1, -(-n // (workers * 4)))
        jobs = [(str(tmp), s, min(n, s + chunk), width, height) for s in range(0, n, chunk)]
        t0 = time.perf_counter()
        if workers > 1 and n > 64:
            with ProcessPoolExecutor(workers) as pool:
                made = sum(pool.map(_write_images, jobs))
        else:
            made = sum(map(_write_images, jobs))
        (tmp / "done.json").write_text(json.dumps({"n": made, "width": width, "height": height,
                                                   "seconds": time.perf_counter() - t0}))
        try:
            os.replace(tmp, folder)
        except OSError:  # another run finished first
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, sorted(str(p) for p in folder.glob("*.jpg"))


# ---- measurements -------------------------------------------------------------------------------------------------
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def encoder_rate(backbone, device: torch.device, batch_size: int, iters: int) -> float:
    """Images/s of the image encoder alone on random CLIP-sized inputs (fp16 autocast on CUDA)."""
    backbone.to(device)
    x = torch.randn(batch_size, 3, backbone.image_size, backbone.image_size, device=device)
    amp = device.type == "cuda"
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        for _ in range(2):
            backbone.encode_image(x)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            backbone.encode_image(x)
        _sync(device)
    return batch_size * iters / (time.perf_counter() - t0)


def pipeline_rate(backbone, paths, device, decode, batch_size, workers) -> dict:
    from xmx.features.extract import extract_image_features
    warm = paths[: min(len(paths), 2 * batch_size)]
    extract_image_features(backbone, warm, device=device, decode=decode, batch_size=batch_size,
                           num_workers=workers, progress=False)  # nvjpeg handles, cudnn autotune, page cache
    stats = {}
    extract_image_features(backbone, paths, device=device, decode=decode, batch_size=batch_size,
                           num_workers=workers, progress=True, stats=stats)
    return stats


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({os.cpu_count()} CPU cores)"
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def markdown(res: dict) -> str:
    lines = [f"## Feature extraction throughput ({res['date'][:10]})", "",
             f"- device: {res['device']}", f"- command: `{res['command']}`",
             f"- {res['n_images']} JPEGs, about {res['image_wh'][0]}x{res['image_wh'][1]}, batch {res['batch_size']}, "
             f"{res['workers']} loader workers; torch {torch.__version__}; random-init weights", "",
             "| model | gpu path (img/s) | PIL baseline (img/s) | encoder only (img/s) | gpu / encoder |",
             "|---|---:|---:|---:|---:|"]
    for m, r in res["models"].items():
        lines.append(f"| {m} | {r['gpu']:,.0f} | {r['pil']:,.0f} | {r['encoder']:,.0f} | "
                     f"{r['gpu'] / r['encoder']:.0%} |")
    return "\n".join(lines) + "\n"


def table(res: dict) -> str:
    head = f"{'model':<12}{'gpu path':>14}{'PIL baseline':>16}{'encoder only':>16}   (images/s)"
    rows = [f"{m:<12}{r['gpu']:>14,.0f}{r['pil']:>16,.0f}{r['encoder']:>16,.0f}" for m, r in res["models"].items()]
    return "\n".join([f"device:  {res['device']}", f"date:    {res['date']}", f"command: {res['command']}",
                      f"images:  {res['n_images']} JPEGs ~{res['image_wh'][0]}x{res['image_wh'][1]} in {res['folder']}",
                      f"gpu row: decode={res['gpu_decode']}", head, *rows])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="xmx-tiny, 32 small JPEGs, seconds on a CPU")
    ap.add_argument("--out", default=os.environ.get("XMX_BENCH_DIR", "/tmp/xmx-bench"),
                    help="folder for the generated images and results.json")
    ap.add_argument("--n", type=int, default=10_000, help="number of JPEGs")
    ap.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    ap.add_argument("--models", nargs="+", default=["ViT-B-16", "RN50"])
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores - 1, max 16)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--encoder-iters", type=int, default=20)
    ap.add_argument("--markdown", action="store_true", help="also print a section for docs/benchmarks.md")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.size, args.models, args.batch_size, args.encoder_iters = 32, (64, 48), ["xmx-tiny"], 16, 3
        args.workers = 0 if args.workers is None else args.workers

    from xmx.backbones.clip import CLIPBackbone
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    workers = args.workers if args.workers is not None else max(0, min(16, (os.cpu_count() or 1) - 1))
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    folder, paths = make_images(out, args.n, *args.size)
    res = {"device": device_name(device), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": "python bench/extract.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
           "n_images": len(paths), "image_wh": list(args.size), "folder": str(folder),
           "batch_size": args.batch_size, "workers": workers, "gpu_decode": "gpu" if cuda else "tensor (CPU)",
           "models": {}}
    for model in args.models:
        torch.manual_seed(0)
        bb = CLIPBackbone(model, None)
        row = {"encoder": encoder_rate(bb, device, args.batch_size, args.encoder_iters)}
        for name, decode in (("gpu", "gpu" if cuda else "tensor"), ("pil", "pil")):
            st = pipeline_rate(bb, paths, device, decode, args.batch_size, workers)
            row[name] = st["images_per_s"]
            row[f"{name}_stats"] = st
        res["models"][model] = row
        del bb
        if cuda:
            torch.cuda.empty_cache()
    print(table(res))
    if args.markdown:
        print()
        print(markdown(res))
    from xmx.utils import atomic_write_text
    atomic_write_text(out / "results.json", json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
