"""``data.source: hf``: GLUE, WikiText-103 and COCO Karpathy captions read with ``datasets`` from parquet files in the
Hub repositories' own layout (a local folder), giving the same examples as the file readers; offline without a cache
is one line. No network: any non-loopback connection fails the test."""

from __future__ import annotations

import socket

import pytest

from test_text_data import GLUE_FILES  # noqa: F401  (the same examples in the GLUE script's TSV format)
from xmx.data.hf_text import read_coco_karpathy_hf, read_glue_hf, read_wikitext_hf
from xmx.data.text import read_glue, read_wikitext
from xmx.errors import XmxError


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    real = socket.socket.connect

    def connect(self, addr):
        assert not isinstance(addr, tuple) or addr[0] in ("127.0.0.1", "::1"), f"real host {addr}"
        return real(self, addr)
    monkeypatch.setattr(socket.socket, "connect", connect)


def _parquet(path, rows: dict) -> None:
    import datasets
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(rows).to_parquet(str(path))


# The rows of GLUE_FILES as nyu-mll/glue holds them: its column names and ClassLabel ints (written independently).
HF_GLUE = {
    ("cola", "train"): {"sentence": ["Our friends won't buy this analysis, let alone the next one we propose.",
                                     "One more pseudo generalization and I'm giving up."], "label": [1, 0]},
    ("sst2", "validation"): {"sentence": ["it 's a charming and often affecting journey . ", "unflinchingly bleak "],
                             "label": [1, 0]},
    ("mrpc", "train"): {"sentence1": ["Amrozi accused his brother ."],
                        "sentence2": ["Referring to him , Amrozi accused ."], "label": [1]},
    ("qqp", "validation"): {"question1": ["Why are African-Americans so beautiful?"],
                            "question2": ["Why are hispanics so beautiful?"], "label": [0]},
    ("stsb", "validation"): {"sentence1": ["A man with a hard hat is dancing."],
                             "sentence2": ["A man wearing a hard hat is dancing."], "label": [5.0]},
    ("mnli", "train"): {"premise": ["Conceptually cream skimming has two basic dimensions."],
                        "hypothesis": ['Product and geography are what make cream "skimming" work.'], "label": [1]},
    ("mnli", "validation_matched"): {"premise": ["The new rights are nice enough"],
                                     "hypothesis": ["Everyone really likes the newest benefits"], "label": [1]},
    ("mnli", "validation_mismatched"): {"premise": ["Your contribution helped."],
                                        "hypothesis": ["Your contributions were of no help."], "label": [2]},
    ("qnli", "validation"): {"question": ["What came into force after the new constitution?"],
                             "sentence": ["As of that day, the new constitution heralding the Second Republic came "
                                          "into force."], "label": [0]},
    ("rte", "train"): {"sentence1": ["No Weapons of Mass Destruction Found in Iraq Yet."],
                       "sentence2": ["Weapons of Mass Destruction Found in Iraq."], "label": [1]},
    ("wnli", "validation"): {"sentence1": ["The drain is clogged with hair. It has to be cleaned."],
                             "sentence2": ["The hair has to be cleaned."], "label": [0]},
}
TSV_SPLIT = {"train": "train", "validation": "dev", "validation_matched": "dev_matched",
             "validation_mismatched": "dev_mismatched"}


def test_glue_from_hub_parquet_equals_the_tsv_reader(tmp_path):
    from test_text_data import GLUE_FILES as files
    tsv, hub = tmp_path / "tsv", tmp_path / "hub"
    for (folder, split), text in files.items():
        (tsv / folder).mkdir(parents=True, exist_ok=True)
        (tsv / folder / f"{split}.tsv").write_text(text, encoding="utf-8")
    for (task, split), rows in HF_GLUE.items():
        n = len(rows["label"])
        _parquet(hub / task / f"{split}-00000-of-00001.parquet", {**rows, "idx": list(range(n))})
    for (task, split) in HF_GLUE:
        got = read_glue_hf(str(hub), task, TSV_SPLIT[split])
        assert got == read_glue(tsv, task, TSV_SPLIT[split]), (task, split)


def test_wikitext_from_hub_parquet_equals_the_raw_reader(tmp_path):
    raw = (" \n = Robert Boulter = \n \n Robert Boulter is an English film actor . \n \n"
           " = = Career = = \n \n In 2000 Boulter had a guest role . \n")
    (tmp_path / "wiki.valid.raw").write_text(raw)
    lines = raw.splitlines(keepends=True)  # the Hub's rows: one per line of the raw file
    _parquet(tmp_path / "hub" / "wikitext-103-raw-v1" / "validation-00000-of-00001.parquet", {"text": lines})
    got = read_wikitext_hf(str(tmp_path / "hub"), "valid")
    assert got == read_wikitext(tmp_path, "valid") == ["Robert Boulter is an English film actor .",
                                                       "In 2000 Boulter had a guest role ."]


