"""The deep part of bench/prompt_learning.py (MaPLe / PromptSRC / MMRL steps, all classes at once vs chunked with
recomputation) runs on CPU in its smoke mode and reports every method."""

import json

import pytest
from conftest import load_bench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_deep_part_smoke(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    bench = load_bench("prompt_learning")
    res = bench.main(["--smoke", "--deep-only", "--reps", "1", "--out", str(out_file)])
    d = res["deep"]
    assert res["device"] == "cpu" and res["weights"].startswith("random-init")
    assert d["classes"] == 16 and d["chunk"] == 1 and list(d["methods"]) == ["maple", "promptsrc", "mmrl"]
    for r in d["methods"].values():
        assert r["plain"]["time_ms"] > 0 and r["chunked"]["time_ms"] > 0
        assert r["time_ratio"] == pytest.approx(r["chunked"]["time_ms"] / r["plain"]["time_ms"])
        assert r["plain"]["peak_mb"] is None and r["memory_ratio"] is None  # in-process on CPU: nothing made up
        assert r["plain"]["trainable"] == r["chunked"]["trainable"] > 0
    assert d["meets_target"] is None
    assert "not judged" in capsys.readouterr().out
    assert json.loads(out_file.read_text())["deep"]["chunk"] == 1
