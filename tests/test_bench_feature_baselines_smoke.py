"""The feature-baselines benchmark (GDA, LP++, TaskRes, ProLIP) runs end to end in its smoke mode and reports every
field it documents."""

import json

from conftest import load_bench


def test_smoke_reports_every_method(tmp_path, capsys, one_thread):
    out = tmp_path / "fb.json"
    res = load_bench("feature_baselines").main(["--smoke", "--out", str(out)])
    assert res["smoke"] is True and res["device"] == "cpu"
    assert res["sizes"]["classes"] == 10 and res["sizes"]["lpp_epochs"] == 20
    g, p, t, q = res["gda"], res["lpp"], res["taskres"], res["prolip"]
    assert g["fit_search_s"] > 0 and g["alpha"] in (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)
    assert g["meets_cpu_target"] is None and p["meets_cpu_target"] is None   # targets are judged at full size only
    assert p["epochs"] == 20 and 0 <= p["selected_epoch"] < 20 and p["s_per_epoch"] == p["fit_s"] / 20
    assert t["steps_per_epoch"] == 3 and t["epochs_measured"] == 2 and t["s_per_epoch"] > 0   # 40 rows, batch 16
    assert q["epochs_measured"] == 3 and q["fit_300_epochs_s_est"] == 300 * q["s_per_epoch"]
    # the random problem has class structure: every method beats chance (10 %) on its test features
    assert min(g["test_acc"], p["test_acc"], t["test_acc_after_measured_epochs"]) > 30
    assert "GDA fit + alpha search" in capsys.readouterr().out
    assert json.loads(out.read_text())["lpp"]["epochs"] == 20
