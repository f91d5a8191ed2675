"""Evaluation protocols (docs/protocols.md): which images train, which select, and which label sets are tested.

- ``fewshot``: K shots per class of every class; test on the dataset's test split.
- ``base2new``: sorted label ids, base = first ceil(N·ratio) (or floor, or the MMA release's rule), new = the rest,
  each relabelled from 0; the training subset is the all-class few-shot subset filtered to base classes (not
  resampled); test base and new separately, each with only its own classes; HM = 2BN/(B+N).
- ``cross_dataset`` / ``domain_shift``: train few-shot on the source dataset; test on the source and on every
  target's test split with the target's own classes (ImageNet-A/-R: their 200-class subsets).
- ``test_time``: nothing trains; every test split (the dataset's, then each of ``targets``) is one unlabelled stream
  read in the order :func:`stream_order` draws from ``seed`` alone (TDA, TPT: docs/methods/test_time.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from xmx.data.datasets import Datum, DatasetSplits, load_dataset
from xmx.data.fewshot import select_fewshot
from xmx.errors import XmxError


@dataclass
class EvalSet:
    """A labelled image list with its own label space; ``name`` is the metric prefix (``test`` -> ``test/acc``)."""
    name: str
    items: list[Datum]  # labels relabelled to 0..len(classnames)-1
    classnames: list[str]
    dataset: str
    templates: list[str]
    # for each class of this set, its index among the training classes (None where the class was never trained):
    # methods whose outputs are tied to training classes (linear probe, caches) read their columns through it
    train_index: list[int | None] = field(default_factory=list)
    # protocol=test_time: the stream order, as indices into the split's own list (items are already in this order)
    order: list[int] | None = None

    @property
    def seen_only(self) -> bool:
        return all(i is not None for i in self.train_index)


@dataclass
class ProtocolData:
    name: str
    train: list[Datum]
    classnames: list[str]  # the training label space
    templates: list[str]
    val: EvalSet
    eval_sets: list[EvalSet]
    subset_source: str = "sampled"

    def summarize(self, metrics: dict) -> dict:
        """Protocol-level numbers derived from per-set metrics (base-to-new: the harmonic mean)."""
        if self.name == "base2new" and "test_base/acc" in metrics and "test_new/acc" in metrics:
            b, n = metrics["test_base/acc"], metrics["test_new/acc"]
            return {"hm": 2 * b * n / (b + n) if b + n > 0 else 0.0}
        return {}


def _relabel(items: list[Datum], keep: list[int]) -> list[Datum]:
    new = {old: i for i, old in enumerate(keep)}
    return [Datum(d.path, new[d.label], d.classname) for d in items if d.label in new]


def _index_in(keys: list[str], train_keys: list[str]) -> list[int | None]:
    """Each target class's position among the training classes, matched on stable class keys."""
    pos = {c: i for i, c in enumerate(train_keys)}
    return [pos.get(c) for c in keys]


BASE_SPLITS = ("ceil", "floor", "release")
RELEASE_RATIOS = (0.5, 0.8)


def n_base_classes(n: int, base_split: str = "ceil", base_ratio: float = 0.5) -> int:
    """How many of ``n`` sorted classes are base classes. ``ceil``/``floor``: of ``n * base_ratio`` (CoCoOp: ceil);
    ``release``: MMA's released code, ``n // 2`` for 50/50 and ``n - n // 5`` for 80/20 (only those two ratios)."""
    if base_split not in BASE_SPLITS:
        raise XmxError(f"protocol.base_split={base_split!r}; valid choices: {', '.join(BASE_SPLITS)}")
    if not 0 < base_ratio < 1:
        raise XmxError(f"protocol.base_ratio={base_ratio} must lie strictly between 0 and 1")
    if base_split == "release":
        if math.isclose(base_ratio, 0.5):
            return n // 2
        if math.isclose(base_ratio, 0.8):
            return n - n // 5
        raise XmxError(f"protocol.base_split=release is defined for protocol.base_ratio 0.5 or 0.8 (the release's "
                       f"50/50 and 80/20), got {base_ratio}; use base_split=ceil|floor for other ratios")
    return (math.ceil if base_split == "ceil" else math.floor)(n * base_ratio)


