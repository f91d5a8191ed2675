"""The MMA training benchmark (bench/train_mma.py, parts a, b, c) runs end to end on CPU in its smoke mode."""

import json
from conftest import load_bench




def test_train_mma_smoke(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    res = load_bench("train_mma").main(["--smoke", "--out", str(out_file)])
    assert res["benchmark"] == "train_mma" and res["smoke"] is True and res["device"] == "cpu"
    assert res["parts"] == ["a", "b", "c"]
    # (a) base-to-new from cached features: 2 tiny datasets x 1 seed x 2 epochs, each split on its own classes
    a = res["a"]
    assert a["datasets"] == ["smoke_a", "smoke_b"] and a["seeds"] == [1] and a["epochs"] == 2 and a["n_runs"] == 2
    for r, (classes, base, train, steps) in zip(a["runs"], [(10, 5, 80, 6), (6, 3, 48, 4)]):
        assert (r["classes"], r["base"], r["new"], r["train"]) == (classes, base, classes - base, train)
        assert r["steps"] == steps and r["wall_s"] >= r["train_s"] > 0  # ceil(train / 32) x 2 epochs
        assert 0 <= r["base_acc"] <= 100 and 0 <= r["new_acc"] <= 100
        assert r["test_base"] + r["test_new"] in (40, 30)
    assert a["steps"] == 10 and a["wall_s"] == sum(r["wall_s"] for r in a["runs"])
    assert a["meets_target"] is None  # the H100 target is not judged on CPU
    # (b) the released code's way: every training image through the (tiny) encoder in every epoch
    b = res["b"]
    (rb,) = b["runs"]
    assert rb["dataset"] == "smoke_a" and rb["model"] == "xmx-tiny" and rb["epochs"] == 2
    assert rb["images_encoded"] == 2 * 80 + 40  # 2 epochs of training images + the test images once
    assert rb["steps"] == a["runs"][0]["steps"] and rb["cached_wall_s"] == a["runs"][0]["wall_s"]
    assert rb["ratio"] == rb["wall_s"] / rb["cached_wall_s"] and b["ratio"] == rb["ratio"] > 0
    assert b["meets_target"] is None
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
    assert "(a) MMA base-to-new" in printed and "(b) the released code's way" in printed
    disk = json.loads(out_file.read_text())
    assert disk["c"]["params"] == 197_760 and disk["a"]["n_runs"] == 2 and disk["b"]["ratio"] == b["ratio"]


def test_train_mma_single_part(capsys):
    res = load_bench("train_mma").main(["--smoke", "--part", "a"])
    assert res["parts"] == ["a"] and "b" not in res and "c" not in res and res["a"]["n_runs"] == 2
