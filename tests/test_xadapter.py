"""X-adapter (docs/methods/xadapter.md#design): tiny PLMs, the expert block and its injection, masking, retrieval, colour probe, GLUE metrics."""

from __future__ import annotations

import math

import pytest
import torch

from xmx.backbones.clip import CLIPBackbone
from xmx.backbones.plm import COLOR_WORDS, build_plm
from xmx.data.text import ColorDataset, ColorItem, read_color_terms, read_memory_color
from xmx.errors import XmxError
from xmx.data.color_probe import VALM_TEMPLATES, ColorProbe, color_token_ids, fill_template
from xmx.data.mlm import MLMMasker, plm_view_texts
from xmx.features.retrieval import ImageIndex
from xmx.methods.xadapter import (ClassificationHead, ExpertBlock, GlueMetrics, XAdapter, glue_loss, mlm_loss,
                                  resolve_placement, t_expert_inputs, v_expert_inputs)

SENTENCES = ["a man riding a horse on the beach", "two dogs playing in the snow", "a red bus on the street"]


@pytest.fixture(scope="module")
def clip():
    return CLIPBackbone("xmx-tiny", None)


@pytest.fixture(scope="module")
def plms():
    return {k: build_plm("tiny", kind=k) for k in ("bert", "roberta")}


# ---- PLM building ------------------------------------------------------------------------------------------------
def test_tiny_plm_is_frozen_and_stays_in_eval(plms):
    for plm in plms.values():
        assert plm.num_layers == 3 and plm.random_init
        assert not any(p.requires_grad for p in plm.parameters())
        plm.train()
        assert not plm.model.training and not any(m.training for m in plm.model.modules())


def test_tiny_tokenizers_are_deterministic_and_keep_colour_words_whole(plms):
    again = build_plm("tiny", kind="roberta")
    assert again.tokenizer.get_vocab() == plms["roberta"].tokenizer.get_vocab()
    for plm in plms.values():
        ids = color_token_ids(plm.tokenizer, COLOR_WORDS)
        assert len(set(ids.tolist())) == len(COLOR_WORDS)
    # RoBERTa: the leading-space variant is the one checked and used
    assert plms["roberta"].tokenizer.convert_ids_to_tokens(
        color_token_ids(plms["roberta"].tokenizer, ["red"]).tolist()) == ["Ġred"]


def test_offline_hub_name_fails_fast_naming_a_local_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(XmxError, match=r"bert-base-uncased.*offline.*plm.name_or_path=/path/to/bert-base-uncased"):
        build_plm("bert-base-uncased", cache_dir=str(tmp_path))
    with pytest.raises(XmxError, match="local model folder not found"):
        build_plm(str(tmp_path / "nope"))


def test_local_folder_loads_and_kind_is_checked(plms, tmp_path):
    plms["roberta"].model.save_pretrained(tmp_path)
    plms["roberta"].tokenizer.save_pretrained(tmp_path)
    plm = build_plm(str(tmp_path))
    assert plm.kind == "roberta" and not plm.random_init
    enc = plm.tokenize(SENTENCES)
    torch.testing.assert_close(plm.model(**enc).logits, plms["roberta"].model(**enc).logits)
    with pytest.raises(XmxError, match="roberta model"):
        build_plm(str(tmp_path), kind="bert")


# ---- the untrained adapter is the identity -----------------------------------------------------------------------
@pytest.mark.parametrize("kind,placement,positions", [
    ("bert", "last_two", [1]), ("bert", "every", [0, 1, 2]), ("bert", 1, [0]), ("bert", 3, [2]),
    ("bert", [1, 2], [0, 1]), ("roberta", "last_two", [1]), ("roberta", "every", [0, 1, 2])])
def test_untrained_adapter_leaves_outputs_unchanged(plms, clip, kind, placement, positions):
    plm = plms[kind]
    enc = plm.tokenize(SENTENCES)
    base = plm.model(**enc).logits
    xa = XAdapter.for_plm(plm, clip.embed_dim, placement=placement, heads=4)
    try:
        assert xa.positions == positions
        feats, valid = t_expert_inputs(clip, SENTENCES)
        with torch.no_grad(), xa.context(feats, valid):
            assert torch.equal(plm.model(**enc).logits, base)  # exactly, at g = 0
            for b in xa.blocks.values():
                b.gate.fill_(0.5)
            assert not torch.allclose(plm.model(**enc).logits, base)  # the hooks really run
    finally:
        xa.detach()
    assert torch.equal(plm.model(**enc).logits, base)  # detached: the HF model is untouched


