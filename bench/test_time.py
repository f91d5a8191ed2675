"""Benchmark: the test-time methods (issue 26) next to the releases' per-image loops, in the same run.

TDA  a stream of random features (``--images`` images, ``--classes`` classes, width ``--dim``), with one view and with
     ``--views`` views: xmx's stream (``summarize_views`` + ``TDAStream``: bookkeeping on numbers, one masked matrix
     product per chunk) against a release-style loop on the same features and order (per image: the view selection,
     then list caches rebuilt with ``torch.cat`` and one-hot values, as kdiAAA/TDA ``tda_runner.py``). The release
     loop runs on the first ``--release-images`` images (all by default) and its time is scaled to the whole stream
     when shorter (reported as such). Both produce the same predictions (checked on the common prefix).
     Targets: xmx ≥ 20x the release loop; ≤ 60 s for the 50,000-image, 1,000-class stream on a GPU.
TPT  per-image latency of ``TPTMethod.tune`` (one step: N prompts through the text tower, entropy of the averaged
     confident views, backward, AdamW, then the tuned prompt's forward) against one plain forward+backward of the
     same tower on the same [N, L] prompts. Target: ≤ 1.2x that forward+backward per step.

The weights and features are random: timings only, never an accuracy.

    python bench/test_time.py                # 50,000 images x 1,000 classes, 64 views; ViT-B/16 text tower
    python bench/test_time.py --smoke        # small sizes on the CPU: seconds
    python bench/test_time.py --out tt.json

``main(argv)`` returns the results dict (also printed).
"""

from __future__ import annotations

# bench/gpu_all.py-style entry: this command on a GPU, within this many seconds on one H100
GPU_COMMAND = ["--device", "cuda", "--out", "{out}/bench.json"]
GPU_BUDGET_S = 400

import argparse
import json
import math
import operator
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from xmx.data.protocols import EvalSet
from xmx.methods.coop import TPTMethod, encode_prompts
from xmx.methods.tda import TDAConfig, TDAStream, summarize_views

FULL = dict(images=50_000, classes=1000, dim=1024, views=64, release_images=None, model="ViT-B-16", tpt_classes=1000,
            reps=5, warmup=2)
SMOKE = dict(images=400, classes=50, dim=64, views=20, release_images=None, model="xmx-tiny", tpt_classes=20,
             reps=3, warmup=1)


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="small sizes on the CPU")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available; cpu with --smoke)")
    for k in ("images", "classes", "dim", "views", "release_images", "tpt_classes", "reps", "warmup"):
        ap.add_argument("--" + k.replace("_", "-"), dest=k, type=int, default=None)
    ap.add_argument("--model", default=None, help="open_clip text tower for TPT (random weights)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: tda, tpt")
    ap.add_argument("--out", default=None, help="also write the results as JSON")
    args = ap.parse_args(argv)
    for k, v in (SMOKE if args.smoke else FULL).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.device is None:
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    return args


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---- TDA ----------------------------------------------------------------------------------------------------------
def release_loop(feats: torch.Tensor, W: torch.Tensor, cfg: TDAConfig, n: int) -> torch.Tensor:
    """kdiAAA/TDA's per-image loop (get_clip_logits, update_cache, compute_cache_logits) on cached features: the
    predictions of the first ``n`` images."""
    K, preds, pos, neg = W.shape[1], [], {}, {}

    def update(cache, pred, item, cap):
        if pred in cache:
            if len(cache[pred]) < cap:
                cache[pred].append(item)
            elif item[1] < cache[pred][-1][1]:
                cache[pred][-1] = item
            cache[pred] = sorted(cache[pred], key=operator.itemgetter(1))
        else:
            cache[pred] = [item]

    def cache_logits(key, cache, alpha, beta, mask=None):
        keys, vals = [], []
        for c in sorted(cache):
            for it in cache[c]:
                keys.append(it[0])
                vals.append(it[2] if mask else c)
        keys = torch.cat(keys, 0).permute(1, 0)
        if mask:
            v = torch.cat(vals, 0)
            vals = ((v > mask[0]) & (v < mask[1])).to(key.dtype)
        else:
            vals = F.one_hot(torch.tensor(vals, device=key.device), K).to(key.dtype)
        return alpha * ((-1) * (beta - beta * (key @ keys))).exp() @ vals

    for i in range(n):
        f = feats[:, i].float()
        f = f / f.norm(dim=-1, keepdim=True)
        z = 100.0 * f @ W
        if f.shape[0] > 1:
            ent = -(z.softmax(1) * z.log_softmax(1)).sum(1)
            idx = torch.argsort(ent, descending=False)[:int(ent.shape[0] * 0.1)]
            out = z[idx]
            key, zi = f[idx].mean(0, keepdim=True), out.mean(0, keepdim=True)
            lp = out - out.logsumexp(-1, keepdim=True)
            avg = lp.logsumexp(0) - math.log(lp.shape[0])
            loss = -(avg * avg.exp()).sum(-1)
            prob, pred = out.softmax(1).mean(0, keepdim=True), int(out.mean(0).argmax())
        else:
            key, zi = f, z
            loss = -(z.softmax(1) * z.log_softmax(1)).sum(1)[0]
            prob, pred = z.softmax(1), int(z.argmax())
        ent_n = float(loss / math.log2(K))
        update(pos, pred, [key, loss], cfg.pos_capacity)
        if cfg.entropy_lower < ent_n < cfg.entropy_upper:
            update(neg, pred, [key, loss, prob], cfg.neg_capacity)
        final = zi.clone()
        if pos:
            final += cache_logits(key, pos, cfg.pos_alpha, cfg.pos_beta)
        if neg:
            final -= cache_logits(key, neg, cfg.neg_alpha, cfg.neg_beta, (cfg.mask_lower, cfg.mask_upper))
        preds.append(int(final.argmax()))
    return torch.tensor(preds)


