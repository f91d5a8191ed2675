"""The encoder-adapter benchmark (bench/encoder_adapters.py) runs end to end on CPU in its smoke mode."""

import json

from conftest import load_bench


def test_encoder_adapters_smoke(tmp_path):
    out = tmp_path / "bench.json"
    res = load_bench("encoder_adapters").main(["--smoke", "--out", str(out), "--repeats", "2"])
    assert json.loads(out.read_text())["benchmark"] == "encoder_adapters" and res["device"] == "cpu"
    s = res["step"]
    assert (s["model"], s["batch"], s["classes"], s["autocast"]) == ("xmx-tiny", 4, 5, None)
    assert s["trainable_params"] == 3072  # LoRA r=2 on q,k,v of the 2+2 tiny blocks (width 64)
    assert len(s["lora_step_s_all"]) == len(s["plain_step_s_all"]) == 2
    assert s["lora_images_per_s"] == 4 / s["lora_step_s"] and s["ratio"] == s["lora_images_per_s"] / s[
        "plain_images_per_s"] > 0
    assert s["meets_target"] is None  # the GPU target is not judged on CPU
    r = res["run"]
    assert r["steps"] == 6 and r["projected_train_s"] == 6 * r["step_s"]
    assert r["projected_wall_s"] == r["projected_train_s"] + r["projected_test_s"] > 0
    d = res["decode"]  # the online loaders: PIL in the workers next to the byte path's code (tensor on CPU)
    assert (d["images"], d["crop"], d["workers"]) == (16, 32, 0)
    assert d["pil"]["resolved"] == "pil" and d["tensor"]["resolved"] == "tensor"
    for mode in ("pil", "tensor"):
        assert len(d[mode]["epoch_s_all"]) == 2 and d[mode]["images_per_s"] == 16 / d[mode]["epoch_s"]
    assert d["speedup"] == d["tensor"]["images_per_s"] / d["pil"]["images_per_s"] > 0
