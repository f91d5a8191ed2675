"""The shared LightningModule: evaluation over the datamodule's eval sets, predictions kept for results, optimisers
built from config partials, and checkpoints that leave the frozen encoders out.

A method implements ``build(dm)`` (create parameters from the set-up datamodule), ``logits(x, eval_set)`` and,
when it trains, ``training_step``.

Long file: the one base every family extends (evaluation, predictions, checkpoints, schedules, resume points);
what is shared lives here once instead of in each family's file.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Checkpoint
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassStatScores

from xmx.errors import XmxError
from xmx.validate import PosInt

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``.ckpt`` file, or a run folder holding ``checkpoints/best.ckpt`` / ``checkpoints/last.ckpt``."""
    p = Path(str(path)).expanduser()
    if p.is_file():
        return p
    for cand in (p / "checkpoints" / "best.ckpt", p / "checkpoints" / "last.ckpt", p / "best.ckpt", p / "last.ckpt"):
        if cand.is_file():
            return cand
    raise XmxError(f"init_from={path}: no checkpoint there; pass a .ckpt file or a run folder containing "
                   "checkpoints/best.ckpt or checkpoints/last.ckpt")


def read_checkpoint(path: str | Path) -> tuple[Path, dict]:
    """-> (file, contents) of an xmx run's checkpoint; anything else (a corrupt file, a plain ``state_dict``, a
    pickle of something else) is one :class:`XmxError` line instead of an unpickling traceback."""
    ckpt = resolve_checkpoint(path)
    try:
        raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - whatever torch/pickle raises for a file that is not a checkpoint
        why = (str(e).splitlines() or [""])[0][:120]
        why = "" if "weights_only" in why or not why else f": {why}"
        raise XmxError(f"init_from={path}: {ckpt} is not a readable PyTorch checkpoint ({type(e).__name__}{why}); "
                       "pass the checkpoints/best.ckpt (or the folder) of an xmx run") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("state_dict"), dict):
        raise XmxError(f"init_from={path}: {ckpt} holds no 'state_dict': it is not a checkpoint written by an xmx "
                       "run; pass the checkpoints/best.ckpt (or the folder) of an xmx run")
    return ckpt, raw


def backbone_identity(node) -> dict:
    """What a checkpoint's tensors were trained against, from the backbone's config (so that it can be compared before
    anything is built): its loader, architecture and weights (a tag, or a file's name; None: random init)."""
    def get(k):
        return node.get(k) if node is not None and k in node else None
    loader = str(get("_target_") or "").rsplit(".", 1)[-1]
    if get("model") is not None:  # open_clip: an architecture + a tag, file or folder
        arch, weights = str(get("model")), get("weights")
    else:  # Hugging Face: one folder / hub name holds both
        arch = weights = get("name_or_path")
    if isinstance(weights, str) and ("/" in weights or "\\" in weights):
        weights = Path(weights).name or weights  # a file may move: its name identifies it
    return {"loader": loader, "arch": None if arch is None else str(arch),
            "weights": None if weights is None else str(weights)}


def _shown_backbone(b: dict) -> str:
    return f"{b.get('arch')} with weights {b.get('weights') or 'none (random init)'}"


def check_checkpoint(path: str | Path, target: str | None = None, backbone: dict | None = None) -> Path:
    """``init_from`` is checked before any data is read: the file exists, is an xmx checkpoint, (when it says)
    comes from the family of the method ``target`` (the method config's ``_target_``) and was trained on the
    ``backbone`` of this run (:func:`backbone_identity`; checkpoints written before it was recorded are not
    compared)."""
    ckpt, raw = read_checkpoint(path)
    theirs_b = raw.get("xmx_backbone")
    if backbone and isinstance(theirs_b, dict) and (theirs_b.get("arch"), theirs_b.get("weights")) != (
            backbone.get("arch"), backbone.get("weights")):
        raise XmxError(f"init_from={path}: the checkpoint was trained on backbone {_shown_backbone(theirs_b)}, this "
                       f"run uses {_shown_backbone(backbone)}; initialise from a run on the same backbone (or set "
                       "backbone.model / backbone.weights to the checkpoint's)")
    theirs = raw.get("xmx_method") or {}
    if target and theirs.get("family"):
        parts = str(target).split(".")
        mine = parts[2] if parts[:2] == ["xmx", "methods"] and len(parts) > 3 else ".".join(parts[:-1])
        if theirs["family"] != mine:
            raise XmxError(f"init_from={path}: the checkpoint is of method {theirs.get('name')} ({theirs['family']} "
                           f"family), this run's method is of the {mine} family; initialise from a run of the same "
                           "method family")
    return ckpt


