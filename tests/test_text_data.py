"""Text readers (xmx.data.text) on small generated files in the real formats: COCO captions, WikiText-103 raw,
GLUE task folders, and the shipped MemoryColor / ColorTerms CSVs."""

from __future__ import annotations

import json

import pytest

from xmx.data.text import (GLUE_TASKS, OBJECT_COLOR_DIR, glue_task, read_coco_captions, read_color_dataset,
                           read_color_terms, read_glue, read_memory_color, read_wikitext)
from xmx.errors import XmxError


# ---- object colour -----------------------------------------------------------------------------------------------
def test_shipped_object_colour_sets():
    mc = read_memory_color()
    assert len(mc.items) == 109 and len(mc.colors) == 11
    assert mc.colors == ("black", "blue", "brown", "green", "grey", "orange", "pink", "purple", "red", "white",
                         "yellow")
    assert mc.items[0].descriptor == "a" and mc.items[0].item == "sunflower" and mc.items[0].color == "yellow"
    assert mc.items[2].descriptor == ""  # empty descriptor stays empty (dropped by the probe)
    assert all(it.descriptor == it.descriptor.strip() for it in mc.items)
    ct = read_color_terms()
    assert len(ct.items) == 52 and len(ct.colors) == 10 and "purple" not in ct.colors
    assert ct.items[0].item == "ash" and ct.items[0].color == "grey"
    assert sorted(p.name for p in OBJECT_COLOR_DIR.glob("*.csv")) == ["color_terms.csv", "memory_color.csv"]
    assert read_color_dataset("color_terms").items == ct.items


def test_object_colour_bad_input(tmp_path):
    bad = tmp_path / "mc.csv"
    bad.write_text("Index,Descriptor,Item,Color\n1,a ,sunflower,yellow\n2,the,ocean\n")
    with pytest.raises(XmxError, match=r"mc.csv:3: malformed row"):
        read_memory_color(bad)
    bad.write_text("item,colour\nsky,blue\n")
    with pytest.raises(XmxError, match=r"expected header object,color"):
        read_color_terms(bad)
    with pytest.raises(XmxError, match="valid: memory_color, color_terms"):
        read_color_dataset("xkcd")


# ---- COCO captions -----------------------------------------------------------------------------------------------
def _coco(root, n_images=3):
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    images = [{"id": 9 + i, "file_name": f"{9 + i:012d}.jpg", "height": 8, "width": 8} for i in range(n_images)]
    anns = [{"id": 100 + j, "image_id": 9 + j % n_images, "caption": f"A  dog number {j}\n"} for j in range(7)]
    (root / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
    for im in images:
        (root / "train2017" / im["file_name"]).write_bytes(b"\xff\xd8\xff")
    return images


def test_coco_captions(tmp_path):
    images = _coco(tmp_path)
    caps = read_coco_captions(tmp_path)
    assert len(caps) == 7
    assert caps[0].image == "train2017/000000000009.jpg" and caps[0].caption == "A dog number 0"
    assert caps[4].image_id == 10
    (tmp_path / "train2017" / images[1]["file_name"]).unlink()
    with pytest.raises(XmxError, match=r"image .*000000000010\.jpg \(id 10\) is missing"):
        read_coco_captions(tmp_path)
    assert len(read_coco_captions(tmp_path, check_images=False)) == 7
    with pytest.raises(XmxError, match=r"captions_val2017.json"):
        read_coco_captions(tmp_path, split="val2017")


# ---- WikiText-103 ------------------------------------------------------------------------------------------------
def test_wikitext_raw(tmp_path):
    (tmp_path / "wiki.valid.raw").write_text(
        " \n = Robert Boulter = \n \n Robert Boulter is an English film actor . \n \n"
        " = = Career = = \n \n In 2000 Boulter had a guest role . \n")
    paras = read_wikitext(tmp_path, "valid")
    assert paras == ["Robert Boulter is an English film actor .", "In 2000 Boulter had a guest role ."]
    assert len(read_wikitext(tmp_path, "valid", drop_headings=False)) == 4
    with pytest.raises(XmxError, match=r"wiki.train.raw"):
        read_wikitext(tmp_path, "train")
    with pytest.raises(XmxError, match="valid: train, valid, test"):
        read_wikitext(tmp_path, "dev")


# ---- GLUE --------------------------------------------------------------------------------------------------------
MNLI_HEAD_TRAIN = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                   "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
MNLI_HEAD_DEV = MNLI_HEAD_TRAIN.replace("label1\tgold_label", "label1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label")

GLUE_FILES = {
    ("CoLA", "train"): "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
                       "gj04\t0\t*\tOne more pseudo generalization and I'm giving up.\n",
    ("SST-2", "dev"): "sentence\tlabel\nit 's a charming and often affecting journey . \t1\nunflinchingly bleak \t0\n",
    ("MRPC", "train"): "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                       "1\t702876\t702977\tAmrozi accused his brother .\tReferring to him , Amrozi accused .\n",
    ("QQP", "dev"): "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                    "201359\t303345\t303346\tWhy are African-Americans so beautiful?\tWhy are hispanics so beautiful?\t0\n",
    ("STS-B", "dev"): "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                      "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat is dancing.\t"
                      "A man wearing a hard hat is dancing.\t5.000\n",
    ("MNLI", "train"): MNLI_HEAD_TRAIN + "\n0\t31193\t31193n\tgovernment\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t"
                       "Conceptually cream skimming has two basic dimensions.\tProduct and geography are what "
                       "make cream \"skimming\" work.\tneutral\tneutral\n",
    ("MNLI", "dev_matched"): MNLI_HEAD_DEV + "\n0\t63735\t63735n\tslate\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t"
                             "The new rights are nice enough\tEveryone really likes the newest benefits\tneutral\t"
                             "entailment\tneutral\tneutral\tneutral\tneutral\n",
    ("MNLI", "dev_mismatched"): MNLI_HEAD_DEV + "\n0\t75\t75c\tletters\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t"
                                "Your contribution helped.\tYour contributions were of no help.\tcontradiction\t"
                                "contradiction\tcontradiction\tcontradiction\tcontradiction\tcontradiction\n",
    ("QNLI", "dev"): "index\tquestion\tsentence\tlabel\n0\tWhat came into force after the new constitution?\t"
                     "As of that day, the new constitution heralding the Second Republic came into force.\t"
                     "entailment\n",
    ("RTE", "train"): "index\tsentence1\tsentence2\tlabel\n0\tNo Weapons of Mass Destruction Found in Iraq Yet.\t"
                      "Weapons of Mass Destruction Found in Iraq.\tnot_entailment\n",
    ("WNLI", "dev"): "index\tsentence1\tsentence2\tlabel\n0\tThe drain is clogged with hair. It has to be cleaned.\t"
                     "The hair has to be cleaned.\t0\n",
}


@pytest.fixture()
def glue_root(tmp_path):
    for (folder, split), text in GLUE_FILES.items():
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / f"{split}.tsv").write_text(text, encoding="utf-8")
    return tmp_path


