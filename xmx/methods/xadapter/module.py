"""The xmx runs of the language track (X-adapter, docs/methods/xadapter.md#design): MLM pre-training, the zero-shot
colour probe and GLUE
fine-tuning, as LightningModules over the blocks of :mod:`xmx.methods.xadapter.expert`."""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from xmx.data.color_probe import VALM_TEMPLATES
from xmx.errors import XmxError
from xmx.methods.base import XmxModule, resolve_checkpoint
from xmx.methods.xadapter.expert import (ClassificationHead, ImageIndex, XAdapter, glue_loss)
from xmx.methods.xadapter.glue import GlueMetrics

# Below: the xmx runs of the language track. Each keeps the CLIP ``backbone`` and the ``plm`` as submodules named
# exactly so (checkpoints leave them out; with ``finetune_plm`` the PLM is trained and therefore kept). Batches are
# the dicts of ``xmx.datamodules.text``.


log = logging.getLogger(__name__)

EXPERTS = ("v", "t", "none")
PLM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def mlm_head(plm) -> nn.Module:
    """The masked-LM prediction head of a BERT (``cls``) or RoBERTa (``lm_head``) model: hidden [...,d] -> [...,V]."""
    head = getattr(plm.model, "cls", None) or getattr(plm.model, "lm_head", None)
    if head is None:
        raise XmxError(f"plm: {plm.name} has no masked-LM head (cls / lm_head)")
    return head


def linear_warmup(total: int, warmup: float, decay: str = "linear") -> Callable[[int], float]:
    """LR multiplier per optimiser step: linear warm-up over ``warmup`` (a fraction) of ``total`` steps, then
    linear decay to 0 (``decay="linear"``) or constant (``"constant"``)."""
    if decay not in ("linear", "constant"):
        raise XmxError(f"method.decay: {decay!r}; valid: linear, constant")
    warm = max(1, round(float(warmup) * total))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if decay == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warm))
    return f


