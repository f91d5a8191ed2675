"""Tip-Adapter, Tip-Adapter-F and XMAdapter through the run loop (tiny backbone, synthetic data, in-process):
validation-selected alpha/beta and epoch, exact Tip-Adapter-F reduction, column slicing, refusals."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from xmx.data.datasets import Datum
from xmx.data.protocols import EvalSet
from xmx.errors import XmxError
from xmx.methods.tip_adapter import (TIP_DATASETS, TIP_DEFAULT, TipAdapterFMethod, TipAdapterMethod, build_cache,
                                     search_alpha_beta, search_grid, tip_logits)
from xmx.methods.xmadapter import XMAdapterMethod
from xmx.run import build, run

# 4 shots x 10 classes, 2 cached `tip` views: features are extracted once per session (feature store) and shared
SMALL = ["backbone=tiny", "data=synthetic", "augment=tip", "augment.views=2", "shots=4", "trainer.accelerator=cpu"]
# a large initial alpha lets the cache move the tiny random CLIP's predictions, so val/acc changes between epochs
TRAIN = ["method.epochs=4", "data.view_sampling=cycle", "method.optimizer.lr=0.01", "method.init_alpha=50"]
_RUNS: dict[str, tuple[dict, Path]] = {}


def _run_once(key: str, make_cfg, root: Path, overrides: list[str]) -> tuple[dict, Path]:
    """One run per key for the whole module (the Tip-Adapter-F run serves two tests)."""
    if key not in _RUNS:
        out = root / key
        _RUNS[key] = (run(make_cfg(SMALL + overrides, output_dir=out)), out)
    return _RUNS[key]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tip_runs")


def _setup_dm(make_cfg, overrides):
    cfg = make_cfg(SMALL + overrides)
    L.seed_everything(int(cfg.seed), verbose=False)  # the random-init tiny backbone, as run() builds it
    dm = build(cfg.data, backbone=build(cfg.backbone), _convert_="all")
    dm.setup("test")
    return dm


def _labels(s) -> torch.Tensor:
    return torch.tensor([d.label for d in s.items])


# ---- Tip-Adapter (training-free) ---------------------------------------------------------------------------------
def test_tip_adapter_searches_on_validation_and_writes_the_curve(make_cfg, tmp_path):
    res = run(make_cfg(SMALL + ["method=tip_adapter"], output_dir=tmp_path / "tip"))
    ex = res["extra"]
    assert res["method"] == "tip_adapter" and 0.0 <= res["metrics"]["test/acc"] <= 100.0
    # synthetic is not in the per-dataset table: the core's default entry
    assert ex["dataset_entry"]["source"].startswith("TIP_DEFAULT")
    assert ex["dataset_entry"]["beta_max"] == TIP_DEFAULT["beta_max"] == 10.0
    s = ex["search"]
    assert ex["searched_on"] == "val" and (ex["alpha"], ex["beta"]) == (s["alpha"], s["beta"])
    assert res["metrics"]["val/acc"] == pytest.approx(s["val_acc"])  # the validation accuracy of what was selected
    assert s["betas"] == search_grid(10.0, 200) and s["alphas"] == search_grid(10.0, 20)
    assert len(s["best_val_acc_per_beta"]) == 200 and max(s["best_val_acc_per_beta"]) == pytest.approx(s["val_acc"])
    assert "val_acc_grid" not in s  # 200 x 20 cells: the per-beta summary only (results_grid=auto)
    assert json.loads((tmp_path / "tip" / "results.json").read_text())["extra"]["alpha"] == ex["alpha"]

    # independent recomputation from the same features: the cache is the mean of the views, the search ran on the
    # validation features, and the reported test logits are Tip-Adapter's at the searched alpha/beta
    dm = _setup_dm(make_cfg, ["method=tip_adapter"])
    W = dm.text_classifier(dm.classnames)
    keys, values = build_cache(dm.train_features, dm.train_labels, len(dm.classnames))
    ref = search_alpha_beta(dm.features_of(dm.val_set).float(), _labels(dm.val_set), W, keys, values, 10.0, 10.0)
    assert (ref.alpha, ref.beta, ref.acc) == (ex["alpha"], ex["beta"], pytest.approx(s["val_acc"]))
    assert s["best_val_acc_per_beta"] == pytest.approx(ref.grid.max(dim=1).values.tolist(), abs=1e-3)
    assert s["best_alpha_per_beta"] == [ref.alphas[int(j)] for j in ref.grid.argmax(dim=1)]
    test = dm.eval_sets[0]
    logits = tip_logits(dm.features_of(test).float(), W, keys, values, ex["alpha"], ex["beta"])
    preds = load_file(tmp_path / "tip" / "predictions.safetensors")
    assert torch.allclose(preds["test/logits"].float(), logits, rtol=2e-3, atol=2e-2)
    acc = 100.0 * (logits.argmax(-1) == _labels(test)).double().mean().item()
    assert acc == pytest.approx(res["metrics"]["test/acc"], abs=1e-3)


# ---- Tip-Adapter-F -----------------------------------------------------------------------------------------------
def _val_curve_from_csv(out: Path) -> list[tuple[int, float]]:
    rows = list(csv.DictReader((out / "csv" / "metrics.csv").open()))
    return [(int(r["epoch"]), float(r["val/acc"])) for r in rows if r.get("val/acc") and not r.get("test/acc")]


def test_tip_adapter_f_selects_its_epoch_on_validation_then_searches(make_cfg, runs_dir):
    res, out = _run_once("tip_f", make_cfg, runs_dir, ["method=tip_adapter_f", *TRAIN])
    ex = res["extra"]
    curve = _val_curve_from_csv(out)
    assert [e for e, _ in curve] == [0, 1, 2, 3] and len({a for _, a in curve}) > 1  # a real choice
    assert [(c["epoch"], c["val_acc"]) for c in ex["epoch_curve"]] == [(e, pytest.approx(a)) for e, a in curve]
    best = max(range(len(curve)), key=lambda i: (curve[i][1], -i))  # ties: the first epoch reaching the best
    assert ex["selected_epoch"] == curve[best][0]
    # the epoch was chosen at the initial alpha/beta, but val/acc reports what was selected: the searched alpha/beta
    # on the selected keys (it used to print the initial-alpha/beta score next to the searched test/acc)
    assert res["metrics"]["val/acc"] == pytest.approx(ex["search"]["val_acc"])
    assert (ex["init_alpha"], ex["init_beta"]) == (50.0, TIP_DEFAULT["init_beta"])
    # the restored checkpoint holds trained keys (rows no longer unit vectors), then alpha/beta came from validation
    ckpt = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == ex["selected_epoch"]
    norms = ckpt["state_dict"]["model.adapter.weight"].norm(dim=-1)
    assert (norms - 1).abs().max() > 1e-3
    assert not any(k.startswith("backbone.") for k in ckpt["state_dict"])
    assert ckpt["xmx_cache"]["classes"] == 10 and ckpt["xmx_cache"]["views"] == 2
    assert ex["searched_on"] == "val" and (ex["alpha"], ex["beta"]) == (ex["search"]["alpha"], ex["search"]["beta"])
    assert ex["search"]["val_acc"] == pytest.approx(max(ex["search"]["best_val_acc_per_beta"]))
    assert 0.0 <= res["metrics"]["test/acc"] <= 100.0


def test_xmadapter_fixed_gamma_one_kappa_zero_is_exactly_tip_adapter_f(make_cfg, runs_dir):
    ref, ref_out = _run_once("tip_f", make_cfg, runs_dir, ["method=tip_adapter_f", *TRAIN])
    xm, xm_out = _run_once("xm_fixed", make_cfg, runs_dir,
                           ["method=xmadapter", *TRAIN, "method.gamma_mode=fixed", "method.gamma=1.0",
                            "method.kappa=0"])
    assert xm["metrics"] == ref["metrics"]
    for k in ("alpha", "beta", "selected_epoch", "epoch_curve"):
        assert xm["extra"][k] == ref["extra"][k], k
    assert xm["extra"]["gamma"] == 1.0 and xm["extra"]["search"]["gammas"] == [1.0]
    a, b = load_file(ref_out / "predictions.safetensors"), load_file(xm_out / "predictions.safetensors")
    assert torch.equal(a["test/logits"], b["test/logits"])


def test_xmadapter_searches_gamma_on_validation(make_cfg, runs_dir):
    res, _ = _run_once("xm_searched", make_cfg, runs_dir, ["method=xmadapter", "method.epochs=2",
                                                          "data.view_sampling=cycle", "method.n_beta=20"])
    ex = res["extra"]
    s = ex["search"]
    assert ex["gamma_mode"] == "searched" and s["gammas"] == [i / 10 for i in range(11)]
    assert ex["gamma"] == s["gamma"] in s["gammas"] and ex["beta_txt"] == ex["beta"]  # beta_txt tied to beta
    assert len(s["best_val_acc_per_gamma"]) == 11 and max(s["best_val_acc_per_gamma"]) == pytest.approx(s["val_acc"])
    assert len(s["best_val_acc_per_beta"]) == 20 and "val_acc_grid" not in s  # 20x20x11 cells: summary only
    res, _ = _run_once("xm_small_grid", make_cfg, runs_dir, ["method=xmadapter", "method.epochs=1", "method.n_beta=5",
                                                             "method.n_alpha=4", "method.gamma_steps=4"])
    grid = torch.tensor(res["extra"]["search"]["val_acc_grid"])  # 5x1x4x5 = 100 cells: written whole
    assert grid.shape == (5, 1, 4, 5) and float(grid.max()) == pytest.approx(res["extra"]["search"]["val_acc"])


# ---- column slicing and refusals, at module level ----------------------------------------------------------------
def _fake_dm(N=6, K=3, C=16, V=2, eval_sets=(), classnames=None, seed=0):
    """What build() reads from a set-up CLIPDataModule, on random class-structured features."""
    g = torch.Generator().manual_seed(seed)
    names = classnames or [f"class_{i}" for i in range(N)]
    mu = torch.nn.functional.normalize(torch.randn(N, C, generator=g), dim=-1)
    W = torch.nn.functional.normalize(mu + 0.5 * torch.randn(N, C, generator=g), dim=-1).T.contiguous()
    y = torch.arange(N).repeat_interleave(K)
    items = [Datum(f"x/{i}.jpg", int(c), names[c]) for i, c in enumerate(y)]
    val = EvalSet("val", items, names, "fake", ["{}"], list(range(N)))
    feats = {"val": 3 * (mu[y] + 0.3 * torch.randn(len(y), C, generator=g))}
    for s in eval_sets:
        feats[s.name] = torch.randn(len(s.items), C, generator=g)
    return SimpleNamespace(inputs="features", name="fake", classnames=names, val_set=val, eval_sets=list(eval_sets),
                           train_features=3 * (mu[y] + 0.3 * torch.randn(V, len(y), C, generator=g)),
                           train_labels=y, view_sampling="cycle", text_classifier=lambda cn, t=None: W,
                           features_of=lambda s: feats[s.name])


def _built(cls, dm, **kw):
    m = cls(name=cls.__name__, **kw)
    m.dm = dm
    m.build(dm)
    return m


@pytest.mark.parametrize("cls", [TipAdapterMethod, TipAdapterFMethod, XMAdapterMethod])
def test_subset_eval_set_reads_its_columns_through_train_index(cls):
    names = [f"class_{i}" for i in range(6)]
    idx = [4, 1, 5]  # an ImageNet-A/-R-like subset, in its own order
    sub = EvalSet("test_subset", [Datum("s/0.jpg", 0, names[4])] * 5, [names[i] for i in idx], "fake", ["{}"], idx)
    full = EvalSet("test", [Datum("t/0.jpg", 0, names[0])] * 5, names, "fake", ["{}"], list(range(6)))
    dm = _fake_dm(eval_sets=[full, sub])
    m = _built(cls, dm, search=False)
    x = torch.randn(5, 16)
    whole = m.logits(x, full)
    assert whole.shape == (5, 6)
    assert torch.equal(m.logits(x, sub), whole[:, idx])
    # the same as Tip-Adapter with the classifier and the cache values restricted to the subset's classes
    tm = m.model
    if cls is not XMAdapterMethod:
        ref = tip_logits(x, tm.W[:, idx], tm.cache_keys().detach(), tm.values[:, idx], tm.alpha, tm.beta)
        assert torch.allclose(m.logits(x, sub), ref, atol=1e-5)


def test_unseen_classes_are_refused_in_one_line(make_cfg):
    names = [f"class_{i}" for i in range(6)]
    new = EvalSet("test_new", [Datum("n/0.jpg", 0, "zebra")], ["zebra", names[2]], "fake", ["{}"], [None, 2])
    with pytest.raises(XmxError, match=r"test_new.*'zebra'.*can't score unseen classes") as e:
        _built(TipAdapterFMethod, _fake_dm(eval_sets=[new]))
    assert "\n" not in str(e.value)
    m = _built(TipAdapterMethod, _fake_dm(), search=False)
    with pytest.raises(XmxError, match="can't score unseen classes"):
        m.logits(torch.randn(2, 16), new)
    # the run level: base-to-new's new classes, before any training
    with pytest.raises(XmxError, match=r"test_new.*can't score unseen classes.*method=zeroshot"):
        run(make_cfg(SMALL + ["method=tip_adapter_f", "protocol=base2new"]))


def test_a_cache_for_other_classes_or_another_backbone_is_refused(tmp_path):
    m = _built(TipAdapterFMethod, _fake_dm())
    good = {"state_dict": {k: v.clone() for k, v in m.state_dict().items()}, "xmx_cache": dict(m.cache_meta)}
    torch.save(good, tmp_path / "same.ckpt")
    m.load_weights(tmp_path / "same.ckpt")  # its own cache loads
    wide = {"state_dict": {**good["state_dict"], "model.adapter.weight": torch.randn(18, 32)}}
    torch.save(wide, tmp_path / "wide.ckpt")
    with pytest.raises(XmxError, match=r"init_from=.*width 32 .*another backbone") as e:
        m.load_weights(tmp_path / "wide.ckpt")
    assert "\n" not in str(e.value)
    more = {"state_dict": {**good["state_dict"], "model.values": torch.eye(9)[torch.arange(18) % 9]}}
    torch.save(more, tmp_path / "more.ckpt")
    with pytest.raises(XmxError, match=r"init_from=.*9 classes.*another label set"):
        m.load_weights(tmp_path / "more.ckpt")
    # same shapes, other class names (or another backbone identity): the recorded cache identity refuses it
    other = _built(TipAdapterFMethod, _fake_dm(classnames=[f"other_{i}" for i in range(6)]))
    with pytest.raises(XmxError, match=r"init_from=.*built for other classes"):
        other.load_weights(tmp_path / "same.ckpt")
    foreign = {**good, "xmx_cache": {**good["xmx_cache"], "backbone": {"arch": "RN50", "sha256": "ab"}}}
    m.cache_meta["backbone"] = {"arch": "xmx-tiny", "sha256": None}
    torch.save(foreign, tmp_path / "foreign.ckpt")
    with pytest.raises(XmxError, match=r"init_from=.*built with backbone RN50 .* this run uses xmx-tiny"):
        m.load_weights(tmp_path / "foreign.ckpt")


# ---- configs -----------------------------------------------------------------------------------------------------
def test_method_config_table_mirrors_the_core_and_sets_epochs(make_cfg):
    cfg = make_cfg(["method=tip_adapter_f"])
    table = {k: dict(v) for k, v in cfg.method.datasets.items()}
    assert set(table) == set(TIP_DATASETS)
    for name, entry in TIP_DATASETS.items():
        assert {k: float(v) for k, v in table[name].items()} == {k: float(v) for k, v in entry.items()}, name
    assert make_cfg(["method=tip_adapter_f", "data=eurosat"]).trainer.max_epochs == 100
    assert make_cfg(["method=xmadapter", "data=dtd"]).trainer.max_epochs == 20
    assert make_cfg(["method=xmadapter"]).trainer.max_epochs == 20  # synthetic: not in the table
    m = TipAdapterFMethod(datasets=table, beta_max=99.0)
    entry, source = m.dataset_entry("imagenet_sketch")  # ImageNet's variants use ImageNet's entry
    assert entry["alpha_max"] == 3.0 and entry["beta_max"] == 99.0 and "overrides (beta_max)" in source
    with pytest.raises(XmxError, match="method.datasets.dtd: unknown key"):
        TipAdapterMethod(datasets={"dtd": {"beta_maxx": 3}})
    assert math.isclose(entry["init_alpha"], 1.17)
