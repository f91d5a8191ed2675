"""GDA, LP++, TaskRes and ProLIP (issue 14) against independent computations: torch.linalg for GDA's discriminant,
the zero-shot classifier for LP++ and TaskRes at their neutral settings, CLIP's own embeddings for ProLIP at its
pre-trained projection; a singular 1-shot covariance; the presets through the run loop (tiny backbone)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import one_line_error

from xmx.backbones.clip import CLIPBackbone
from xmx.methods.gda import (
    GDAMethod,
    class_means,
    gda_classifier,
    ks_precision,
    search_alpha,
    synthesize_new_classes,
)
from xmx.methods.lpp import fit_lpp, lpp_init, lpp_logits, lpp_step_sizes
from xmx.methods.prolip import fit_projection, project
from xmx.methods.taskres import TaskResHead, warmup_cosine
from xmx.methods.zeroshot import zeroshot_logits
from xmx.run import build, run

SMALL = ["backbone=tiny", "data=synthetic", "augment=tip", "augment.views=2", "shots=4", "trainer.accelerator=cpu"]


def _problem(K=4, per=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(K, d, generator=g) * 2
    y = torch.arange(K).repeat_interleave(per)
    x = F.normalize(centres[y] + torch.randn(K * per, d, generator=g), dim=-1).double()
    return x, y


# ---- GDA ----------------------------------------------------------------------------------------------------------
def test_gda_discriminant_equals_a_direct_linalg_solve(one_thread):
    x, y = _problem()
    n, d = x.shape
    mu = class_means(x, y, 4)
    W, b = gda_classifier(mu, ks_precision(x - mu[y]))
    # independent: the class means by masking, the shrunk covariance by its definition, W by a linear solve
    mu_ref = torch.stack([x[y == k].mean(0) for k in range(4)])
    c = x - mu_ref[y]
    S = torch.cov(c.T)                                               # unbiased
    sigma = ((n - 1) * S + torch.trace(S) * torch.eye(d, dtype=torch.float64)) / d
    W_ref = torch.linalg.solve(sigma, mu_ref.T)                      # [d,K]
    b_ref = math.log(1 / 4) - 0.5 * torch.einsum("kd,dk->k", mu_ref, W_ref)
    torch.testing.assert_close(W, W_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b, b_ref, rtol=1e-9, atol=1e-9)


def test_gda_one_shot_singular_covariance_stays_finite(one_thread):
    d, K = 16, 5
    g = torch.Generator().manual_seed(1)
    one = F.normalize(torch.randn(K, d, generator=g), dim=-1)
    # 1 shot: three identical "views" of each image (zero within-class scatter), then 2 distinct views (n < d)
    for x in (one.repeat(3, 1), torch.cat([one, F.normalize(one + 0.1 * torch.randn(K, d, generator=g), dim=-1)])):
        y = torch.arange(K).repeat(x.shape[0] // K)
        mu = class_means(x, y, K)
        P = ks_precision(x - mu[y])
        W, b = gda_classifier(mu, P)
        assert torch.isfinite(P).all() and torch.isfinite(W).all() and torch.isfinite(b).all()
    # the second (rank-deficient) problem: the shrinkage makes it positive definite, and the classes separate
    assert torch.linalg.eigvalsh(P).min() > 0
    assert ((one @ W + b).argmax(1) == torch.arange(K)).all()


def test_gda_alpha_search_keeps_the_first_best():
    zs = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    g = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    a, acc, curve = search_alpha(zs, g, torch.tensor([1, 0]), alphas=(0.1, 2.0, 3.0))
    assert (a, acc) == (0.1, 50.0) and [c for _, c in curve] == [50.0, 50.0, 50.0]
    a, acc, _ = search_alpha(zs, g, torch.tensor([1, 1]), alphas=(0.1, 2.0, 3.0))
    assert (a, acc) == (2.0, 100.0)


def test_gda_new_classes_synthesised_from_their_nearest_features(one_thread):
    x, _ = _problem(K=3, per=10, d=6)
    t = F.normalize(torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), dim=0)
    mu, P = synthesize_new_classes(x, t, topk=5, text_repeats=2)
    near = torch.topk(t[:, 0] @ x.T, 5).indices
    torch.testing.assert_close(mu[0], (x[near].sum(0) + 2 * t[:, 0]) / 7)
    c = x[near] - t[:, 0]
    C = c.T @ c / 4
    P0 = 6 * torch.linalg.inv(4 * C + torch.trace(C) * torch.eye(6, dtype=torch.float64))
    c1 = x[torch.topk(t[:, 1] @ x.T, 5).indices] - t[:, 1]
    C1 = c1.T @ c1 / 4
    P1 = 6 * torch.linalg.inv(4 * C1 + torch.trace(C1) * torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(P, (P0 + P1) / 2)


def test_gda_paper_selection_uses_imagenet_test():
    m = GDAMethod(selection="paper")
    val = SimpleNamespace(name="val", items=[SimpleNamespace(label=0)] * 2)
    test = SimpleNamespace(name="test", items=[SimpleNamespace(label=1)] * 2)
    W_clip = torch.eye(2)
    m.heads = {"val": (W_clip, torch.zeros(2, 2), torch.tensor([0.0, 2.0])),
               "test": (W_clip, torch.zeros(2, 2), torch.tensor([0.0, 2.0]))}
    feats = {"val": torch.tensor([[1.0, 0.0], [1.0, 0.0]]), "test": torch.tensor([[1.0, 0.0], [1.0, 0.0]])}
    dm = SimpleNamespace(name="imagenet", val_set=val, eval_sets=[test], features_of=lambda s: feats[s.name])
    m._choose_alpha(dm, torch.device("cpu"))
    assert m.search["on"] == "test" and m.alpha == 100.0   # only alpha 100 flips the zero-shot answer to class 1
    dm.name = "caltech101"
    m._choose_alpha(dm, torch.device("cpu"))
    assert m.search["on"] == "val" and m.alpha == 1e-4


# ---- LP++ ---------------------------------------------------------------------------------------------------------
def _text_for(x, y, seed=1):
    """A text classifier [d,K] that agrees with the classes (a noisy copy of the class means), seeded."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.stack([x[y == k].mean(0) for k in range(int(y.max()) + 1)])
    return F.normalize(mu + 0.3 * torch.randn(mu.shape, generator=g, dtype=mu.dtype), dim=-1).T.contiguous()