class XAdapterRun(XmxModule):
    """Shared part of the X-adapter runs: the adapter, its CLIP context per batch, AdamW + linear warm-up.

    ``expert``: ``v`` (retrieved CLIP image embeddings), ``t`` (CLIP text-token features) or ``none`` (no adapter:
    the bare / frozen-PLM baselines; also ``adapter: null``). ``adapter``: the :class:`XAdapter` keys (placement,
    heads, d_a, head_dim, ffn_mult, dropout, gate_init). ``k``: images retrieved per sentence. ``context``:
    ``retrieve`` or ``own_image`` (COCO pre-training: the caption's own image where it is in the index, retrieval
    for the others). ``exclude_own``: never retrieve the caption's own image.
    """

    def __init__(self, name: str | None = None, expert: str = "v", adapter: dict | None = None, k: int = 4,
                 context: str = "retrieve", exclude_own: bool = False, batch_size: int | None = 256,
                 max_length: int = 64, steps: int | None = None, epochs: int | None = None, lr: float = 1e-4,
                 weight_decay: float = 0.01, warmup: float = 0.06, decay: str = "linear"):
        super().__init__(name=name, inputs="text", batch_size=batch_size, epochs=epochs)
        if expert not in EXPERTS:
            raise XmxError(f"method.expert: {expert!r}; valid: {', '.join(EXPERTS)}")
        if context not in ("retrieve", "own_image"):
            raise XmxError(f"method.context: {context!r}; valid: retrieve, own_image")
        if int(k) < 1:
            raise XmxError(f"method.k: {k}; retrieve at least one image")
        self.expert = "none" if adapter is None else expert
        self.adapter_cfg = dict(adapter or {})
        self.k, self.context_mode, self.exclude_own = int(k), context, bool(exclude_own)
        self.max_length, self.steps = max_length, steps
        self.lr, self.weight_decay, self.warmup, self.decay = float(lr), float(weight_decay), float(warmup), decay
        self.adapter: XAdapter | None = None
        self.loaded_tensors = 0

    # ---- construction -----------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        self.backbone, self.plm = dm.backbone, dm.plm  # submodules named exactly so: checkpoints skip them
        super().setup(stage)

    def build_metrics(self, dm) -> None:
        """Each run type makes its own metrics in ``build`` (MLM loss/accuracy, colour accuracy, GLUE metrics)."""

    def make_adapter(self) -> XAdapter | None:
        if self.expert == "none":
            return None
        return XAdapter.for_plm(self.plm, self.backbone.embed_dim, expert=self.expert, **self.adapter_cfg)

    def load_weights(self, path) -> None:
        """``init_from``: load the matching tensors; every adapter tensor must be among them (a pre-trained
        adapter of another shape or placement is an error, not a silent random init)."""
        ckpt = resolve_checkpoint(path)
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        own = self.state_dict()
        need = [k for k in own if k.startswith("adapter.")]
        bad = [k for k in need if k not in state or state[k].shape != own[k].shape]
        if bad:
            raise XmxError(f"init_from={path}: the checkpoint lacks {len(bad)} of the {len(need)} adapter tensors "
                           f"(e.g. {bad[0]}); pre-train with the same method.adapter (placement, d_a, heads) and "
                           f"backbone/plm")
        super().load_weights(path)
        self.loaded_tensors = sum(1 for k, v in state.items() if k in own and own[k].shape == v.shape)

    # ---- CLIP context -----------------------------------------------------------------------------------------
    def _index(self) -> ImageIndex:
        index = self.dm.index
        if index.embeddings.device != self.device:
            index.to(self.device)
        return index

    @torch.no_grad()
    def clip_context(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The expert's CLIP feature sequence for the batch: (feats [B,M,C], valid [B,M]); None without adapter."""
        if self.adapter is None:
            return None
        tokens = batch["clip_tokens"].to(self.device)
        if self.expert == "t":
            return self.backbone.encode_text_tokens(tokens, project=True)
        index = self._index()
        own = batch.get("image_rows")
        own = own.to(self.device) if own is not None else None
        q = self.backbone.encode_text(tokens)
        _, rows = index.search(q, min(self.k, len(index)), own if self.exclude_own else None)
        feats = index.features(rows)  # [B,k,C]
        valid = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        if self.context_mode == "own_image" and own is not None:
            have = own >= 0
            if have.any():
                feats = feats.clone()
                feats[have, 0] = index.features(own[have][:, None])[:, 0]
                valid[have, 1:] = False  # the caption's own image alone
        return feats, valid

    def plm_hidden(self, batch: dict, ctx) -> torch.Tensor:
        """Last hidden states [B,L,d] of the PLM (with the adapter's context when there is an adapter)."""
        inputs = {k: batch[k] for k in PLM_INPUTS if k in batch}
        if self.adapter is None:
            return self.plm.model.base_model(**inputs)[0]
        with self.adapter.context(*ctx):
            return self.plm.model.base_model(**inputs)[0]

    # ---- optimisation -----------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        decay = [p for n, p in params if p.ndim >= 2]
        rest = [p for n, p in params if p.ndim < 2]  # biases, LayerNorms, the gates
        return [g for g in ({"params": decay, "weight_decay": self.weight_decay},
                            {"params": rest, "weight_decay": 0.0}) if g["params"]]

    def configure_optimizers(self):
        groups = self.param_groups()
        if not groups:
            return None
        opt = torch.optim.AdamW(groups, lr=self.lr)
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise XmxError("trainer: set trainer.max_steps (or trainer.max_epochs) so the warm-up schedule has a "
                           "length")
        sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup(int(total), self.warmup, self.decay))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def extra_results(self) -> dict:
        out = {"expert": self.expert, "plm": self.plm.describe() if hasattr(self, "plm") else None}
        if self.adapter is not None:
            out.update({"adapter": {**self.adapter_cfg, "positions": [p + 1 for p in self.adapter.positions]},
                        "gates": self.adapter.gates(),
                        "adapter_params": sum(p.numel() for p in self.adapter.parameters())})
            if self.expert == "v":
                out.update({"k": self.k, "context": self.context_mode})
        if self.init_from:
            out["init_from"] = {"path": str(self.init_from), "tensors_loaded": self.loaded_tensors}
        return out

    # evaluation hooks of XmxModule assume (x, y) classification batches: each run below defines its own
    def logits(self, x, eval_set):  # pragma: no cover - not used by the language track
        raise NotImplementedError


