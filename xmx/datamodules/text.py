"""DataModules of the X-adapter language track (docs/methods/xadapter.md#design): COCO captions and WikiText-103 (MLM
pre-training), the
object-colour probe (MemoryColor, ColorTerms) and GLUE.

Each takes the frozen CLIP ``backbone`` and the ``plm`` from ``xmx.run`` and serves dict batches, tokenized with the
PLM tokenizer in the loader (workers do the text work, the module only runs encoders):

- ``input_ids`` / ``attention_mask`` (+ ``token_type_ids`` for BERT) ``[B,L]``, padded to the longest in the batch;
- ``labels``: MLM ``[B,L]`` (-100 = not predicted), GLUE ``[B]`` (class index, or the STS-B score), colour ``[B]``;
- ``clip_tokens`` ``[B,77]``: the sentence **as the PLM sees it** (every MLM target replaced by the mask word, see
  :func:`xmx.data.mlm.plm_view_texts`) in CLIP's tokenizer — the V-expert's retrieval query and the
  T-expert's input; the answer cannot leak through CLIP;
- ``image_rows`` ``[B]`` (COCO): the row of the caption's own image in the retrieval index, -1 when not indexed;
- ``mask_index`` ``[B]`` and ``rows`` ``[B]`` (colour probe): the mask position and the prompt's position.

MLM masking is drawn from ``(seed, epoch, batch)`` alone (training) or ``(seed, set, batch)`` (evaluation: the same
masks every epoch), so a resumed run, or any worker count, sees the same data. The V-expert retrieval index
(:attr:`TextDataModule.index`) is the CLIP image embeddings of every image under ``index.folder`` (COCO
``train2017`` by default), through the feature store when it is enabled (``xmx.features.embed_image_folder``),
in memory otherwise; it is built on first use, so runs that do not retrieve never pay for it.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from xmx.datamodules.clip import epoch_generator
from xmx.data.text import (ColorDataset, glue_task, read_coco_captions, read_color_dataset, read_glue,
                           read_wikitext)
from xmx.data.images import check_unreadable
from xmx.errors import XmxError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextProtocol:
    """What ``xmx.run`` records as the protocol (``name``); the language track has no few-shot protocol."""
    name: str

    def summarize(self, metrics: dict) -> dict:
        return {}


@dataclass
class TextSet:
    """One split served by a text DataModule: ``name`` is the metric prefix (``val``, ``test``,
    ``test_memory_color``, ``test_matched``, ...); ``examples`` its rows."""
    name: str
    examples: list
    classnames: list[str]


def examples_digest(rows: Sequence) -> str:
    """sha256 over the example list (its text, labels, ids): identifies the data a run saw."""
    h = hashlib.sha256()
    for r in rows:
        h.update(repr(r).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


# ---- batches --------------------------------------------------------------------------------------------------
class BatchKeySampler(Sampler):
    """Yields ``(epoch, batch_no, indices)`` keys: a fresh permutation per epoch from (seed, epoch) when shuffling;
    the dataset derives the batch's masking from the same key. Lightning calls ``set_epoch`` before every epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool, stream: int = 0):
        self.n, self.batch_size, self.seed, self.shuffle, self.stream = n, max(1, int(batch_size)), seed, shuffle, stream
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        order = (torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch)) if self.shuffle
                 else torch.arange(self.n))
        epoch = self.epoch if self.shuffle else -1 - self.stream  # eval masks: identical every epoch
        for b, i in enumerate(range(0, self.n, self.batch_size)):
            yield epoch, b, order[i:i + self.batch_size]


