"""The run loop end to end, in-process: results.json and its companions, evaluation-only reuse, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from xmx.errors import XmxError
from xmx.run import run


def _read(out) -> dict:
    return json.loads((Path(out) / "results.json").read_text())


def test_zeroshot_writes_complete_traceable_results(make_cfg):
    cfg = make_cfg(["method=zeroshot"])
    res = run(cfg)
    out = Path(cfg.paths.output_dir)
    disk = _read(out)
    assert disk["schema"] == "xmx.results/1" and disk["status"] == "complete"
    assert disk["method"] == "zeroshot" and disk["dataset"] == "synthetic" and disk["shots"] == 16
    assert 0.0 <= disk["metrics"]["test/acc"] <= 100.0
    # provenance: config, code, packages, weights, exact data, cost
    assert disk["config"]["method"]["name"] == "zeroshot" and disk["config"]["seed"] == 1
    assert disk["weights"]["random_init"] is True and disk["weights"]["arch"] == "xmx-tiny"
    assert disk["packages"]["torch"] and disk["code"]["xmx"]
    assert disk["data"]["splits"]["test"]["n"] == 200 and disk["data"]["splits"]["train"]["n"] == 160
    assert len(disk["data"]["splits"]["train"]["sha256"]) == 64
    assert disk["cost"]["wall_time_s"] > 0 and disk["cost"]["device"]
    subset = json.loads((out / "subset.json").read_text())
    assert len(subset["train"]) == 160 and len(subset["val"]) == 40  # 16 shots, min(16,4) val shots, 10 classes
    assert all(p.startswith("synthetic/images/") for p, _, _ in subset["train"])
    preds = load_file(out / "predictions.safetensors")
    assert preds["test/logits"].shape == (200, 10) and preds["test/labels"].shape == (200,)
    acc = 100.0 * (preds["test/logits"].float().argmax(-1) == preds["test/labels"]).float().mean().item()
    assert acc == pytest.approx(disk["metrics"]["test/acc"], abs=1e-3)  # new metrics need no rerun
    assert res["metrics"] == disk["metrics"]


def test_a_runs_own_subset_json_is_a_valid_subset_file(make_cfg, tmp_path):
    """The subset.json a run writes, fed back as data.subset_file (with another seed), gives the same images."""
    run(make_cfg(["method=zeroshot", "seed=3"], output_dir=tmp_path / "a"))
    res = run(make_cfg(["method=zeroshot", "seed=4", f"data.subset_file={tmp_path / 'a' / 'subset.json'}"],
                       output_dir=tmp_path / "b"))
    a, b = (json.loads((tmp_path / n / "subset.json").read_text()) for n in ("a", "b"))
    assert a["train"] == b["train"] and a["val"] == b["val"] and res["shots"] == 16
    assert res["data"]["subset_source"].startswith("file:")


def test_linear_probe_learns_and_reuses_its_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg(["method=linear_probe", "method.refine_steps=2", "method.max_iter=200"],
                   output_dir=tmp_path / "lp")
    res = run(cfg)
    assert res["metrics"]["test/acc"] > 25.0  # chance is 10 %: the probe learned from frozen features
    assert res["extra"]["C"] in [c["C"] for c in res["extra"]["validation_curve"]]
    assert (tmp_path / "lp" / "checkpoints" / "last.ckpt").is_file()
    # evaluation only from the trained run's folder: the same numbers
    cfg2 = make_cfg(["method=linear_probe", "train=false", f"init_from={tmp_path / 'lp'}"],
                    output_dir=tmp_path / "lp_eval")
    res2 = run(cfg2)
    assert res2["metrics"]["test/acc"] == pytest.approx(res["metrics"]["test/acc"])
    assert not list((tmp_path / "lp_eval").glob("checkpoints/*.ckpt"))


def test_seeds_give_different_reproducible_subsets(make_cfg, tmp_path):
    subsets = {}
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        cfg = make_cfg(["method=zeroshot", f"seed={seed}", "shots=2"], output_dir=tmp_path / name)
        run(cfg)
        subsets[name] = json.loads((tmp_path / name / "subset.json").read_text())["train"]
    assert subsets["a"] == subsets["b"] and subsets["a"] != subsets["c"]


def test_init_from_without_checkpoint_is_one_clear_line(make_cfg, tmp_path):
    cfg = make_cfg(["method=linear_probe", "train=false", f"init_from={tmp_path}/nothing_here"])
    with pytest.raises(XmxError, match="init_from=.*no checkpoint there"):
        run(cfg)


def test_unknown_dataset_and_too_many_shots(make_cfg):
    with pytest.raises(XmxError, match="unknown dataset 'nope'; valid choices: .*synthetic"):
        run(make_cfg(["data.name=nope"]))
    with pytest.raises(XmxError, match="shots=50 but class"):
        run(make_cfg(["shots=50"]))


def test_second_run_reads_features_from_the_store(make_cfg, tmp_path, xmx_cache):
    from xmx.features import FeatureStore
    cfg = make_cfg(["method=zeroshot", "seed=7", f"paths.feature_dir={tmp_path / 'store'}"],
                   output_dir=tmp_path / "first")
    first = run(cfg)
    store = FeatureStore(tmp_path / "store")
    entries = {e.path: e.created for e in store.entries()}
    assert any(e.kind == "image_features" for e in store.entries()) and any(e.kind == "text" for e in store.entries())
    cfg2 = make_cfg(["method=zeroshot", "seed=7", f"paths.feature_dir={tmp_path / 'store'}"],
                    output_dir=tmp_path / "second")
    second = run(cfg2)
    assert {e.path: e.created for e in store.entries()} == entries  # nothing recomputed
    assert second["metrics"] == first["metrics"]