def test_lpp_with_zero_visual_weight_is_zero_shot(one_thread):
    x, y = _problem(d=8)
    x = x.float()
    T = _text_for(x, y)
    _, _, alpha = lpp_init(x, y, T, 4)
    assert (alpha > 0).all()                                    # the text agrees with the classes
    out = lpp_logits(x, torch.zeros(4, 8), torch.zeros(4), alpha, T)
    zs = zeroshot_logits(x, T, math.log(100.0))
    torch.testing.assert_close(out, zs * (alpha[0] / 100.0))
    assert torch.equal(out.argmax(1), zs.argmax(1))


def test_lpp_init_and_step_sizes_follow_the_release(one_thread):
    x, y = _problem(d=8)
    x = x.float()
    T = _text_for(x, y)
    W, b, alpha = lpp_init(x, y, T, 4, bias="zeros")
    torch.testing.assert_close(W, torch.stack([x[y == k].sum(0) for k in range(4)]))     # class sums
    own = torch.stack([(x[y == k] @ T[:, k]).mean() for k in range(4)])
    torch.testing.assert_close(alpha, torch.full((4,), 250 * float(own.mean())))
    lr_w, lr_a = lpp_step_sizes(x, T)
    assert lr_w == pytest.approx(4 * 24 / float(torch.linalg.svdvals(x.double())[0] ** 2), rel=1e-5)
    assert lr_a == pytest.approx(24 / (4 * float(((x @ T) ** 2).sum(0).max())), rel=1e-5)
    r = fit_lpp(x, y, T, 4, epochs=30, x_val=x, y_val=y, bias="zeros")
    assert r["val_acc"] == max(c["val_acc"] for c in r["curve"])
    assert r["epoch"] == max(c["epoch"] for c in r["curve"] if c["val_acc"] == r["val_acc"])  # ties: the latest
    assert not torch.equal(r["alpha"], alpha)                    # alpha took its every-10th-epoch steps