def batch_seed(seed: int, epoch: int, batch_no: int) -> int:
    h = hashlib.sha256(f"xmx-mlm:{seed}:{epoch}:{batch_no}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


class KeyedBatches(Dataset):
    """Indexed by a :class:`BatchKeySampler` key; ``make(key) -> batch dict`` does the work (in a worker)."""

    def __init__(self, n: int, make: Callable):
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        return self.make(key)


def _plm_inputs(enc) -> dict[str, torch.Tensor]:
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


# ---- the shared part ------------------------------------------------------------------------------------------
class TextDataModule(L.LightningDataModule):
    """Shared wiring: encoders, loaders, the retrieval index and the records ``xmx.run`` writes."""

    protocol_name = "text"

    def __init__(self, name: str, root: str, backbone, plm=None, seed: int = 1, batch_size: int | None = 32,
                 eval_batch_size: int = 64, max_length: int = 128, num_workers: int = 2, index: dict | None = None,
                 features: dict | None = None, query_masked: str = "mask_word", source: str = "files",
                 hf: dict | None = None):
        super().__init__()
        if source not in ("files", "hf"):
            raise XmxError(f"data.source={source!r}: valid: files (data.root), hf (the Hugging Face Hub, data.hf)")
        self.source, self.hf = source, dict(hf or {})
        if plm is None:
            raise XmxError(f"data={name}: the language track needs a PLM; add plm=bert_base (or roberta_base, tiny)")
        self.name, self.root = name, Path(str(root)).expanduser()
        self.backbone, self.plm = backbone, plm
        self.tokenizer = plm.tokenizer
        self.seed, self.max_length = int(seed), int(max_length)
        self.batch_size, self.eval_batch_size = batch_size, int(eval_batch_size)
        self.num_workers, self.query_masked = int(num_workers), query_masked
        self.index_cfg = {"folder": None, "batch_size": 256, "num_workers": num_workers, "precision": "fp16",
                          "device": "auto", "unreadable": "error", **(index or {})}
        check_unreadable(self.index_cfg["unreadable"], "data.index.unreadable")
        self.features_cfg = dict(features or {})
        self.protocol = TextProtocol(self.protocol_name)
        self.shots = 0
        self.train_set: TextSet | None = None
        self.val_set: TextSet | None = None
        self.eval_sets: list[TextSet] = []
        self._index = None
        self._ready = False

    # ---- to implement -----------------------------------------------------------------------------------------
    def load(self) -> None:
        """Fill ``train_set`` (may stay None), ``val_set`` (may stay None) and ``eval_sets``."""
        raise NotImplementedError

    def make_batch(self, s: TextSet, key) -> dict:
        raise NotImplementedError

    # ---- setup / loaders ------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        self.load()
        self._ready = True

    def clip_tokens(self, texts: Sequence[str]) -> torch.Tensor:
        return self.backbone.tokenize(list(texts))

    def _loader(self, s: TextSet, shuffle: bool, stream: int = 0) -> DataLoader:
        bs = (self.batch_size or len(s.examples)) if shuffle else self.eval_batch_size
        sampler = BatchKeySampler(len(s.examples), bs, self.seed, shuffle, stream)
        return DataLoader(KeyedBatches(len(s.examples), lambda key, s=s: self.make_batch(s, key)), batch_size=None,
                          sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=False)

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise XmxError(f"data={self.name} has no training split; this dataset is evaluation-only")
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False, stream=0) if self.val_set is not None else []

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(s, shuffle=False, stream=i + 1) for i, s in enumerate(self.eval_sets)]

    # ---- retrieval index --------------------------------------------------------------------------------------
    @property
    def index(self):
        """The V-expert :class:`~xmx.features.retrieval.ImageIndex` (CLIP image embeddings of ``index.folder``),
        built on first use."""
        if self._index is None:
            self._index = self._build_index()
        return self._index

    def _build_index(self):
        from xmx.features.extract import embed_image_folder, extract_image_features, list_image_folder
        from xmx.features.retrieval import ImageIndex
        cfg = self.index_cfg
        if not cfg.get("folder"):
            raise XmxError(f"data={self.name}: the V-expert needs data.index.folder (a folder of images to "
                           f"retrieve from, e.g. $DATA/coco/train2017)")
        folder = Path(str(cfg["folder"])).expanduser()
        if not folder.is_dir():
            raise XmxError(f"data.index.folder: {folder} does not exist; unpack COCO train2017 there or point "
                           f"data.index.folder at a folder of images")
        device = cfg.get("device", "auto")
        device = None if device == "auto" else torch.device(device)
        kw = dict(precision=cfg["precision"], device=device, batch_size=int(cfg["batch_size"]),
                  num_workers=int(cfg["num_workers"]), progress=False, unreadable=cfg.get("unreadable", "error"),
                  policy_key="data.index.unreadable")
        self.index_skipped = []
        if self.features_cfg.get("enabled") and self.features_cfg.get("root"):
            from xmx.features.store import FeatureStore
            feats, ids = embed_image_folder(FeatureStore(self.features_cfg["root"]), self.backbone, folder,
                                            skipped=self.index_skipped, **kw)
        else:
            ids = list_image_folder(folder)
            if not ids:
                raise XmxError(f"data.index.folder: {folder} holds no images")
            bad: list = []
            feats = extract_image_features(self.backbone, ids, folder, skipped=bad, **kw)[0]
            if bad:  # data.index.unreadable=skip: out of the index
                drop = {i for i, _ in bad}
                self.index_skipped = [ids[i] for i in sorted(drop)]
                keep = [i for i in range(len(ids)) if i not in drop]
                feats, ids = feats[keep], [ids[i] for i in keep]
        if self.index_skipped:
            log.warning("retrieval index: left out %d unreadable image(s) (data.index.unreadable=skip), e.g. %s",
                        len(self.index_skipped), self.index_skipped[0])
        if self._listing() and sorted([*ids, *self.index_skipped]) != self._listing():
            raise XmxError(f"data.index.folder: {folder} changed while the run was starting; start it again")
        if self.index_skipped:  # index rows follow the kept images
            self._ids, self._row_of = list(ids), None
            self.index_rows([])  # rebuilt now, in the main process, before loader workers start
        log.info("retrieval index: %d images from %s", len(ids), folder)
        return ImageIndex(feats, ids)

    def _listing(self) -> list[str]:
        """The images under ``index.folder`` in index row order ([] when the folder does not exist)."""
        if getattr(self, "_ids", None) is None:
            from xmx.features.extract import list_image_folder
            folder = self.index_cfg.get("folder")
            ok = folder and Path(str(folder)).expanduser().is_dir()
            self._ids = list_image_folder(Path(str(folder)).expanduser()) if ok else []
        return self._ids

    def index_rows(self, images: Sequence[str]) -> torch.Tensor:
        """Row in the index of each image (a path relative to ``root``); -1 where the image is not indexed."""
        if getattr(self, "_row_of", None) is None:
            self._row_of = {i: r for r, i in enumerate(self._listing())}
        if not self._row_of:
            return torch.full((len(images),), -1, dtype=torch.long)
        folder = Path(str(self.index_cfg["folder"])).expanduser().resolve()
        out = []
        for im in images:
            try:
                rel = (self.root / im).resolve().relative_to(folder).as_posix()
            except ValueError:
                rel = None
            out.append(self._row_of.get(rel, -1))
        return torch.tensor(out, dtype=torch.long)

    # ---- records ----------------------------------------------------------------------------------------------
    def _sets(self) -> dict[str, TextSet]:
        sets = {}
        if self.train_set is not None:
            sets["train"] = self.train_set
        if self.val_set is not None:
            sets["val"] = self.val_set
        sets.update({s.name: s for s in self.eval_sets})
        return sets

    def files(self) -> list[str]:
        return []

    def data_record(self) -> dict:
        return {"dataset": self.name, "root": str(self.root), "protocol": self.protocol.name, "files": self.files(),
                "source": self.source, **({"hf": dict(self.hf)} if self.source == "hf" else {}),
                "index_folder": self.index_cfg.get("folder"),
                "unreadable": {"policy": self.index_cfg.get("unreadable", "error"),
                               "skipped": len(getattr(self, "index_skipped", [])),
                               "files": list(getattr(self, "index_skipped", []))[:50]},
                "splits": {k: {"n": len(s.examples), "classes": len(s.classnames), "sha256": examples_digest(
                    s.examples)} for k, s in self._sets().items()}}

    def subset_record(self) -> dict:
        return {"dataset": self.name, "shots": 0, "seed": self.seed, "source": "full",
                "splits": {k: {"n": len(s.examples), "sha256": examples_digest(s.examples)}
                           for k, s in self._sets().items()}}

    def summarize(self, metrics: dict) -> dict:
        return {}


