"""The MMA training microbenchmark (bench/train_mma.py, part c) runs end to end on CPU in its smoke mode."""

import importlib.util
import json
from pathlib import Path


def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "train_mma.py"
    spec = importlib.util.spec_from_file_location("bench_train_mma", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_mma_smoke(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    res = _bench().main(["--smoke", "--out", str(out_file)])
    assert res["benchmark"] == "train_mma" and res["smoke"] is True and res["device"] == "cpu"
    c = res["c"]
    assert c["sizes"] == {"classes": 20, "batch": 8, "dim": 512}
    assert c["params"] == 197_760
    for path in ("fast", "dense"):
        r = c[path]
        assert r["time_ms"] > 0 and len(r["time_ms_all"]) == 5
        assert r["saved_bytes"] > 0
        assert r["peak_mem_bytes"] is None  # no allocator statistics off CUDA: nothing is made up
    # the fast path keeps less for backward even at N=20, and both paths agree
    assert c["fast"]["saved_bytes"] < c["dense"]["saved_bytes"]
    assert c["saved_bytes_ratio"] > 1 and c["speedup"] > 0
    assert c["equal"]["passed"] is True and c["equal"]["max_abs_logit_diff_cos"] <= 1e-5
    assert c["memory_ratio"] is None and c["meets_targets"] is None  # GPU targets are not judged on CPU
    printed = capsys.readouterr().out
    assert "fast" in printed and "dense" in printed and "PASS" in printed
    assert json.loads(out_file.read_text())["c"]["params"] == 197_760