def test_placement_validation_and_missing_context(plms, clip):
    assert resolve_placement("every", 12) == list(range(12)) and resolve_placement("last_two", 12) == [10]
    for bad in (0, 4, "middle"):
        with pytest.raises(XmxError, match="method.adapter.placement"):
            resolve_placement(bad, 3)
    xa = XAdapter.for_plm(plms["bert"], clip.embed_dim, heads=4)
    try:
        with pytest.raises(XmxError, match="no CLIP context"):
            plms["bert"].model(**plms["bert"].tokenize(SENTENCES))
    finally:
        xa.detach()


def test_bottleneck_block_shapes_and_identity():
    torch.manual_seed(0)
    blk = ExpertBlock(d=128, d_clip=32, d_a=64, head_dim=32)
    assert blk.attn.num_heads == 2 and blk.attn.embed_dim == 64
    h, e = torch.randn(2, 5, 128), torch.randn(2, 4, 32)
    valid = torch.tensor([[True, True, False, False], [False, False, False, False]])  # row 2: no context at all
    assert torch.equal(blk(h, e, valid), h)
    with torch.no_grad():
        blk.gate.fill_(1.0)
    out = blk(h, e, valid)
    assert out.shape == h.shape and torch.isfinite(out).all()


# ---- training touches only the adapter and head ------------------------------------------------------------------
def test_adapter_only_step_and_first_step_gradients(plms, clip):
    torch.manual_seed(0)
    plm = plms["bert"]
    before = {k: v.clone() for k, v in plm.model.state_dict().items()}
    xa = XAdapter.for_plm(plm, clip.embed_dim, placement="every", heads=4, dropout=0.0)
    head = ClassificationHead(plm.hidden_size, 2)
    opt = torch.optim.AdamW(list(xa.parameters()) + list(head.parameters()), lr=1e-2)
    enc = plm.tokenize(SENTENCES)
    feats, valid = t_expert_inputs(clip, SENTENCES)
    head_before = [p.detach().clone() for p in head.parameters()]
    adapter_before = {n: p.detach().clone() for n, p in xa.named_parameters()}
    try:
        def step():
            opt.zero_grad()
            with xa.context(feats, valid):
                hidden = plm.model.base_model(**enc).last_hidden_state  # [B,L,d]
            loss = glue_loss(head(hidden), torch.tensor([0, 1, 1]), regression=False)
            loss.backward()
        step()
        for n, p in xa.named_parameters():  # at g = 0 only g gets a gradient
            if n.endswith("gate"):
                assert p.grad is not None and p.grad.abs().item() > 0, n
            else:
                assert p.grad is None or torch.count_nonzero(p.grad) == 0, n
        assert all(p.grad is None for p in plm.parameters())
        opt.step()
        assert all(not torch.equal(a, p) for a, p in zip(head_before, head.parameters()))
        assert all(b.gate.item() != 0 for b in xa.blocks.values())
        step()  # g != 0 now: the block's own weights learn too
        assert torch.count_nonzero(xa.blocks["0"].proj.weight.grad) > 0
        opt.step()
        assert not torch.equal(adapter_before["blocks.0.proj.weight"], xa.blocks["0"].proj.weight)
        after = plm.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # PLM weights bit-identical
    finally:
        xa.detach()


def test_mlm_first_step_only_gate_gets_gradient(plms, clip):
    plm = plms["roberta"]
    xa = XAdapter.for_plm(plm, clip.embed_dim, heads=4)
    masker = MLMMasker(plm.tokenizer, ratio=0.45, seed=1)
    enc = plm.tokenize(SENTENCES)
    ids, labels = masker(enc["input_ids"], enc["attention_mask"])
    assert (labels != -100).any()
    try:
        feats, valid = t_expert_inputs(clip, plm_view_texts(plm.tokenizer, ids, labels != -100,
                                                            enc["attention_mask"]))
        with xa.context(feats, valid):
            loss = mlm_loss(plm.model(input_ids=ids, attention_mask=enc["attention_mask"]).logits, labels)
        loss.backward()
        grads = {n: p.grad for n, p in xa.named_parameters()}
        assert grads["blocks.1.gate"].abs().item() > 0
        assert all(g is None or torch.count_nonzero(g) == 0 for n, g in grads.items() if n != "blocks.1.gate")
    finally:
        xa.detach()