# ---- MLM pre-training -----------------------------------------------------------------------------------------
class MLMDataModule(TextDataModule):
    """Sentences -> MLM batches: BERT masking (``mask_ratio``; 80/10/10 by default) seeded per batch."""

    protocol_name = "mlm_pretrain"

    def __init__(self, *args, mask_ratio: float = 0.15, mask_prob: float = 0.8, random_prob: float = 0.1,
                 val_size: int | None = 2000, test_size: int | None = 5000, **kw):
        super().__init__(*args, **kw)
        from xmx.data.mlm import MLMMasker
        self.masker = MLMMasker(self.tokenizer, mask_ratio, mask_prob, random_prob, seed=self.seed)
        self.mask_ratio = float(mask_ratio)
        self.val_size, self.test_size = val_size, test_size

    def text_of(self, example) -> str:
        return example

    def extra_fields(self, rows: list) -> dict:
        return {}

    def make_batch(self, s: TextSet, key) -> dict:
        from xmx.data.mlm import plm_view_texts
        epoch, batch_no, idx = key
        rows = [s.examples[int(i)] for i in idx]
        enc = self.tokenizer([self.text_of(r) for r in rows], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        batch = _plm_inputs(enc)
        self.masker.generator.manual_seed(batch_seed(self.seed, epoch, batch_no))
        ids, labels = self.masker(batch["input_ids"], batch["attention_mask"])
        batch["input_ids"], batch["labels"] = ids, labels
        texts = plm_view_texts(self.tokenizer, ids, hide=labels != -100, attention_mask=batch["attention_mask"],
                               mode=self.query_masked)
        batch["clip_tokens"] = self.clip_tokens(texts)
        batch.update(self.extra_fields(rows))
        return batch


def _take(rows: list, n: int | None) -> list:
    return rows if n is None or n <= 0 else rows[:n]


class CocoCaptionsDataModule(MLMDataModule):
    """COCO captions (``<root>/annotations/captions_<split>.json`` + ``<root>/<split>/`` images) for V-expert MLM
    pre-training. ``val_images`` images of ``split`` (the last ones by id) are held out for validation; the test
    set is the captions of ``test_split`` (``val2017``; null: the held-out images)."""

    def __init__(self, *args, split: str = "train2017", test_split: str | None = "val2017", val_images: int = 500,
                 check_images: bool = True, **kw):
        super().__init__(*args, **kw)
        self.split, self.test_split, self.val_images, self.check_images = split, test_split, int(val_images), \
            check_images

    def load(self) -> None:
        if self.source == "hf":
            return self._load_hf()
        caps = read_coco_captions(self.root, self.split, self.check_images)
        ids = sorted({c.image_id for c in caps})
        if self.val_images >= len(ids):
            raise XmxError(f"data.val_images={self.val_images} but {self.split} holds {len(ids)} images; lower it")
        held = set(ids[len(ids) - self.val_images:]) if self.val_images > 0 else set()
        train = [c for c in caps if c.image_id not in held]
        val = _take([c for c in caps if c.image_id in held], self.val_size)
        self.train_set = TextSet("train", train, [])
        self.val_set = TextSet("val", val, []) if val else None
        if self.test_split:
            test = _take(read_coco_captions(self.root, self.test_split, self.check_images), self.test_size)
        else:
            test = val
        self.eval_sets = [TextSet("test", test, [])]
        self.index_rows([])  # the image -> index row map, built here (main process) before loader workers start

    def _load_hf(self) -> None:
        """Karpathy's splits from the Hub: train, validation (``val_size``), test (``test_size``)."""
        from xmx.data.hf_text import read_coco_karpathy_hf
        path, rev = self.hf.get("path"), self.hf.get("revision")
        self.train_set = TextSet("train", read_coco_karpathy_hf(path, "train", rev), [])
        self.val_set = TextSet("val", _take(read_coco_karpathy_hf(path, "validation", rev), self.val_size), [])
        self.eval_sets = [TextSet("test", _take(read_coco_karpathy_hf(path, "test", rev), self.test_size), [])]
        self.index_rows([])

    def text_of(self, example) -> str:
        return example.caption

    def extra_fields(self, rows: list) -> dict:
        return {"image_rows": self.index_rows([r.image for r in rows])}

    def files(self) -> list[str]:
        if self.source == "hf":
            return [f"{self.hf.get('path')}@{self.hf.get('revision')}:{s}" for s in ("train", "validation", "test")]
        out = [f"annotations/captions_{self.split}.json"]
        return out + ([f"annotations/captions_{self.test_split}.json"] if self.test_split else [])


class WikiTextDataModule(MLMDataModule):
    """WikiText-103 raw (``<root>/wiki.{train,valid,test}.raw``) paragraphs, each truncated to ``max_length``
    tokens, for T-expert MLM pre-training."""

    def load(self) -> None:
        if self.source == "hf":
            from xmx.data.hf_text import read_wikitext_hf
            path, rev = self.hf.get("path"), self.hf.get("revision")
            read = lambda split: read_wikitext_hf(path, split, rev)  # noqa: E731
        else:
            read = lambda split: read_wikitext(self.root, split)  # noqa: E731
        self.train_set = TextSet("train", read("train"), [])
        self.val_set = TextSet("val", _take(read("valid"), self.val_size), [])
        self.eval_sets = [TextSet("test", _take(read("test"), self.test_size), [])]

    def files(self) -> list[str]:
        if self.source == "hf":
            return [f"{self.hf.get('path')}@{self.hf.get('revision')}:{s}" for s in ("train", "validation", "test")]
        return [f"wiki.{s}.raw" for s in ("train", "valid", "test")]


# ---- object colour probe --------------------------------------------------------------------------------------
class ColorDataModule(TextDataModule):
    """The zero-shot colour probe (evaluation only): one eval set per colour dataset, named ``test_<dataset>``
    (``test_memory_color``, ``test_color_terms``); prompts from :class:`~xmx.data.color_probe.ColorProbe`."""

    protocol_name = "zeroshot_probe"

    def __init__(self, *args, sets: Sequence[str] = ("memory_color", "color_terms"),
                 paths: dict | None = None, **kw):
        super().__init__(*args, **kw)
        if not sets:
            raise XmxError("data.sets is empty; valid: memory_color, color_terms")
        self.set_names, self.paths = list(sets), dict(paths or {})
        self.probes: dict = {}

    def load(self) -> None:
        from xmx.data.color_probe import ColorProbe
        for n in self.set_names:
            ds: ColorDataset = read_color_dataset(n, self.paths.get(n))
            probe = ColorProbe(ds, self.tokenizer, max_length=self.max_length)
            self.probes[f"test_{n}"] = probe
            self.eval_sets.append(TextSet(f"test_{n}", list(zip(probe.texts, probe.labels.tolist())),
                                          list(ds.colors)))

    def make_batch(self, s: TextSet, key) -> dict:
        from xmx.data.mlm import plm_view_texts
        _, _, idx = key
        p = self.probes[s.name]
        idx = idx.long()
        ids, am = p.input_ids[idx], p.attention_mask[idx]
        batch = {"input_ids": ids, "attention_mask": am, "mask_index": p.mask_index[idx], "labels": p.labels[idx],
                 "rows": idx.clone()}
        texts = plm_view_texts(self.tokenizer, ids, hide=ids == self.tokenizer.mask_token_id, attention_mask=am,
                               mode=self.query_masked)
        batch["clip_tokens"] = self.clip_tokens(texts)
        return batch

    def files(self) -> list[str]:
        return [str(self.paths.get(n) or f"xmx/data/object_color/{n}.csv") for n in self.set_names]


# ---- GLUE -----------------------------------------------------------------------------------------------------
class GlueDataModule(TextDataModule):
    """One GLUE task (``task``) from ``<root>/<Task>/{train,dev}.tsv``: training on train, dev-set reporting.
    Eval sets: ``test`` (the dev set), or for MNLI ``test_matched`` and ``test_mismatched``; validation during
    training runs on the first of them."""

    protocol_name = "glue_dev"

    def __init__(self, *args, task: str = "sst2", train_size: int | None = None, **kw):
        super().__init__(*args, **kw)
        self.task = glue_task(str(task))
        self.train_size = train_size

    def load(self) -> None:
        t = self.task
        classes = list(t.labels or [])
        if self.source == "hf":
            from xmx.data.hf_text import read_glue_hf
            read = lambda sp: read_glue_hf(self.hf.get("path"), t.name, sp, self.hf.get("revision"))  # noqa: E731
        else:
            read = lambda sp: read_glue(self.root, t.name, sp)  # noqa: E731
        self.train_set = TextSet("train", _take(read("train"), self.train_size), classes)
        names = {"dev": "test", "dev_matched": "test_matched", "dev_mismatched": "test_mismatched"}
        self.eval_sets = [TextSet(names[sp], read(sp), classes) for sp in t.eval_splits]
        self.val_set = TextSet("val", self.eval_sets[0].examples, classes)

    def make_batch(self, s: TextSet, key) -> dict:
        _, _, idx = key
        rows = [s.examples[int(i)] for i in idx]
        pair = self.task.text_b is not None
        enc = self.tokenizer([r.text_a for r in rows], [r.text_b or "" for r in rows] if pair else None,
                             padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = _plm_inputs(enc)
        dtype = torch.float32 if self.task.is_regression else torch.long
        batch["labels"] = torch.tensor([r.label for r in rows], dtype=dtype)
        batch["clip_tokens"] = self.clip_tokens([f"{r.text_a} {r.text_b}" if pair else r.text_a for r in rows])
        return batch

    def files(self) -> list[str]:
        if self.source == "hf":
            from xmx.data.hf_text import GLUE_SPLIT
            return [f"{self.hf.get('path')}@{self.hf.get('revision')}:{self.task.name}/{GLUE_SPLIT[sp]}"
                    for sp in ("train",) + self.task.eval_splits]
        return [f"{self.task.folder}/{sp}.tsv" for sp in ("train",) + self.task.eval_splits]
