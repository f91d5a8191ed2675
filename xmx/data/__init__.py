"""Data: CoOp-layout dataset readers, few-shot subsets, protocols, transforms and the DataModules."""

from xmx.data import synthetic  # noqa: F401  (registers the synthetic dataset)
from xmx.data.datasets import DATASETS, Datum, DatasetSplits, load_dataset

__all__ = ["DATASETS", "Datum", "DatasetSplits", "load_dataset"]
