"""Few-shot subsets: K images per class drawn with a generator seeded from (seed, split) alone, never global state;
:func:`select_fewshot` picks a run's subset (a user's file, else the CoOp-protocol subset shipped in
``fewshot_subsets/<dataset>/shot_<K>-seed_<S>.json.gz``, else seeded sampling)."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from xmx.data.datasets import Datum
from xmx.errors import XmxError


def _rng(seed: int, tag: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{tag}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample_fewshot(items: list[Datum], shots: int, seed: int, tag: str = "train", short: str = "error") -> list[Datum]:
    """``shots`` items per class, in label order, sampled without replacement by a generator seeded from
    ``(seed, tag)``. ``shots <= 0`` means all items. A class with fewer than ``shots`` items: ``short="error"`` stops
    with one line; ``short="all"`` keeps all of its items, drawing nothing (Dassl's ``generate_fewshot_dataset`` with
    ``repeat=False``, which the releases' K-shot validation subsets use)."""
    if shots is None or shots <= 0:
        return list(items)
    by_class: dict[int, list[Datum]] = defaultdict(list)
    for d in items:
        by_class[d.label].append(d)
    rng = _rng(seed, tag)
    out = []
    for label in sorted(by_class):
        pool = by_class[label]
        if len(pool) < shots and short == "all":
            out.extend(pool)
            continue
        if len(pool) < shots:
            raise XmxError(f"shots={shots} but class {label} ({pool[0].classname!r}) has only {len(pool)} "
                           f"{tag} images; use shots<={min(len(v) for v in by_class.values())}")
        idx = rng.choice(len(pool), size=shots, replace=False)
        out.extend(pool[i] for i in sorted(idx))
    return out


def subset_digest(items: list[Datum]) -> str:
    """sha256 over the exact (path, label) list: the identity of a data subset."""
    h = hashlib.sha256()
    for d in items:
        h.update(f"{d.path}\t{d.label}\n".encode())
    return h.hexdigest()


def subset_to_json(splits: dict[str, list[Datum]]) -> dict:
    """Portable form of a subset (same as the shipped CoOp subsets): {split: [[path, label, classname], ...]}."""
    return {name: [[d.path, d.label, d.classname] for d in items] for name, items in splits.items()}


def read_subset_file(path: str | Path) -> dict[str, list[Datum]]:
    from xmx.data.datasets import read_json
    path = Path(path).expanduser()
    if not path.is_file():
        raise XmxError(f"subset file not found: {path}; expected JSON {{\"train\": [[path, label, classname], ...], "
                       "\"val\": [...]}} with paths relative to $DATA")
    try:
        raw = read_json(path)
        return {k: [Datum(str(p), int(y), str(c)) for p, y, c in v] for k, v in raw.items()}
    except (ValueError, TypeError, EOFError) as e:
        raise XmxError(f"subset file {path} is malformed ({e}); expected {{split: [[path, label, classname], ...]}}") from None


def write_json_atomic(path: str | Path, obj) -> None:
    from xmx.utils import atomic_write_text
    atomic_write_text(path, json.dumps(obj))


# --------------------------------------------------------------------------------- choosing a run's few-shot subset
SUBSETS_DIR = Path(__file__).with_name("fewshot_subsets")


def shipped_subset_path(dataset: str, shots: int, seed: int) -> Path | None:
    """The CoOp-protocol subset xmx ships for (dataset, shots, seed), or None when it is not covered."""
    path = SUBSETS_DIR / dataset / f"shot_{shots}-seed_{seed}.json.gz"
    return path if path.is_file() else None


def _default_val_shots(shots: int) -> int:
    return min(shots, 4) if shots and shots > 0 else 0


def resolve_val_shots(val_shots, shots: int, has_val: bool) -> int | str:
    """``data.val_shots`` -> images per class of the validation subset, or ``"all"`` for the dataset's whole
    validation split. ``null``: ``min(shots, 4)`` (CoOp's few-shot validation). ``all``: the whole split (what
    Tip-Adapter's release selects on); a dataset without one (ImageNet) keeps the ``min(shots, 4)``-per-class subset
    drawn from training images outside the training subset."""
    if val_shots is None:
        return _default_val_shots(shots)
    if isinstance(val_shots, str) and val_shots.strip().lower() == "all":
        return "all" if has_val else _default_val_shots(shots)
    try:
        k = int(val_shots)
        if isinstance(val_shots, bool) or k != float(val_shots) or k < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise XmxError(f"data.val_shots={val_shots!r}; valid choices: null (min(shots, 4) per class), all (the "
                       "dataset's whole validation split) or a number of images per class >= 0") from None
    return k


def describe_val(val_shots, shots: int, has_val: bool) -> str:
    """One phrase saying which validation images a run selects on (results.json ``data.val.selection``)."""
    k = resolve_val_shots(val_shots, shots, has_val)
    if k == "all":
        return "the whole validation split"
    if has_val:
        return f"{k} images per class from the validation split"
    return (f"{k} images per class from training images outside the training subset (the dataset has no "
            "validation split" + ("; val_shots=all falls back to min(shots, 4) per class)" if k != val_shots and
                                  val_shots is not None else ")"))


def _match(items: list[Datum], pool: dict[str, Datum], what: str, source: str, fix: str) -> list[Datum]:
    """Map subset items onto the tree's own :class:`Datum` objects, failing on anything not in ``pool``."""
    out, bad = [], []
    for d in items:
        own = pool.get(d.path)
        if own is None or own.label != d.label:
            bad.append(d.path if own is None else f"{d.path} (label {d.label}, split says {own.label})")
        else:
            out.append(own)
    if bad:
        raise XmxError(f"{source}: {len(bad)} of {len(items)} {what} items are not in the dataset's {what} split "
                       f"lists, e.g. {', '.join(bad[:3])}; {fix}")
    return out


def select_fewshot(dataset: str, splits, shots: int, seed: int, subset_seed: int | None = None,
                   subset_file: str | Path | None = None,
                   val_shots: int | None = None) -> tuple[list[Datum], list[Datum], str]:
    """The K-shot training subset and the validation subset of a run, and where they came from.

    Order of precedence: ``subset_file`` (a user's ``{"train": [...], "val": [...]}``) wins; else the CoOp-protocol
    subset xmx ships for (dataset, shots, seed), when ``subset_seed`` is the default (None or ``seed``); else seeded
    sampling with ``subset_seed`` (default ``seed``), independent of global random state. Validation has
    ``val_shots`` (default ``min(shots, 4)``) images per class, drawn from the val split, or, when the dataset has
    none (ImageNet), from the training images outside the training subset; ``val_shots="all"`` keeps the whole val
    split (:func:`resolve_val_shots`). Every item is checked against the split
    lists of ``splits`` (a :class:`~xmx.data.datasets.DatasetSplits`) and returned as the tree's own Datum.
    """
    sseed = seed if subset_seed is None else subset_seed
    train_pool = {d.path: d for d in splits.train}
    has_val = bool(splits.val)
    vshots = resolve_val_shots(val_shots, shots, has_val)
    val_pool = {d.path: d for d in splits.val}

    def val_from(pool_items: list[Datum], train_subset: list[Datum]) -> list[Datum]:
        if vshots == "all":
            return list(pool_items)
        if has_val:
            pool = pool_items
        else:
            taken = {d.path for d in train_subset}
            pool = [d for d in splits.train if d.path not in taken]
        # the val split (Dassl's K-shot val keeps small classes whole); train images outside the subset: an error
        return _sample(pool, vshots, sseed, "val", short="all" if has_val else "error") if vshots else []

    def _sample(items: list[Datum], k: int, s: int, tag: str, short: str = "error") -> list[Datum]:
        try:
            return sample_fewshot(items, k, s, tag, short)
        except XmxError as e:
            raise XmxError(f"{dataset}: {e}") from None

    if subset_file is not None:
        source = str(Path(subset_file).expanduser())
        raw = read_subset_file(subset_file)
        if "train" not in raw:
            raise XmxError(f"subset file {source} has no \"train\" list; expected {{\"train\": [[path, label, "
                           "classname], ...], \"val\": [...]}} with paths relative to $DATA")
        fix = f"the subset file was written for another dataset or split file; check data.subset_file={source}"
        train = _match(raw["train"], train_pool, "train", source, fix)
        if "val" in raw:
            val = _match(raw["val"], val_pool if has_val else train_pool, "val" if has_val else "train", source, fix)
            overlap = {d.path for d in val} & {d.path for d in train}
            if overlap:
                raise XmxError(f"subset file {source}: {len(overlap)} images are in both \"train\" and \"val\", "
                               f"e.g. {', '.join(sorted(overlap)[:3])}; validation images must be held out")
        else:
            val = val_from(splits.val, train)
            source += (" (val: the whole validation split)" if vshots == "all" else
                       f" (val sampled: subset_seed={sseed}, val_shots={vshots})")
        return train, val, f"file:{source}"

    shipped = shipped_subset_path(dataset, shots, seed) if sseed == seed else None
    if shipped is not None:
        from xmx.data.datasets import read_json
        raw = read_json(shipped)
        name = f"coop:{dataset}/{shipped.name}"
        fix = ("the dataset's split file differs from CoOp's; set data.subset_seed to a value other than the seed "
               "to sample a subset instead")
        train = _match([Datum(str(p), int(y), str(c)) for p, y, c in raw["train"]], train_pool, "train", name, fix)
        if vshots == _default_val_shots(shots):
            val = _match([Datum(str(p), int(y), str(c)) for p, y, c in raw["val"]],
                         val_pool if has_val else train_pool, "val" if has_val else "train", name, fix)
            return train, val, name
        if vshots == "all":
            return train, val_from(splits.val, train), f"{name} (train); val: the whole validation split"
        return train, val_from(splits.val, train), f"{name} (train); val sampled (subset_seed={sseed}, val_shots={vshots})"

    train = _sample(splits.train, shots, sseed, "train")
    return train, val_from(splits.val, train), f"sampled (subset_seed={sseed}, shots={shots}, val_shots={vshots})"
