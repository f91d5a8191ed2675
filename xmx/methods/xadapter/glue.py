"""GLUE metrics of the X-adapter fine-tuning runs (percent)."""

from __future__ import annotations

import warnings

import torch
import torchmetrics
from torch import nn



class GlueMetrics(nn.Module):
    """The task's standard dev-set metrics (percent): Matthews for CoLA, F1 + accuracy for MRPC/QQP,
    Pearson/Spearman for STS-B, accuracy elsewhere. ``update(outputs, targets)`` takes class logits [B,C] or
    regression outputs [B] / [B,1]."""

    def __init__(self, task: str):
        super().__init__()
        from xmx.data.text import glue_task
        self.task = glue_task(task)
        n = self.task.num_labels
        make = {
            "mcc": lambda: torchmetrics.MatthewsCorrCoef(task="multiclass", num_classes=n),
            "f1": lambda: torchmetrics.F1Score(task="binary"),
            "acc": lambda: torchmetrics.Accuracy(task="multiclass", num_classes=n),
            "pearson": lambda: torchmetrics.PearsonCorrCoef(),
            "spearman": lambda: torchmetrics.SpearmanCorrCoef(),
        }
        with warnings.catch_warnings():  # Spearman keeps all predictions: fine for GLUE dev sets (<= 40k rows)
            warnings.filterwarnings("ignore", message=".*will save all targets and predictions.*")
            self.metrics = torchmetrics.MetricCollection({m: make[m]() for m in self.task.metrics})

    @property
    def main_metric(self) -> str:
        return self.task.main_metric

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if self.task.is_regression:
            self.metrics.update(outputs.reshape(-1).float(), targets.float())
        else:
            self.metrics.update(outputs.argmax(-1), targets.long())

    def compute(self) -> dict[str, float]:
        return {k: 100.0 * float(v) for k, v in self.metrics.compute().items()}

    def reset(self) -> None:
        self.metrics.reset()