def _release_lpp_loop(x, y, T, K, epochs, alpha_grad):
    """The release's loop (methods/linear_probe_p2.py) with autograd: nn.Linear, SGD(momentum 0.9), alpha's grad
    never zeroed (``window``: zeroed every alpha_every epochs)."""
    W0, b0, a0 = lpp_init(x, y, T, K, bias="zeros")
    lr_w, lr_a = lpp_step_sizes(x, T)
    lin = torch.nn.Linear(x.shape[1], K)
    lin.weight.data, lin.bias.data = W0.clone(), b0.clone()
    alpha = a0.clone()[None].requires_grad_(True)
    opt = torch.optim.SGD(lin.parameters(), lr_w, momentum=0.9)
    for epoch in range(epochs):
        logits = lin(x) + torch.ones(x.shape[0], 1) @ alpha * (x @ T)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        if alpha_grad == "window" and epoch % 10 == 0 and alpha.grad is not None:
            alpha.grad.zero_()
        loss.backward()
        opt.step()
        if (epoch + 1) % 10 == 0:
            alpha.data -= lr_a * alpha.grad.data
    return lin.weight.detach(), lin.bias.detach(), alpha.detach()[0], float(loss.detach())


@pytest.mark.parametrize("alpha_grad", ["cumulative", "window"])
def test_lpp_written_out_gradients_equal_the_releases_autograd_loop(one_thread, alpha_grad):
    x, y = _problem(K=4, per=6, d=8)
    x = x.float()
    T = _text_for(x, y).float()
    W, b, a, loss = _release_lpp_loop(x, y, T, 4, 35, alpha_grad)
    r = fit_lpp(x, y, T, 4, epochs=35, alpha_grad=alpha_grad, bias="zeros", precision="fp32")
    assert r["epoch"] == 34 and r["matmul_dtype"] == "float32"
    torch.testing.assert_close(r["W"], W, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r["b"], b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r["alpha"], a, rtol=1e-4, atol=1e-5)
    assert r["final_loss"] == pytest.approx(loss, rel=1e-4)
    assert not torch.allclose(a, lpp_init(x, y, T, 4, bias="zeros")[2])      # alpha moved: its gradient is in play


def test_lpp_half_precision_products_stay_close_to_fp32(one_thread):
    x, y = _problem(K=6, per=8, d=32, seed=3)
    x = x.float()
    T = _text_for(x, y).float()
    full = fit_lpp(x, y, T, 6, epochs=40, bias="zeros", precision="fp32")
    half = fit_lpp(x, y, T, 6, epochs=40, bias="zeros", precision="bf16")
    assert half["matmul_dtype"] == "bfloat16" and half["W"].dtype == torch.float32      # fp32 master weights
    assert not torch.equal(half["W"], full["W"])                                          # bf16 products were used
    torch.testing.assert_close(half["W"], full["W"], rtol=0.05, atol=0.05)
    assert torch.equal(lpp_logits(x, half["W"], half["b"], half["alpha"], T).argmax(1),
                       lpp_logits(x, full["W"], full["b"], full["alpha"], T).argmax(1))


# ---- TaskRes ------------------------------------------------------------------------------------------------------
_DMS: dict = {}


def _setup_dm(make_cfg, overrides):
    """A set-up datamodule per override list, shared by this module's tests (extraction is the slow part)."""
    key = tuple(overrides)
    if key not in _DMS:
        cfg = make_cfg(SMALL + overrides)
        L.seed_everything(int(cfg.seed), verbose=False)
        dm = build(cfg.data, backbone=build(cfg.backbone), _convert_="all")
        dm.setup("test")
        _DMS[key] = dm
    return _DMS[key]


def test_taskres_alpha_zero_is_zero_shot(make_cfg, one_thread):
    dm = _setup_dm(make_cfg, ["method=zeroshot", "features.precision=fp32"])
    tmpl = [dm.templates[0]]
    base = dm.text_classifier(dm.classnames, tmpl, normalize=False)
    W = dm.text_classifier(dm.classnames, tmpl)
    assert not torch.allclose(base.norm(dim=0), torch.ones(base.shape[1]))  # the base really is raw
    f = dm.features_of(dm.eval_sets[0])
    head = TaskResHead(base, alpha=0.0)
    torch.nn.init.normal_(head.residual)                        # any residual: alpha = 0 switches it off
    zs = zeroshot_logits(f, W, dm.logit_scale)
    torch.testing.assert_close(head(f, dm.logit_scale), zs, rtol=1e-5, atol=1e-5)
    head.alpha = 0.5
    assert not torch.allclose(head(f, dm.logit_scale), zs, atol=1e-3)


