"""bench/extract.py --smoke runs in-process on a CPU and returns its figures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench" / "extract.py"


def _load():
    spec = importlib.util.spec_from_file_location("xmx_bench_extract", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_bench(tmp_path, capsys):
    bench = _load()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: intra-op threads only add contention
    try:
        res = bench.main(["--smoke", "--out", str(tmp_path)])
        folder = Path(res["folder"])
        first = folder.stat().st_mtime_ns
        again = bench.main(["--smoke", "--out", str(tmp_path), "--markdown"])
    finally:
        torch.set_num_threads(threads)
    assert res["n_images"] == 32 and len(list(folder.glob("*.jpg"))) == 32
    assert folder.stat().st_mtime_ns == first and again["folder"] == res["folder"]  # generated once
    row = res["models"]["xmx-tiny"]
    for name in ("gpu", "pil", "encoder"):
        assert row[name] > 0
    assert row["pil_stats"]["images"] == 32 and row["pil_stats"]["decode"] == "pil"
    assert row["gpu_stats"]["decode"] == ("gpu" if torch.cuda.is_available() else "tensor")
    out = capsys.readouterr().out
    assert "device:" in out and "xmx-tiny" in out and "| xmx-tiny |" in out  # table, then the Markdown section
    assert json.loads((tmp_path / "results.json").read_text())["n_images"] == 32
