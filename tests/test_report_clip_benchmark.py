"""``python -m xmx.report --format clip_benchmark``: CLIP_benchmark's per-run JSON and merged CSV, with the numbers
CLIP_benchmark itself would compute from the same logits (top-1/top-5 accuracy, sklearn's balanced accuracy)."""

from __future__ import annotations

import csv
import json
import math

import pytest
from safetensors.torch import load_file

from xmx.report.cli import main
from xmx.run import run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_export_writes_clip_benchmark_json_and_csv(make_cfg, tmp_path, capsys):
    from sklearn.metrics import balanced_accuracy_score
    out = tmp_path / "runs" / "zs"
    res = run(make_cfg(["method=zeroshot", "backbone=open_clip", "backbone.model=xmx-tiny-sigmoid",
                        "backbone.weights=null", "logger=none"], output_dir=out))
    assert main([str(tmp_path / "runs"), "--format", "clip_benchmark", "--out", str(tmp_path / "cb")]) == 0
    files = sorted((tmp_path / "cb").glob("*.json"))
    assert [f.name for f in files] == ["synthetic_random-init_xmx-tiny-sigmoid_en_zeroshot_classification_seed1.json"]
    d = json.loads(files[0].read_text())
    assert (d["dataset"], d["model"], d["pretrained"], d["task"], d["language"]) == \
        ("synthetic", "xmx-tiny-sigmoid", "random-init", "zeroshot_classification", "en")
    assert set(d["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"} and d["seed"] == 1
    # what CLIP_benchmark computes from the same logits (fractions, not percent)
    p = load_file(out / "predictions.safetensors")
    logits, y = p["test/logits"].float(), p["test/labels"]
    assert d["metrics"]["acc1"] == pytest.approx((logits.argmax(-1) == y).float().mean().item(), abs=0.006)
    assert d["metrics"]["mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(y.numpy(), logits.argmax(-1).numpy()), abs=0.006)
    assert d["metrics"]["acc1"] == pytest.approx(res["metrics"]["test/acc"] / 100)
    rows = list(csv.DictReader(open(tmp_path / "cb" / "benchmark.csv")))
    assert len(rows) == 1 and rows[0]["model_fullname"] == "xmx-tiny-sigmoid random-init"
    assert float(rows[0]["acc5"]) == pytest.approx(res["metrics"]["test/acc5"] / 100)
    # a results.json from before top-5 / mean per-class recall were recorded: recomputed from its predictions
    rec = json.loads((out / "results.json").read_text())
    for k in ("test/acc5", "test/mean_per_class_recall"):
        del rec["metrics"][k]
    (out / "results.json").write_text(json.dumps(rec))
    assert main([str(out), "--format", "clip_benchmark", "--out", str(tmp_path / "cb2")]) == 0
    d2 = json.loads(next((tmp_path / "cb2").glob("*.json")).read_text())["metrics"]
    assert d2["acc5"] == pytest.approx(d["metrics"]["acc5"], abs=0.006)
    assert d2["mean_per_class_recall"] == pytest.approx(d["metrics"]["mean_per_class_recall"], abs=0.006)
    assert not math.isnan(d2["acc5"])
    # nothing to export: one error line, exit code 2
    (tmp_path / "empty").mkdir()
    capsys.readouterr()  # what the run above printed
    assert main([str(tmp_path / "empty"), "--format", "clip_benchmark", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