def test_taskres_schedule_is_dassl_warmup_then_cosine():
    assert warmup_cosine(0, 200, 2e-3) == pytest.approx(1e-5 / 2e-3)
    assert warmup_cosine(1, 200, 2e-3) == pytest.approx(1.0)  # Dassl's recount: the cosine's step 0 after the warm-up
    assert warmup_cosine(2, 200, 2e-3) == pytest.approx(0.5 * (1 + math.cos(math.pi / 200)))
    assert warmup_cosine(101, 200, 2e-3) == pytest.approx(0.5)


# ---- ProLIP -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["xmx-tiny", "xmx-tiny-rn"])
def test_pre_projection_features_reproduce_the_embeddings(arch, one_thread):
    torch.manual_seed(0)
    bb = CLIPBackbone(arch, None)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        raw, pre = bb.encode_image(x), bb.encode_image(x, project=False)
    P, b = bb.image_projection()
    assert pre.shape[1] == bb.pre_projection_dim != raw.shape[1] or arch == "xmx-tiny"
    torch.testing.assert_close(project(pre, P, b), raw, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        assert torch.equal(bb.encode_image(x), raw)             # the projection is back in place


def test_prolip_at_pretrained_projection_equals_cached_features(make_cfg, one_thread):
    dm_raw = _setup_dm(make_cfg, ["method=zeroshot", "features.precision=fp32"])
    dm_pre = _setup_dm(make_cfg, ["method=prolip", "features.precision=fp32"])
    assert dm_pre.feature_output == "pre_projection" and dm_raw.feature_output == "raw"
    P0, b = dm_pre.backbone.image_projection()
    assert dm_pre.train_features.shape[-1] == P0.shape[0] != dm_raw.train_features.shape[-1]
    torch.testing.assert_close(project(dm_pre.train_features.float(), P0, b), dm_raw.train_features.float(),
                               rtol=0, atol=1e-6)
    for s_raw, s_pre in zip([dm_raw.val_set, *dm_raw.eval_sets], [dm_pre.val_set, *dm_pre.eval_sets]):
        torch.testing.assert_close(project(dm_pre.features_of(s_pre), P0, b), dm_raw.features_of(s_raw),
                                   rtol=0, atol=1e-6)
    kinds = {p.name for p in Path(dm_pre.store.root).iterdir() if p.is_dir()}
    assert {"image_features", "image_features_preproj"} <= kinds   # their own entry kind


def test_prolip_regulariser_holds_the_projection_near_its_start(one_thread):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 20, 12, generator=g)
    y = torch.arange(4).repeat(5)
    P0 = torch.randn(12, 6, generator=g) * 0.3
    W = F.normalize(torch.randn(6, 4, generator=g), dim=0)
    free, _ = fit_projection(z, y, P0, None, W, lr=1e-2, lam=0.0, epochs=30)
    held, _ = fit_projection(z, y, P0, None, W, lr=1e-2, lam=100.0, epochs=30)
    assert (held - P0).norm() < 0.5 * (free - P0).norm()
    same, _ = fit_projection(z, y, P0, None, W, lr=0.0, lam=1.0, epochs=3)
    assert torch.equal(same, P0)


