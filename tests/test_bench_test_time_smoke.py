"""The test-time benchmark runs end to end in its smoke mode (CPU, small sizes) and reports every field."""

import json

from conftest import load_bench


def test_smoke_reports_tda_and_tpt(tmp_path, capsys):
    out = tmp_path / "tt.json"
    res = load_bench("test_time").main(["--smoke", "--out", str(out)])
    assert res["smoke"] is True and res["device"] == "cpu"
    one, many = res["tda"]
    assert (one["views"], many["views"]) == (1, 20) and one["images"] == 400 and one["classes"] == 50
    for r in (one, many):
        assert r["same_predictions"] is True  # xmx's stream and the release loop agree on every image
        assert r["xmx_s"] > 0 and r["release_s"] > 0 and r["speedup"] == r["release_s_whole_stream"] / r["xmx_s"]
        assert r["positive_entries"] > 0 and not r["release_extrapolated"]
    t = res["tpt"]
    assert t["tpt_ms"] > 0 and t["plain_fwd_bwd_ms"] > 0 and t["ratio"] == t["tpt_ms"] / t["plain_fwd_bwd_ms"]
    assert "TPT xmx-tiny" in capsys.readouterr().out
    assert json.loads(out.read_text())["tda"][1]["views"] == 20