def stream_order(n: int, seed: int) -> list[int]:
    """The order in which a test-time method reads a split of ``n`` images: a permutation drawn from ``seed`` alone
    (a fresh generator: no global RNG, no dataset, no other setting enters it)."""
    import torch
    return torch.randperm(int(n), generator=torch.Generator().manual_seed(int(seed))).tolist()


def _stream(s: EvalSet, seed: int) -> EvalSet:
    order = stream_order(len(s.items), seed)
    s.items, s.order = [s.items[i] for i in order], order
    return s


PROTOCOLS = ("fewshot", "base2new", "cross_dataset", "domain_shift", "test_time")


def build_protocol(cfg: dict, splits: DatasetSplits, shots: int, seed: int, templates: list[str],
                   subset_seed: int | None = None, subset_file: str | None = None,
                   val_shots: int | None = None, root: str | Path | None = None,
                   target_templates=None) -> ProtocolData:
    name = cfg.get("name", "fewshot")
    if name not in PROTOCOLS:
        raise XmxError(f"protocol.name={name!r}; valid choices: {', '.join(PROTOCOLS)}")
    if name == "test_time":
        return _test_time(cfg, splits, seed, templates, root, target_templates)
    train, val, source = select_fewshot(splits.name, splits, shots, seed, subset_seed=subset_seed,
                                        subset_file=subset_file, val_shots=val_shots)
    classnames = list(splits.classnames)
    ds = splits.name

    if name == "base2new":
        n = len(classnames)
        nb = n_base_classes(n, cfg.get("base_split", "ceil"), float(cfg.get("base_ratio", 0.5)))
        base, new = list(range(nb)), list(range(nb, n))
        base_names, new_names = [classnames[i] for i in base], [classnames[i] for i in new]
        val_set = EvalSet("val", _relabel(val, base), base_names, ds, templates, list(range(nb)))
        return ProtocolData(
            name, _relabel(train, base), base_names, templates, val_set,
            [EvalSet("test_base", _relabel(splits.test, base), base_names, ds, templates, list(range(nb))),
             EvalSet("test_new", _relabel(splits.test, new), new_names, ds, templates, [None] * len(new))],
            source)

    val_set = EvalSet("val", val, classnames, ds, templates, list(range(len(classnames))))
    test = EvalSet("test", splits.test, classnames, ds, templates, list(range(len(classnames))))
    eval_sets = [test]
    if name in ("cross_dataset", "domain_shift"):
        targets = list(cfg.get("targets") or [])
        if not targets:
            raise XmxError(f"protocol={name} needs protocol.targets (a list of dataset names)")
        for t in targets:
            tsplits = load_dataset(t, root if root is not None else splits.root)
            tt = templates if target_templates is None else target_templates(tsplits)
            eval_sets.append(EvalSet(f"test_{t}", tsplits.test, list(tsplits.classnames), t, tt,
                                     _index_in(tsplits.keys, splits.keys)))
    return ProtocolData(name, train, classnames, templates, val_set, eval_sets, source)


def _test_time(cfg: dict, splits: DatasetSplits, seed: int, templates: list[str], root, target_templates
               ) -> ProtocolData:
    """No training images, no selection images: the test split (and each target's) as a seeded stream."""
    classnames, ds = list(splits.classnames), splits.name
    every = list(range(len(classnames)))
    sets = [_stream(EvalSet("test", list(splits.test), classnames, ds, templates, every), seed)]
    for t in list(cfg.get("targets") or []):
        tsplits = load_dataset(t, root if root is not None else splits.root)
        tt = templates if target_templates is None else target_templates(tsplits)
        sets.append(_stream(EvalSet(f"test_{t}", list(tsplits.test), list(tsplits.classnames), t, tt,
                                    [None] * len(tsplits.classnames)), seed))
    return ProtocolData("test_time", [], classnames, templates, EvalSet("val", [], classnames, ds, templates, every),
                        sets, "none: protocol=test_time trains on nothing")