# ---- through the run loop -----------------------------------------------------------------------------------------
def test_presets_run_and_record_their_selection(make_cfg, tmp_path, one_thread):
    # new_topk: the release's 64 exceeds this tiny run's training features (refused, never clamped): 4 here
    gda = run(make_cfg(["experiment=gda_b2n"] + SMALL + ["shots=1", "method.new_topk=4"], output_dir=tmp_path / "gda"))
    assert gda["extra"]["searched_on"] == "val" and gda["extra"]["selection"] == "val"
    assert all(math.isfinite(v) for v in gda["metrics"].values()) and "test_new/acc" in gda["metrics"]
    gda1 = run(make_cfg(["experiment=gda_16shot"] + SMALL + ["shots=1", "augment.views=1", "selection=paper"],
                        output_dir=tmp_path / "gda1"))       # 1 shot, 1 view: zero scatter, still finite
    assert math.isfinite(gda1["metrics"]["test/acc"])
    # paper selection is recorded; only ImageNet searches on test in the release, so synthetic stays on val
    assert gda1["selection"] == "paper" and gda1["extra"]["selection"] == "paper"
    assert gda1["extra"]["searched_on"] == "val"
    tr = run(make_cfg(["experiment=taskres_16shot"] + SMALL + ["method.epochs=3"], output_dir=tmp_path / "tr"))
    assert tr["extra"]["selected_epoch"] == 2 and tr["extra"]["selected_by"].startswith("last epoch")
    assert tr["config"]["method"]["optimizer"]["lr"] == 2e-3 and tr["extra"]["alpha"] == 0.5
    pl = run(make_cfg(["experiment=prolip_b2n"] + SMALL + ["method.epochs=3"], output_dir=tmp_path / "pl"))
    assert pl["extra"]["chosen"]["lambda"] == 1 / 4 and pl["extra"]["fit"]["views"] == 2   # 1/N, N = 4 shots


def test_taskres_tables_resolve_from_shots_and_dataset(make_cfg):
    cfg = make_cfg(["experiment=taskres_16shot", "data=imagenet", "shots=4"])
    assert cfg.method.epochs == 100 and cfg.trainer.max_epochs == 100 and cfg.method.optimizer.lr == 2e-4
    cfg = make_cfg(["experiment=taskres_16shot", "data=oxford_flowers"])
    assert cfg.method.epochs == 200 and cfg.method.alpha == 1.0 and cfg.method.optimizer.lr == 2e-3


def test_selection_paper_is_gda_only(make_cfg, tmp_path):
    for m in ("lpp", "taskres", "prolip"):  # their releases select on validation or not at all: refused before work
        one_line_error(lambda: run(make_cfg(SMALL + [f"method={m}", "selection=paper"], output_dir=tmp_path / m)),
                       "selection=paper", "selection=val")


def test_bad_keys_fail_in_one_line():
    one_line_error(lambda: GDAMethod(covariance="shrunk"), "method.covariance", "ks")
    one_line_error(lambda: GDAMethod(selection="test"), "selection", "paper")
    from xmx.methods.lpp import LPPMethod
    from xmx.methods.prolip import ProLIPMethod
    one_line_error(lambda: LPPMethod(alpha_grad="sum"), "method.alpha_grad")
    one_line_error(lambda: ProLIPMethod(feature_output="raw"), "method.feature_output=pre_projection")
    one_line_error(lambda: ProLIPMethod(lambda_rule="1/N"), "method.lambda_rule", "inv_shots")


def test_lpp_auto_precision_follows_the_cpu(tmp_path, monkeypatch):
    """precision=auto: bf16 only on a CPU with native bf16 instructions (emulated bf16 is ~5x slower than fp32 on an
    AVX2-only EPYC), else fp32; the choice and its reason are recorded."""
    import xmx.methods.lpp as lpp
    plain, native = tmp_path / "plain", tmp_path / "native"
    plain.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    native.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16\n")
    assert lpp.cpu_bf16_flags(str(plain)) == [] and lpp.cpu_bf16_flags(str(native)) == ["avx512_bf16", "amx_bf16"]
    assert lpp.cpu_bf16_flags(str(tmp_path / "absent")) == []
    for flags, dtype in (([], torch.float32), (["avx512_bf16"], torch.bfloat16)):
        monkeypatch.setattr(lpp, "cpu_bf16_flags", lambda flags=flags: flags)
        h, why = lpp.matmul_choice("auto", "cpu")
        assert h == dtype and ("no native bf16" in why) == (not flags)
        x, y = _problem(K=3, per=4, d=8, seed=1)
        r = lpp.fit_lpp(x.float(), y, _text_for(x, y).float(), 3, epochs=2, precision="auto")
        assert r["matmul_dtype"] == str(dtype).removeprefix("torch.") and r["matmul_dtype_why"] == why
    assert lpp.matmul_choice("auto", "cuda")[0] == torch.float16
    assert lpp.matmul_choice("bf16", "cpu") == (torch.bfloat16, "method.precision")
