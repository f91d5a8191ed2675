"""Benchmark: the linear probe (CoOp lpclip, issue 13) — its solvers on 16-shot ImageNet-sized features.

Parts (all run):
  i   the demo-sized search (160 x 32 features, 10 classes, 40 validation): the whole lpclip search (7 coarse C + 8
      bisection steps = 23 fits) and the final fit, with the scikit-learn solver. Target < 5 s on a 2-core CPU.
  ii  ImageNet-sized features (16,000 x 1,024, 1,000 classes): per solver (sklearn on CPU; torch on --device), one
      fit at C = --C capped at --iters L-BFGS iterations: seconds per iteration (the median over --repeats), and
      the projection to a full 1,000-iteration fit and to the 24-fit search. A fit stops earlier when it converges,
      so the projection is an upper bound.

The features are random (class centres plus noise, at the scale of raw CLIP features); timings are the point.

    python bench/linear_probe.py                       # full sizes; torch on cuda if available
    python bench/linear_probe.py --smoke               # tiny sizes on CPU: seconds
    python bench/linear_probe.py --device cuda --out bench.json

``main(argv)`` returns the results dict (also printed).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import numpy as np
import torch

from xmx.methods.linear_probe import COARSE_GRID, fit_sklearn, fit_torch, lpclip_search

FULL = dict(n=16000, dim=1024, classes=1000)
SMOKE = dict(n=200, dim=32, classes=10)
DEMO = dict(n=160, dim=32, classes=10, val=40)
DEMO_TARGET_S = 5.0


def make_features(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centres = rng.normal(size=(classes, dim))
    X = 0.6 * centres[y] + rng.normal(size=(n, dim))  # raw-feature scale: norms ~ sqrt(dim)
    return X, y


def _timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def part_demo() -> dict:
    X, y = make_features(DEMO["n"], DEMO["dim"], DEMO["classes"], 1)
    Xv, yv = make_features(DEMO["val"], DEMO["dim"], DEMO["classes"], 2)
    out = {}

    def go():
        C, curve = lpclip_search(fit_sklearn, X, y, Xv, yv, DEMO["classes"], COARSE_GRID, 8)
        fit_sklearn(X, y, DEMO["classes"], C)
        out.update(C=C, fits=len(curve) + 1)

    wall, cpu = _timed(go)
    return {**out, "wall_s": wall, "cpu_s": cpu, "target_s": DEMO_TARGET_S, "meets_target": wall < DEMO_TARGET_S}


def part_large(sizes: dict, device: str, C: float, iters: int, repeats: int) -> dict:
    X, y = make_features(sizes["n"], sizes["dim"], sizes["classes"])
    rows = {}
    solvers = {"sklearn_cpu": lambda: fit_sklearn(X, y, sizes["classes"], C, max_iter=iters, tol=0.0)}
    for dt in ("float64", "float32"):
        solvers[f"torch_{device}_{dt}"] = (lambda dt=dt: fit_torch(X, y, sizes["classes"], C, max_iter=iters,
                                                                   tol=0.0, device=device, dtype=getattr(torch, dt)))
    for name, fn in solvers.items():
        fn() if device == "cuda" and name.startswith("torch") else None  # CUDA warm-up (kernels, cuBLAS)
        if device == "cuda":
            torch.cuda.synchronize()
        times = [_timed(fn) for _ in range(repeats)]
        wall = statistics.median(t[0] for t in times)
        per_iter = wall / iters
        rows[name] = {"iters": iters, "wall_s_median": wall, "wall_s_all": [t[0] for t in times],
                      "cpu_s_median": statistics.median(t[1] for t in times), "s_per_iter": per_iter,
                      "projected_1000_iter_fit_s": 1000 * per_iter, "projected_search_s": 24 * 1000 * per_iter}
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU")
    ap.add_argument("--device", default=None, help="torch solver device (default: cuda if available, else cpu)")
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--iters", type=int, default=None, help="L-BFGS iterations per timed fit (default 20; smoke 5)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="also write the results as JSON")
    a = ap.parse_args(argv)
    device = "cpu" if a.smoke else (a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = SMOKE if a.smoke else FULL
    iters = a.iters or (5 if a.smoke else 20)
    res = {"bench": "linear_probe", "smoke": a.smoke, "device": device, "sizes": sizes, "C": a.C,
           "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
           "cpu_threads": torch.get_num_threads(),
           "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
           "part_i": part_demo(), "part_ii": part_large(sizes, device, a.C, iters, a.repeats)}
    d = res["part_i"]
    print(f"(i) demo lpclip search, {d['fits']} fits: {d['wall_s']:.2f}s wall, {d['cpu_s']:.2f}s CPU "
          f"(target < {DEMO_TARGET_S:.0f}s: {'met' if d['meets_target'] else 'MISSED'})")
    print(f"(ii) {sizes['n']} x {sizes['dim']} features, {sizes['classes']} classes, {iters} L-BFGS iterations:")
    for name, r in res["part_ii"].items():
        print(f"    {name:<20} {r['s_per_iter']:.3f} s/iter (median of {len(r['wall_s_all'])})  "
              f"1000-iter fit <= {r['projected_1000_iter_fit_s'] / 60:.1f} min  "
              f"24-fit search <= {r['projected_search_s'] / 3600:.2f} h")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":
    main()
