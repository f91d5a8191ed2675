"""MMA math core (docs/methods/mma.md#specification): fast block path == dense masked attention, mask semantics, counts, learning, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import one_line_error

from xmx.errors import XmxError
from xmx.methods.mma import BLOCKS, MASKS, SAMPLERS, MultiModalAdapter, attention_mask

pytestmark = pytest.mark.usefixtures("one_thread")

LN100 = math.log(100.0)




def n_params(m):
    return sum(p.numel() for p in m.parameters())


def randomise(m, seed=0, std=0.1):
    """Random weights *and* non-zero biases (MHA initialises its biases to 0, which would hide bias bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return m.eval()


def feats(B, N, C, seed=1):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(B, C, generator=g), dim=-1)  # [B, C]
    t = F.normalize(torch.randn(N, C, generator=g), dim=-1)  # [N, C]
    return v, t


# ---------------------------------------------------------------- parameter counts
def test_parameter_count_default_c512():
    m = MultiModalAdapter(512)
    assert n_params(m) == 197_760
    assert isinstance(m.attn, torch.nn.MultiheadAttention)
    assert m.attn.batch_first and m.attn.dropout == 0.0 and m.attn.in_proj_bias is not None


def test_parameter_count_bottleneck32_c512():
    assert n_params(MultiModalAdapter(512, sampler="bottleneck32")) == 107_712


def test_transformer_block_uses_pytorch_defaults():
    m = MultiModalAdapter(512, block="transformer")
    assert isinstance(m.attn, torch.nn.TransformerEncoderLayer)
    assert m.attn.linear1.out_features == 2048 and m.attn.dropout.p == 0.1
    assert m.attn.self_attn.embed_dim == 128 and m.attn.self_attn.num_heads == 4


# ---------------------------------------------------------------- fast block path == dense masked MHA
@pytest.mark.parametrize("B,N,C", [(1, 1, 64), (3, 2, 64), (8, 37, 64), (5, 100, 512)])
def test_block_fast_path_equals_dense(B, N, C):
    m = randomise(MultiModalAdapter(C), seed=B + N)
    v, t = feats(B, N, C, seed=N)
    img_fast, txt_fast = m(v, t)
    img_dense, txt_dense = m.forward_dense(v, t)
    assert img_fast.shape == (B, C) and txt_fast.shape == (B, N, C)
    assert (img_fast - img_dense).abs().max() <= 1e-5
    assert (txt_fast - txt_dense).abs().max() <= 1e-5
    # logits on the cosine scale (s = 1) and at CLIP's s = 100 (same 1e-5 tolerance on the cosine)
    assert (m.logits(v, t, 0.0) - m.logits_dense(v, t, 0.0)).abs().max() <= 1e-5
    assert (m.logits(v, t, LN100) - m.logits_dense(v, t, LN100)).abs().max() <= 1e-5 * 100
    # and the closed form is not a lucky coincidence: it matches <v', t'> from the adapted features themselves
    assert torch.allclose(m.logits(v, t, 0.0), torch.einsum("bc,bnc->bn", img_dense, txt_dense), atol=1e-5)


def test_block_fast_path_gradients_equal_dense():
    B, N, C = 6, 11, 64
    m = randomise(MultiModalAdapter(C), seed=3)
    v, t = feats(B, N, C, seed=4)
    y = torch.arange(B) % N
    grads = []
    for fn in (m.logits, m.logits_dense):
        m.zero_grad()
        F.cross_entropy(fn(v, t, LN100), y).backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6), k
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_image_only_ablation_fast_equals_dense_and_text_frozen():
    B, N, C = 4, 9, 64
    m = randomise(MultiModalAdapter(C, adapt_text=False), seed=5)
    v, t = feats(B, N, C, seed=6)
    img, txt = m(v, t)
    assert torch.allclose(txt, t.unsqueeze(0).expand(B, N, C), atol=1e-7)  # text passes through unchanged
    assert (m.logits(v, t, LN100) - 100 * img @ t.T).abs().max() <= 1e-5 * 100
    assert (m.logits(v, t, 0.0) - m.logits_dense(v, t, 0.0)).abs().max() <= 1e-5


def test_fast_logits_never_save_quadratic_or_bnc_tensors():
    """The fast path keeps O(B·N + (B+N)·C) activations for backward; the dense one the (N+1)² scores."""
    B, N, C = 8, 50, 64
    m = randomise(MultiModalAdapter(C), seed=7).train()
    v, t = feats(B, N, C)

    def largest_saved(fn):
        sizes = []

        def pack(x):
            sizes.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn(v, t, LN100).sum()
        return max(sizes)

    assert largest_saved(m.logits) < B * N * C // 4  # nothing near [B, N, C] nor [B, H, N+1, N+1]
    assert largest_saved(m.logits_dense) >= B * N * C  # the dense reference holds the [B, N, C] text tensor