# ---- MLM masking -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.15, 0.45])
def test_masking_statistics(plms, ratio):
    tok = plms["bert"].tokenizer
    g = torch.Generator().manual_seed(0)
    special = torch.tensor(tok.all_special_ids)
    normal = torch.tensor([i for i in range(len(tok)) if i not in set(tok.all_special_ids)])
    ids = normal[torch.randint(len(normal), (2000, 64), generator=g)]
    ids[:, 0], ids[:, 40] = tok.cls_token_id, tok.sep_token_id
    ids[:, 41:] = tok.pad_token_id
    attn = (torch.arange(64) < 41).long().expand(2000, 64)
    out, labels = MLMMasker(tok, ratio=ratio, seed=3)(ids, attn)
    sel = labels != -100
    maskable = ~torch.isin(ids, special)
    assert not (sel & ~maskable).any() and torch.equal(out[~maskable], ids[~maskable])  # specials, padding: never
    assert torch.equal(labels[sel], ids[sel])
    assert abs(sel.sum().item() / maskable.sum().item() - ratio) < 0.01
    n = sel.sum().item()
    is_mask = (out == tok.mask_token_id) & sel
    is_random = sel & (out != ids) & ~is_mask
    kept = sel & (out == ids)
    assert abs(is_mask.sum().item() / n - 0.8) < 0.02
    assert abs(is_random.sum().item() / n - 0.1) < 0.02
    assert abs(kept.sum().item() / n - 0.1) < 0.02
    assert not torch.isin(out[is_random], special).any()
    again, _ = MLMMasker(tok, ratio=ratio, seed=3)(ids, attn)
    other, _ = MLMMasker(tok, ratio=ratio, seed=4)(ids, attn)
    assert torch.equal(again, out) and not torch.equal(other, out)


def test_plm_view_hides_every_target(plms):
    for plm in plms.values():
        tok = plm.tokenizer
        enc = plm.tokenize(["a red bus on the street"])
        ids = enc["input_ids"]
        red = (ids == tok(" red", add_special_tokens=False)["input_ids"][0])
        assert red.sum() == 1
        shown = plm_view_texts(tok, ids, red, enc["attention_mask"], mask_word="something")
        assert shown == ["a something bus on the street"]
        assert plm_view_texts(tok, ids, red, enc["attention_mask"], mode="remove") == ["a bus on the street"]
        assert "red" not in plm_view_texts(tok, ids, red)[0] and tok.mask_token in plm_view_texts(tok, ids, red)[0]


# ---- retrieval ---------------------------------------------------------------------------------------------------
def test_retrieval_returns_true_nearest_images():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1000, 32, generator=g) * (torch.rand(1000, 1, generator=g) * 5 + 0.1)  # varied norms
    index = ImageIndex(emb, [f"img{i}" for i in range(1000)], chunk=97)  # chunks force the top-k merge
    targets = torch.tensor([5, 123, 999, 500])
    queries = 3.0 * emb[targets] / emb[targets].norm(dim=1, keepdim=True) + 0.01 * torch.randn(4, 32, generator=g)
    scores, rows = index.search(queries, k=4)
    assert torch.equal(rows[:, 0], targets)
    cos = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(emb, dim=1).T
    ref_s, ref_i = cos.topk(4, dim=1)
    assert torch.equal(rows, ref_i)
    torch.testing.assert_close(scores, ref_s)
    _, rows_ex = index.search(queries, k=4, exclude=targets)
    assert not (rows_ex == targets[:, None]).any() and torch.equal(rows_ex[:, :3], ref_i[:, 1:])
    assert index.position(["img123", "img5"]).tolist() == [123, 5]
    assert index.features(rows).shape == (4, 4, 32)
    with pytest.raises(XmxError, match="k=1001"):
        index.search(queries, k=1001)


def test_v_expert_retrieves_with_clip_text_queries(clip):
    captions = ["a photo of a dog", "a red car", "a plate of food", "a snowy mountain", "a cat on a sofa"]
    index = ImageIndex(clip.encode_text(clip.tokenize(captions)), captions)  # stand-in "image" embeddings
    feats, valid = v_expert_inputs(clip, index, ["a red car", "a snowy mountain"], k=2)
    assert feats.shape == (2, 2, clip.embed_dim) and valid.all()
    torch.testing.assert_close(feats[:, 0], index.embeddings[[1, 3]])


# ---- colour probe ------------------------------------------------------------------------------------------------
def test_templates_fill_like_valm(plms):
    assert len(VALM_TEMPLATES) == 9
    assert fill_template(VALM_TEMPLATES[4], "the inside of a", "watermelon", "[MASK]") == \
        "The color of the inside of a watermelon is [MASK]."
    assert fill_template(VALM_TEMPLATES[0], "", "grass", "<mask>") == "Q: What is the color of grass? A: It is <mask>."
    assert fill_template(VALM_TEMPLATES[8], "a ", "banana", "[MASK]") == "a banana usually has the color of [MASK]."


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_colour_probe_scores_an_oracle_at_100(plms, kind):
    tok = plms[kind].tokenizer
    ds = read_memory_color()
    probe = ColorProbe(ds, tok)
    assert len(probe) == 9 * 109
    truth = {fill_template(t, it.descriptor, it.item, tok.mask_token): ds.colors.index(it.color)
             for t in VALM_TEMPLATES for it in ds.items}
    vocab = len(tok)

    def oracle(batch):  # a "model" that reads the prompt and puts its largest logit on the right colour at the mask
        logits = torch.zeros(len(batch["texts"]), batch["input_ids"].shape[1], vocab)
        logits[:, :, probe.color_ids] = torch.rand(len(batch["texts"]), 1, len(probe.color_ids))
        for i, text in enumerate(batch["texts"]):
            logits[i, batch["mask_index"][i], probe.color_ids[truth[text]]] = 100.0
        return logits

    res = probe.evaluate(oracle, batch_size=100)
    assert res["acc"] == 100.0 and all(res[f"acc/t{i}"] == 100.0 for i in range(9))

    def always_white(batch):
        logits = torch.zeros(len(batch["texts"]), batch["input_ids"].shape[1], vocab)
        logits[:, :, probe.color_ids[ds.colors.index("white")]] = 1.0
        return logits

    n_white = sum(it.color == "white" for it in ds.items)
    assert probe.evaluate(always_white)["acc"] == pytest.approx(100.0 * n_white / 109)