def bench_tda(args, views: int) -> dict:
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    dtype = torch.float16 if dev.type == "cuda" and views > 1 else torch.float32  # 64 views x 50k x 1024 in fp16
    feats = torch.empty(views, args.images, args.dim, dtype=dtype, device=dev)
    for a in range(0, args.images, 5000):  # random features with a class structure (so that caches fill)
        feats[:, a:a + 5000] = torch.randn(views, min(5000, args.images - a), args.dim, generator=g).to(dev, dtype)
    W = F.normalize(torch.randn(args.dim, args.classes, generator=g), dim=0).to(dev)
    lab = torch.randint(args.classes, (args.images,), generator=g).to(dev)
    feats += (3.0 * W.T[lab]).to(dtype)[None]
    cfg = TDAConfig(pos_alpha=2.0, pos_beta=5.0)
    _sync(dev)
    t0 = time.perf_counter()
    st = TDAStream(summarize_views(feats, W, 100.0, 0.1), cfg)
    st.run(chunk=1024)
    _sync(dev)
    xmx_s = time.perf_counter() - t0
    n_rel = min(args.release_images or args.images, args.images)
    _sync(dev)
    t0 = time.perf_counter()
    rel_pred = release_loop(feats, W, cfg, n_rel)
    _sync(dev)
    rel_s = time.perf_counter() - t0
    rel_full = rel_s * args.images / n_rel
    same = bool(torch.equal(st.logits[:n_rel].argmax(1), rel_pred))
    return {"views": views, "images": args.images, "classes": args.classes, "dim": args.dim,
            "feature_dtype": str(dtype).replace("torch.", ""), "xmx_s": xmx_s, "release_s": rel_s,
            "release_images": n_rel, "release_s_whole_stream": rel_full, "release_extrapolated": n_rel < args.images,
            "speedup": rel_full / xmx_s, "same_predictions": same,
            "positive_entries": sum(map(len, st.pos.slots.values())),
            "negative_entries": sum(map(len, st.neg.slots.values()))}


# ---- TPT ----------------------------------------------------------------------------------------------------------
def bench_tpt(args) -> dict:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    from xmx.backbones.clip import CLIPBackbone
    dev = torch.device(args.device)
    names = [IMAGENET_CLASSNAMES[i % 1000] + ("" if i < 1000 else f" {i // 1000}") for i in range(args.tpt_classes)]
    bb = CLIPBackbone(name="bench", model=args.model, weights=None).to(dev)
    s = EvalSet("test", [], names, "bench", ["a photo of a {}."], list(range(len(names))))
    dm = SimpleNamespace(backbone=bb, classnames=names, val_set=s, eval_sets=[s], logit_scale=bb.logit_scale,
                         templates=["a photo of a {}."])
    m = TPTMethod(views=64, protocol="test_time", name="tpt", amp="bf16" if dev.type == "cuda" else None)
    m.build(dm)
    m.to(dev)
    cp = m.prompts("test")
    ctx0 = m.learner.ctx.detach().clone()
    feats = torch.randn(1, 64, bb.embed_dim, device=dev)

    def tpt_once():
        m.tune(feats, "test", ctx0)

    def plain_once():  # one forward + backward of the tower on the same prompts
        leaf = cp.assemble(ctx0).detach().requires_grad_(True)
        t = encode_prompts(bb, leaf, cp.tokens, amp=m.amp)
        t.sum().backward()

    out = {}
    for name, fn in (("tpt", tpt_once), ("plain_fwd_bwd", plain_once)):
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(args.reps):
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times.append(time.perf_counter() - t0)
        out[name + "_ms"] = 1000 * statistics.median(times)
    out.update(model=args.model, classes=len(names), tokens=int(cp.length), steps=m.steps,
               ratio=out["tpt_ms"] / out["plain_fwd_bwd_ms"])
    return out


def main(argv=None) -> dict:
    args = parse(argv if argv is not None else sys.argv[1:])
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # tiny tensors: more threads only contend on a shared CPU
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args) -> dict:
    skip = {p for p in args.skip.split(",") if p}
    res = {"smoke": args.smoke, "device": args.device, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    if "tda" not in skip:
        res["tda"] = [bench_tda(args, 1), bench_tda(args, args.views)]
        for r in res["tda"]:
            print(f"TDA {r['images']:,} images x {r['classes']} classes, {r['views']} view(s): xmx {r['xmx_s']:.2f} s, "
                  f"release loop {r['release_s_whole_stream']:.2f} s"
                  f"{' (scaled from ' + str(r['release_images']) + ' images)' if r['release_extrapolated'] else ''}"
                  f" -> {r['speedup']:.1f}x (target >= 20x); same predictions: {r['same_predictions']}")
    if "tpt" not in skip:
        res["tpt"] = t = bench_tpt(args)
        print(f"TPT {t['model']} text tower, {t['classes']} classes, {t['tokens']} tokens: per image {t['tpt_ms']:.1f} ms"
              f" vs forward+backward {t['plain_fwd_bwd_ms']:.1f} ms -> {t['ratio']:.2f}x (target <= 1.2x)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