# ---------------------------------------------------------------- mask semantics
def test_attention_mask_values():
    n = 3
    blk, bias, none = (attention_mask(n, k) for k in MASKS)
    img = n  # the image is the last position
    for i in range(n + 1):
        for j in range(n + 1):
            cross = (i == img) != (j == img)
            assert blk[i, j] == (0.0 if cross else float("-inf"))
            assert bias[i, j] == (1.0 if cross else 0.0)
            assert none[i, j] == 0.0


def test_block_attention_weights_who_sees_whom():
    B, N, C = 3, 6, 64
    m = randomise(MultiModalAdapter(C), seed=8)
    v, t = feats(B, N, C)
    _, _, w = m.raw_attention_dense(v, t, need_weights=True)  # [B, H, N+1, N+1]
    assert w.shape == (B, 4, N + 1, N + 1)
    # each text row: all weight on the image key
    assert torch.allclose(w[:, :, :N, N], torch.ones(B, 4, N))
    assert w[:, :, :N, :N].abs().max() == 0
    # the image row: a distribution over the N texts, nothing on itself
    assert w[:, :, N, N].abs().max() == 0
    assert (w[:, :, N, :N] > 0).all() and torch.allclose(w[:, :, N, :N].sum(-1), torch.ones(B, 4))


@pytest.mark.parametrize("mask", ["bias", "none"])
def test_soft_masks_weights_are_softmax_of_mask(mask):
    """With zero query/key projections every score is 0, so the weights are exactly softmax(M) per row."""
    B, N, C = 2, 5, 64
    m = randomise(MultiModalAdapter(C, mask=mask), seed=9)
    with torch.no_grad():
        D = m.hidden
        m.attn.in_proj_weight[: 2 * D].zero_()
        m.attn.in_proj_bias[: 2 * D].zero_()
    v, t = feats(B, N, C)
    _, _, w = m.raw_attention_dense(v, t, need_weights=True)  # [B, H, N+1, N+1]
    expected = attention_mask(N, mask).softmax(-1)  # [N+1, N+1]
    assert torch.allclose(w, expected.expand_as(w), atol=1e-6)
    if mask == "bias":  # cross-modal pairs get e times the weight of same-modality pairs
        assert torch.allclose(w[0, 0, 0, N] / w[0, 0, 0, 1], torch.tensor(math.e))
        assert torch.allclose(w[0, 0, N, 0] / w[0, 0, N, N], torch.tensor(math.e))


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("mask", MASKS)
def test_perturbation_who_sees_whom(mask, block):
    """Change text j: under `block` no other text row changes (texts see only the image); otherwise they do.
    Change the image: every row changes under every mask."""
    B, N, C, j = 2, 5, 64, 2
    m = randomise(MultiModalAdapter(C, mask=mask, block=block), seed=10, std=0.3)
    v, t = feats(B, N, C)
    t2 = t.clone()
    t2[j] = F.normalize(torch.randn(C), dim=-1)
    o_img, o_txt, _ = m.raw_attention_dense(v, t)
    p_img, p_txt, _ = m.raw_attention_dense(v, t2)
    others = [c for c in range(N) if c != j]
    other_change = (o_txt[:, others] - p_txt[:, others]).abs().max()
    if mask == "block":
        assert other_change <= 1e-6
    else:
        assert other_change > 1e-4
    assert (o_img - p_img).abs().max() > 1e-4  # the image row always sees the texts
    if mask == "block" and block == "mha":  # not even its own text changes a text row: it sees only the image
        assert (o_txt[:, j] - p_txt[:, j]).abs().max() <= 1e-6
    v2 = F.normalize(v + 0.5 * torch.randn(B, C), dim=-1)
    q_img, q_txt, _ = m.raw_attention_dense(v2, t)
    assert (q_txt - o_txt).abs().amax(dim=(0, 2)).min() > 1e-4  # every text row sees the image


def test_block_text_rows_identical_for_every_class():
    """The consequence of the block mask (docs/methods/mma.md#the-mask), reproduced: under `block` the raw O_txt[b, c] does not depend on the class c."""
    B, N, C = 4, 13, 64
    m = randomise(MultiModalAdapter(C), seed=11, std=0.3)
    v, t = feats(B, N, C)
    _, o_txt, _ = m.raw_attention_dense(v, t)  # [B, N, C]
    assert (o_txt - o_txt[:, :1]).abs().max() <= 1e-6
    assert (o_txt[0, 0] - o_txt[1, 0]).abs().max() > 1e-4  # but it does depend on the image
    _, o_fast = m.raw_attention_block(v, t)  # [B, C]
    assert (o_fast - o_txt[:, 0]).abs().max() <= 1e-5 * o_txt.abs().max()
    # under `none` it does depend on the class
    m_none = randomise(MultiModalAdapter(C, mask="none"), seed=11, std=0.3)
    _, o_none, _ = m_none.raw_attention_dense(v, t)
    assert (o_none - o_none[:, :1]).abs().max() > 1e-4


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("mask", MASKS)
def test_every_variant_forward_and_logits(mask, sampler):
    B, N, C = 3, 4, 128 if sampler == "bottleneck32" else 64
    m = randomise(MultiModalAdapter(C, mask=mask, sampler=sampler), seed=12)
    v, t = feats(B, N, C)
    img, txt = m(v, t)
    assert img.shape == (B, C) and txt.shape == (B, N, C)
    assert torch.allclose(img.norm(dim=-1), torch.ones(B)) and torch.allclose(txt.norm(dim=-1), torch.ones(B, N))
    logits = m.logits(v, t, LN100)
    assert logits.shape == (B, N)
    assert torch.allclose(logits, 100 * torch.einsum("bc,bnc->bn", img, txt), atol=1e-4)


