"""Data: CoOp-layout dataset readers, few-shot subsets, protocols, transforms, templates and text sets (the Lightning
DataModules that compose them live in :mod:`xmx.datamodules`)."""

from xmx.data import coop, synthetic  # noqa: F401  (register the CoOp datasets and the synthetic one)
from xmx.data.datasets import DATASETS, Datum, DatasetSplits, load_dataset

__all__ = ["DATASETS", "Datum", "DatasetSplits", "load_dataset"]
