"""bench/encoder_adapters.py times CLIP-SVD's and 2SFS's steps next to the plain forward + backward (smoke, CPU)."""

import pytest

from conftest import load_bench

pytestmark = pytest.mark.usefixtures("one_thread")


def test_whole_model_steps_smoke():
    res = load_bench("encoder_adapters").main(["--smoke", "--part", "step", "--repeats", "2"])
    s = res["step"]
    assert s["svd_trainable_params"] == 1536 and s["twosfs_stage1_params"] == 1024  # tiny: 2 + 2 blocks of width 64
    assert len(s["plain_step_s_all"]) == 2 and len(s["plain_whole_step_s_all"]) == 2  # plain timed again between
    assert s["plain_whole_images_per_s"] == 4 / s["plain_whole_step_s"]
    for k in ("svd", "twosfs_stage1", "twosfs_stage2"):
        assert len(s[f"{k}_step_s_all"]) == 2 and s[f"{k}_images_per_s"] == 4 / s[f"{k}_step_s"]
        assert s[f"{k}_ratio"] == s[f"{k}_images_per_s"] / s["plain_whole_images_per_s"] > 0
        assert s[f"{k}_meets_target"] is None  # the GPU target is not judged on CPU
