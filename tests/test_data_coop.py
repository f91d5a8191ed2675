"""The CoOp readers on fake ``$DATA`` trees built from the real split files: exact counts, class names, templates,
the precedence of a user's split file, and one clear line for every kind of bad input."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

import xmx.data.coop as coop
from xmx.data.datasets import DATASETS, load_dataset, read_json
from xmx.data.fake import write_fake_dataset
from xmx.errors import XmxError

_BUF = io.BytesIO()
Image.new("RGB", (8, 8), (120, 30, 200)).save(_BUF, format="JPEG")
JPEG = _BUF.getvalue()
_TREES: dict[str, Path] = {}


def write_files(root: Path, rel_paths) -> None:
    """One tiny JPEG's bytes at every path (relative to root), one mkdir per folder."""
    made = set()
    for rel in rel_paths:
        parent = os.path.join(root, os.path.dirname(rel))
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(JPEG)


def fake_coop_tree(tmp_path_factory, name: str) -> Path:
    """A ``$DATA`` root holding dataset ``name`` with every image its shipped split file lists, written by
    ``python -m xmx.data fake`` (cached per session)."""
    if name not in _TREES:
        root = tmp_path_factory.mktemp(f"data-{name}")
        write_fake_dataset(root, name)
        _TREES[name] = root
    return _TREES[name]


def link_root(tmp_path: Path, *sources: Path) -> Path:
    """A fresh ``$DATA`` root whose dataset folders are symlinks into the given (cached) trees."""
    root = tmp_path / "DATA"
    root.mkdir()
    for src in sources:
        for d in src.iterdir():
            (root / d.name).symlink_to(d, target_is_directory=True)
    return root


def write_split(path: Path, split: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split))


def small_split(classes=("abyssinian", "beagle"), per=(2, 1, 1), ext=".jpg") -> dict:
    out = {"train": [], "val": [], "test": []}
    n = 0
    for label, c in enumerate(classes):
        for s, k in zip(out, per):
            for _ in range(k):
                out[s].append([f"{c}_{n}{ext}", label, c])
                n += 1
    return out


@pytest.fixture(scope="session")
def caltech_root(tmp_path_factory):
    return fake_coop_tree(tmp_path_factory, "caltech101")


@pytest.fixture(scope="session")
def pets_root(tmp_path_factory):
    return fake_coop_tree(tmp_path_factory, "oxford_pets")


# ------------------------------------------------------------------------------------------------ registry
SPEC_TEMPLATES = {
    "imagenet": "a photo of a {}.", "imagenet_v2": "a photo of a {}.", "imagenet_sketch": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.", "imagenet_r": "a photo of a {}.", "caltech101": "a photo of a {}.",
    "stanford_cars": "a photo of a {}.", "sun397": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.", "oxford_flowers": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.", "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.", "eurosat": "a centered satellite photo of {}.", "ucf101": "a photo of a person doing {}.",
}


def test_registry_names_templates_and_sizes():
    assert set(coop.COOP_DATASETS) == set(SPEC_TEMPLATES) <= set(DATASETS)
    for name, tmpl in SPEC_TEMPLATES.items():
        assert DATASETS[name].templates == (tmpl,), name
    assert DATASETS["imagenet"].sizes == (1281167, 0, 50000, 1000)
    assert DATASETS["food101"].sizes == (50500, 20200, 30300, 101)
    assert DATASETS["imagenet_a"].sizes[2:] == (7500, 200) and DATASETS["imagenet_a"].test_only
    assert DATASETS["imagenet_sketch"].sizes[2:] == (50889, 1000)
    assert not DATASETS["caltech101"].test_only


def test_shipped_split_counts_match_spec():
    for name in ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "dtd", "eurosat", "ucf101"):
        info = DATASETS[name]
        raw = read_json(coop.SPLITS_DIR / f"{info.extra['split_file']}.gz")
        counts = tuple(len(raw[s]) for s in ("train", "val", "test")) + (len({y for _, y, _ in raw["train"]}),)
        assert counts == info.sizes, name


# ------------------------------------------------------------------------------------- full-size fake trees
def test_caltech101_exact_counts(caltech_root):
    s = load_dataset("caltech101", caltech_root)
    assert (len(s.train), len(s.val), len(s.test), len(s.classnames)) == (4128, 1649, 2465, 100)
    assert s.classnames[0] == "face" and s.classnames[1] == "leopard"
    assert s.train[0].path.startswith("caltech-101/101_ObjectCategories/Faces/")
    assert (caltech_root / s.test[-1].path).is_file()
    assert s.templates == ["a photo of a {}."]
    assert s.split_source.endswith("xmx/data/splits/split_zhou_Caltech101.json.gz")


