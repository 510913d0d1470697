"""Datasets, splits and transforms of the paper's experiments (``prepare`` turns a spec's ``data`` block into
train/val/test datasets)."""

from __future__ import annotations

from repsim.data.named import NAMED, check_data, default_root
from repsim.lazy import lazy_exports

# Imported on first use, so that reading NAMED (the CLI, study settings) does not import torch.
__getattr__, __dir__, _lazy = lazy_exports(__name__, {
    "Data": "repsim.data.preparation", "prepare": "repsim.data.preparation", "GENERAL_KEYS": "repsim.data.preparation",
    "loader": "repsim.data.loaders", "near_equal_batches": "repsim.batches",
    "bootstrap_batches": "repsim.data.loaders", "DatasetInfo": "repsim.data.datasets",
    "ImageDataset": "repsim.data.datasets", "Source": "repsim.data.datasets", "with_channels": "repsim.data.datasets",
    "READERS": "repsim.data.registry", "load_source": "repsim.data.registry",
    "split_indices": "repsim.data.splits", "build_transform": "repsim.data.transforms",
})

__all__ = ["NAMED", "check_data", "default_root", *_lazy]
