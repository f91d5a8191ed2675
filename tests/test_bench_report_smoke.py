"""bench/report.py runs end to end in its smoke mode: a paired comparison over three datasets × three seeds."""

from conftest import load_bench


def test_smoke_compares_and_times(tmp_path):
    out = load_bench("report").main(["--smoke", "--root", str(tmp_path), "--bootstrap", "200"])
    assert out["runs"] == 18 and out["datasets"] == 3
    lo, hi = out["average_interval"]
    assert lo < out["average_diff"] < hi and out["average_diff"] > 0  # A is built 5 points better
    assert sum(out["verdicts"].values()) == 3
    assert out["cells_with_interval"] == 2 * (3 + 1)  # 3 datasets + the average, per method
    assert out["compare_s"] >= 0 and out["intervals_variance_s"] >= 0
    assert list(tmp_path.iterdir()) == []
