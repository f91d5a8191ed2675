"""select_fewshot: the shipped CoOp subsets come back exactly (checked against the tree), a user's file wins, anything
else is sampled reproducibly from (subset_seed, split) alone; ImageNet's validation comes from unused train images."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from test_data_coop import fake_coop_tree
from xmx.data.datasets import DatasetSplits, Datum, load_dataset, read_json
from xmx.data.fewshot import (SUBSETS_DIR, sample_fewshot, select_fewshot, shipped_subset_path, subset_to_json,
                              write_json_atomic)
from xmx.errors import XmxError

SHOTS = (1, 2, 4, 8, 16)


@pytest.fixture(scope="session")
def caltech(tmp_path_factory):
    return load_dataset("caltech101", fake_coop_tree(tmp_path_factory, "caltech101"))


@pytest.fixture(scope="session")
def pets(tmp_path_factory):
    return load_dataset("oxford_pets", fake_coop_tree(tmp_path_factory, "oxford_pets"))


def _triples(items):
    return [(d.path, d.label, d.classname) for d in items]


def _shipped(dataset, shots, seed):
    raw = read_json(SUBSETS_DIR / dataset / f"shot_{shots}-seed_{seed}.json.gz")
    return [tuple(x) for x in raw["train"]], [tuple(x) for x in raw["val"]]


def test_shipped_subset_folders_use_xmx_names():
    from xmx.data import coop  # noqa: F401  (registers the names)
    from xmx.data.datasets import DATASETS
    folders = sorted(p.name for p in SUBSETS_DIR.iterdir())
    assert folders == sorted(n for n in coop.COOP_DATASETS if not DATASETS[n].test_only)
    assert shipped_subset_path("imagenet", 16, 1) is None  # not redistributed
    assert shipped_subset_path("imagenet", 8, 5) is not None
    assert shipped_subset_path("oxford_pets", 16, 4) is None


@pytest.mark.parametrize("name", ["caltech", "pets"])
def test_shipped_subsets_returned_exactly(name, request):
    splits = request.getfixturevalue(name)
    dataset = splits.name
    train_set, val_set = set(splits.train), set(splits.val)
    for shots in SHOTS:
        for seed in (1, 2, 3):
            train, val, source = select_fewshot(dataset, splits, shots, seed)
            exp_train, exp_val = _shipped(dataset, shots, seed)
            assert _triples(train) == exp_train and _triples(val) == exp_val
            assert source == f"coop:{dataset}/shot_{shots}-seed_{seed}.json.gz"
            assert set(train) <= train_set and set(val) <= val_set  # the tree's own Datum objects
            assert set(Counter(d.label for d in val).values()) == {min(shots, 4)}
    # subset_seed equal to the seed is the default
    assert select_fewshot(dataset, splits, 4, 2, subset_seed=2)[2] == f"coop:{dataset}/shot_4-seed_2.json.gz"


def test_sampled_subsets_seeded_reproducible_and_independent_of_global_state(pets):
    ref = select_fewshot("oxford_pets", pets, 16, 1, subset_seed=7)
    random.seed(123)
    np.random.seed(123)
    again = select_fewshot("oxford_pets", pets, 16, 1, subset_seed=7)
    assert ref == again and ref[2] == "sampled (subset_seed=7, shots=16, val_shots=4)"
    other = select_fewshot("oxford_pets", pets, 16, 1, subset_seed=8)
    assert _triples(other[0]) != _triples(ref[0]) and _triples(other[1]) != _triples(ref[1])
    assert _triples(ref[0]) != _shipped("oxford_pets", 16, 7 % 3 + 1)[0]
    train, val, _ = ref
    assert set(Counter(d.label for d in train).values()) == {16} and len(train) == 16 * 37
    assert set(Counter(d.label for d in val).values()) == {4}
    assert set(train) <= set(pets.train) and set(val) <= set(pets.val)
    assert [d.label for d in train] == sorted(d.label for d in train)


def test_uncovered_shots_are_sampled(caltech):
    train, val, source = select_fewshot("caltech101", caltech, 3, 1)
    assert source.startswith("sampled (subset_seed=1, shots=3, val_shots=3)")
    assert len(train) == 300 and len(val) == 300


def test_val_shots_override_keeps_shipped_train(pets):
    train, val, source = select_fewshot("oxford_pets", pets, 16, 2, val_shots=16)
    assert _triples(train) == _shipped("oxford_pets", 16, 2)[0]
    assert set(Counter(d.label for d in val).values()) == {16} and set(val) <= set(pets.val)
    assert source.startswith("coop:oxford_pets/shot_16-seed_2.json.gz (train); val sampled")


def test_user_subset_file_wins(pets, tmp_path):
    train = sample_fewshot(pets.train, 2, 7)  # 2 images of every class: not what seed 1 samples
    val = pets.val[:3]
    path = tmp_path / "my_subset.json"
    write_json_atomic(path, subset_to_json({"train": train, "val": val}))
    got_train, got_val, source = select_fewshot("oxford_pets", pets, 2, 1, subset_file=path)
    assert got_train == train and got_val == val and source == f"file:{path}"
    assert got_train != select_fewshot("oxford_pets", pets, 2, 1)[0]
    # without "val", validation is sampled
    write_json_atomic(path, subset_to_json({"train": train}))
    got_train, got_val, source = select_fewshot("oxford_pets", pets, 2, 1, subset_file=path)
    assert got_train == train and len(got_val) == 2 * 37 and "val sampled" in source


def test_bad_subset_files(pets, tmp_path):
    with pytest.raises(XmxError, match=r"subset file not found: .*nope\.json"):
        select_fewshot("oxford_pets", pets, 1, 1, subset_file=tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    write_json_atomic(bad, {"train": [["oxford_pets/images/Not_There_1.jpg", 0, "abyssinian"]], "val": []})
    with pytest.raises(XmxError, match=r"1 of 1 train items are not in the dataset's train split lists, "
                                       r"e\.g\. oxford_pets/images/Not_There_1\.jpg"):
        select_fewshot("oxford_pets", pets, 1, 1, subset_file=bad)
    d = pets.train[0]
    write_json_atomic(bad, {"train": [[d.path, d.label + 1, d.classname]], "val": []})
    with pytest.raises(XmxError, match=rf"label {d.label + 1}, split says {d.label}"):
        select_fewshot("oxford_pets", pets, 1, 1, subset_file=bad)
    write_json_atomic(bad, {"val": []})
    with pytest.raises(XmxError, match=r'has no "train" list'):
        select_fewshot("oxford_pets", pets, 1, 1, subset_file=bad)


def _subset_case(pets, case):
    """(file contents, shots, required classes) of one class of bad subset file."""
    one = sample_fewshot(pets.train, 1, 3)  # one image of each of the 37 classes
    rows = [[d.path, d.label, d.classname] for d in one]
    return {
        "a JSON list": (rows, 1, None),
        "an empty train list": ({"train": []}, 1, None),
        "a duplicated image": ({"train": rows + rows[:1]}, 1, None),
        "a class missing": ({"train": rows[1:]}, 1, None),
        "a float label": ({"train": [[rows[0][0], 0.0, rows[0][2]]] + rows[1:]}, 1, None),
        "a bool label": ({"train": [[rows[0][0], True, rows[0][2]]] + rows[1:]}, 1, None),
        "a label out of range": ({"train": rows + [[rows[0][0] + "x", 37, "x"]]}, 1, None),
        "a negative label": ({"train": [[rows[0][0], -1, rows[0][2]]] + rows[1:]}, 1, None),
        "an absolute path": ({"train": [["/etc/passwd", 0, "abyssinian"]] + rows[1:]}, 1, None),
        "a path leaving $DATA": ({"train": [["oxford_pets/../../x.jpg", 0, "abyssinian"]] + rows[1:]}, 1, None),
        "5 images of one class for shots=16": (
            {"train": [[d.path, d.label, d.classname] for d in pets.train if d.label == 0][:5]}, 16, [0]),
        "fewer images than shots in every class": ({"train": rows}, 16, None),
        "another dataset's subset": ({"dataset": "dtd", "train": rows}, 1, None),
        "an unknown key": ({"train": rows, "tain": []}, 1, None),
        "an entry that is not a triple": ({"train": [[rows[0][0], 0]] + rows[1:]}, 1, None),
    }[case]


SUBSET_CASES = {  # case -> what the one line says
    "a JSON list": "the file holds a JSON list, not an object",
    "an empty train list": 'the "train" list is empty',
    "a duplicated image": 'is listed twice in "train"',
    "a class missing": "1 of the 37 classes this protocol trains on have no training image (e.g. 0 'abyssinian')",
    "a float label": "the label must be a whole number (a class index), not 0.0",
    "a bool label": "the label must be a whole number (a class index), not True",
    "a label out of range": "label 37 of oxford_pets/",
    "a negative label": "the label -1 is negative",
    "an absolute path": "the path leaves the dataset folder",
    "a path leaving $DATA": "the path leaves the dataset folder",
    "5 images of one class for shots=16": "class 0 'abyssinian' has 5 training images but shots=16 (1 classes differ); "
                                          "set shots=5 to match the file",
    "fewer images than shots in every class": "set shots=1 to match the file",
    "another dataset's subset": "the file is a subset of 'dtd', this run's dataset is 'oxford_pets'",
    "an unknown key": "unknown key(s) 'tain'",
    "an entry that is not a triple": "is not [path, label, classname]",
}


@pytest.mark.parametrize("case", sorted(SUBSET_CASES))
def test_every_class_of_bad_subset_file_is_one_line(pets, tmp_path, case):
    raw, shots, required = _subset_case(pets, case)
    path = tmp_path / "subset.json"
    write_json_atomic(path, raw)
    with pytest.raises(XmxError) as e:
        select_fewshot("oxford_pets", pets, shots, 1, subset_file=path, required_classes=required)
    msg = str(e.value)
    assert SUBSET_CASES[case] in msg and "\n" not in msg and str(path) in msg, msg


def test_a_protocol_that_trains_on_some_classes_needs_only_those(pets, tmp_path):
    base = [d for d in sample_fewshot(pets.train, 2, 3) if d.label < 19]
    path = tmp_path / "base.json"
    write_json_atomic(path, subset_to_json({"train": base}))
    train, _, _ = select_fewshot("oxford_pets", pets, 2, 1, subset_file=path, required_classes=list(range(19)))
    assert train == base
    with pytest.raises(XmxError, match="18 of the 37 classes"):
        select_fewshot("oxford_pets", pets, 2, 1, subset_file=path)


def test_a_runs_own_subset_record_is_accepted_as_a_subset_file(pets, tmp_path):
    """The format a run writes (``subset.json``: metadata + lists) round-trips as ``data.subset_file``."""
    train, val, source = select_fewshot("oxford_pets", pets, 4, 1)
    record = {"dataset": "oxford_pets", "shots": 4, "seed": 1, "source": source,
              **subset_to_json({"train": train, "val": val})}
    path = tmp_path / "subset.json"
    write_json_atomic(path, record)
    got_train, got_val, got_source = select_fewshot("oxford_pets", pets, 4, 9, subset_file=path)
    assert got_train == train and got_val == val and got_source == f"file:{path}"


def test_too_many_shots_is_one_line(pets):
    with pytest.raises(XmxError) as e:
        select_fewshot("oxford_pets", pets, 500, 1)
    msg = str(e.value)
    assert msg.startswith("oxford_pets: shots=500 but class") and "use shots<=" in msg and "\n" not in msg


# ------------------------------------------------------------------------------------------ ImageNet (no val split)
def _imagenet_like(per_class=30, classes=5) -> DatasetSplits:
    train = [Datum(f"imagenet/images/train/w{c}/w{c}_{k:03d}.JPEG", c, f"class {c}")
             for c in range(classes) for k in range(per_class)]
    return DatasetSplits("imagenet", None, train, [], [], [f"class {c}" for c in range(classes)], ["{}"])


def test_imagenet_val_drawn_from_train_outside_subset():
    splits = _imagenet_like()
    for shots in (1, 4, 16):
        train, val, source = select_fewshot("imagenet_like", splits, shots, 1)
        assert source.startswith("sampled")
        assert not {d.path for d in train} & {d.path for d in val}
        assert set(Counter(d.label for d in val).values()) == {min(shots, 4)}
        assert set(val) <= set(splits.train)
    with pytest.raises(XmxError, match=r"imagenet_like: shots=27 .*has only 14 val images"):
        select_fewshot("imagenet_like", splits, 16, 1, val_shots=27)


def test_imagenet_shipped_subset_checked_against_tree():
    raw = read_json(SUBSETS_DIR / "imagenet" / "shot_2-seed_4.json.gz")
    items = [Datum(p, y, c) for p, y, c in raw["train"] + raw["val"]]
    extra = [Datum(f"imagenet/images/train/x/extra_{i}.JPEG", i % 1000, "x") for i in range(50)]
    splits = DatasetSplits("imagenet", None, extra + items, [], [], [], [])
    train, val, source = select_fewshot("imagenet", splits, 2, 4)
    assert _triples(train) == [tuple(x) for x in raw["train"]] and _triples(val) == [tuple(x) for x in raw["val"]]
    assert source == "coop:imagenet/shot_2-seed_4.json.gz"
    # a tree that lacks the listed images: one line saying so and how to sample instead
    with pytest.raises(XmxError, match=r"coop:imagenet/shot_2-seed_4\.json\.gz: 2000 of 2000 train items are not in "
                                       r"the dataset's train split lists.*data\.subset_seed"):
        select_fewshot("imagenet", DatasetSplits("imagenet", None, extra, [], [], [], []), 2, 4)


def test_sample_fewshot_unchanged():
    items = [Datum(f"d/{i}.jpg", i % 3, str(i % 3)) for i in range(30)]
    a = sample_fewshot(items, 2, 5)
    assert a == sample_fewshot(items, 2, 5) and len(a) == 6
    assert sample_fewshot(items, 0, 5) == items
