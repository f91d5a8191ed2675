"""The prompt-learning benchmark (bench/prompt_learning.py) runs on CPU in its smoke mode and reports every part."""

import json

import pytest
from conftest import load_bench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prompt_learning_smoke(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    bench = load_bench("prompt_learning")
    res = bench.main(["--smoke", "--out", str(out_file)])
    assert res["bench"] == "prompt_learning" and res["smoke"] is True and res["device"] == "cpu"
    assert res["amp"] == "fp32" and res["weights"].startswith("random-init")
    assert res["sizes"] == {"model": "xmx-tiny", "classes": 20, "batch": 8, "cocoop_batch": 4, "reps": 2, "warmup": 1}
    p = res["parts"]
    assert list(p) == ["coop", "coop_full", "cocoop_b1", "cocoop_b4"]
    # the cut after the last EOT: the longest of the first 20 ImageNet names + "a photo of a" + "." + SOT/EOT
    names = bench.classnames(20)
    import open_clip
    longest = max(int(open_clip.tokenize([f"a photo of a {n}."]).argmax(-1)) + 1 for n in names)
    assert p["coop"]["tokens"] == p["cocoop_b1"]["tokens"] == longest < 77 and p["coop_full"]["tokens"] == 77
    assert [p[k]["sequences"] for k in p] == [20, 20, 20, 80]
    assert p["cocoop_b4"]["chunk"] == 40 and p["cocoop_b1"]["chunk"] is None
    for r in p.values():
        assert r["step"]["time_ms"] > 0 and r["plain"]["time_ms"] > 0 and len(r["step"]["time_ms_all"]) == 2
        assert r["ratio"] == pytest.approx(r["plain"]["time_ms"] / r["step"]["time_ms"])
        assert r["step"]["peak_mem_mb"] is None  # no allocator statistics off CUDA: nothing is made up
    assert res["trim_speedup"] == pytest.approx(p["coop_full"]["step"]["time_ms"] / p["coop"]["step"]["time_ms"])
    assert res["meets_target"] is None  # the GPU target is not judged on CPU
    printed = capsys.readouterr().out
    assert "cocoop_b4" in printed and "not judged off GPU" in printed
    assert json.loads(out_file.read_text())["parts"]["coop"]["tokens"] == longest
