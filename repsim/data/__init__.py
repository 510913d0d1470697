"""Datasets, splits and transforms of the paper's experiments (``prepare`` turns a spec's ``data`` block into
train/val/test datasets)."""

from __future__ import annotations

import importlib
from typing import Any

from repsim.data.named import NAMED, check_data, default_root

# Imported on first use, so that reading NAMED (the CLI, study settings) does not import torch.
_LAZY = {
    "Data": "spec", "prepare": "spec", "GENERAL_KEYS": "spec",
    "loader": "loaders", "near_equal_batches": "loaders", "bootstrap_batches": "loaders",
    "DatasetInfo": "datasets", "ImageDataset": "datasets", "Source": "datasets", "READERS": "readers",
    "load_source": "readers", "with_channels": "datasets",
    "split_indices": "splits", "build_transform": "transforms",
}

__all__ = ["NAMED", "check_data", "default_root", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"repsim.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'repsim.data' has no attribute {name!r}")
