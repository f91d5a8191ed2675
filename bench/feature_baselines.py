"""Benchmark: GDA, LP++, TaskRes and ProLIP on ImageNet-sized cached features, in one run (issue 14).

Sizes (full): 16-shot ImageNet — 16,000 training features x 1,024 (RN50's width), 1,000 classes, validation 4,000,
test 50,000; ProLIP's pre-projection features are 2,048 wide (RN50's attention pool) and its projection 2,048 x 1,024.

  gda      fit (class means, the KS shrinkage precision (an LU inverse: the matrix is positive definite), W, b)
           + the 7-value alpha search on
           validation; then scoring the 50,000 test features. Target on the 2-core CPU: fit + search <= 10 s.
  lpp      the release's 300 full-batch epochs with validation after every epoch (step sizes included: an eigen-
           decomposition of X^T X); then test scoring. Target on the 2-core CPU: <= 60 s. ``--lpp-precision``
           is method.precision (default auto: bf16 products on a CPU, fp16 on CUDA; fp32 for comparison).
  taskres  s/epoch: mini-batches of 256 (63 steps/epoch), Adam, the residual [1024, 1000]; median of the measured
           epochs. The release trains 200 epochs at 16 shots.
  prolip   s/epoch: one full-batch step of the projection (16,000 x 2,048 -> 1,024, 1,000 classes); median of the
           measured epochs; the release trains 300 epochs per fit, 49 fits in its validation grid.

Random features with class structure (timings are the point; accuracies only show that something was learned).

    python bench/feature_baselines.py                     # full sizes, cuda when available
    python bench/feature_baselines.py --device cpu        # the CPU figures of docs/benchmarks.md
    python bench/feature_baselines.py --smoke             # tiny sizes on CPU, seconds
    python bench/feature_baselines.py --out bench.json    # also write the results as JSON

``main(argv)`` returns the results dict (also printed as a table).
"""

from __future__ import annotations

# bench/gpu_all.py runs this on a GPU with these arguments, within this many seconds on one H200
GPU_COMMAND = ["--device", "cuda", "--out", "{out}/bench.json"]
GPU_BUDGET_S = 240

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from xmx.methods.gda import class_means, gda_classifier, ks_precision, search_alpha
from xmx.methods.lpp import fit_lpp, lpp_logits
from xmx.methods.prolip import fit_projection, prolip_logits
from xmx.methods.taskres import TaskResHead, warmup_cosine

TARGETS_CPU = {"gda": 10.0, "lpp": 60.0}  # seconds on the 2-core CPU (issue 14)
FULL = dict(classes=1000, shots=16, dim=1024, pre_dim=2048, val=4000, test=50000, lpp_epochs=300,
            taskres_epochs=3, prolip_epochs=3, batch=256, noise=3.0)
SMOKE = dict(classes=10, shots=4, dim=32, pre_dim=48, val=40, test=200, lpp_epochs=20, taskres_epochs=2,
             prolip_epochs=3, batch=16, noise=1.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_features(s: dict, device: torch.device, seed: int = 0) -> dict:
    """Class centres in the pre-projection space, a random projection P0 [D, C] (and bias) to the embedding space,
    the text classifier a noisy copy of the projected centres; train/val/test features around the centres."""
    g = torch.Generator().manual_seed(seed)
    K, D, C = s["classes"], s["pre_dim"], s["dim"]
    centres = torch.randn(K, D, generator=g)
    P0 = torch.randn(D, C, generator=g) / math.sqrt(D)
    b0 = 0.01 * torch.randn(C, generator=g)
    W = F.normalize(F.normalize(centres @ P0, dim=-1) + 1.5 * torch.randn(K, C, generator=g) / math.sqrt(C),
                    dim=-1).T.contiguous()                                            # [C, K] a noisy text classifier

    def around(y):  # noise well above the centres' scale: neither zero-shot nor the fits are perfect
        return centres[y] + s["noise"] * torch.randn(len(y), D, generator=g)

    y_tr = torch.arange(K).repeat_interleave(s["shots"])
    y_val = torch.randint(0, K, (s["val"],), generator=g)
    y_te = torch.randint(0, K, (s["test"],), generator=g)
    z_tr, z_val, z_te = around(y_tr), around(y_val), around(y_te)
    out = dict(P0=P0, b0=b0, W=W, z_tr=z_tr, y_tr=y_tr, z_val=z_val, y_val=y_val, z_te=z_te, y_te=y_te,
               f_tr=z_tr @ P0 + b0, f_val=z_val @ P0 + b0, f_te=z_te @ P0 + b0)
    return {k: v.to(device) for k, v in out.items()}


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == y).float().mean())


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def bench_gda(d: dict, device) -> dict:
    K = d["W"].shape[1]

    def fit():
        x = F.normalize(d["f_tr"], dim=-1)
        mu = class_means(x, d["y_tr"], K)
        W, b = gda_classifier(mu, ks_precision(x - mu[d["y_tr"]]))
        fv = F.normalize(d["f_val"], dim=-1)
        alpha, acc, _ = search_alpha(100.0 * fv @ d["W"], fv @ W + b, d["y_val"])
        return W, b, alpha, acc

    (W, b, alpha, val_acc), fit_s = _timed(fit, device)

    def test():
        ft = F.normalize(d["f_te"], dim=-1)
        return _acc(ft @ (100.0 * d["W"] + alpha * W) + alpha * b, d["y_te"])  # as GDAMethod.logits: one matmul

    test_acc, test_s = _timed(test, device)
    zs = _acc(F.normalize(d["f_te"], dim=-1) @ d["W"], d["y_te"])
    return {"fit_search_s": fit_s, "test_s": test_s, "alpha": alpha, "val_acc": val_acc, "test_acc": test_acc,
            "zeroshot_test_acc": zs}


