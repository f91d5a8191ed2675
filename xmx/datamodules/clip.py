"""CLIPDataModule: a CoOp-layout dataset under a protocol, served as images or as cached frozen-CLIP features.

Feature-based methods (linear probe, CLIP-Adapter, Tip-Adapter, MMA, XMAdapter) set ``inputs: features``: every image
goes through the frozen encoder once per augmented view, through the feature store, and batches are
``(raw_features[B,C], labels[B])``. Methods that run encoders inside the training step set ``inputs: images``.
``feature_output: pre_projection`` (a method's ``feature_output`` key; ProLIP) serves the features *before* the image
encoder's final projection instead (``[B,D]``, their own feature-store entries), everywhere the raw ones would be.
With ``inputs: images``, ``data.decode`` says where images are decoded and augmented (:mod:`xmx.features.online`):
PIL in the loader workers, or JPEG bytes decoded on the trainer's device in :meth:`transfer_batch_to_device`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from xmx.config import check_decode
from xmx.data.datasets import Datum, load_dataset
from xmx.data.fake import is_fake_tree
from xmx.data.fewshot import describe_val, subset_digest, subset_to_json
from xmx.data.fingerprint import check_mode, combine, fingerprint_files
from xmx.data.images import check_unreadable, find_unreadable
from xmx.data.protocols import EvalSet, build_protocol
from xmx.data.templates import resolve_templates
from xmx.errors import XmxError
from xmx.validate import Decode, NonNegInt, PosInt

log = logging.getLogger(__name__)


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed process group (DDP), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Each epoch's randomness comes from (seed, epoch) alone, so a resumed run sees the same data order."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


class EpochBatchSampler(Sampler):
    """Yields ``[B,2]`` tensors of (sample, view) pairs: a fresh permutation each epoch and, per ``view_sampling``,
    one random view per sample (``random``) or the same view for every sample, cycling ``epoch % views``
    (``cycle``: Tip-Adapter-F's "one cached view per epoch"); all drawn from (seed, epoch). Lightning calls
    ``set_epoch`` before every epoch.

    Distributed (``rank``/``world_size``, default: torch.distributed's when initialised): ``batch_size`` is the global
    batch; for training (``pad=True``) each rank takes every world-th sample of each global batch (a rank left empty by
    a tiny last batch repeats one sample), so all ranks yield the same number of batches; for evaluation
    (``pad=False``) each rank takes a contiguous, unpadded slice of the order, so no sample is counted twice."""

    def __init__(self, n: int, views: int, batch_size: int | None, seed: int, shuffle: bool = True,
                 view_sampling: str = "random", rank: int | None = None, world_size: int | None = None,
                 pad: bool = True, drop_last: bool = False):
        """``drop_last``: leave out the last partial batch when the set holds at least one full batch (Dassl's
        ``drop_last=is_train and len(data_source) >= batch_size``, dassl/data/data_manager.py)."""
        if view_sampling not in ("random", "cycle"):
            raise XmxError(f"data.view_sampling={view_sampling!r}; valid choices: random, cycle")
        self.n, self.views, self.seed, self.shuffle, self.view_sampling = n, views, seed, shuffle, view_sampling
        self.batch_size = batch_size or n
        self.drop_last = bool(drop_last) and self.n >= self.batch_size
        self.epoch = 0
        r, w = dist_rank_world()
        self.rank, self.world_size, self.pad = r if rank is None else rank, w if world_size is None else world_size, pad

    def _eval_slice(self) -> tuple[int, int]:
        return self.n * self.rank // self.world_size, self.n * (self.rank + 1) // self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.world_size > 1 and not self.pad:
            lo, hi = self._eval_slice()
            return -(-(hi - lo) // self.batch_size)
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        g = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        if self.views > 1 and self.view_sampling == "random":
            view = torch.randint(self.views, (self.n,), generator=g)
        else:
            view = torch.full((self.n,), self.epoch % self.views, dtype=torch.long)
        if self.world_size > 1 and not self.pad:  # evaluation: this rank's contiguous slice, no padding
            lo, hi = self._eval_slice()
            order = order[lo:hi]
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for i in range(0, stop, self.batch_size):
            idx = order[i:i + self.batch_size]
            if self.world_size > 1 and self.pad:  # training: this rank's share of the global batch
                idx = idx[self.rank::self.world_size] if self.rank < len(idx) else idx[self.rank % len(idx):][:1]
            yield torch.stack([idx, view[idx]], dim=1)


class ResumableLoader(DataLoader):
    """The feature path's training loader, resumable in the middle of an epoch (Lightning checkpoints the
    ``state_dict`` of a loader that has one): its order comes from the sampler's (seed, epoch) alone, so a run resumed
    from a checkpoint taken after batch k of epoch e skips the first k batches of epoch e and goes on with the very
    batches the uninterrupted run saw. ``progress()`` says how many batches of the current epoch the trainer has
    consumed (set by the datamodule)."""

    resumes_mid_epoch = True

    def __init__(self, *args, progress=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        done = int(self.progress()) if self.progress else 0
        epoch = int(getattr(self.sampler, "epoch", 0))
        return {"epoch": epoch, "batches_done": done if done < len(self) else 0}

    def load_state_dict(self, state: dict) -> None:
        self._pending = dict(state) if state and state.get("batches_done") else None

    def __iter__(self):
        pending, self._pending = self._pending, None
        if not pending:
            return super().__iter__()
        rng = torch.get_rng_state()  # creating an iterator draws a seed: the run resumed mid-epoch must not
        it = super().__iter__()
        torch.set_rng_state(rng)
        return self._skip(it, pending)

    def _skip(self, it, pending: dict):
        first = next(it, None)  # the sampler reads its epoch here (Lightning sets it before the first batch)
        if first is None:
            return
        if int(getattr(self.sampler, "epoch", 0)) == pending["epoch"]:
            for _ in range(int(pending["batches_done"]) - 1):
                if next(it, None) is None:
                    return
            first = next(it, None)
            if first is None:
                return
        yield first
        yield from it


class FeatureBatches(Dataset):
    """Indexed by a ``[B,2]`` (sample, view) tensor: returns ``(features[B,C], labels[B])`` in one gather."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features = features if features.dim() == 3 else features[None]  # [V,N,C]
        self.labels = labels

    def __len__(self) -> int:
        return self.features.shape[1]

    def __getitem__(self, pairs: torch.Tensor):
        return self.features[pairs[:, 1], pairs[:, 0]].float(), self.labels[pairs[:, 0]]


class CLIPDataModule(L.LightningDataModule):
    def __init__(self, name: str, root: str, backbone, protocol: dict | None = None, shots: PosInt = 16,
                 seed: NonNegInt = 1, subset_seed: NonNegInt | None = None, subset_file: str | None = None,
                 val_shots: NonNegInt | Literal["all"] | None = None, templates=None, augment: dict | None = None,
                 inputs: Literal["features", "images"] = "features", features: dict | None = None,
                 batch_size: PosInt | None = 256, eval_batch_size: PosInt = 1024, num_workers: NonNegInt = 2,
                 unreadable: Literal["error", "skip"] = "error", view_sampling: Literal["random", "cycle"] = "random",
                 plm=None, feature_output: Literal["raw", "pre_projection"] = "raw",
                 fingerprint: Literal["content", "stat"] = "content", fingerprint_cache: str | None = None,
                 decode: Decode = "pil", drop_last: bool = False):
        super().__init__()
        self.drop_last = bool(drop_last)  # training: no last partial batch when the set holds >= 1 batch (Dassl)
        if inputs not in ("features", "images"):
            raise XmxError(f"method.inputs={inputs!r}; valid choices: features, images")
        self.decode = check_decode(decode)  # inputs=images: where images are decoded (xmx.features.online)
        self._online: dict = {}  # split -> OnlineImages of the byte loaders (data.decode gpu/tensor)
        self._decode_used: dict[str, str] = {}  # split -> the decode its image loader ran (pil | gpu | tensor)
        check_unreadable(unreadable)
        self.fingerprint_mode, self.fingerprint_cache = check_mode(fingerprint), fingerprint_cache
        self._fingerprint: dict | None = None
        self._lists_ready = False
        self._last_skipped: list[int] = []
        self.synthetic = name == "synthetic"
        self.skipped: dict[str, list[str]] = {}  # set name -> unreadable images left out (data.unreadable=skip)
        self.name, self.root, self.backbone, self.plm = name, Path(str(root)).expanduser(), backbone, plm
        self.protocol_cfg = dict(protocol or {"name": "fewshot"})
        self.shots, self.seed, self.subset_seed, self.subset_file = int(shots), int(seed), subset_seed, subset_file
        self.val_shots, self.templates_choice = val_shots, templates
        self.augment = {"preset": "none", "views": 1, "noise_std": 0.0, "noise_on_eval": False, **(augment or {})}
        self.inputs = inputs
        if feature_output not in ("raw", "pre_projection"):
            raise XmxError(f"data.feature_output={feature_output!r}; valid choices: raw, pre_projection")
        self.feature_output = feature_output
        self.features_cfg = {"enabled": True, "root": None, "precision": "fp32", "batch_size": 256,
                             "num_workers": num_workers, "device": "auto", **(features or {})}
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.unreadable, self.view_sampling = num_workers, unreadable, view_sampling
        self._ready = False
        self._text_cache: dict = {}
        self.store = None
        if self.features_cfg.get("enabled") and self.features_cfg.get("root"):
            from xmx.features.store import FeatureStore
            self.store = FeatureStore(self.features_cfg["root"])

    # ---- setup ------------------------------------------------------------------------------------------------
    def prepare_lists(self) -> None:
        """The image lists of the protocol (no encoder, no image decoded): what :meth:`data_fingerprint` covers."""
        if self._lists_ready:
            return
        splits = load_dataset(self.name, self.root)
        self.has_val_split = bool(splits.val)
        self.templates = resolve_templates(self.templates_choice, splits.templates)
        explicit = self.templates_choice is not None
        self.protocol = build_protocol(
            self.protocol_cfg, splits, self.shots, self.seed, self.templates, subset_seed=self.subset_seed,
            subset_file=self.subset_file, val_shots=self.val_shots, root=self.root,
            target_templates=None if explicit else (lambda t: list(t.templates)))
        self.classnames = self.protocol.classnames
        log.info("%s: selecting on %d validation images (%s)", self.name, len(self.protocol.val.items),
                 describe_val(self.val_shots, self.shots, self.has_val_split))
        self.val_set: EvalSet = self.protocol.val
        self.eval_sets: list[EvalSet] = self.protocol.eval_sets
        self.synthetic = self.name == "synthetic" or is_fake_tree(self.root, self.name)
        self._lists_ready = True

    def _sets(self) -> dict[str, list[Datum]]:
        return {"train": self.protocol.train, **{s.name: s.items for s in [self.val_set, *self.eval_sets]}}

    def data_fingerprint(self) -> dict:
        """The fingerprint of the bytes of every image this run reads (:mod:`xmx.data.fingerprint`): ``mode``,
        ``files``, ``bytes``, ``digest`` (all sets) and ``sets`` (one digest per set). Part of the job identity and
        of every feature key; the content hashes are computed once and cached under ``data.fingerprint_cache``."""
        if self._fingerprint is None:
            self.prepare_lists()
            parts = {name: fingerprint_files(self.root, [d.path for d in items], mode=self.fingerprint_mode,
                                             cache_dir=self.fingerprint_cache)
                     for name, items in self._sets().items()}
            self._fingerprint = {**combine(parts), "sets": {k: v["digest"] for k, v in parts.items()}}
        return self._fingerprint

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        self.data_fingerprint()
        self.logit_scale = self.backbone.logit_scale  # the backbone's own (log of the multiplier)
        self.logit_bias = getattr(self.backbone, "logit_bias", None)  # SigLIP's learned bias, else None
        if self.inputs == "features":
            aug = self.augment
            train = self._image_features(self.protocol.train, "train", aug["preset"], int(aug["views"]),
                                         aug["noise_std"])  # [V,N,C]
            self.train_features = self._keep("train", self.protocol.train, train, dim=1)
            self.train_labels = torch.tensor([d.label for d in self.protocol.train])
            eval_noise = aug["noise_std"] if aug["noise_on_eval"] else 0.0
            self._eval_features = {}
            for s in [self.val_set, *self.eval_sets]:
                feats = self._image_features(s.items, s.name, "none", 1, eval_noise)[0]
                self._eval_features[s.name] = self._keep(s.name, s, feats, dim=0)
        else:  # images decoded in every step: every image the run will read is decoded once, before training
            for name, s in [("train", self.protocol), *((e.name, e) for e in [self.val_set, *self.eval_sets])]:
                items = s.train if name == "train" else s.items
                bad = find_unreadable(self.root, items, self.num_workers, what=name)
                if bad and self.unreadable == "error":
                    raise XmxError(f"unreadable image {self.root / items[bad[0]].path} ({len(bad)} unreadable in the "
                                   f"{name} set, found before training); replace the file(s), or set "
                                   "data.unreadable=skip to leave such files out")
                if bad:
                    self.skipped[name] = [items[i].path for i in bad]
                    drop = set(bad)
                    kept = [d for i, d in enumerate(items) if i not in drop]
                    if name == "train":
                        s.train = kept
                    else:
                        s.items = kept
        if self.skipped:
            n = sum(map(len, self.skipped.values()))
            log.warning("data.unreadable=skip: left out %d unreadable image(s) (%s), e.g. %s", n,
                        ", ".join(f"{k} {len(v)}" for k, v in self.skipped.items()),
                        next(iter(self.skipped.values()))[0])
        self._ready = True

    def _keep(self, name: str, owner, feats: torch.Tensor, dim: int) -> torch.Tensor:
        """Drop the images extraction skipped as unreadable from a set's list (``owner.items`` or, for the training
        set, ``protocol.train``) and from its features (rows along ``dim``)."""
        bad = self._last_skipped
        if not bad:
            return feats
        items = self.protocol.train if name == "train" else owner.items
        drop = set(bad)
        keep = [i for i in range(len(items)) if i not in drop]
        self.skipped[name] = [items[i].path for i in bad]
        kept = [items[i] for i in keep]
        if name == "train":
            self.protocol.train = kept
        else:
            owner.items = kept
        return feats.index_select(dim, torch.tensor(keep, dtype=torch.long))

    # ---- features ----------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        want = self.features_cfg.get("device", "auto")
        if want in ("auto", None):
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(want)

    def _cached(self, kind: str, key: dict, compute) -> dict:
        if self.store is None:
            return compute()
        out = self.store.get_or_compute(kind, key, compute)
        log.info("feature store %s: %s (%s)", self.store.last_outcome, kind, key.get("split", key.get("kind")))
        return out

    def _image_features(self, items: list[Datum], split: str, preset: str, views: int,
                        noise_std: float) -> torch.Tensor:
        """Raw features [V,N,C] of ``items``: through the feature store (keyed on everything that changes the
        numbers), or extracted in memory when ``features.enabled`` is false."""
        from xmx.features.extract import cached_image_features, extract_image_features
        f = self.features_cfg
        opts = dict(preset=preset, views=int(views), seed=self.seed, noise_std=float(noise_std),
                    precision=f["precision"], decode=f.get("decode", "auto"), device=self._device(),
                    amp=f.get("amp", "fp16"), batch_size=int(f["batch_size"]), num_workers=int(f["num_workers"]),
                    output=self.feature_output)
        bad: list = []
        opts.update(unreadable=self.unreadable, skipped=bad)
        if self.store is None:
            feats = extract_image_features(self.backbone, items, self.root, **opts)
            self._last_skipped = sorted(i for i, _ in bad)
            return feats
        content = self.data_fingerprint()["sets"][split]  # the same list the fingerprint covered
        feats = cached_image_features(self.store, self.backbone, items, self.root, dataset=self.name, split=split,
                                      content=content, **opts)
        self._last_skipped = sorted(i for i, _ in bad)
        log.info("feature store %s: %s/%s (%d images x %d views%s)", self.store.last_outcome, self.name, split,
                 len(items), views, ", pre-projection" if self.feature_output != "raw" else "")
        return feats

    def text_classifier(self, classnames: list[str], templates: list[str] | None = None,
                        normalize: bool = True, underscores: bool = False) -> torch.Tensor:
        """The zero-shot classifier W [C,N] for ``classnames`` (docs/methods/shared.md#zero-shot-classifier), computed
        once and cached.
        ``normalize=False``: the mean of the raw prompt embeddings instead (TaskRes's base; its own store key).
        ``underscores=True``: class names are not cleaned (TaskRes's release; its own store key)."""
        templates = list(templates or self.templates)
        memo = (tuple(classnames), tuple(templates), bool(normalize), bool(underscores))
        if memo not in self._text_cache:
            from xmx.features.extract import backbone_identity
            key = {"kind": "text/classifier" if normalize else "text/mean_raw",
                   "backbone": backbone_identity(self.backbone), "classnames": list(classnames),
                   "templates": templates, **({"underscores": True} if underscores else {})}
            self.backbone.to(self._device())
            self._text_cache[memo] = self._cached(
                "text", key, lambda: {"W": self.backbone.text_classifier(classnames, templates,
                                                                         normalize=normalize,
                                                                         underscores=underscores).float().cpu()})["W"]
        return self._text_cache[memo]

    def features_of(self, eval_set: EvalSet) -> torch.Tensor:
        return self._eval_features[eval_set.name]

    def view_features_of(self, eval_set: EvalSet, preset: str, views: int) -> torch.Tensor:
        """Raw features [V,N,C] of an eval set under ``views`` draws of the augmentation ``preset``, through the
        feature store like every other view (test-time methods: TDA's and TPT's AugMix views)."""
        return self._image_features(eval_set.items, eval_set.name, preset, int(views), 0.0)

    # ---- loaders ----------------------------------------------------------------------------------------------
    def _loader_device(self) -> torch.device:
        """Where the batches go: the trainer's device when attached to one, else ``features.device``."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return self._device()

    def _online_images(self, split: str, items: list[Datum], preset: str, noise_std: float):
        """The split's image dataset + collate, decoded per ``data.decode`` (:mod:`xmx.features.online`): PIL in the
        workers, or bytes decoded on the device in :meth:`transfer_batch_to_device`."""
        from xmx.features.online import OnlineImages
        online = OnlineImages(self.root, items, self.backbone, preset=preset, noise_std=noise_std,
                              decode=self.decode, device=self._loader_device(), split=split,
                              unreadable=self.unreadable)
        if online.pp is not None:
            self._online[split] = online
        self._decode_used[split] = online.mode
        return online.dataset(), online.collate()

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Byte batches (``data.decode`` gpu/tensor) are decoded, resized/cropped/flipped and normalised on
        ``device`` here: ``(images [B,3,S,S], labels [B])``, as the PIL loaders yield them."""
        from xmx.features.online import is_online_batch
        if is_online_batch(batch):
            return self.decode_batch(batch, device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def decode_batch(self, batch, device: torch.device | str = "cpu"):
        """A byte batch of one of this datamodule's image loaders -> ``(images, labels)`` on ``device`` (None when no
        image of it is readable); any other batch is returned as it is."""
        from xmx.features.online import is_online_batch
        if not is_online_batch(batch):
            return batch
        return self._online[batch["split"]].decode(batch, torch.device(device))

    def _eval_loader(self, s: EvalSet) -> DataLoader:
        if self.inputs == "features":
            feats = self.features_of(s)
            labels = torch.tensor([d.label for d in s.items])
            return DataLoader(FeatureBatches(feats, labels), batch_size=None,
                              sampler=EpochBatchSampler(len(labels), 1, self.eval_batch_size, 0, shuffle=False,
                                                        pad=False))
        ds, collate = self._online_images(s.name, s.items, "none",
                                          self.augment["noise_std"] if self.augment["noise_on_eval"] else 0.0)
        rank, world = dist_rank_world()  # DDP: an unpadded contiguous slice per rank
        sampler = range(len(s.items) * rank // world, len(s.items) * (rank + 1) // world) if world > 1 else None
        return DataLoader(ds, batch_size=self.eval_batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        if self.inputs == "features":
            n = self.train_features.shape[1]
            return ResumableLoader(FeatureBatches(self.train_features, self.train_labels), batch_size=None,
                                   sampler=EpochBatchSampler(n, self.train_features.shape[0], self.batch_size,
                                                             self.seed, view_sampling=self.view_sampling,
                                                             drop_last=self.drop_last),
                                   progress=self._batches_done)
        aug = self.augment
        ds, collate = self._online_images("train", self.protocol.train, aug["preset"], aug["noise_std"])
        bs = self.batch_size or len(self.protocol.train)
        rank, world = dist_rank_world()
        if world > 1:  # DDP: batch_size is global; Lightning calls set_epoch on the DistributedSampler
            from torch.utils.data.distributed import DistributedSampler
            return DataLoader(ds, batch_size=max(bs // world, 1), num_workers=self.num_workers,
                              sampler=DistributedSampler(ds, world, rank, shuffle=True, seed=self.seed),
                              collate_fn=collate, drop_last=False)
        return DataLoader(ds, batch_size=bs, shuffle=True, num_workers=self.num_workers, collate_fn=collate,
                          drop_last=self.drop_last and len(ds) >= bs)

    def _batches_done(self) -> int:
        """Training batches of the current epoch the trainer has taken (for a mid-epoch checkpoint)."""
        trainer = getattr(self, "trainer", None)
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready) if trainer is not None else 0

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(s) for s in self.eval_sets]

    # ---- records ----------------------------------------------------------------------------------------------
    def summarize(self, metrics: dict) -> dict:
        return self.protocol.summarize(metrics)

    def subset_record(self) -> dict:
        """The exact images used, as portable JSON (paths relative to $DATA)."""
        rec = {"dataset": self.name, "shots": self.shots, "seed": self.seed, "source": self.protocol.subset_source,
               **subset_to_json({"train": self.protocol.train, "val": self.val_set.items})}
        streams = {s.name: {"dataset": s.dataset, "seed": self.seed, "order": s.order, **subset_to_json(
            {"items": s.items})} for s in self.eval_sets if s.order is not None}
        return {**rec, "streams": streams} if streams else rec

    def data_record(self) -> dict:
        sets = {"train": (self.protocol.train, self.classnames), "val": (self.val_set.items, self.val_set.classnames)}
        sets.update({s.name: (s.items, s.classnames) for s in self.eval_sets})
        fp = self.data_fingerprint()
        return {"dataset": self.name, "root": str(self.root), "protocol": self.protocol.name,
                "subset_source": self.protocol.subset_source, "templates": self.templates,
                "val": {"val_shots": self.val_shots,
                        "selection": describe_val(self.val_shots, self.shots, self.has_val_split)},
                "splits": {k: {"n": len(items), "classes": len(names), "sha256": subset_digest(items)}
                           for k, (items, names) in sets.items()},
                "content": {k: fp[k] for k in ("mode", "files", "bytes", "digest", "sets")},
                "unreadable": {"policy": self.unreadable, "skipped": sum(map(len, self.skipped.values())),
                               "by_set": {k: len(v) for k, v in self.skipped.items()},
                               "files": [p for v in self.skipped.values() for p in v][:50]},
                "synthetic": self.synthetic, **self._decode_record()}

    def _decode_record(self) -> dict:
        """``inputs: images``: where the images were decoded — ``data.decode`` as set, what each loader ran (``auto``
        resolves per device; ``gpu`` falls back to ``pil`` without CUDA) and, for the byte loaders, how many images
        the batched JPEG decoder read on the GPU / on the CPU (PIL fallbacks and ``tensor`` count as CPU)."""
        if self.inputs != "images":
            return {}
        out = {"setting": self.decode, "used": dict(self._decode_used)}
        if self._online:
            out.update({k: sum(o.counts[k] for o in self._online.values()) for k in ("gpu_decoded", "cpu_decoded")})
        return {"decode": out}
