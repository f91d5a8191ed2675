"""Paper-faithful protocols of the Tip family (docs/methods/tip_adapter.md#the-cache-model-and-its-search, issue:
selection set, selection modes, ImageNet templates):
what a run selects on, which mode chose it, and which prompts ImageNet gets."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

import xmx.data.coop as coop
from xmx.data.datasets import Datum, DatasetSplits, read_json
from xmx.data.fewshot import describe_val, resolve_val_shots, select_fewshot
from xmx.data.protocols import EvalSet
from xmx.data.templates import resolve_templates
from xmx.methods.tip_adapter import PAPER_EPOCH_MONITOR, TipAdapterMethod
from xmx.run import run

from conftest import one_line_error
from test_data_coop import fake_coop_tree

# Tip-Adapter's ImageNet prompts, copied from its release (datasets/imagenet.py, imagenet_templates)
TIP_IMAGENET_TEMPLATES = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                          "a {} in a video game.", "art of the {}.", "a photo of the small {}."]


# ---- (1) the selection set: the dataset's whole CoOp validation split ------------------------------------------
def test_tip_adapter_selects_on_the_whole_caltech101_validation_split(make_cfg, tmp_path_factory, tmp_path,
                                                                       one_thread):
    tree = fake_coop_tree(tmp_path_factory, "caltech101")  # every image of the real split file (tiny JPEGs)
    # the real split file with its test list cut to one image per class (the test set is not what this checks, and
    # extracting 2,465 test images would dominate the test's time); a split file in the dataset folder wins
    raw = read_json(coop.SPLITS_DIR / "split_zhou_Caltech101.json.gz")
    firsts = {}
    for item in raw["test"]:
        firsts.setdefault(item[1], item)
    root = tmp_path / "DATA"
    (root / "caltech-101").mkdir(parents=True)
    (root / "caltech-101" / "101_ObjectCategories").symlink_to(tree / "caltech-101" / "101_ObjectCategories")
    (root / "caltech-101" / "split_zhou_Caltech101.json").write_text(
        json.dumps({**raw, "test": list(firsts.values())}))
    res = run(make_cfg(["experiment=tip_adapter_16shot", "backbone=tiny", "augment.views=1", "shots=1",
                        f"paths.data_dir={root}", "features.batch_size=512", "data.eval_batch_size=4096",
                        "method.n_beta=2", "method.n_alpha=2", "trainer.accelerator=cpu"],
                       output_dir=tmp_path / "tip"))
    assert res["data"]["splits"]["val"]["n"] == len(raw["val"]) == 1649 and res["data"]["splits"]["train"]["n"] == 100
    assert res["data"]["splits"]["test"]["n"] == 100
    assert res["data"]["val"] == {"val_shots": "all", "selection": "the whole validation split"}
    assert res["extra"]["searched_on"] == "val" and res["selection"] == "val"
    assert res["config"]["data"]["val_shots"] == "all"
    # the accuracy the search reports is over all 1,649 images: a multiple of 100/1649
    assert (res["extra"]["search"]["val_acc"] * 1649 / 100) == pytest.approx(
        round(res["extra"]["search"]["val_acc"] * 1649 / 100), abs=1e-6)


def test_val_shots_key_other_methods_and_overrides(make_cfg):
    assert make_cfg(["method=tip_adapter_f"]).data.val_shots == "all"
    assert make_cfg(["method=xmadapter"]).data.val_shots == "all"
    assert make_cfg(["method=zeroshot"]).data.val_shots is None  # CoOp's min(K, 4) for everything else
    assert make_cfg(["method=tip_adapter", "data.val_shots=4"]).data.val_shots == 4


def _imagenet_like(per_class=12, classes=3) -> DatasetSplits:
    train = [Datum(f"imagenet/images/train/w{c}/w{c}_{k:03d}.JPEG", c, f"class {c}")
             for c in range(classes) for k in range(per_class)]
    return DatasetSplits("imagenet", None, train, [], [], [f"class {c}" for c in range(classes)], ["{}"])


def test_val_shots_all_keeps_the_split_and_imagenet_falls_back_to_train_outside_the_subset():
    val = [Datum(f"v{i}.jpg", i % 3, f"class {i % 3}") for i in range(30)]
    train = [Datum(f"t{i}.jpg", i % 3, f"class {i % 3}") for i in range(60)]
    splits = DatasetSplits("toy", None, train, val, [], ["class 0", "class 1", "class 2"], ["{}"])
    tr, va, source = select_fewshot("toy", splits, 2, 1, val_shots="all")
    assert va == val and len(tr) == 6 and "val_shots=all" in source
    assert len(select_fewshot("toy", splits, 2, 1)[1]) == 6  # default: min(K, 4) per class
    inet = _imagenet_like()
    tr, va, _ = select_fewshot("imagenet_like", inet, 8, 1, val_shots="all")
    assert set(Counter(d.label for d in va).values()) == {4} and not {d.path for d in tr} & {d.path for d in va}
    assert "outside the training subset" in describe_val("all", 8, has_val=False)
    assert describe_val("all", 8, has_val=True) == "the whole validation split"
    for bad in ("most", -1, 2.5):
        one_line_error(lambda: resolve_val_shots(bad, 16, True), "data.val_shots=", "all")


# ---- (2) selection modes -------------------------------------------------------------------------------------------
SMALL = ["backbone=tiny", "data=synthetic", "augment=tip", "augment.views=2", "shots=4", "trainer.accelerator=cpu",
         "method.epochs=4", "data.view_sampling=cycle", "method.optimizer.lr=0.01", "method.init_alpha=50",
         "method.n_beta=10", "method.n_alpha=5"]


def test_paper_selection_picks_tip_adapter_f_epoch_on_test(make_cfg, tmp_path, one_thread):
    res = run(make_cfg(SMALL + ["method=tip_adapter_f", "selection=paper"], output_dir=tmp_path / "paper"))
    ex = res["extra"]
    assert res["selection"] == ex["selection"] == "paper" and ex["epoch_selected_on"] == "test"
    test_curve = [c["test_acc"] for c in ex["epoch_curve"]]
    assert len(test_curve) == 4
    first_best = test_curve.index(max(test_curve))  # the release keeps the first epoch reaching the best (acc >)
    assert ex["selected_epoch"] == ex["epoch_curve"][first_best]["epoch"]
    assert res["metrics"][PAPER_EPOCH_MONITOR] == pytest.approx(max(test_curve))
    assert ex["searched_on"] == "val"  # alpha/beta on validation except on ImageNet (main.py)
    # main.py then reports max(best_acc, acc): the better of the initial and the searched alpha/beta on test
    pc = ex["paper_final_choice"]
    assert res["metrics"]["test/acc"] == pytest.approx(max(pc["test_acc_initial"], pc["test_acc_searched"]))
    assert pc["test_acc_initial"] == pytest.approx(max(test_curve))  # the selected epoch at the initial alpha/beta
    assert res["config"]["selection"] == "paper"


def test_selection_mode_is_validated_and_imagenet_paper_search_is_on_test(make_cfg):
    one_line_error(lambda: run(make_cfg(["selection=test"])), "selection='test'", "val, paper")
    one_line_error(lambda: TipAdapterMethod(selection="best"), "selection='best'", "val, paper")
    names = ["a", "b"]
    val = EvalSet("val", [], names, "imagenet", ["{}"], [0, 1])
    test = EvalSet("test", [], names, "imagenet", ["{}"], [0, 1])
    dm = SimpleNamespace(name="imagenet", val_set=val, eval_sets=[test], classnames=names)
    assert TipAdapterMethod(selection="paper").selection_set(dm) is test
    assert TipAdapterMethod(selection="val").selection_set(dm) is val
    assert TipAdapterMethod(selection="paper").selection_set(SimpleNamespace(**{**vars(dm), "name": "dtd"})) is val


# ---- (3) ImageNet prompts --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", ["tip_adapter_16shot", "tip_adapter_f_16shot", "xmadapter_16shot",
                                        "tip_adapter_f_domain_shift", "xmadapter_domain_shift"])
def test_tip_family_uses_tip_adapters_seven_imagenet_templates(make_cfg, experiment):
    cfg = make_cfg([f"experiment={experiment}", "data=imagenet"])
    assert resolve_templates(cfg.data.templates, ["a photo of a {}."]) == TIP_IMAGENET_TEMPLATES
    # the shots sweep only varies data/shots/seed: its ImageNet jobs resolve the same way
    swept = make_cfg([f"experiment={experiment}", "sweep=shots", "data=imagenet", "shots=2"])
    assert swept.data.templates == "tip7"


def test_imagenet_templates_stay_selectable_and_other_datasets_keep_coop(make_cfg):
    cfg = make_cfg(["experiment=tip_adapter_f_16shot", "data=imagenet", "data.templates=clip80"])
    assert len(resolve_templates(cfg.data.templates, [])) == 80
    assert make_cfg(["experiment=tip_adapter_f_16shot", "data=dtd"]).data.templates is None  # CoOp's "{} texture."
    assert make_cfg(["experiment=zeroshot_16shot", "data=imagenet"]).data.templates is None
    assert OmegaConf.to_container(make_cfg(["method=tip_adapter"]).method.dataset_templates) == {"imagenet": "tip7"}


# ---- (2) the report keeps the two modes apart -----------------------------------------------------------------------
def test_report_marks_paper_selected_cells_and_never_averages_them_with_val(tmp_path):
    from test_report import cell, write_result

    from xmx.report import build_report
    for seed, (val_acc, paper_acc) in enumerate([(60.0, 70.0), (62.0, 72.0)], start=1):
        for ds in ("dtd", "eurosat"):
            write_result(tmp_path, method="tip_adapter_f", dataset=ds, seed=seed, acc=val_acc,
                         config={"selection": "val"}, selection="val")
            write_result(tmp_path, method="tip_adapter_f", dataset=ds, seed=seed, acc=paper_acc,
                         config={"selection": "paper"}, selection="paper")
    res = build_report([tmp_path], out=tmp_path / "report", plots=False)
    cells = res["cells"]
    val = cell(cells, dataset="average", column="16", selection="val")
    paper = cell(cells, dataset="average", column="16", selection="paper")
    assert (val["mean"], paper["mean"]) == (61.0, 71.0)  # a mixed mean would be 66
    assert paper["text"].startswith("71.00†") and "†" not in val["text"] and "selection: paper" in paper["label"]
    assert len(res["skipped"]) == 0 and "never averaged" in res["markdown"]


def test_selection_paper_is_refused_by_methods_without_a_test_selecting_release(make_cfg, tmp_path):
    one_line_error(lambda: run(make_cfg(["backbone=tiny", "data=synthetic", "method=zeroshot", "selection=paper"],
                                        output_dir=tmp_path / "zs")), "selection=paper", "zeroshot", "selection=val")
    assert not (tmp_path / "zs" / "results.json").exists()