def bench_lpp(d: dict, device, epochs: int, precision: str = "auto") -> dict:
    K = d["W"].shape[1]
    x, xv = F.normalize(d["f_tr"], dim=-1), F.normalize(d["f_val"], dim=-1)
    r, fit_s = _timed(lambda: fit_lpp(x, d["y_tr"], d["W"], K, epochs=epochs, x_val=xv, y_val=d["y_val"],
                                      generator=torch.Generator().manual_seed(0), precision=precision), device)
    acc, test_s = _timed(lambda: _acc(lpp_logits(F.normalize(d["f_te"], dim=-1), r["W"], r["b"], r["alpha"], d["W"]),
                                      d["y_te"]), device)
    return {"fit_s": fit_s, "epochs": epochs, "s_per_epoch": fit_s / epochs,
            "fit_300_epochs_s_est": None if epochs == 300 else 300 * fit_s / epochs, "test_s": test_s,
            "selected_epoch": r["epoch"], "val_acc": r["val_acc"], "test_acc": acc, "precision": precision,
            "matmul_dtype": r["matmul_dtype"]}


def bench_taskres(d: dict, device, epochs: int, batch: int) -> dict:
    base = d["W"] * 8.0                                                # a raw (unnormalised) text base
    head = TaskResHead(base, alpha=0.5).to(device)
    opt = torch.optim.Adam([head.residual], lr=2e-3, weight_decay=5e-4)
    total = 200
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: warmup_cosine(e, total, 2e-3))
    g = torch.Generator().manual_seed(0)
    n = d["f_tr"].shape[0]
    times = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).to(device)
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(head(d["f_tr"][idx], math.log(100.0)), d["y_tr"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        acc, test_s = _timed(lambda: _acc(head(d["f_te"], math.log(100.0)), d["y_te"]), device)
    return {"s_per_epoch": statistics.median(times), "epochs_measured": epochs, "steps_per_epoch": math.ceil(n / batch),
            "test_s": test_s, "test_acc_after_measured_epochs": acc}


def _prolip_run(d: dict, device, epochs: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[float]]:
    views = d["z_tr"][None]                                            # one cached view [1, n, D]
    times = []
    P = d["P0"]
    for _ in range(epochs):  # one epoch per call: the median over calls is the s/epoch
        P, info = fit_projection(views, d["y_tr"], P, d["b0"], d["W"], lr=1e-3, lam=1.0 / 16, epochs=1, dtype=dtype)
        times.append(info["seconds"])
    return P, times


def bench_prolip(d: dict, device, epochs: int) -> dict:
    """fp32 (xmx's default) and fp16 (the release: method.precision=fp16) from the same start: s/epoch of each, and
    how far the fp16 projection and its test accuracy land from the fp32 ones."""
    P, times = _prolip_run(d, device, epochs, torch.float32)
    P16, times16 = _prolip_run(d, device, epochs, torch.float16)
    with torch.no_grad():
        acc, test_s = _timed(lambda: _acc(prolip_logits(d["z_te"], P, d["b0"], d["W"]), d["y_te"]), device)
        acc16 = _acc(prolip_logits(d["z_te"], P16, d["b0"], d["W"]), d["y_te"])
        rel = float((P16 - P).norm() / (P - d["P0"]).norm().clamp_min(1e-12))
    spe, spe16 = statistics.median(times), statistics.median(times16)
    return {"s_per_epoch": spe, "epochs_measured": epochs, "fit_300_epochs_s_est": 300 * spe,
            "search_49_fits_s_est": 49 * 300 * spe, "test_s": test_s, "test_acc_after_measured_epochs": acc,
            "fp16": {"s_per_epoch": spe16, "test_acc_after_measured_epochs": acc16,
                     "test_acc_minus_fp32": acc16 - acc, "update_rel_diff_vs_fp32": rel}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (seconds)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available; cpu with --smoke)")
    ap.add_argument("--lpp-epochs", type=int, default=None)
    ap.add_argument("--lpp-precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="LP++'s method.precision (auto: fp16 on cuda, bf16 on cpu)")
    ap.add_argument("--taskres-epochs", type=int, default=None)
    ap.add_argument("--prolip-epochs", type=int, default=None)
    ap.add_argument("--only", default="gda,lpp,taskres,prolip", help="comma-separated subset of the methods")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    s = dict(SMOKE if args.smoke else FULL)
    for k in ("lpp_epochs", "taskres_epochs", "prolip_epochs"):
        if getattr(args, k) is not None:
            s[k] = getattr(args, k)
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    only = [m.strip() for m in args.only.split(",") if m.strip()]
    bad = sorted(set(only) - {"gda", "lpp", "taskres", "prolip"})
    if bad:
        raise SystemExit(f"error: --only {','.join(bad)}: valid methods are gda, lpp, taskres, prolip")
    torch.manual_seed(args.seed)
    d = make_features(s, device, args.seed)
    res = {"smoke": args.smoke, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
           or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "sizes": s,
           "load_average_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
           "command": "python bench/feature_baselines.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if "gda" in only:
        res["gda"] = bench_gda(d, device)
    if "lpp" in only:
        res["lpp"] = bench_lpp(d, device, s["lpp_epochs"], args.lpp_precision)
    if "taskres" in only:
        res["taskres"] = bench_taskres(d, device, s["taskres_epochs"], s["batch"])
    if "prolip" in only:
        res["prolip"] = bench_prolip(d, device, s["prolip_epochs"])
    cpu_full = device.type == "cpu" and not args.smoke
    if "gda" in res:
        res["gda"]["meets_cpu_target"] = res["gda"]["fit_search_s"] <= TARGETS_CPU["gda"] if cpu_full else None
    if "lpp" in res:
        res["lpp"]["meets_cpu_target"] = (res["lpp"]["fit_s"] <= TARGETS_CPU["lpp"]
                                          if cpu_full and s["lpp_epochs"] == 300 else None)
    rows = []
    if "gda" in res:
        g = res["gda"]
        rows.append(("GDA fit + alpha search", f"{g['fit_search_s']:.2f} s", f"test scoring {g['test_s']:.2f} s; "
                     f"alpha {g['alpha']:g}; test {g['test_acc']:.1f}% (zero-shot {g['zeroshot_test_acc']:.1f}%)"))
    if "lpp" in res:
        p = res["lpp"]
        est = "" if p["fit_300_epochs_s_est"] is None else f"300 epochs ~{p['fit_300_epochs_s_est']:.0f} s (est.); "
        rows.append((f"LP++ {p['epochs']} epochs ({p['matmul_dtype']})", f"{p['fit_s']:.2f} s", f"{p['s_per_epoch']:.3f} s/epoch; {est}"
                     f"epoch {p['selected_epoch']} kept; test {p['test_acc']:.1f}%"))
    if "taskres" in res:
        t = res["taskres"]
        rows.append(("TaskRes", f"{t['s_per_epoch']:.3f} s/epoch", f"{t['steps_per_epoch']} steps/epoch, median of "
                     f"{t['epochs_measured']}"))
    if "prolip" in res:
        q = res["prolip"]
        rows.append(("ProLIP", f"{q['s_per_epoch']:.3f} s/epoch", f"300 epochs ~{q['fit_300_epochs_s_est']:.0f} s; "
                     f"49-fit grid ~{q['search_49_fits_s_est']:.0f} s (estimates)"))
        h = q["fp16"]
        rows.append(("ProLIP fp16 (release)", f"{h['s_per_epoch']:.3f} s/epoch", f"test acc {h['test_acc_minus_fp32']:+.2f} "
                     f"vs fp32; |P16 - P32| / |P32 - P0| = {h['update_rel_diff_vs_fp32']:.3f}"))
    res["load_average_1min_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"feature baselines on {res['device']} ({res['device_name']}, {res['threads']} threads, load "
          f"{res['load_average_1min_at_start'] or 0:.1f} -> {res['load_average_1min_at_end'] or 0:.1f}), "
          f"{s['classes']} classes x {s['shots']} shots, C={s['dim']}, D={s['pre_dim']}")
    for name, val, note in rows:
        print(f"  {name:<26} {val:>16}   {note}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