def test_oxford_pets_exact_counts(pets_root):
    s = load_dataset("oxford_pets", pets_root)
    assert (len(s.train), len(s.val), len(s.test), len(s.classnames)) == (2944, 736, 3669, 37)
    assert s.classnames[0] == "abyssinian"
    assert all(d.path.startswith("oxford_pets/images/") for d in s.train[:50])
    assert {d.label for d in s.test} == set(range(37))


def test_scan_reports_no_missing(caltech_root):
    splits, missing = coop.scan_dataset("caltech101", caltech_root)
    assert missing == [] and len(splits.train) == 4128


# ---------------------------------------------------------------------------------- split file precedence
def test_users_split_file_wins(tmp_path):
    split = small_split()
    write_split(tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json", split)
    write_files(tmp_path, (f"oxford_pets/images/{p}" for s in split.values() for p, _, _ in s))
    s = load_dataset("oxford_pets", tmp_path)
    assert (len(s.train), len(s.val), len(s.test)) == (4, 2, 2)
    assert s.classnames == ["abyssinian", "beagle"]
    assert s.split_source == str(tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json")


def test_stanford_cars_paths_relative_to_dataset_folder(tmp_path):
    split = {"train": [["cars_train/00001.jpg", 0, "2012 Audi TTS Coupe"]],
             "val": [["cars_train/00002.jpg", 0, "2012 Audi TTS Coupe"]],
             "test": [["cars_test/00001.jpg", 0, "2012 Audi TTS Coupe"]]}
    write_split(tmp_path / "stanford_cars" / "split_zhou_StanfordCars.json", split)
    write_files(tmp_path, (f"stanford_cars/{p}" for s in split.values() for p, _, _ in s))
    s = load_dataset("stanford_cars", tmp_path)
    assert s.test[0].path == "stanford_cars/cars_test/00001.jpg"


def test_food101_needs_its_own_split_file(tmp_path):
    (tmp_path / "food-101" / "images").mkdir(parents=True)
    with pytest.raises(XmxError, match=r"split_zhou_Food101\.json not found.*DATASETS\.md"):
        load_dataset("food101", tmp_path)
    split = small_split(classes=("apple_pie", "baby_back_ribs"))
    write_split(tmp_path / "food-101" / "split_zhou_Food101.json", split)
    write_files(tmp_path, (f"food-101/images/{p}" for s in split.values() for p, _, _ in s))
    s = load_dataset("food101", tmp_path)
    assert s.classnames == ["apple_pie", "baby_back_ribs"] and s.train[0].path.startswith("food-101/images/")


@pytest.mark.parametrize("content", ["{not json", json.dumps({"train": [], "val": []}),
                                     json.dumps({"train": [["a.jpg"]], "val": [], "test": []})])
def test_malformed_split_file(tmp_path, content):
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(content)
    with pytest.raises(XmxError, match=r"split_zhou_DescribableTextures\.json is malformed") as e:
        load_dataset("dtd", tmp_path)
    assert "\n" not in str(e.value)


def test_missing_images_counted_with_examples(tmp_path):
    split = small_split(per=(3, 1, 1))
    write_split(tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json", split)
    paths = [f"oxford_pets/images/{p}" for s in split.values() for p, _, _ in s]
    write_files(tmp_path, paths[2:])
    with pytest.raises(XmxError) as e:
        load_dataset("oxford_pets", tmp_path)
    msg = str(e.value)
    assert "2 of 10 images" in msg and paths[0] in msg and paths[1] in msg and "\n" not in msg
    _, missing = coop.scan_dataset("oxford_pets", tmp_path)
    assert missing == paths[:2]


def test_missing_image_folder(tmp_path):
    (tmp_path / "eurosat").mkdir()
    with pytest.raises(XmxError, match=r"image folder .*eurosat/2750 not found.*eurosat/2750/<images>"):
        load_dataset("eurosat", tmp_path)


def test_missing_root_dataset_folder_and_unknown_name(tmp_path):
    with pytest.raises(XmxError, match=r"data root .*nope does not exist"):
        load_dataset("caltech101", tmp_path / "nope")
    with pytest.raises(XmxError, match=r"dataset folder .*caltech-101 not found.*101_ObjectCategories"):
        load_dataset("caltech101", tmp_path)
    with pytest.raises(XmxError, match=r"unknown dataset 'caltech'; valid choices: .*caltech101.*oxford_pets"):
        load_dataset("caltech", tmp_path)


# ------------------------------------------------------------------------------------------------ FGVCAircraft
def _aircraft(root: Path, variants=("707-320", "F/A-18", "A300B4"), drop_variant_file=False):
    d = root / "fgvc_aircraft"
    d.mkdir(parents=True)
    if not drop_variant_file:
        (d / "variants.txt").write_text("\n".join(variants) + "\n")
    ids = {"train": ["0001", "0002", "0003", "0004"], "val": ["0005", "0006"], "test": ["0007", "0008", "0009"]}
    for split, imids in ids.items():
        (d / f"images_variant_{split}.txt").write_text(
            "".join(f"{i} {variants[n % len(variants)]}\n" for n, i in enumerate(imids)))
    write_files(root, (f"fgvc_aircraft/images/{i}.jpg" for v in ids.values() for i in v))
    return ids


def test_fgvc_aircraft_reader(tmp_path):
    _aircraft(tmp_path)
    s = load_dataset("fgvc_aircraft", tmp_path)
    assert (len(s.train), len(s.val), len(s.test)) == (4, 2, 3)
    assert s.classnames == ["707-320", "F/A-18", "A300B4"]
    assert [(d.path, d.label, d.classname) for d in s.train[:2]] == [
        ("fgvc_aircraft/images/0001.jpg", 0, "707-320"), ("fgvc_aircraft/images/0002.jpg", 1, "F/A-18")]
    assert s.templates == ["a photo of a {}, a type of aircraft."]


def test_fgvc_aircraft_bad_inputs(tmp_path):
    _aircraft(tmp_path / "a", drop_variant_file=True)
    with pytest.raises(XmxError, match=r"variants\.txt not found"):
        load_dataset("fgvc_aircraft", tmp_path / "a")
    _aircraft(tmp_path / "b")
    with open(tmp_path / "b" / "fgvc_aircraft" / "images_variant_val.txt", "a") as f:
        f.write("0010 Spitfire\n")
    with pytest.raises(XmxError, match=r"images_variant_val\.txt is malformed: line 3 .*'Spitfire'"):
        load_dataset("fgvc_aircraft", tmp_path / "b")
    _aircraft(tmp_path / "c")
    (tmp_path / "c" / "fgvc_aircraft" / "images" / "0009.jpg").unlink()
    with pytest.raises(XmxError, match=r"1 of 9 images .*fgvc_aircraft/images/0009\.jpg"):
        load_dataset("fgvc_aircraft", tmp_path / "c")


# ---------------------------------------------------------------------------------------------- ImageNet family
WNIDS = list(coop.shipped_wnids("imagenet"))
IMAGENET_CLASSNAMES = coop.open_clip_imagenet_classnames()


@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-imagenet")
    files = []
    for i, w in enumerate(WNIDS):
        files += [f"imagenet/images/train/{w}/{w}_{k}.JPEG" for k in (10, 2, 1)[: 1 + i % 3]]
        files.append(f"imagenet/images/val/{w}/ILSVRC2012_val_{i:08d}.JPEG")
    write_files(root, files)
    (root / "imagenet/images/train" / WNIDS[0] / ".DS_Store").write_bytes(b"")  # hidden: skipped
    return root


def test_imagenet_reader(imagenet_root):
    s = load_dataset("imagenet", imagenet_root)
    assert len(s.classnames) == 1000 and s.classnames == list(IMAGENET_CLASSNAMES)
    assert IMAGENET_CLASSNAMES[:2] == ("tench", "goldfish") and len(IMAGENET_CLASSNAMES) == 1000
    assert s.val == [] and len(s.test) == 1000 and len(s.train) == sum(1 + i % 3 for i in range(1000))
    assert s.train[0].path == f"imagenet/images/train/{WNIDS[0]}/{WNIDS[0]}_10.JPEG"
    assert [d.path.rsplit("_", 1)[1] for d in s.train if d.label == 2] == ["1.JPEG", "10.JPEG", "2.JPEG"]  # sorted
    assert s.train[0].classname == "tench" and s.test[999].label == 999
    assert "open_clip" in s.split_source


def test_imagenet_classnames_txt_wins(imagenet_root, tmp_path):
    root = link_root(tmp_path, imagenet_root)
    (root / "imagenet").unlink()
    (root / "imagenet").mkdir()
    (root / "imagenet" / "images").symlink_to(imagenet_root / "imagenet" / "images", target_is_directory=True)
    lines = [f"{w} class number {i}" for i, w in enumerate(WNIDS)]
    (root / "imagenet" / "classnames.txt").write_text("\n".join(reversed(lines)) + "\n")
    s = load_dataset("imagenet", root)
    assert s.classnames[0] == "class number 0" and s.classnames[999] == "class number 999"
    (root / "imagenet" / "classnames.txt").write_text("\n".join(lines[:10]) + "\n")
    with pytest.raises(XmxError, match=r"classnames\.txt is malformed: it has 10 wnids"):
        load_dataset("imagenet", root)


def test_imagenet_missing_class_folders(imagenet_root, tmp_path):
    src = imagenet_root / "imagenet" / "images"
    train = tmp_path / "imagenet" / "images" / "train"
    train.mkdir(parents=True)
    for w in WNIDS[2:]:
        (train / w).symlink_to(src / "train" / w, target_is_directory=True)
    (tmp_path / "imagenet" / "images" / "val").symlink_to(src / "val", target_is_directory=True)
    with pytest.raises(XmxError, match=rf"2 class folders are missing .*imagenet/images/train/{WNIDS[0]}/"):
        load_dataset("imagenet", tmp_path)
    (tmp_path / "imagenet" / "images" / "val").unlink()
    with pytest.raises(XmxError, match=r"image folder .*imagenet/images/val not found.*images/\{train,val\}"):
        load_dataset("imagenet", tmp_path)


def test_index_folders_does_not_stat_files(imagenet_root, monkeypatch):
    def no_stat(*a, **k):
        raise AssertionError("stat called")
    monkeypatch.setattr(os, "stat", no_stat)
    monkeypatch.setattr(os, "lstat", no_stat)
    items, absent = coop.index_folders(imagenet_root, "imagenet/images/train", WNIDS, list(range(1000)), WNIDS)
    assert absent == [] and len(items) == 2000 - 1  # 334*1 + 333*2 + 333*3 = 1999


def test_imagenet_a_r_v2_sketch(tmp_path):
    a = list(coop.shipped_wnids("imagenet_a"))
    r = list(coop.shipped_wnids("imagenet_r"))
    write_files(tmp_path, [f"imagenet-adversarial/imagenet-a/{w}/x.jpg" for w in a]
                + [f"imagenet-rendition/imagenet-r/{w}/art_{k}.jpg" for w in r for k in (1, 0)]
                + [f"imagenetv2/imagenetv2-matched-frequency-format-val/{i}/h.jpeg" for i in range(1000)]
                + [f"imagenet-sketch/images/{w}/sketch_1.JPEG" for w in WNIDS])
    (tmp_path / "imagenet-adversarial" / "imagenet-a" / "README.txt").write_text("ignored")
    sa = load_dataset("imagenet_a", tmp_path)
    assert len(sa.test) == 200 and len(sa.classnames) == 200 and sa.train == [] and sa.val == []
    assert [d.label for d in sa.test] == list(range(200))
    idx = coop.imagenet_indices("imagenet_a")
    assert idx[:3] == [6, 11, 13] and sa.classnames == [IMAGENET_CLASSNAMES[i] for i in idx]
    sr = load_dataset("imagenet_r", tmp_path)
    assert len(sr.test) == 400 and sr.test[0].path.endswith(f"{r[0]}/art_0.jpg") and sr.test[1].label == 0
    assert sr.classnames == [IMAGENET_CLASSNAMES[i] for i in coop.imagenet_indices("imagenet_r")]
    v2 = load_dataset("imagenet_v2", tmp_path)
    assert len(v2.test) == 1000 and v2.test[7].label == 7 and v2.test[7].path.split("/")[2] == "7"
    assert v2.classnames[0] == "tench"
    sk = load_dataset("imagenet_sketch", tmp_path)
    assert len(sk.test) == 1000 and coop.imagenet_indices("imagenet_sketch") == list(range(1000))
    shutil.rmtree(tmp_path / "imagenet-adversarial" / "imagenet-a" / a[5])
    with pytest.raises(XmxError, match=rf"imagenet_a: 1 class folders are missing .*{a[5]}/"):
        load_dataset("imagenet_a", tmp_path)
