"""XMAdapter reconstruction (docs/methods/xmadapter.md#reconstruction): reduction to Tip-Adapter-F, text cache, hard-sample weights, search, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from xmx.errors import XmxError
from xmx.methods.tip_adapter import TipAdapterF, build_cache, norm, search_alpha_beta
from xmx.methods.xmadapter import (GAMMA_MODES, IMG2TXT, XMAdapter, hard_sample_weights, make_pseudo_token_prompt,
                                   search_xmadapter)


def task(N=6, K=4, C=16, V=3, n_val=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = F.normalize(torch.randn(N, C, generator=g), dim=-1)
    W = F.normalize(mu + 0.6 * torch.randn(N, C, generator=g), dim=-1).T.contiguous()      # [C, N]
    y = torch.arange(N).repeat_interleave(K)
    views = 2.0 * (mu[y] + 0.5 * torch.randn(V, N * K, C, generator=g))                     # raw [V, NK, C]
    y_val = torch.arange(N).repeat(n_val)
    f_val = 2.0 * (mu[y_val] + 0.5 * torch.randn(len(y_val), C, generator=g))
    keys, values = build_cache(views, y, N)
    return dict(W=W, views=views, y=y, keys=keys, values=values, f_val=f_val, y_val=y_val, N=N, K=K)


def train(model, t, steps=6, bs=8, loss=None, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    n = t["y"].numel()
    for s in range(steps):
        idx = torch.randperm(n)[:bs]
        x = t["views"][s % t["views"].shape[0]][idx]
        opt.zero_grad()
        out = model.loss(x, t["y"][idx])
        (out[0] if isinstance(out, tuple) else out).backward()
        opt.step()
        sched.step()
    return model


@pytest.mark.parametrize("options", [dict(), dict(img2txt_proj=True, txt_keys_from="trained"),
                                     dict(img2txt="linear", learn_img2txt_temp=True)])
def test_fixed_gamma_one_kappa_zero_is_exactly_tip_adapter_f(options):
    t = task()
    tip = TipAdapterF(t["keys"], t["values"], t["W"], alpha=1.17, beta=1.0)
    xm = XMAdapter(t["keys"], t["values"], t["W"], alpha=1.17, beta=1.0, gamma_mode="fixed", gamma=1.0, kappa=0,
                   **options)
    assert torch.equal(xm(t["f_val"]), tip(t["f_val"]))
    train(tip, t)
    train(xm, t)
    assert not torch.equal(tip.adapter.weight, t["keys"])                  # the keys did move ...
    assert torch.equal(xm.adapter.weight, tip.adapter.weight)              # ... identically
    assert torch.equal(xm(t["f_val"]), tip(t["f_val"]))
    # and the search at gamma = 1 is Tip-Adapter's search on the trained keys
    a = search_xmadapter(xm, t["f_val"], t["y_val"], 7, 3, n_beta=10, n_alpha=5)
    b = search_alpha_beta(t["f_val"], t["y_val"], t["W"], tip.adapter.weight, t["values"], 7, 3, 10, 5)
    assert torch.equal(a.grid[:, 0, :, 0], b.grid) and (a.alpha, a.beta, a.gamma) == (b.alpha, b.beta, 1.0)


def test_text_branch_changes_logits_and_training_when_enabled():
    t = task()
    tip = TipAdapterF(t["keys"], t["values"], t["W"], alpha=1.17, beta=1.0)
    xm = XMAdapter(t["keys"], t["values"], t["W"], alpha=1.17, beta=1.0, gamma_mode="fixed", gamma=0.5, kappa=1)
    assert not torch.allclose(xm(t["f_val"]), tip(t["f_val"]))
    train(tip, t)
    train(xm, t)
    assert not torch.allclose(xm.adapter.weight, tip.adapter.weight)


def test_text_keys_are_g_of_mean_view_keys_recomputed_every_step():
    t = task()
    xm = XMAdapter(t["keys"], t["values"], t["W"], img2txt="text_mixture", img2txt_proj=True)
    W = t["W"]
    expected = norm(torch.softmax(100 * t["keys"] @ W, dim=-1) @ W.T)               # proj = identity at init
    assert torch.allclose(xm.text_keys(), expected, atol=1e-6)
    before = xm.text_keys().detach().clone()
    train(xm, t, steps=3)
    assert not torch.allclose(xm.img2txt.proj.weight, torch.eye(16))
    assert torch.allclose(xm.text_keys(), xm.img2txt(xm.mean_view_keys))            # from the current g ...
    assert not torch.allclose(xm.text_keys(), before)                                # ... so it changed
    # 'manual' refresh keeps a detached copy until refresh_text_keys()
    man = XMAdapter(t["keys"], t["values"], t["W"], img2txt="linear", txt_keys_refresh="manual")
    first = man.text_keys()
    assert not first.requires_grad and torch.allclose(first, norm(t["keys"]), atol=1e-6)
    with torch.no_grad():
        man.img2txt.linear.weight.mul_(2).add_(0.1)
    assert torch.equal(man.text_keys(), first)
    man.refresh_text_keys()
    assert not torch.allclose(man.text_keys(), first)


def test_hard_sample_weights_are_detached_and_bounded():
    torch.manual_seed(0)
    t = task()
    xm = XMAdapter(t["keys"], t["values"], t["W"], img2txt="linear", kappa=1.0, tau=50.0)
    with torch.no_grad():
        xm.img2txt.linear.weight.add_(0.3 * torch.randn(16, 16))                       # make the branches disagree
    loss, info = xm.loss(t["f_val"], t["y_val"])
    w = info["weights"]
    assert not w.requires_grad and w.grad_fn is None
    assert torch.all(w >= 1) and torch.all(w <= 2) and w.max() > 1.05               # non-trivial weights
    # the gradient is that of a weighted CE with constant weights: nothing flows through w
    params = [xm.adapter.weight, xm.img2txt.linear.weight]
    g_model = torch.autograd.grad(loss, params)
    logits = xm(t["f_val"])
    manual = (w.clone() * F.cross_entropy(logits, t["y_val"], reduction="none")).mean()
    g_manual = torch.autograd.grad(manual, params, retain_graph=True)
    for a, b in zip(g_model, g_manual):
        assert torch.allclose(a, b, atol=1e-7)
    # whereas letting the gradient through the weights would change it
    A_img = torch.exp(-xm.beta * (1 - xm.adapter(norm(t["f_val"]))))
    A_txt = torch.exp(-xm.beta_txt * (1 - xm.img2txt(norm(t["f_val"])) @ xm.text_keys().T))
    p_i = torch.softmax(xm.tau * A_img @ xm.values / xm.shots, -1)
    p_t = torch.softmax(xm.tau * A_txt @ xm.values / xm.shots, -1)
    w_live = 1 + 0.5 * (p_i - p_t).abs().sum(-1)
    assert torch.allclose(w_live.detach(), w, atol=1e-6)
    live = (w_live * F.cross_entropy(logits, t["y_val"], reduction="none")).mean()
    assert not torch.allclose(torch.autograd.grad(live, params[1])[0], g_model[1], atol=1e-7)
    # bounds [1, 2^kappa], reached at agreement / total disagreement
    A = torch.rand(5, 24)
    for kappa in (0.5, 1.0, 2.0, 3.0):
        w_k, d = hard_sample_weights(A, torch.rand(5, 24), t["values"], 50.0, 4.0, kappa)
        assert torch.all(w_k >= 1) and torch.all(w_k <= 2 ** kappa + 1e-6) and torch.all((d >= 0) & (d <= 1))
    same, _ = hard_sample_weights(A, A, t["values"], 50.0, 4.0, 1.0)
    assert torch.equal(same, torch.ones(5))
    a_one, a_other = torch.zeros(1, 24), torch.zeros(1, 24)
    a_one[0, 0], a_other[0, 23] = 1.0, 1.0                                              # keys of class 0 vs class 5
    far, _ = hard_sample_weights(a_one, a_other, t["values"], 1e4, 4.0, 2.0)
    assert torch.allclose(far, torch.tensor([4.0]))
    off, _ = hard_sample_weights(torch.rand(5, 24), torch.rand(5, 24), t["values"], 50.0, 4.0, 0.0)
    assert torch.equal(off, torch.ones(5))


def test_learned_gamma_is_a_sigmoid_parameter_that_trains():
    t = task()
    xm = XMAdapter(t["keys"], t["values"], t["W"], gamma_mode="learned", gamma=0.3)
    assert math.isclose(xm.gamma.item(), 0.3, rel_tol=1e-6)
    before = xm.gamma_logit.item()
    train(xm, t, steps=3)
    assert xm.gamma_logit.item() != before and 0 < xm.gamma.item() < 1
    with pytest.raises(XmxError, match="learned"):
        XMAdapter(t["keys"], t["values"], t["W"], gamma_mode="learned", gamma=1.0)


def test_search_over_beta_alpha_gamma_and_beta_txt():
    t = task(n_val=6)
    xm = XMAdapter(t["keys"], t["values"], t["W"], img2txt="linear", gamma_mode="searched")
    with torch.no_grad():
        xm.img2txt.linear.weight.add_(0.3 * torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))
    res = search_xmadapter(xm, t["f_val"], t["y_val"], beta_max=7, alpha_max=3, n_beta=6, n_alpha=4)
    assert res.grid.shape == (6, 1, 4, 11) and res.gammas[0] == 0.0 and res.gammas[-1] == 1.0
    # every cell equals the accuracy of the model set to that cell (a direct, unvectorised check)
    for i, beta in enumerate(res.betas):
        for j, alpha in enumerate(res.alphas):
            for l_, gamma in enumerate(res.gammas[::5]):
                xm.set_hparams(alpha=alpha, beta=beta, beta_txt=beta, gamma=gamma)
                acc = float((xm(t["f_val"]).argmax(-1) == t["y_val"]).double().mean() * 100)
                assert math.isclose(acc, float(res.grid[i, 0, j, 5 * l_]), abs_tol=1e-9)
    flat = res.grid.flatten()
    assert res.acc == float(flat.max()) and float(flat[int(torch.argmax(flat))]) == res.acc
    # untied beta_txt: searched jointly; chunking changes nothing
    r2 = search_xmadapter(xm, t["f_val"], t["y_val"], 7, 3, n_beta=6, n_alpha=4, betas_txt=[0.5, 2.0, 8.0])
    r3 = search_xmadapter(xm, t["f_val"], t["y_val"], 7, 3, n_beta=6, n_alpha=4, betas_txt=[0.5, 2.0, 8.0],
                          max_elements=700)
    assert r2.grid.shape == (6, 3, 4, 11) and torch.equal(r2.grid, r3.grid) and r2.beta_txt in (0.5, 2.0, 8.0)
    assert r2.acc == float(r2.grid.max())
    d = r2.as_dict()
    assert {"alpha", "beta", "beta_txt", "gamma", "val_acc", "val_acc_grid"} <= set(d)
    # a fixed gamma is not searched
    fixed = XMAdapter(t["keys"], t["values"], t["W"], gamma_mode="fixed", gamma=0.7)
    r4 = search_xmadapter(fixed, t["f_val"], t["y_val"], 7, 3, n_beta=4, n_alpha=3)
    assert r4.gammas == [pytest.approx(0.7)] and r4.grid.shape == (4, 1, 3, 1)


class FakeTextBackbone:
    """Just enough of CLIPBackbone for make_pseudo_token_prompt: a bag-of-embeddings 'text encoder'."""
    text_width = 8

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.table = torch.randn(50, 8, generator=g)
        self.proj = torch.randn(8, 16, generator=g)

    def tokenize(self, texts):
        ids = {"a": 3, "photo": 4, "of": 5, "x": 6, "y": 7, ".": 8}
        out = torch.zeros(len(texts), 10, dtype=torch.long)
        for r, s in enumerate(texts):
            toks = [1] + [ids[w] for w in s.replace(".", " .").split()] + [49]
            out[r, :len(toks)] = torch.tensor(toks)
        return out

    def token_embedding(self, tokens):
        return self.table[tokens]

    def encode_text_from_embeddings(self, emb, tokens):
        return torch.tanh(emb.sum(1)) @ self.proj


def test_pseudo_token_branch_trains_img2txt_and_metanet():
    t = task()
    bb = FakeTextBackbone()
    encode_prompt, d_tok = make_pseudo_token_prompt(bb)
    # the pseudo token replaces the placeholder word; zero token and zero shift leave only the other words
    tokens = bb.tokenize(["a photo of a x."])
    base = bb.encode_text_from_embeddings(bb.token_embedding(tokens) * (tokens != 6)[..., None], tokens)
    assert torch.allclose(encode_prompt(torch.zeros(1, d_tok), torch.zeros(1, d_tok)), base)
    xm = XMAdapter(t["keys"], t["values"], t["W"], img2txt="pseudo_token", encode_prompt=encode_prompt,
                   token_dim=d_tok, gamma=0.5)
    loss, _ = xm.loss(t["f_val"], t["y_val"])
    loss.backward()
    for p in (xm.img2txt.img2txt.net.weight, xm.img2txt.meta.net[0].weight, xm.img2txt.meta.net[2].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    with pytest.raises(XmxError, match="encode_prompt"):
        XMAdapter(t["keys"], t["values"], t["W"], img2txt="pseudo_token")


def test_bad_options_and_caches_are_refused_in_one_line():
    t = task()
    for kwargs, needles in [(dict(img2txt="clip"), ["'clip'", *IMG2TXT]),
                            (dict(gamma_mode="auto"), ["'auto'", *GAMMA_MODES]),
                            (dict(txt_keys_from="x"), ["mean_view", "trained"]),
                            (dict(gamma=1.5), ["[0, 1]"]), (dict(kappa=-1), ["kappa"])]:
        with pytest.raises(XmxError) as e:
            XMAdapter(t["keys"], t["values"], t["W"], **kwargs)
        assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)
    with pytest.raises(XmxError, match=r"cover 6 classes but the classifier W has 7"):
        XMAdapter(t["keys"], t["values"], torch.cat([t["W"], t["W"][:, :1]], 1))
    with pytest.raises(XmxError, match=r"width 32 but the features have width 16"):
        XMAdapter(torch.randn(24, 32), t["values"], t["W"])
