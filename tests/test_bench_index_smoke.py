"""The ImageNet index benchmark runs end to end in its smoke mode and reports what it indexed."""

from conftest import load_bench




def test_smoke_indexes_every_file(tmp_path):
    out = load_bench("index_imagenet").main(["--smoke", "--root", str(tmp_path)])
    assert out["folders"] == 20 and out["files"] == 1000 and out["items"] == 1000
    assert out["ok"] is True
    assert len(out["index_s"]) == 2 and all(t >= 0 for t in out["index_s"])
    assert out["first"] == "imagenet/images/train/n01440764/n01440764_0.JPEG"
    assert list(tmp_path.iterdir()) == []  # the tree is removed unless --keep


def test_smoke_times_the_fingerprint(tmp_path):
    out = load_bench("index_imagenet").main(["--smoke", "--root", str(tmp_path), "--repeat", "1", "--fingerprint"])
    assert set(out["fingerprint_s"]) == {"first", "cached", "stat"} and all(v >= 0 for v in out["fingerprint_s"].values())
