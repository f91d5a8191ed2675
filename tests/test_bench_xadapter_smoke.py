"""The X-adapter benchmark (bench/xadapter.py) runs end to end on CPU in its smoke mode and reports sane numbers."""

import json
from conftest import load_bench




def test_xadapter_bench_smoke(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    res = load_bench("xadapter").main(["--smoke", "--out", str(out_file)])
    assert res["benchmark"] == "xadapter" and res["smoke"] is True and res["device"] == "cpu"
    assert res["sizes"]["batch"] == 8 and res["sizes"]["index_size"] == 2000 and res["sizes"]["autocast"] == "fp32"
    m, r = res["mlm"], res["retrieval"]
    assert m["mlm_seq_per_s"] > 0 and m["reference_seq_per_s"] > 0 and m["adapter_params"] > 0
    assert abs(m["ratio"] - m["reference_step_ms"] / m["mlm_step_ms"]) < 1e-9
    assert m["meets_target"] == (m["ratio"] >= 0.70)
    assert r["queries_per_s"] > 0 and r["index_size"] == 2000 and r["k"] == 4
    assert json.loads(out_file.read_text())["mlm"] == m
    assert "queries/s" in capsys.readouterr().out