def test_glue_readers_in_the_real_formats(glue_root):
    cola = read_glue(glue_root, "cola", "train")
    assert [e.label for e in cola] == [1, 0] and cola[0].text_b is None
    assert cola[1].text_a == "One more pseudo generalization and I'm giving up."
    sst = read_glue(glue_root, "SST-2", "dev")
    assert [e.label for e in sst] == [1, 0] and sst[0].text_a.startswith("it 's a charming")
    mrpc = read_glue(glue_root, "mrpc", "train")[0]
    assert mrpc.label == 1 and mrpc.text_b == "Referring to him , Amrozi accused ."
    assert read_glue(glue_root, "qqp", "dev")[0].text_b == "Why are hispanics so beautiful?"
    sts = read_glue(glue_root, "sts-b", "dev")[0]
    assert sts.label == 5.0 and sts.text_a == "A man with a hard hat is dancing."
    mnli = read_glue(glue_root, "mnli", "train")[0]
    assert mnli.label == GLUE_TASKS["mnli"].labels.index("neutral") and '"skimming"' in mnli.text_b  # no quoting
    assert read_glue(glue_root, "mnli", "dev_matched")[0].label == 2
    assert read_glue(glue_root, "mnli", "dev_mismatched")[0].label == 0
    assert read_glue(glue_root, "qnli", "dev")[0].label == 0
    assert read_glue(glue_root, "rte", "train")[0].label == 1
    assert read_glue(glue_root, "wnli", "dev")[0].text_b == "The hair has to be cleaned."
    assert glue_task("STS_B").is_regression and glue_task("mnli").num_labels == 3


def test_glue_bad_input(glue_root):
    with open(glue_root / "RTE" / "train.tsv", "a") as f:
        f.write("1\tA second premise.\tentailment\n")  # a column missing
    with pytest.raises(XmxError, match=r"RTE/train.tsv:3: malformed row: expected at least 4 tab-separated columns, "
                                       r"found 3"):
        read_glue(glue_root, "rte", "train")
    with open(glue_root / "CoLA" / "train.tsv", "a") as f:
        f.write("gj04\tyes\t\tA sentence.\n")
    with pytest.raises(XmxError, match=r"CoLA/train.tsv:3: malformed row: label 'yes' is not one of 0, 1"):
        read_glue(glue_root, "cola", "train")
    with pytest.raises(XmxError, match=r"unknown task 'squad'; valid: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, "
                                       r"wnli"):
        read_glue(glue_root, "squad")
    with pytest.raises(XmxError, match=r"MNLI has no split 'dev'; valid: train, dev_matched, dev_mismatched"):
        read_glue(glue_root, "mnli", "dev")
    with pytest.raises(XmxError, match=r"CoLA/dev.tsv"):
        read_glue(glue_root, "cola", "dev")
    (glue_root / "QNLI" / "dev.tsv").write_text("index\tquestion\tsentence\n0\ta\tb\n")
    with pytest.raises(XmxError, match=r"QNLI/dev.tsv:1: header lacks column 'label'"):
        read_glue(glue_root, "qnli", "dev")
