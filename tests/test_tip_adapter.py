"""Tip-Adapter / Tip-Adapter-F math cores (docs/methods/tip_adapter.md#the-cache-model-and-its-search): cache, logits, validation search, training, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import one_line_error

from xmx.methods.tip_adapter import (TIP_DATASETS, TIP_DEFAULT, TipAdapter, TipAdapterF, accuracy, build_cache,
                                     search_alpha_beta, search_grid, tip_dataset_config, tip_logits)


def make_task(N=10, K=8, C=48, V=4, n_val=8, n_test=40, text_noise=1.2, feat_noise=1.0, seed=0, dtype=torch.float32):
    """Class-structured random 'CLIP features': class centres mu_c, an imperfect text classifier near them, raw
    (unnormalised, scaled) training views and val/test features around the centres."""
    g = torch.Generator().manual_seed(seed)
    mu = F.normalize(torch.randn(N, C, generator=g), dim=-1)
    W = F.normalize(mu + text_noise * torch.randn(N, C, generator=g) / math.sqrt(C), dim=-1).T.contiguous()

    def sample(labels, views=None):
        shape = (views, len(labels), C) if views else (len(labels), C)
        x = mu[labels] + feat_noise * torch.randn(*shape, generator=g) / math.sqrt(C)
        return 3.0 * x  # raw encoder outputs are not unit vectors

    y_tr = torch.arange(N).repeat_interleave(K)
    y_val, y_te = torch.arange(N).repeat(n_val), torch.arange(N).repeat(n_test)
    return dict(W=W.to(dtype), views=sample(y_tr, V).to(dtype), y_tr=y_tr, f_val=sample(y_val).to(dtype),
                y_val=y_val, f_te=sample(y_te).to(dtype), y_te=y_te, N=N)


def test_build_cache_means_raw_views_then_normalises():
    views = torch.randn(3, 6, 5) * torch.tensor([1.0, 10.0, 0.1])[:, None, None]
    labels = torch.tensor([0, 0, 1, 2, 2, 1])
    keys, values = build_cache(views, labels, 4)
    mean = views.mean(0)
    assert torch.allclose(keys, mean / mean.norm(dim=-1, keepdim=True))
    # averaging normalised views would give another answer: the order matters
    alt = F.normalize(F.normalize(views, dim=-1).mean(0), dim=-1)
    assert not torch.allclose(keys, alt, atol=1e-3)
    assert values.dtype == torch.float32 and values.shape == (6, 4)
    assert torch.equal(values.argmax(1), labels) and torch.equal(values.sum(1), torch.ones(6))
    assert values[:, 3].sum() == 0  # a class without cached images has an all-zero column


def test_tip_logits_matches_per_sample_loop():
    t = make_task(N=5, K=3, C=12, V=2, dtype=torch.float64)
    keys, values = build_cache(t["views"], t["y_tr"], t["N"])
    keys = keys + 0.05 * torch.randn_like(keys)  # fine-tuned keys are not unit vectors: must be used as given
    keys, values, W = keys.double(), values.double(), t["W"]
    f = t["f_val"][:7]
    alpha, beta = 1.7, 5.3
    got = tip_logits(f, W, keys, values, alpha, beta)
    ref = torch.zeros(f.shape[0], t["N"], dtype=torch.float64)
    for b in range(f.shape[0]):
        fb = f[b] / math.sqrt(float((f[b] ** 2).sum()))
        for n in range(t["N"]):
            cache = sum(math.exp(-beta * (1 - float(fb @ keys[k]))) * float(values[k, n]) for k in range(len(keys)))
            ref[b, n] = 100 * float(fb @ W[:, n]) + alpha * cache
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-9)
    # the modules compute the same thing; Tip-Adapter-F starts where Tip-Adapter is
    assert torch.allclose(TipAdapter(keys, values, W, alpha, beta).double()(f), ref, atol=1e-9)
    assert torch.allclose(TipAdapterF(keys, values, W, alpha, beta).double()(f), ref, atol=1e-9)


def test_search_grid_is_the_authors_grid_exactly():
    betas = search_grid(7, 200)
    assert len(betas) == 200 and betas[0] == 0.1 and max(betas) < 7
    assert betas == [0.1 + i * (7 - 0.1) / 200 for i in range(200)]
    assert search_grid(3, 20)[19] == 0.1 + 19 * (3 - 0.1) / 20


def _brute_force(t, keys, values, betas, alphas):
    """The original double loop: strict '>' keeps the first best pair in beta-major order."""
    best, grid = (-1.0, None, None), torch.zeros(len(betas), len(alphas), dtype=torch.float64)
    for i, beta in enumerate(betas):
        for j, alpha in enumerate(alphas):
            grid[i, j] = acc = accuracy(tip_logits(t["f_val"], t["W"], keys, values, alpha, beta), t["y_val"])
            if acc > best[0]:
                best = (acc, alpha, beta)
    return best, grid


def test_search_equals_brute_force_double_loop_with_beta_major_ties():
    t = make_task(N=6, K=4, C=16, V=2, n_val=3, text_noise=3.0, seed=0, dtype=torch.float64)
    t["W"] = 0.1 * t["W"]  # soften the zero-shot margins so that the cache decides (a varied grid)
    keys, values = build_cache(t["views"], t["y_tr"], t["N"])
    keys, values = keys.double(), values.double()
    res = search_alpha_beta(t["f_val"], t["y_val"], t["W"], keys, values, beta_max=9, alpha_max=6, n_beta=12,
                            n_alpha=7)
    (acc, alpha, beta), grid = _brute_force(t, keys, values, search_grid(9, 12), search_grid(6, 7))
    assert torch.allclose(res.grid, grid)
    assert (res.alpha, res.beta, res.acc) == (alpha, beta, pytest.approx(acc))
    # the constructed problem has a non-trivial optimum, with ties, that is not the first pair
    assert (grid == grid.max()).sum() > 1 and grid.max() > grid[0, 0]
    # chunking (tiny memory budget) changes nothing
    small = search_alpha_beta(t["f_val"], t["y_val"], t["W"], keys, values, 9, 6, 12, 7, max_elements=500)
    assert torch.equal(small.grid, res.grid) and (small.alpha, small.beta) == (res.alpha, res.beta)
    d = res.as_dict()
    assert d["alpha"] == res.alpha and len(d["val_acc_grid"]) == 12 and len(d["val_acc_grid"][0]) == 7


def test_search_finds_the_known_optimum_and_first_pair_on_ties():
    # two classes, one val image per class; each image is also its own cache key (affinity 1 at every beta),
    # the other key is orthogonal (affinity exp(-beta)). Zero-shot W prefers the wrong class for image 0 by
    # a margin of 100*(0.6-0.4)=20 logits, and the right one (class 1) for image 1, which the cache confirms:
    # image 0 correct  <=>  alpha (1 - e^-beta) > 20;  image 1 is correct for every pair.
    f = torch.eye(2, 3, dtype=torch.float64)                      # [2, C=3]
    W = torch.tensor([[0.4, 0.6], [0.4, 0.6], [0.0, 0.0]], dtype=torch.float64)  # [C, N]
    keys, values = f.clone(), torch.eye(2, dtype=torch.float64)
    y = torch.tensor([0, 1])
    res = search_alpha_beta(f, y, W, keys, values, beta_max=5, alpha_max=50, n_beta=10, n_alpha=10)
    betas, alphas = search_grid(5, 10), search_grid(50, 10)
    ok = [(i, j) for i, b in enumerate(betas) for j, a in enumerate(alphas) if a * (1 - math.exp(-b)) > 20]
    i, j = ok[0]                                                   # first 100 % pair in beta-major order
    assert res.acc == 100.0 and (res.beta, res.alpha) == (betas[i], alphas[j])
    assert i > 0 and j > 0                                         # not the trivial first cell
    assert res.grid[0, 0] == 50.0
    # an uninformative cache (all pairs tie): the very first pair wins
    flat = search_alpha_beta(f, y, W, keys, torch.zeros(2, 2, dtype=torch.float64), 5, 50, 10, 10)
    assert (flat.beta, flat.alpha) == (betas[0], alphas[0]) and torch.all(flat.grid == 50.0)


def test_tip_adapter_f_improves_over_tip_adapter():
    torch.manual_seed(0)
    # a weak zero-shot classifier (noisy class texts) that the cache has to correct
    t = make_task(N=10, K=8, C=48, V=4, n_test=40, text_noise=4.0, feat_noise=1.0, seed=1)
    keys, values = build_cache(t["views"], t["y_tr"], t["N"])
    tip = TipAdapter(keys, values, t["W"], alpha=3.0, beta=1.0)
    model = TipAdapterF(keys, values, t["W"], alpha=3.0, beta=1.0)
    epochs, bs = 20, 16
    n = t["y_tr"].numel()
    steps = epochs * math.ceil(n / bs)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    assert [p for p in model.parameters()] == [model.adapter.weight]  # only the keys train
    for ep in range(epochs):
        x_all = t["views"][ep % t["views"].shape[0]]                  # one cached view per epoch
        for idx in torch.randperm(n).split(bs):
            opt.zero_grad()
            model.loss(x_all[idx], t["y_tr"][idx]).backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        acc_tip = accuracy(tip(t["f_te"]), t["y_te"])
        acc_f = accuracy(model(t["f_te"]), t["y_te"])
        train_tip = F.cross_entropy(tip(t["views"].flatten(0, 1)), t["y_tr"].repeat(4))
        train_f = F.cross_entropy(model(t["views"].flatten(0, 1)), t["y_tr"].repeat(4))
    assert not torch.equal(model.adapter.weight, keys)
    assert train_f < train_tip
    assert acc_f > acc_tip + 2.0, (acc_tip, acc_f)
    assert torch.equal(model.values, values) and torch.equal(model.W, t["W"])  # values and W never move


def test_alpha_beta_are_buffers_restored_from_a_checkpoint():
    t = make_task(N=3, K=2, C=8, V=1)
    keys, values = build_cache(t["views"], t["y_tr"], 3)
    a = TipAdapterF(keys, values, t["W"])
    a.set_alpha_beta(2.5, 4.0)
    b = TipAdapterF(keys, values, t["W"])
    b.load_state_dict(a.state_dict())
    assert float(b.alpha) == 2.5 and float(b.beta) == 4.0


def test_per_dataset_table_follows_the_spec():
    names = {"imagenet", "caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "oxford_flowers", "oxford_pets",
             "stanford_cars", "sun397", "ucf101"}
    assert set(TIP_DATASETS) == names
    spec = {"imagenet": (7, 3, 1.17), "caltech101": (12, 5, 3), "dtd": (13, 13, 2), "eurosat": (12, 10, 2),
            "fgvc_aircraft": (30, 30, 5), "food101": (10, 10, 1.17), "oxford_flowers": (50, 50, 10),
            "oxford_pets": (7, 3, 1.17), "stanford_cars": (20, 10, 3), "sun397": (12, 10, 1.17),
            "ucf101": (7, 3, 3)}
    for name, (bmax, amax, a0) in spec.items():
        e = tip_dataset_config(name)
        assert (e["beta_max"], e["alpha_max"], e["init_alpha"], e["init_beta"]) == (bmax, amax, a0, 1.0)
        assert e["epochs"] == (100 if name == "eurosat" else 20) and (e["n_beta"], e["n_alpha"]) == (200, 20)
    assert tip_dataset_config("synthetic") == TIP_DEFAULT
    assert tip_dataset_config("imagenet_sketch") == TIP_DATASETS["imagenet"]
    tip_dataset_config("dtd")["beta_max"] = -1  # a copy: the table is not mutated
    assert TIP_DATASETS["dtd"]["beta_max"] == 13




def test_bad_caches_are_refused_naming_both_sizes():
    t = make_task(N=4, K=2, C=8, V=1)
    keys, values = build_cache(t["views"], t["y_tr"], 4)
    W5 = torch.cat([t["W"], t["W"][:, :1]], dim=1)                   # a classifier for 5 classes
    one_line_error(lambda: tip_logits(t["f_val"], W5, keys, values, 1, 1), "4 classes", "has 5")
    one_line_error(lambda: TipAdapterF(keys, values, W5), "4 classes", "has 5")
    one_line_error(lambda: search_alpha_beta(t["f_val"], t["y_val"], W5, keys, values, 7, 3, 4, 4), "4", "5")
    other = torch.randn(8, 16)                                       # keys from a 16-wide backbone
    one_line_error(lambda: TipAdapter(other, values, t["W"]), "width 16", "width 8", "backbone")
    one_line_error(lambda: TipAdapterF(keys, values, t["W"])(torch.randn(2, 16)), "(2, 16)", "8")
    one_line_error(lambda: build_cache(t["views"], t["y_tr"], 3), "0..3", "3")
    one_line_error(lambda: build_cache(t["views"], t["y_tr"][:-1], 4), "label")
    one_line_error(lambda: search_alpha_beta(t["f_val"][:0], t["y_val"][:0], t["W"], keys, values, 7, 3), "empty")
