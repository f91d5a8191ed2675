"""CLIP-Adapter math core (docs/methods/mma.md#clip-adapter): the equations, ratio 0 = zero-shot, it learns, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import one_line_error

from xmx.methods.clip_adapter import ClipAdapter

pytestmark = pytest.mark.usefixtures("one_thread")

LN100 = math.log(100.0)




def data(B=5, N=7, C=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, C, generator=g) * 3  # raw (unnormalised) image features, as cached
    W = F.normalize(torch.randn(N, C, generator=g), dim=-1).T  # [C, N] zero-shot classifier
    return v, W


def test_structure_no_biases_and_parameter_count():
    m = ClipAdapter(512)
    linears = [x for x in m.fc if isinstance(x, torch.nn.Linear)]
    assert [(x.in_features, x.out_features) for x in linears] == [(512, 128), (128, 512)]
    assert all(x.bias is None for x in linears)
    assert sum(p.numel() for p in m.parameters()) == 2 * 512 * 128


def test_equations_against_direct_computation():
    v, W = data()
    m = ClipAdapter(64, ratio=0.2)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    w1, w2 = m.fc[0].weight, m.fc[2].weight  # [C/4, C], [C, C/4]
    a = torch.relu(torch.relu(v @ w1.T) @ w2.T)  # A(v) [B, C]
    v_ad = (0.2 * a + 0.8 * v) / (0.2 * a + 0.8 * v).norm(dim=-1, keepdim=True)
    assert torch.allclose(m(v), v_ad, atol=1e-6)
    assert torch.allclose(m.logits(v, W, LN100), 100 * v_ad @ W, atol=1e-4)
    assert (a > 0).any() and (a == 0).any()  # both ReLUs actually matter in this check


def test_ratio_zero_gives_zero_shot_logits():
    v, W = data()
    m = ClipAdapter(64, ratio=0.0)
    zero_shot = 100 * F.normalize(v, dim=-1) @ W  # docs/methods/shared.md#zero-shot-classifier
    assert torch.allclose(m.logits(v, W, LN100), zero_shot, atol=1e-4)
    assert torch.allclose(m.logits(v, W, torch.tensor(LN100)), zero_shot, atol=1e-4)


def test_learns_and_beats_zero_shot():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    C, N = 32, 8
    T = F.normalize(torch.randn(N, C, generator=g), dim=-1)  # [N, C]
    y = torch.arange(N).repeat_interleave(16)
    x = 0.4 * T[y] + 0.6 * T[(y + 1) % N] + 0.05 * torch.randn(len(y), C, generator=g)  # nearer the next class
    m = ClipAdapter(C, ratio=0.5)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    zero_shot = ((x @ T.T).argmax(-1) == y).float().mean().item()
    for _ in range(200):
        loss = F.cross_entropy(m.logits(x, T.T, LN100), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = (m.logits(x, T.T, LN100).argmax(-1) == y).float().mean().item()
    assert zero_shot <= 0.2 and acc >= zero_shot + 0.5




def test_bad_inputs():
    v, W = data()
    m = ClipAdapter(64)
    one_line_error(lambda: m(v[:, :32]), "[B, 64]")
    one_line_error(lambda: m.logits(v, W.T, LN100), "[64, N]")
    one_line_error(lambda: m.logits(v, W[:, :0], LN100), "empty", "N=0")
    bad = v.clone()
    bad[0, 0] = float("nan")
    one_line_error(lambda: m(bad), "NaN")
    bad_w = W.clone()
    bad_w[3, 1] = float("nan")
    one_line_error(lambda: m.logits(v, bad_w, LN100), "NaN")
    one_line_error(lambda: ClipAdapter(66), "reduction")
    one_line_error(lambda: ClipAdapter(64, ratio=-0.1), "ratio")