class XAdapterMLM(XAdapterRun):
    """Adapter-only masked-LM pre-training (V-expert on COCO captions, T-expert on WikiText-103). Logs
    ``train/loss``, ``val/mlm_loss``, ``val/mlm_acc`` (masked-token accuracy, %; also as ``val/acc`` so the default
    checkpoint monitor keeps the best) and ``<eval set>/mlm_loss`` / ``mlm_acc`` at test."""

    def build(self, dm) -> None:
        if self.expert == "none":
            raise XmxError("method=xadapter_mlm pre-trains an adapter: set method.expert to v or t and give "
                           "method.adapter")
        self.adapter = self.make_adapter()
        self._sums: dict[str, list[float]] = {}
        self.val_curve: list[dict] = []

    def mlm_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (mean loss over predicted tokens, #correct, #predicted); the head runs on predicted positions only."""
        hidden = self.plm_hidden(batch, self.clip_context(batch))
        labels = batch["labels"]
        sel = labels != -100
        n = sel.sum()
        if not bool(n):
            return hidden.sum() * 0.0, n, n
        logits = mlm_head(self.plm)(hidden[sel])  # [P,V]
        target = labels[sel]
        loss = F.cross_entropy(logits.float(), target)
        return loss, (logits.argmax(-1) == target).sum(), n

    def training_step(self, batch, batch_idx):
        loss, _, n = self.mlm_step(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["input_ids"].shape[0]))
        return loss

    def _accumulate(self, name: str, batch) -> None:
        loss, correct, n = self.mlm_step(batch)
        s = self._sums.setdefault(name, [0.0, 0.0, 0.0])
        s[0] += float(loss) * int(n)
        s[1] += int(correct)
        s[2] += int(n)

    def _emit(self, name: str) -> dict:
        loss, correct, n = self._sums.pop(name, [0.0, 0.0, 0.0])
        if not n:
            return {}
        return {f"{name}/mlm_loss": loss / n, f"{name}/mlm_acc": 100.0 * correct / n}

    def validation_step(self, batch, batch_idx):
        self._accumulate("val", batch)

    def on_validation_epoch_end(self) -> None:
        m = self._emit("val")
        if m:
            self.log_dict(m, prog_bar=True)
            self.log("val/acc", m["val/mlm_acc"])
            self.val_curve.append({"step": int(self.global_step), **m})

    def on_test_epoch_start(self) -> None:
        self._sums = {}

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._accumulate(self.dm.eval_sets[dataloader_idx].name, batch)

    def on_test_epoch_end(self) -> None:
        for s in self.dm.eval_sets:
            m = self._emit(s.name)
            if m:
                self.log_dict(m)

    def extra_results(self) -> dict:
        return {**super().extra_results(), "mask_ratio": getattr(self.dm, "mask_ratio", None),
                "val_curve": self.val_curve}


class XAdapterColorProbe(XAdapterRun):
    """Zero-shot object colour (evaluation only): the MLM logits at the mask, restricted to the colour words.
    Without ``init_from`` the bare PLM (no adapter) is the baseline; with ``init_from=<pre-training run>`` the
    V-expert adapter is loaded and fed the images retrieved for each prompt. Logs ``<set>/acc`` per colour set
    (``test_memory_color/acc``, ``test_color_terms/acc``); per-template accuracies go to ``extra``."""

    needs_fit = False

    def build(self, dm) -> None:
        if self.expert != "none" and not self.init_from:
            log.warning("colour probe: no init_from, so no pre-trained adapter: this is the bare-PLM baseline "
                        "(an untrained adapter is the identity)")
            self.expert = "none"
        self.adapter = self.make_adapter()
        self.per_template: dict[str, dict[str, float]] = {}

    def on_test_epoch_start(self) -> None:
        self._out = {s.name: ([], [], []) for s in self.dm.eval_sets}

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        s = self.dm.eval_sets[dataloader_idx]
        probe = self.dm.probes[s.name]
        hidden = self.plm_hidden(batch, self.clip_context(batch))  # [B,L,d]
        at = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["mask_index"]]  # [B,d]
        logits = mlm_head(self.plm)(at)[:, probe.color_ids.to(at.device)]  # [B,n_colors]
        out = self._out[s.name]
        out[0].append(logits.detach().float().cpu())
        out[1].append(batch["labels"].cpu())
        out[2].append(batch["rows"].cpu())

    def on_test_epoch_end(self) -> None:
        self.predictions = {}
        for s in self.dm.eval_sets:
            logits, labels, rows = (torch.cat(x) for x in self._out[s.name])
            probe = self.dm.probes[s.name]
            if len(rows) == len(probe):
                scores = probe.score(logits[rows.argsort()])
            else:  # a partial pass (debug=fdr / limit_test_batches): score the prompts seen
                correct = (logits.argmax(1) == labels).float()
                t = probe.template_of[rows]
                scores = {"acc": 100.0 * float(correct.mean())}
                scores.update({f"acc/t{i}": 100.0 * float(correct[t == i].mean()) for i in t.unique().tolist()})
            self.log(f"{s.name}/acc", scores["acc"])
            self.per_template[s.name] = {k: v for k, v in scores.items() if k != "acc"}
            self.predictions[s.name] = {"logits": logits.half(), "labels": labels}

    def extra_results(self) -> dict:
        return {**super().extra_results(), "per_template": self.per_template,
                "templates": list(VALM_TEMPLATES)}