def test_coco_karpathy_captions_from_hub_parquet(tmp_path):
    _parquet(tmp_path / "data" / "test-00000-of-00001.parquet", {
        "filepath": ["val2014", "val2014"], "filename": ["COCO_val2014_000000391895.jpg", "b.jpg"],
        "cocoid": [391895, 7], "sentences": [["A man  with a red helmet.", "A dirt bike rider."], ["Two cats."]]})
    caps = read_coco_karpathy_hf(str(tmp_path), "test")
    assert [(c.image_id, c.image, c.caption) for c in caps] == [
        (391895, "val2014/COCO_val2014_000000391895.jpg", "A man with a red helmet."),
        (391895, "val2014/COCO_val2014_000000391895.jpg", "A dirt bike rider."), (7, "val2014/b.jpg", "Two cats.")]
    with pytest.raises(XmxError, match="valid: train, validation, test"):
        read_coco_karpathy_hf(str(tmp_path), "restval2017")


def test_offline_without_cache_is_one_line(tmp_path, monkeypatch):
    import datasets.config as dc
    monkeypatch.setattr(dc, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(dc, "HF_DATASETS_CACHE", tmp_path / "cache", raising=False)
    with pytest.raises(XmxError) as e:
        read_glue_hf("nyu-mll/glue", "sst2", "dev", "bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c")
    msg = str(e.value)
    assert "\n" not in msg and "data.source=hf: cannot load nyu-mll/glue (sst2, validation)" in msg
    assert "data.hf.path" in msg
    with pytest.raises(XmxError, match="no .*sst2/validation-\\*.parquet"):
        read_glue_hf(str(tmp_path), "sst2", "dev")


def test_configs_offer_both_sources_with_pinned_hub_revisions(make_cfg):
    for data, repo in (("glue", "nyu-mll/glue"), ("wikitext103", "Salesforce/wikitext"),
                       ("coco_captions", "yerevann/coco-karpathy")):
        cfg = make_cfg([f"data={data}", "plm=tiny", "backbone=tiny"])
        assert cfg.data.source == "files" and cfg.data.hf.path == repo
    assert len(make_cfg(["data=glue"]).data.hf.revision) == 40


def test_a_glue_run_sees_the_same_examples_from_either_source(make_cfg, tmp_path, one_thread):
    """MNLI written once as the GLUE script's TSVs and once as nyu-mll/glue's parquet files: the two runs record the
    same example digests for every split (labels remapped from the Hub's ClassLabel order)."""
    from test_xadapter_run import _sentence, tiny
    from xmx.run import run
    tsv_names, hub_names = ("contradiction", "entailment", "neutral"), ("entailment", "neutral", "contradiction")
    (tmp_path / "glue" / "MNLI").mkdir(parents=True)
    for split, hf_split, n in (("train", "train", 12), ("dev_matched", "validation_matched", 6),
                               ("dev_mismatched", "validation_mismatched", 5)):
        a, b = [_sentence(i) for i in range(n)], [_sentence(i + 2) for i in range(n)]
        gold = [tsv_names[(i * 5) % 3] for i in range(n)]
        (tmp_path / "glue" / "MNLI" / f"{split}.tsv").write_text("\n".join(
            ["index\tsentence1\tsentence2\tgold_label"] + [f"{i}\t{a[i]}\t{b[i]}\t{gold[i]}" for i in range(n)]) + "\n")
        _parquet(tmp_path / "hub" / "mnli" / f"{hf_split}-00000-of-00001.parquet",
                 {"premise": a, "hypothesis": b, "label": [hub_names.index(g) for g in gold], "idx": list(range(n))})
    common = ["experiment=xadapter_glue", "glue_task=mnli", *tiny(tmp_path, "debug=fdr", "method.batch_size=4")]
    files = run(make_cfg(common, output_dir=tmp_path / "files"))
    hub = run(make_cfg(common + ["data.source=hf", f"data.hf.path={tmp_path / 'hub'}"], output_dir=tmp_path / "hf"))
    assert files["data"]["source"] == "files" and hub["data"]["source"] == "hf"
    assert hub["data"]["hf"]["path"] == str(tmp_path / "hub")
    for k in ("train", "test_matched", "test_mismatched"):
        assert hub["data"]["splits"][k] == files["data"]["splits"][k], k
