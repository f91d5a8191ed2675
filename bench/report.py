"""Time ``python -m xmx.report``'s statistics on a full-size comparison (issue 28) — target ≤ 10 s on the 2-core CPU.

Writes results.json + predictions.safetensors for 2 methods × 11 datasets × 3 seeds with the real test-set sizes and
class counts (ImageNet: 50,000 images × 1,000 classes, fp16 logits as xmx saves them), then times, in one process:
the paired comparison (``--compare-methods A B``), the intervals of every cell (``--intervals``) and the variance
decomposition (``--variance``), each with 2,000 replicates.

    python bench/report.py                 # full size (≈ 1.3 GB of predictions under --root, removed afterwards)
    python bench/report.py --smoke         # three tiny datasets: seconds; what the tests run
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

# (dataset, test images, classes): CoOp's test splits
FULL = [("imagenet", 50000, 1000), ("caltech101", 2465, 100), ("oxford_pets", 3669, 37),
        ("stanford_cars", 8041, 196), ("oxford_flowers", 2463, 102), ("food101", 30300, 101),
        ("fgvc_aircraft", 3333, 100), ("sun397", 19850, 397), ("dtd", 1692, 47), ("eurosat", 8100, 10),
        ("ucf101", 3783, 101)]
SMOKE = [("dtd", 200, 47), ("eurosat", 300, 10), ("caltech101", 250, 100)]


def write_runs(root: Path, datasets, seeds=(1, 2, 3), methods=(("tip_adapter_f", 0.75), ("zeroshot", 0.70))):
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    for name, n, classes in datasets:
        labels = rng.integers(0, classes, n)
        hard = rng.random(n)
        for method, p in methods:
            for seed in seeds:
                correct = hard < p + rng.normal(0, 0.01)
                logits = rng.standard_normal((n, classes)).astype(np.float16)
                pred = np.where(correct, labels, (labels + 1) % classes)
                logits[np.arange(n), pred] = 10
                run = root / f"{method}_{name}_{seed}"
                run.mkdir(parents=True)
                save_file({"test/logits": logits, "test/labels": labels}, str(run / "predictions.safetensors"))
                rec = {"schema": "xmx.results/1", "status": "complete", "experiment": f"{method}_16shot",
                       "method": method, "dataset": name, "protocol": "fewshot", "shots": 16, "seed": seed,
                       "selection": "val", "metrics": {"test/acc": 100 * float(correct.mean())},
                       "weights": {"arch": "ViT-B-16", "random_init": False}, "data": {"synthetic": False},
                       "predictions": "predictions.safetensors",
                       "config": {"seed": seed, "data": {"name": name, "subset_seed": None}}}
                (run / "results.json").write_text(json.dumps(rec))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="three tiny datasets (seconds)")
    ap.add_argument("--root", default=None, help="where to write the runs (default: a temporary folder)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args(argv)
    from xmx.report import build_report

    root = Path(tempfile.mkdtemp(prefix="xmx-bench-report-", dir=args.root))
    try:
        t0 = time.perf_counter()
        write_runs(root / "runs", SMOKE if args.smoke else FULL)
        t_write = time.perf_counter() - t0
        out = {"datasets": len(SMOKE if args.smoke else FULL), "runs": 0, "write_s": round(t_write, 2)}
        t0 = time.perf_counter()
        res = build_report([root / "runs"], out=root / "report", plots=False,
                           compare_pair=[("tip_adapter_f", "zeroshot")], n_boot=args.bootstrap)
        out["compare_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        res2 = build_report([root / "runs"], out=root / "report2", plots=False, intervals=True, variance=True,
                            n_boot=args.bootstrap)
        out["intervals_variance_s"] = round(time.perf_counter() - t0, 2)
        p = res["pairs"][0]
        avg = p[p.dataset == "average"].iloc[0]
        out.update(runs=len(res["runs"]), average_diff=round(float(avg["diff"]), 3),
                   average_interval=[round(float(avg.lo), 3), round(float(avg.hi), 3)],
                   verdicts=p[p.dataset != "average"].verdict.value_counts().to_dict(),
                   cells_with_interval=int(res2["cells"].ci_lo.notna().sum()))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
