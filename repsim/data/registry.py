"""Every dataset reader by name (``READERS``, what a spec's ``data.dataset`` names) and ``load_source``, which
dispatches on it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from repsim.data.csv_readers import aptos2019, cbis_ddsm, chexpert, csv_images, isic2019, nih_cxr14
from repsim.data.datasets import Source, image_folder, medmnist

READERS: dict[str, Callable[..., Source]] = {
    "medmnist": medmnist, "aptos2019": aptos2019, "isic2019": isic2019, "chexpert": chexpert,
    "cbis_ddsm": cbis_ddsm, "nih_cxr14": nih_cxr14, "csv": csv_images, "image_folder": image_folder,
}


def load_source(dataset: str, root: str | Path, **kwargs: Any) -> Source:
    """Read dataset ``dataset`` (a key of ``READERS``) from ``root`` with reader-specific ``kwargs``."""
    if dataset not in READERS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(READERS)}")
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data folder for {dataset!r} not found: {root}")
    return READERS[dataset](root, **kwargs)