def method_family(cls: type) -> str:
    """``tip_adapter`` for ``xmx.methods.tip_adapter.TipAdapterFMethod``: methods of one family (one file or
    sub-package) can initialise each other (Tip-Adapter -> Tip-Adapter-F, X-adapter MLM -> GLUE)."""
    parts = cls.__module__.split(".")
    return parts[2] if parts[:2] == ["xmx", "methods"] and len(parts) > 2 else cls.__module__


class RNGState(L.Callback):
    """Saves the global RNG states (torch, CUDA, numpy, Python) in every checkpoint and restores them on resume, so
    that a resumed run draws the same random numbers (dropout, loader seeds) as an uninterrupted one.
    (Its checkpoint entry is keyed by the class name, so checkpoints from when it lived in ``xmx.run`` resume.)"""

    def state_dict(self) -> dict:
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        if "numpy" in states:  # tensors and plain numbers only: checkpoints stay loadable with weights_only=True
            name, keys, pos, has_gauss, gauss = states["numpy"]
            states["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)]
        return {"rng": states}

    def load_state_dict(self, state_dict: dict) -> None:
        states = dict(state_dict.get("rng") or {})
        if not states:
            return
        if "numpy" in states:
            import numpy as np
            name, keys, pos, has_gauss, gauss = states["numpy"]
            states["numpy"] = (name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss)
        _set_rng_states(states)


class ResumeCheckpoint(Checkpoint):
    """``last.ckpt``, the resume point, on a schedule independent of validation: at every training epoch end (after
    that epoch's validation, when there is one) and, inside long epochs, every ``every_minutes`` of training when the
    training loader can resume mid-epoch (the feature path: its batch order comes from (seed, epoch) alone; the
    online image loaders save at epoch ends only). The file is written to a temporary name, flushed to disk and
    renamed into place, so a process killed (SIGKILL, pre-emption, a full disk) while saving leaves the previous
    ``last.ckpt`` intact and never a truncated one. A ``Checkpoint`` subclass: Lightning adds no default
    checkpointing of its own when this is the only one."""

    def __init__(self, dirpath: str, filename: str = "last", every_minutes: float | None = 10.0):
        if every_minutes is not None and (isinstance(every_minutes, bool) or not isinstance(every_minutes, (int, float))
                                          or not math.isfinite(every_minutes) or every_minutes <= 0):
            raise XmxError(f"callbacks.resume.every_minutes={every_minutes!r}: must be a positive number of minutes "
                           "(or null: save at epoch ends only)")
        self.dirpath, self.filename, self.every_minutes = Path(str(dirpath)), filename, every_minutes
        self._last_save = time.monotonic()
        self.saves = {"epoch_end": 0, "timed": 0}

    @property
    def path(self) -> Path:
        return self.dirpath / f"{self.filename}.ckpt"

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_save = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.every_minutes or time.monotonic() - self._last_save < 60.0 * self.every_minutes:
            return
        if batch_idx + 1 >= trainer.num_training_batches:  # the epoch-end save follows (after validation)
            return
        if not getattr(trainer.train_dataloader, "resumes_mid_epoch", False):
            return
        self._save(trainer, "timed")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer, "epoch_end")

    def _save(self, trainer, why: str) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        path = self.path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            trainer.save_checkpoint(tmp)  # every rank calls it (barrier); rank 0 writes
            if trainer.is_global_zero:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                fsync_dir(path.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._last_save = time.monotonic()
        self.saves[why] += 1
        log.debug("resume: %s saved (%s, epoch %d, step %d)", path, why, trainer.current_epoch, trainer.global_step)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems cannot open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


TOP_K = 5  # the second accuracy every classification result reports (CLIP_benchmark's acc5)


class MeanPerClassRecall(MulticlassStatScores):
    """Mean over the classes present in the targets of each class's recall: scikit-learn's
    ``balanced_accuracy_score``, which CLIP_benchmark reports as ``mean_per_class_recall``. (torchmetrics'
    ``MulticlassRecall(average="macro")`` also averages in classes that are predicted but absent from the targets, as
    zeros; the per-class counts here are torchmetrics' own.)"""

    def __init__(self, num_classes: int):
        super().__init__(num_classes=num_classes, average=None)

    def compute(self) -> torch.Tensor:
        tp, _, _, fn = self._final_state()
        support = tp + fn
        present = support > 0
        return (tp[present].double() / support[present]).mean().float()


def classification_metrics(num_classes: int) -> nn.ModuleDict:
    """Top-1 and top-k accuracy (k = min(5, classes): with fewer classes top-k is trivially 100) and mean per-class
    recall for one label set, all as torchmetrics states (DDP-reduced by Lightning)."""
    n = max(num_classes, 2)
    return nn.ModuleDict({"acc": MulticlassAccuracy(num_classes=n, average="micro"),
                          "acc5": MulticlassAccuracy(num_classes=n, top_k=min(TOP_K, n), average="micro"),
                          "mean_per_class_recall": MeanPerClassRecall(n)})


# ---- small helpers shared by the methods that fit on cached features in ``build`` (GDA, LP++, ProLIP, TaskRes) --
def eval_labels(eval_set) -> torch.Tensor:
    """The labels [N] of an eval set's items."""
    return torch.tensor([d.label for d in eval_set.items], dtype=torch.long)


def chunk_rows(n_rows: int, per_row: int, max_elements: int) -> int:
    """How many of ``n_rows`` rows (``per_row`` elements each) fit in ``max_elements`` (at least 1): the chunk size
    that bounds an intermediate tensor of a vectorised search."""
    return max(1, min(n_rows, max_elements // max(per_row, 1)))


def fast_dev_run(module) -> bool:
    """True under ``trainer.fast_dev_run`` (``debug=fdr``): loops a method runs itself (in ``build``) then take one
    step, as Lightning's own loops take one batch."""
    return bool(getattr(getattr(module, "_trainer", None), "fast_dev_run", False))


def fit_device(choice: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else as given."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def class_columns(eval_set, num_train: int) -> tuple[str, torch.Tensor | None]:
    """How an eval set's classes map onto the training classes (``eval_set.train_index``): ``("same", None)``,
    ``("seen", training column of each class)`` or ``("new", None)`` (none was trained on); a mix is refused."""
    idx = list(eval_set.train_index or [])
    if idx == list(range(num_train)):
        return "same", None
    if idx and all(i is not None for i in idx):
        return "seen", torch.tensor(idx, dtype=torch.long)
    if idx and all(i is None for i in idx):
        return "new", None
    raise XmxError(f"eval set '{eval_set.name}' mixes training classes and unseen ones; score them as two eval sets "
                   "(protocol=base2new keeps base and new apart)")


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Dassl's `cosine` schedule with a constant warm-up (the one schedule of every Dassl-based recipe: CoOp, CoCoOp,
    KgCoOp, TaskRes, CLIP-Adapter's release; dassl/optim/lr_scheduler.py, WARMUP_RECOUNT true), per epoch:
    `lr(e) = warmup_lr` for `e < warmup_epochs`, else `base·½(1 + cos(π·(e − warmup_epochs)/T_max))`; `T_max` is the
    number of epochs (the cosine never reaches its end: the last epoch runs at `cos(π·(T_max−2)/T_max)`, as there)."""

    def __init__(self, optimizer, T_max: int, warmup_epochs: int = 1, warmup_lr: float = 1e-5, last_epoch: int = -1):
        if T_max < 1:
            raise XmxError(f"method.scheduler.T_max={T_max}; the cosine needs at least one epoch")
        self.T_max, self.warmup_epochs, self.warmup_lr = int(T_max), int(warmup_epochs), float(warmup_lr)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        e = self.last_epoch
        if e < self.warmup_epochs:
            return [self.warmup_lr for _ in self.base_lrs]
        f = 0.5 * (1 + math.cos(math.pi * (e - self.warmup_epochs) / self.T_max))
        return [base * f for base in self.base_lrs]


class XmxModule(L.LightningModule):
    needs_fit: bool = True  # training-free methods (zero-shot, Tip-Adapter) set False
    # top-level `selection` values the method implements: "paper" = its release's selection on the test set, only
    # where a method reproduces one (the Tip family); a run refuses the others before any work
    selection_modes: tuple[str, ...] = ("val",)
    frozen_prefixes: tuple[str, ...] = ("backbone.", "plm.")  # never written into checkpoints

    def __init__(self, name: str | None = None, inputs: Literal["features", "images", "text"] = "features",
                 batch_size: PosInt | None = 256, epochs: PosInt | None = None,
                 view_sampling: Literal["random", "cycle"] = "random", optimizer=None, scheduler=None,
                 scheduler_interval: Literal["step", "epoch"] = "epoch", drop_last: bool = False):
        """``drop_last``: the training loader leaves out the last partial batch when the set holds at least one batch
        (Dassl's loaders; ``data.drop_last`` reads it). ``name``/``inputs``/``batch_size``/``epochs``/``view_sampling`` describe what the method asks of the run
        (the datamodule and trainer configs read them); ``optimizer``/``scheduler`` are partials
        (``_partial_: true``); ``scheduler_interval`` is ``epoch`` or ``step``."""
        super().__init__()
        if scheduler_interval not in ("step", "epoch"):
            raise XmxError(f"method.scheduler_interval={scheduler_interval!r}; valid choices: step, epoch")
        self.scheduler_interval = scheduler_interval
        self.epoch_curve: list[dict] = []  # validation accuracy after every training epoch
        self.selected_epoch: int | None = None  # the epoch of the checkpoint restored before testing
        # what training did (results.json): epochs and optimiser steps completed (a resumed run counts the epochs
        # before the interruption too), and the scheduler's length (T_max) in its unit
        self.fit_progress: dict | None = None
        self.schedule_length: dict | None = None
        self.method_name, self.inputs, self.batch_size, self.epochs = name, inputs, batch_size, epochs
        self.view_sampling, self.drop_last = view_sampling, bool(drop_last)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.init_from: str | None = None
        self.backbone_identity: dict | None = None  # set by the run (backbone_identity): written into checkpoints
        self.init_record: dict | None = None  # what init_from loaded (results.json "init_from")
        self.strict_loading = False  # checkpoints omit the frozen encoders
        self.predictions: dict[str, dict[str, torch.Tensor]] = {}
        self._built = False

    # ---- construction -----------------------------------------------------------------------------------------
    def build(self, dm) -> None:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if self._built:
            return
        dm = self.trainer.datamodule
        dm.setup(stage)
        self.dm = dm
        self.build(dm)
        self.build_metrics(dm)
        self._built = True
        if self.init_from:
            self.load_weights(self.init_from)

    def build_metrics(self, dm) -> None:
        """Classification accuracy on the validation set; on every eval set (each with its own classes) top-1 and
        top-5 accuracy and mean per-class recall (``<set>/acc``, ``<set>/acc5``, ``<set>/mean_per_class_recall``,
        percent). Methods with other metrics (language track) override this."""
        self.val_acc = MulticlassAccuracy(num_classes=max(len(dm.val_set.classnames), 2), average="micro")
        self.test_metrics = nn.ModuleList(classification_metrics(len(s.classnames)) for s in dm.eval_sets)

    def load_weights(self, path) -> None:
        """``init_from``: load the checkpoint's tensors into this method. A checkpoint of another method family, one
        whose tensors have other shapes, or one of which nothing fits is an error (a silent random init would
        report numbers identical to training from scratch); what was loaded is logged and kept for results.json
        (:attr:`init_record`)."""
        ckpt, raw = read_checkpoint(path)
        state, own = raw["state_dict"], self.state_dict()
        theirs = raw.get("xmx_method") or {}
        mine = {"name": self.method_name, "family": method_family(type(self))}
        if theirs.get("family") and theirs["family"] != mine["family"]:
            raise XmxError(f"init_from={path}: the checkpoint is of method {theirs.get('name')} ({theirs['family']} "
                           f"family), this run is {mine['name']} ({mine['family']}); initialise from a run of the "
                           "same method family")
        wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        if wrong:
            k = wrong[0]
            raise XmxError(f"init_from={path}: {len(wrong)} tensors have other shapes than in this run (e.g. {k}: "
                           f"{tuple(state[k].shape)} in the checkpoint, {tuple(own[k].shape)} here); use the "
                           "backbone, classes and method settings the checkpoint was trained with")
        usable = {k: v for k, v in state.items() if k in own}
        if not usable:
            eg = ", ".join(sorted(state)[:3]) or "none"
            raise XmxError(f"init_from={path}: none of the checkpoint's {len(state)} tensors (e.g. {eg}) is a "
                           f"parameter of {mine['name']}: nothing would be loaded; pass a run of the same method")
        skipped = sorted(set(state) - set(usable))
        kept = sorted(k for k in own if k not in usable and not k.startswith(self.frozen_prefixes))
        self.load_state_dict(usable, strict=False)
        self.init_record = {"checkpoint": str(ckpt), "method": theirs.get("name"), "loaded": len(usable),
                            "skipped": skipped, "not_in_checkpoint": kept}
        log.warning("init_from %s: loaded %d tensors (%s)%s%s", ckpt, len(usable), ", ".join(sorted(usable)[:6])
                    + (", ..." if len(usable) > 6 else ""),
                    f"; skipped {len(skipped)} of the checkpoint's ({', '.join(skipped[:3])})" if skipped else "",
                    f"; {len(kept)} of this method's kept their initial values ({', '.join(kept[:3])})"
                    if kept else "")

    # ---- the method's part ------------------------------------------------------------------------------------
    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw CLIP image features [B,C]: cached features pass through, images [B,3,H,W] go through the encoder."""
        if x.dim() == 4:
            with torch.no_grad():
                return self.dm.backbone.encode_image(x).float()
        return x

    def logits(self, x: torch.Tensor, eval_set) -> torch.Tensor:
        raise NotImplementedError

    def extra_results(self) -> dict:
        return {}

    def parameter_counts(self, *modules: nn.Module) -> dict:
        """``{"trainable", "frozen"}`` parameter counts over this method and ``modules`` (the encoders, which most
        methods do not hold), each tensor counted once: results.json's ``parameters`` for every method."""
        seen, counts = set(), {"trainable": 0, "frozen": 0}
        for m in (self, *modules):
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    counts["trainable" if p.requires_grad else "frozen"] += p.numel()
        return counts

    # ---- evaluation -------------------------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        if batch is None:
            return
        x, y = batch
        self.val_acc.update(self.logits(x, self.dm.val_set), y)

    def on_validation_epoch_end(self) -> None:
        if self.val_acc.update_called:
            acc = 100.0 * self.val_acc.compute()  # percent, as papers report
            self.log("val/acc", acc, prog_bar=True)
            if not self.trainer.sanity_checking and self.trainer.state.fn == "fit":
                self.epoch_curve.append({"epoch": int(self.current_epoch), "val_acc": float(acc)})
        self.val_acc.reset()

    def training_record(self, selected_by: str = "val/acc (best checkpoint restored)") -> dict:
        """How training went, for results.json: the validation curve and which epoch was kept."""
        sel = self.selected_epoch
        cb = getattr(self._trainer, "checkpoint_callback", None) if self._trainer is not None else None
        if sel is not None and cb is not None and getattr(cb, "monitor", "") is None:
            selected_by = "last epoch (the restored checkpoint monitors nothing: no validation selection)"
        monitored = self._trainer is not None and any(getattr(c, "monitor", None)
                                                      for c in self._trainer.checkpoint_callbacks)
        if sel is None and self.fit_progress and not monitored:  # the last epoch's weights, in memory, were tested
            sel = self.fit_progress["epochs"] - 1
            selected_by = "last epoch (the weights at the end of training: no validation selection)"
        ran = self.fit_progress or {}
        return {"epochs": self.epochs, "epochs_run": ran.get("epochs", len(self.epoch_curve)),
                "steps_run": ran.get("steps"), "schedule_length": self.schedule_length, "epoch_curve": self.epoch_curve,
                "selected_epoch": sel,
                "selected_by": selected_by if sel is not None else
                ("last epoch (no checkpoint restored)" if self.epoch_curve else None)}

    def on_train_end(self) -> None:
        self.fit_progress = {"epochs": int(self.trainer.current_epoch), "steps": int(self.global_step)}

    def on_test_epoch_start(self) -> None:
        self._test_out = {s.name: ([], []) for s in self.dm.eval_sets}

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        if batch is None:
            return
        x, y = batch
        s = self.dm.eval_sets[dataloader_idx]
        logits = self.logits(x, s)
        for metric in self.test_metrics[dataloader_idx].values():
            metric.update(logits, y)
        self._test_out[s.name][0].append(logits.detach().to("cpu", torch.float16))
        self._test_out[s.name][1].append(y.detach().cpu())

    def on_test_epoch_end(self) -> None:
        for s, metrics in zip(self.dm.eval_sets, self.test_metrics):
            for key, metric in metrics.items():
                if metric.update_called:
                    self.log(f"{s.name}/{key}", 100.0 * metric.compute())  # percent, as papers report
                metric.reset()
        self.predictions = {name: {"logits": torch.cat(l), "labels": torch.cat(y)}
                            for name, (l, y) in self._test_out.items() if l}

    # ---- optimisation -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None or not params:
            return None
        opt = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return opt
        kw = {}
        bound = getattr(self.scheduler_factory, "keywords", None) or {}
        if "T_max" not in bound and "T_max" in inspect.signature(self.scheduler_factory).parameters:
            # a cosine schedule left open spans the whole run, in the scheduler's own unit
            budget = getattr(self, "step_budget", None)  # a method's own iteration budget (CLIP-LoRA: 500 x K)
            total = ((budget or self.trainer.estimated_stepping_batches) if self.scheduler_interval == "step"
                     else self.trainer.max_epochs)
            if total is None or not math.isfinite(total) or total < 1:
                raise XmxError(f"cosine schedule needs a finite number of {self.scheduler_interval}s; set "
                               "method.epochs (trainer.max_epochs) or method.scheduler.T_max")
            kw["T_max"] = int(total)
        T_max = kw.get("T_max", bound.get("T_max"))
        self.schedule_length = {"T_max": int(T_max), "unit": self.scheduler_interval} if T_max is not None else None
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=opt, **kw),
                                                   "interval": self.scheduler_interval}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        sd = checkpoint.get("state_dict", {})
        # frozen encoders stay out; parameters a method injected into them (LoRA, in-encoder adapters) train and stay
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        for k in [k for k in sd if k.startswith(self.frozen_prefixes) and k not in trainable]:
            del sd[k]
        checkpoint["xmx_epoch_curve"] = list(self.epoch_curve)  # a resumed run keeps the whole curve
        if self.backbone_identity:
            checkpoint["xmx_backbone"] = dict(self.backbone_identity)
        checkpoint["xmx_method"] = {"name": self.method_name, "family": method_family(type(self)),
                                    "class": f"{type(self).__module__}.{type(self).__qualname__}"}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.selected_epoch = checkpoint.get("epoch")  # the restored (best, for test) checkpoint's epoch
        saved = checkpoint.get("xmx_epoch_curve") or []
        if len(saved) > len(self.epoch_curve):  # resuming; the best checkpoint's curve is a prefix of ours
            self.epoch_curve = list(saved)
