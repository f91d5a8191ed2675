"""The Tip-Adapter-F benchmark runs end to end in its smoke mode (CPU, tiny sizes) and reports every field."""

import json
from conftest import load_bench




def test_smoke_reports_training_and_search(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    res = load_bench("train_tip").main(["--smoke", "--out", str(out_file)])
    assert res["smoke"] is True and res["device"] == "cpu" and res["tf32"] is False
    assert res["sizes"] == {"classes": 10, "shots": 4, "dim": 32, "views": 2, "epochs": 2, "batch": 16, "val": 40,
                            "search_feats": 200}
    a, b = res["part_i"], res["part_ii"]
    assert a["steps"] == 2 * 3 and 1 <= a["best_epoch"] <= 2 and len(a["val_acc_curve"]) == 2
    assert a["val_acc_best_epoch"] == max(a["val_acc_curve"])
    assert a["search"]["pairs"] == 4000 and 0 <= a["search"]["val_acc"] <= 100
    assert 0.1 <= a["search"]["alpha"] < 3 and 0.1 <= a["search"]["beta"] < 7
    for k in ("wall_s", "setup_s", "train_s", "val_eval_s", "search_s"):
        assert a[k] >= 0
    assert a["wall_s"] >= a["train_s"] + a["search_s"]
    assert a["meets_target"] is None  # the H100 target is not judged on CPU
    assert b["pairs"] == 4000 and b["features"] == 200 and b["keys"] == 40 and b["classes"] == 10 and b["wall_s"] > 0
    assert "(i) Tip-Adapter-F total" in capsys.readouterr().out
    assert json.loads(out_file.read_text())["part_ii"]["pairs"] == 4000