def test_colour_probe_runs_a_real_plm_with_v_expert(plms, clip):
    plm = plms["roberta"]
    full = read_color_terms()
    ds = ColorDataset("color_terms[:6]", full.items[:6], full.colors)  # small: CLIP encodes every prompt
    probe = ColorProbe(ds, plm.tokenizer)
    index = ImageIndex(torch.randn(20, clip.embed_dim), list(range(20)))
    xa = XAdapter.for_plm(plm, clip.embed_dim, heads=4)

    def predict(b):
        query = plm_view_texts(plm.tokenizer, b["input_ids"], b["hide"], b["attention_mask"])
        assert all(q.endswith(f"{plm.tokenizer.mask_token}.") for q in query)  # the PLM's view, answer hidden
        with xa.context(*v_expert_inputs(clip, index, query, k=4)):
            return plm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    try:
        res = probe.evaluate(predict, batch_size=32)
    finally:
        xa.detach()
    assert len(probe) == 54 and 0.0 <= res["acc"] <= 100.0 and len(res) == 10


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_colour_word_that_is_not_one_token_is_named(plms, kind):
    ds = ColorDataset("x", (ColorItem("", "sky", "blue"), ColorItem("", "sea", "turquoise")), ("blue", "turquoise"))
    with pytest.raises(XmxError, match="colour word 'turquoise' is not a single token"):
        ColorProbe(ds, plms[kind].tokenizer)


# ---- GLUE metrics ------------------------------------------------------------------------------------------------
def _ranks(x):
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return r


def _pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt(float((a * a).sum() * (b * b).sum())))


def test_glue_metrics_agree_with_manual_formulas():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(2, (200,), generator=g)
    logits = torch.randn(200, 2, generator=g) + 0.8 * torch.nn.functional.one_hot(y, 2)
    p = logits.argmax(1)
    tp, tn = int(((p == 1) & (y == 1)).sum()), int(((p == 0) & (y == 0)).sum())
    fp, fn = int(((p == 1) & (y == 0)).sum()), int(((p == 0) & (y == 1)).sum())
    acc = 100 * (tp + tn) / 200
    f1 = 100 * 2 * tp / (2 * tp + fp + fn)
    mcc = 100 * (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))

    for task, expect in [("cola", {"mcc": mcc}), ("mrpc", {"f1": f1, "acc": acc}), ("QQP", {"f1": f1, "acc": acc}),
                         ("sst-2", {"acc": acc}), ("rte", {"acc": acc}), ("wnli", {"acc": acc})]:
        m = GlueMetrics(task)
        for s in range(0, 200, 64):  # batched updates accumulate
            m.update(logits[s:s + 64], y[s:s + 64])
        got = m.compute()
        assert set(got) == set(expect), task
        for k in expect:
            assert got[k] == pytest.approx(expect[k], abs=1e-3), (task, k)

    y3 = torch.randint(3, (150,), generator=g)
    l3 = torch.randn(150, 3, generator=g)
    m = GlueMetrics("mnli")
    m.update(l3, y3)
    assert m.compute()["acc"] == pytest.approx(100 * float((l3.argmax(1) == y3).float().mean()), abs=1e-3)

    score = torch.rand(300, generator=g) * 5
    pred = score + torch.randn(300, generator=g)
    m = GlueMetrics("sts-b")
    m.update(pred[:, None], score)
    got = m.compute()
    assert got["pearson"] == pytest.approx(100 * _pearson(pred, score), abs=1e-3)
    assert got["spearman"] == pytest.approx(100 * _pearson(_ranks(pred), _ranks(score)), abs=1e-3)
    assert m.main_metric == "pearson" and GlueMetrics("cola").main_metric == "mcc"
    with pytest.raises(XmxError, match="valid: cola, sst2"):
        GlueMetrics("squad")