class XAdapterGlue(XAdapterRun):
    """GLUE fine-tuning: T-expert adapter + classification head train, PLM frozen. Baselines: ``adapter: null``
    (or ``expert: none``: frozen PLM + head) and ``finetune_plm: true`` (full fine-tuning; ``plm_lr`` for the
    PLM's parameters; the PLM is then saved in checkpoints). Logs the task's metrics on the dev set(s)
    (``test/acc``, ``test/mcc``, ``test/f1``, ``test/pearson``, ``test/spearman``; MNLI ``test_matched/acc`` and
    ``test_mismatched/acc``) and on validation (``val/<metric>``, the first dev set)."""

    def __init__(self, *args, finetune_plm: bool = False, plm_lr: float = 2e-5, head_dropout: float = 0.1, **kw):
        super().__init__(*args, **kw)
        self.finetune_plm, self.plm_lr, self.head_dropout = bool(finetune_plm), float(plm_lr), float(head_dropout)

    def build(self, dm) -> None:
        self.task = dm.task
        if self.finetune_plm:
            self.plm.frozen = False
            self.plm.model.requires_grad_(True)
            self.frozen_prefixes = ("backbone.",)  # the fine-tuned PLM is part of the result
        self.adapter = self.make_adapter()
        self.head = ClassificationHead(self.plm.hidden_size, self.task.num_labels, self.head_dropout)
        self.val_metrics = GlueMetrics(self.task.name)
        self.test_metrics = nn.ModuleList(GlueMetrics(self.task.name) for _ in dm.eval_sets)

    def param_groups(self) -> list[dict]:
        groups = super().param_groups()
        if not self.finetune_plm:
            return groups
        plm_ids = {id(p) for p in self.plm.parameters()}
        out = []
        for g in groups:
            for is_plm in (False, True):
                ps = [p for p in g["params"] if (id(p) in plm_ids) == is_plm]
                if ps:
                    out.append({**g, "params": ps, **({"lr": self.plm_lr} if is_plm else {})})
        return out

    def forward_logits(self, batch: dict) -> torch.Tensor:
        return self.head(self.plm_hidden(batch, self.clip_context(batch)))

    def training_step(self, batch, batch_idx):
        loss = glue_loss(self.forward_logits(batch), batch["labels"], self.task.is_regression)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["input_ids"].shape[0]))
        return loss

    def validation_step(self, batch, batch_idx):
        self.val_metrics.update(self.forward_logits(batch).float(), batch["labels"])

    def on_validation_epoch_end(self) -> None:
        if self.val_metrics.metrics[self.task.metrics[0]].update_called:
            self.log_dict({f"val/{k}": v for k, v in self.val_metrics.compute().items()}, prog_bar=True)
        self.val_metrics.reset()

    def on_test_epoch_start(self) -> None:
        self._out = {s.name: ([], []) for s in self.dm.eval_sets}

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        s = self.dm.eval_sets[dataloader_idx]
        logits = self.forward_logits(batch).float()
        self.test_metrics[dataloader_idx].update(logits, batch["labels"])
        self._out[s.name][0].append(logits.detach().cpu())
        self._out[s.name][1].append(batch["labels"].cpu())

    def on_test_epoch_end(self) -> None:
        self.predictions = {}
        for s, m in zip(self.dm.eval_sets, self.test_metrics):
            if not self._out[s.name][0]:
                continue
            self.log_dict({f"{s.name}/{k}": v for k, v in m.compute().items()})
            m.reset()
            self.predictions[s.name] = {"logits": torch.cat(self._out[s.name][0]).half(),
                                        "labels": torch.cat(self._out[s.name][1])}

    def extra_results(self) -> dict:
        return {**super().extra_results(), "task": self.task.name, "main_metric": self.task.main_metric,
                "finetune_plm": self.finetune_plm}
