"""MMA (and CLIP-Adapter) end to end, in-process: the presets write per-split accuracies, base-to-new scores each split
on its own classes only, early stopping restores the best epoch, the adapter learns, noise is part of the feature key,
and bad input stops the run with one line. Tiny random-init CLIP on the synthetic set (10 classes, 16 shots)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from xmx.datamodules.clip import CLIPDataModule
from xmx.errors import XmxError
from xmx.features import FeatureStore
from xmx.methods.mma import MultiModalAdapter
from xmx.run import run

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["backbone=tiny", "data=synthetic", "trainer.accelerator=cpu", "callbacks.rich_progress_bar=null",
        "logger=none"]
FDR = ["backbone=tiny", "data=synthetic", "debug=fdr", "logger=none"]




def _labels(eval_set) -> torch.Tensor:
    return torch.tensor([d.label for d in eval_set.items])


def _acc(logits, labels) -> float:
    return 100.0 * (logits.float().argmax(-1) == labels).float().mean().item()


# ------------------------------------------------------------------------------------------------ presets, results
def test_mma_16shot_early_stopping_restores_the_best_epoch(make_cfg, tmp_path, capture_dm):
    out = tmp_path / "mma16"
    res = run(make_cfg(["experiment=mma_16shot", *TINY, "method.epochs=40"], output_dir=out))
    ex, m = res["extra"], res["metrics"]
    assert 0.0 <= m["test/acc"] <= 100.0 and res["method"] == "mma" and res["protocol"] == "fewshot"
    assert ex["mask"] == "block" and ex["closed_form"] is True and ex["lam"] == 0.2
    # early stopping (patience 5) ended the run before the 40 epochs, 5 epochs after the best one
    curve = [e["val_acc"] for e in ex["epoch_curve"]]
    best_epoch = max(range(len(curve)), key=lambda i: (curve[i], -i))  # the first best (strict improvement)
    assert ex["epochs_run"] == len(curve) < 40 and len(curve) == best_epoch + 1 + 5
    assert ex["selected_epoch"] == best_epoch and m["val/acc"] == pytest.approx(curve[best_epoch])
    # the checkpoint holds the adapter only: no text features, no encoder
    best = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    assert best["state_dict"] and all(k.startswith("adapter.") for k in best["state_dict"])
    assert best["epoch"] == best_epoch < len(curve) - 1  # training went on for 5 epochs after the best one ...
    # ... yet the test predictions are the best checkpoint's: recompute them from its weights and the run's features
    dm = capture_dm[-1]
    adapter = MultiModalAdapter(dm.backbone.embed_dim)
    adapter.load_state_dict({k.removeprefix("adapter."): v for k, v in best["state_dict"].items()})
    test = dm.eval_sets[0]
    with torch.no_grad():
        ref = adapter.logits(dm.features_of(test).float(), dm.text_classifier(test.classnames, test.templates).T,
                             dm.logit_scale)
    preds = load_file(out / "predictions.safetensors")
    assert torch.allclose(preds["test/logits"].float(), ref, atol=2e-2)
    assert m["test/acc"] == pytest.approx(_acc(ref, _labels(test)), abs=1e-3)


def test_mma_b2n_scores_each_split_on_its_own_classes(make_cfg, tmp_path, capture_dm):
    out = tmp_path / "b2n"
    res = run(make_cfg(["experiment=mma_b2n", *TINY, "method.epochs=3"], output_dir=out))
    m = res["metrics"]
    b, n = m["test_base/acc"], m["test_new/acc"]
    assert res["protocol"] == "base2new" and "val/acc" in m
    assert m["hm"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)
    splits = res["data"]["splits"]
    assert splits["train"]["classes"] == 5 and splits["test_base"]["classes"] == 5
    assert splits["test_new"]["classes"] == 5
    preds = load_file(out / "predictions.safetensors")
    assert preds["test_base/logits"].shape == (100, 5) and preds["test_new/logits"].shape == (100, 5)
    # each split is scored against its own classes' text: recompute with the restored weights
    dm = capture_dm[-1]
    adapter = MultiModalAdapter(dm.backbone.embed_dim)
    sd = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    adapter.load_state_dict({k.removeprefix("adapter."): v for k, v in sd.items()})
    base, new = dm.eval_sets
    assert base.classnames == dm.classnames and not set(new.classnames) & set(base.classnames)
    for s, acc in ((base, b), (new, n)):
        with torch.no_grad():
            ref = adapter.logits(dm.features_of(s).float(), dm.text_classifier(s.classnames, s.templates).T,
                                 dm.logit_scale)  # [100, 5]
        assert torch.allclose(preds[f"{s.name}/logits"].float(), ref, atol=2e-2)
        assert torch.equal(preds[f"{s.name}/labels"], _labels(s)) and int(_labels(s).max()) == 4  # relabelled
        assert acc == pytest.approx(_acc(ref, _labels(s)), abs=1e-3)


def test_clip_adapter_b2n_scores_new_classes_with_their_text(make_cfg, tmp_path):
    out = tmp_path / "ca"
    res = run(make_cfg(["experiment=clip_adapter_b2n", *TINY, "method.epochs=2"], output_dir=out))
    preds = load_file(out / "predictions.safetensors")
    assert preds["test_base/logits"].shape == (100, 5) and preds["test_new/logits"].shape == (100, 5)
    assert set(res["metrics"]) >= {"test_base/acc", "test_new/acc", "hm"} and res["extra"]["ratio"] == 0.2


# ------------------------------------------------------------------------------------------------ learning
def test_mma_learns_beyond_zero_shot(make_cfg, tmp_path):
    """Same seed, same features: the trained adapter beats zero-shot CLIP on test. The tiny random CLIP's image
    features are nearly parallel (cosine ≈ 0.96), so the blend weight is raised to 0.5 to make the signal clear."""
    zs = run(make_cfg(["experiment=zeroshot_16shot", *TINY], output_dir=tmp_path / "zs"))
    res = run(make_cfg(["experiment=mma_16shot", *TINY, "method.lam=0.5", "method.batch_size=32", "method.epochs=30",
                        "callbacks.early_stopping.patience=8"], output_dir=tmp_path / "mma"))
    curve = [e["val_acc"] for e in res["extra"]["epoch_curve"]]
    assert max(curve) > curve[0]
    assert res["metrics"]["test/acc"] > zs["metrics"]["test/acc"] + 5.0, (res["metrics"], zs["metrics"])


# ------------------------------------------------------------------------------------------------ noise
def test_mma_noise_is_fresh_every_epoch(make_cfg, tmp_path, capture_dm):
    """The release re-encodes every image each epoch through a transform that draws new noise: the preset caches one
    noisy view per epoch (augment.views = method.epochs) and epoch e trains on view e, so two epochs never see the
    same draw of an image (the preset used to cache one draw and reuse it every epoch)."""
    cfg = make_cfg(["experiment=mma_noise", *FDR, "protocol=fewshot", "method.epochs=3"], output_dir=tmp_path / "n")
    assert cfg.augment.views == 3 and cfg.data.view_sampling == "cycle"
    assert make_cfg(["experiment=mma_noise"]).augment.views == 100  # the recipe's epoch cap
    run(cfg)
    dm = capture_dm[-1]
    V, n, _ = dm.train_features.shape
    assert V == 3
    for a in range(V):
        for b in range(a + 1, V):  # every image's draws differ from each other
            assert not torch.allclose(dm.train_features[a], dm.train_features[b], atol=1e-4)
    loader = dm.train_dataloader()
    seen = []
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        pairs = torch.cat(list(loader.sampler))
        assert set(pairs[:, 1].tolist()) == {epoch}  # epoch e: view e for every image
        x, _ = loader.dataset[pairs[pairs[:, 0].argsort()]]
        seen.append(x)
    assert not torch.allclose(seen[0], seen[1], atol=1e-4) and not torch.allclose(seen[1], seen[2], atol=1e-4)


def test_noise_is_part_of_the_feature_key(make_cfg, tmp_path):
    store_dir = tmp_path / "store"
    common = [*FDR, f"paths.feature_dir={store_dir}", "protocol=fewshot"]  # the same images: only the noise differs
    cfg = make_cfg(["experiment=mma_noise", *common], output_dir=tmp_path / "probe")
    assert cfg.augment.noise_std == 0.1 and cfg.augment.noise_on_eval is False  # the preset's defaults

    def entries(split):
        return [e for e in FeatureStore(store_dir).entries() if e.kind == "image_features" and e.key["split"] == split]

    run(make_cfg(["experiment=mma_16shot", *common], output_dir=tmp_path / "clean"))
    run(make_cfg(["experiment=mma_noise", *common, "augment.views=1"], output_dir=tmp_path / "noisy"))
    train = entries("train")
    assert sorted(e.key["noise_std"] for e in train) == [0.0, 0.1]
    diff = {k for k in train[0].key if train[0].key[k] != train[1].key[k]}
    assert diff and diff <= {"noise_std", "seed"}  # nothing but the noise (and the seed that draws it) differs
    assert [e.key["noise_std"] for e in entries("test")] == [0.0]  # training only, by default
    # noise_on_eval=true (the release): validation and test features are noisy too, and differ from the clean ones
    run(make_cfg(["experiment=mma_noise", *common, "augment.views=1", "augment.noise_on_eval=true"],
                 output_dir=tmp_path / "release"))
    test = sorted(entries("test"), key=lambda e: e.key["noise_std"])
    assert [e.key["noise_std"] for e in test] == [0.0, 0.1] and len(entries("train")) == 2
    assert sorted(e.key["noise_std"] for e in entries("val")) == [0.0, 0.1]
    clean, noisy = (load_file(e.path)["features"].float() for e in test)
    assert clean.shape == noisy.shape and not torch.allclose(clean, noisy)


# ------------------------------------------------------------------------------------------------ bad input
def _poison(monkeypatch, fn):
    setup = CLIPDataModule.setup

    def poisoned(self, stage=None):
        ready = self._ready
        setup(self, stage)
        if not ready:
            fn(self)

    monkeypatch.setattr(CLIPDataModule, "setup", poisoned)


@pytest.mark.parametrize("case,pattern", [
    ("nan", r"MMA: the cached training features contain NaN or inf; recompute them"),
    ("width", r"MMA: the cached training features have width 48 but the backbone's embed_dim is 32"),
    ("no_classes", r"MMA: the class list of 'test_new' is empty"),
])
def test_bad_input_is_one_clear_line(make_cfg, monkeypatch, case, pattern):
    overrides = ["experiment=mma_b2n", *FDR]
    if case == "nan":
        _poison(monkeypatch, lambda dm: dm.train_features.view(-1)[3].fill_(math.nan))
    elif case == "width":
        _poison(monkeypatch, lambda dm: setattr(dm, "train_features", torch.randn(1, len(dm.train_labels), 48)))
    else:
        overrides.append("protocol.base_ratio=0.95")  # ceil(9.5) = 10 base classes: no new class left
    with pytest.raises(XmxError, match=pattern) as e:
        run(make_cfg(overrides))
    assert "\n" not in str(e.value)


def test_bad_variant_fails_before_any_feature_is_extracted(make_cfg, tmp_path):
    with pytest.raises(XmxError, match=r"method.mask='hard'; valid choices: block, bias, none"):
        run(make_cfg(["experiment=mma_16shot", *FDR, "method.mask=hard", f"paths.feature_dir={tmp_path / 's'}"]))
    assert not (tmp_path / "s" / "image_features").exists()
