"""Protocols on fake CoOp trees built from the real split files: base-to-new sizes and relabelling, the training
subset filtered (not resampled) from the all-class subset, and domain shift onto the ImageNet variants."""

from __future__ import annotations

import pytest
from test_data_coop import fake_coop_tree, write_files

from xmx.data import coop, load_dataset
from xmx.data.fewshot import select_fewshot
from xmx.data.protocols import build_protocol, n_base_classes
from xmx.errors import XmxError


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    root = fake_coop_tree(tmp_path_factory, "oxford_pets")
    return load_dataset("oxford_pets", root)


def test_base_to_new_on_oxford_pets(pets):
    p = build_protocol({"name": "base2new"}, pets, shots=16, seed=1, templates=pets.templates)
    base, new = p.eval_sets
    assert (base.name, new.name) == ("test_base", "test_new")
    assert len(p.classnames) == 19 and len(new.classnames) == 18  # ceil(37/2) / rest
    assert base.classnames == pets.classnames[:19] and new.classnames == pets.classnames[19:]
    # each split has only its own classes, relabelled from 0
    assert {d.label for d in base.items} == set(range(19)) and {d.label for d in new.items} == set(range(18))
    assert len(base.items) + len(new.items) == len(pets.test)
    assert all(new.classnames[d.label] == d.classname for d in new.items)
    assert base.seen_only and not any(i is not None for i in new.train_index)
    # the training subset is the all-class 16-shot CoOp subset filtered to base classes: not resampled
    all_train, _, source = select_fewshot("oxford_pets", pets, 16, 1)
    assert source.startswith("coop:")
    assert [d.path for d in p.train] == [d.path for d in all_train if d.label < 19]
    assert {d.label for d in p.val.items} <= set(range(19))
    assert p.summarize({"test_base/acc": 80.0, "test_new/acc": 60.0})["hm"] == pytest.approx(2 * 80 * 60 / 140)


def test_base_split_keys():
    assert n_base_classes(37, "ceil") == 19 and n_base_classes(37, "floor") == 18
    assert n_base_classes(100, "ceil", 0.8) == 80
    with pytest.raises(XmxError, match="valid choices: ceil, floor, release"):
        n_base_classes(10, "round")
    with pytest.raises(XmxError, match="strictly between 0 and 1"):
        n_base_classes(10, "ceil", 1.0)


def test_base_split_release_is_the_mma_codes_rule(pets):
    """MMA's released code: floor(n/2) base classes for 50/50 (not CoCoOp's ceil) and n - n//5 for 80/20."""
    assert n_base_classes(37, "release", 0.5) == 18 and n_base_classes(101, "release", 0.5) == 50
    assert n_base_classes(37, "release", 0.8) == 37 - 7 == 30 and n_base_classes(102, "release", 0.8) == 82
    with pytest.raises(XmxError, match="base_split=release is defined for protocol.base_ratio 0.5 or 0.8"):
        n_base_classes(37, "release", 0.7)
    p = build_protocol({"name": "base2new", "base_split": "release"}, pets, shots=1, seed=1, templates=pets.templates)
    assert len(p.classnames) == 18 and len(p.eval_sets[1].classnames) == 19


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """ImageNet (2 train + 1 val image per class) and the four variants (1 image per class) in CoOp's layout."""
    root = tmp_path_factory.mktemp("imagenet_data")
    wnids, a, r = coop.shipped_wnids("imagenet"), coop.shipped_wnids("imagenet_a"), coop.shipped_wnids("imagenet_r")
    files = [f"imagenet/images/train/{w}/{w}_{i}.JPEG" for w in wnids for i in range(2)]
    files += [f"imagenet/images/val/{w}/{w}_v.JPEG" for w in wnids]
    files += [f"imagenetv2/imagenetv2-matched-frequency-format-val/{i}/x.jpeg" for i in range(1000)]
    files += [f"imagenet-sketch/images/{w}/s.JPEG" for w in wnids]
    files += [f"imagenet-adversarial/imagenet-a/{w}/a.jpg" for w in a]
    files += [f"imagenet-rendition/imagenet-r/{w}/r.jpg" for w in r]
    write_files(root, files)
    return root


def test_domain_shift_eval_sets_and_class_subsets(imagenet_root):
    src = load_dataset("imagenet", imagenet_root)
    p = build_protocol({"name": "domain_shift", "targets": ["imagenet_v2", "imagenet_sketch", "imagenet_a",
                                                             "imagenet_r"]},
                       src, shots=1, seed=1, subset_seed=7, templates=src.templates, root=imagenet_root)
    names = [s.name for s in p.eval_sets]
    assert names == ["test", "test_imagenet_v2", "test_imagenet_sketch", "test_imagenet_a", "test_imagenet_r"]
    sets = dict(zip(names, p.eval_sets))
    assert len(sets["test"].classnames) == 1000 and len(sets["test_imagenet_v2"].classnames) == 1000
    for v in ("imagenet_a", "imagenet_r"):
        s = sets[f"test_{v}"]
        assert len(s.classnames) == 200 and len(s.items) == 200
        assert s.train_index == coop.imagenet_indices(v)  # the 200-way classifier's columns among ImageNet's
        assert [p.classnames[i] for i in s.train_index] == s.classnames
    assert len(p.train) == 1000 and not {d.path for d in p.train} & {d.path for d in p.val.items}