def test_lam_zero_is_zero_shot():
    B, N, C = 3, 6, 64
    m = randomise(MultiModalAdapter(C, lam=0.0), seed=13)
    v, t = feats(B, N, C)
    assert torch.allclose(m.logits(v, t, LN100), 100 * v @ t.T, atol=1e-4)


# ---------------------------------------------------------------- it learns
def test_learns_a_task_zero_shot_gets_wrong():
    """Each image lies 60 % of the way from its class text towards the next class's text: zero-shot picks the
    wrong class; a few hundred Adam steps of MMA (the released lr 0.01, wd 1e-4) recover held-out images."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    C, N, a = 32, 8, 0.6
    T = F.normalize(torch.randn(N, C, generator=g), dim=-1)  # [N, C]

    def images(per_class):
        y = torch.arange(N).repeat_interleave(per_class)
        x = (1 - a) * T[y] + a * T[(y + 1) % N] + 0.05 * torch.randn(len(y), C, generator=g)
        return F.normalize(x, dim=-1), y  # [K, C], [K]

    x_tr, y_tr = images(16)
    x_te, y_te = images(8)
    zero_shot = ((x_te @ T.T).argmax(-1) == y_te).float().mean().item()

    m = MultiModalAdapter(C)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(200):
        loss = F.cross_entropy(m.logits(x_tr, T, LN100), y_tr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (m.logits(x_te, T, LN100).argmax(-1) == y_te).float().mean().item()
    assert zero_shot <= 0.2
    assert acc >= 0.7 and acc >= zero_shot + 0.5




@pytest.mark.parametrize("method", ["forward", "logits", "forward_dense"])
def test_bad_inputs(method):
    C = 64
    m = MultiModalAdapter(C)
    v, t = feats(2, 3, C)
    call = (lambda a, b: getattr(m, method)(a, b, LN100)) if method == "logits" else getattr(m, method)
    one_line_error(lambda: call(v[:, :32], t), "image", "32", "dim=64")
    one_line_error(lambda: call(v, t[:, :48]), "text", "48", "dim=64")
    one_line_error(lambda: call(v, t[:0]), "empty", "N=0")
    bad = v.clone()
    bad[1, 5] = float("nan")
    one_line_error(lambda: call(bad, t), "image", "NaN")
    bad_t = t.clone()
    bad_t[0, 0] = float("nan")
    one_line_error(lambda: call(v, bad_t), "text", "NaN")
    one_line_error(lambda: call(v[0], t), "2-D")


@pytest.mark.parametrize("kw,valid", [({"mask": "soft"}, MASKS), ({"sampler": "conv"}, SAMPLERS),
                                      ({"block": "lstm"}, BLOCKS)])
def test_unknown_names_list_choices(kw, valid):
    msg = one_line_error(lambda: MultiModalAdapter(64, **kw), repr(next(iter(kw.values()))))
    for name in valid:
        assert name in msg


def test_fast_path_refuses_other_variants():
    m = MultiModalAdapter(64, mask="bias")
    v, t = feats(2, 3, 64)
    one_line_error(lambda: m.raw_attention_block(v, t), "mask=bias", "raw_attention_dense")


def test_bad_sizes():
    one_line_error(lambda: MultiModalAdapter(66, reduction=4), "reduction")
    one_line_error(lambda: MultiModalAdapter(64, heads=3), "heads=3")
    one_line_error(lambda: MultiModalAdapter(64, lam=1.5), "lam=1.5")


def test_check_finite_off_skips_only_the_nan_check():
    """Callers that validated their cached features once (MMAMethod.build, the benchmark) turn the per-call NaN check
    off (it costs a device sync per step); the shape checks stay."""
    m = MultiModalAdapter(16)
    v, t = feats(3, 4, 16)
    v[0, 0] = float("nan")
    with pytest.raises(XmxError, match="NaN"):
        m.logits(v, t, LN100)
    m.check_finite = False
    assert torch.isnan(m.logits(v, t, LN100)[0]).all() and torch.isfinite(m.logits(v, t, LN100)[1:]).all()
    with pytest.raises(XmxError, match="width 8"):
        m.logits(v[:, :8], t, LN100)
