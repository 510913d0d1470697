"""``loader``: a DataLoader of evaluation images for CKA from a name, a file or a folder, in one call.

CKA needs the same samples, in the same order, for every model: the loader never shuffles, uses the eval transform
(resize -> centre crop -> normalise), and splits the samples into near-equal contiguous batches (so no batch is too
small for the unbiased estimator: each holds at least ``batch_size`` samples; ``repsim.batches``, the one rule). Its
``normalisation`` attribute says which mean/std were used; ``repsim.compare`` copies it into the result's attrs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader, Dataset, Subset

from repsim.batches import near_equal_batches
from repsim.data.datasets import IMAGE_EXTS, DatasetInfo, ImageDataset, Source, with_channels
from repsim.data.transforms import build_transform
from repsim.inputs import per_channel

Normalise = str | tuple[Sequence[float], Sequence[float]] | Any


def bootstrap_batches(n: int, batch_size: int | None = None) -> list[list[int]]:
    """Near-equal batches for a CKA with a bootstrap over batches: at least 10 of them where ``n`` allows (the
    bootstrap warns below 10), none below 4 samples (the unbiased estimator's minimum), none above ``batch_size``."""
    size = max(4, n // 10)
    return near_equal_batches(n, size if batch_size is None else min(batch_size, size))


def _flat_folder(root: Path) -> Source:
    """Images directly inside ``root`` (no class folders): unlabelled samples (target 0)."""
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    info = DatasetInfo(root.name, "multiclass", ["unlabelled"], 3, "accuracy")
    return Source(files, np.zeros(len(files), np.int64), [p.name for p in files], info)


def _source(data: str, root: str | Path | None, split: str) -> tuple[Source, list[int]]:
    """The samples of ``data`` and the indices of ``split`` (all samples where the data has no split)."""
    from repsim.data.datasets import image_folder, medmnist_file
    from repsim.data.named import NAMED
    from repsim.data.registry import load_source

    path = Path(data).expanduser()
    if data in NAMED:
        block = NAMED[data]
        base = Path(root) if root is not None else None
        folder = Path(block["root"]) if base is None else base / block["root"]
        kwargs = {k: v for k, v in block.items() if k not in ("dataset", "root")}
        source = load_source(block["dataset"], folder, **kwargs)
    elif path.suffix == ".npz":
        source = medmnist_file(path, partial=True)  # CKA needs images only: any splits, labels or not
    elif path.is_dir():
        has_classes = any(p.is_dir() for p in path.iterdir())
        source = image_folder(path) if has_classes else _flat_folder(path)
    else:
        raise ValueError(f"data {data!r} is neither a known dataset ({', '.join(sorted(NAMED))}), 'synthetic', a "
                         ".npz file with MedMNIST keys nor an image folder")
    if source.official is not None:
        if split not in source.official:
            raise ValueError(f"{data} has no {split!r} split; it has {sorted(source.official)}")
        return source, [int(i) for i in source.official[split]]
    return source, list(range(len(source)))


def _heldout(source: Source, indices: list[int], split: str, like: Sequence[Any]) -> tuple[list[int], str]:
    """``indices`` replaced by the images every run in ``like`` held out as ``split`` (their ``heldout`` record, read
    from the run's ``split.json`` by ``load_run``), and where the split came from. A run's split applies when it was
    trained on this dataset (same name) or when this data holds images the run trained on; with several runs, only
    images that all of them held out are kept."""
    keep: list[set[str]] = []
    where = []
    for model in like:
        held = getattr(model, "heldout", None)
        if not held:
            continue
        if held.get("dataset") != source.info.name and not set(held.get("train", ())).intersection(source.ids):
            continue  # another dataset: none of its images were seen in training
        if split not in held:
            raise ValueError(f"{getattr(model, 'run_dir', 'the run')} has no {split!r} split; it has "
                             f"{sorted(k for k in held if k not in ('dataset', 'split_seed'))}")
        keep.append(set(held[split]))
        where.append(str(getattr(model, "run_dir", "?")))
    if not keep:
        return indices, "the data's own"
    indices = [i for i in range(len(source)) if all(source.ids[i] in k for k in keep)]
    if not indices:
        raise ValueError(f"no {split} image of {source.info.name} is held out by every run ({', '.join(where)})")
    return indices, f"the held-out {split} split of run {' and '.join(dict.fromkeys(where))} (split.json)"


def loader(data: str, *, split: str = "test", img_size: int | None = None, root: str | Path | None = None,
           batch_size: int = 64, n_samples: int | None = None, normalise: Normalise = "dataset",
           channels: int | None = None, like: Any = None, num_workers: int = 0, seed: int = 0) -> DataLoader:
    """Evaluation images for CKA as a DataLoader of ``(x, y)`` batches of ``channels``-channel ``img_size`` images.

    Args:
        data: ``"synthetic"`` (repsim's built-in textures), a dataset name (``"retinamnist"``, ... read from
            ``root``), a ``.npz`` file with MedMNIST keys, or an image folder (class sub-folders or flat).
        split: the split of data that has one (MedMNIST: train, val, test); folders are used whole, unless a run
            in ``like`` split them (then its held-out ``split``).
        n_samples: the first ``n_samples`` of the split.
        normalise: ``"dataset"`` (the data's own mean/std: the paper's per-dataset normalisation), a model
            (its ``input_mean``/``input_std``: what pretrained weights expect) or a ``(mean, std)`` pair.
            ``repsim.compare`` converts each model's input to the model's own normalisation whatever this is.
        like: a model, or several, to take the input from: image size and channels (``img_size``/``in_chans``),
            normalisation, and for a run's backbone (``repsim.train.runs.load_run``) the images the run held out,
            so its training images never enter the CKA. Explicit arguments win over it.
    """
    from repsim.data.synthetic import SyntheticPatterns

    if n_samples is not None and (not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1):
        raise ValueError(f"n_samples must be a positive number of samples (or None for all), got {n_samples!r}")
    likes = [] if like is None else list(like) if isinstance(like, (list, tuple)) else [like]
    first = likes[0] if likes else None
    img_size = int(img_size or getattr(first, "img_size", 0) or 224)
    channels = int(channels or getattr(first, "in_chans", 0) or 3)
    if first is not None and isinstance(normalise, str) and normalise == "dataset" and hasattr(first, "input_mean"):
        normalise = first
    extra: dict[str, Any] = {}
    if data == "synthetic":
        if channels != 3:
            raise ValueError(f"the synthetic data has 3 channels, not {channels}")
        dataset: Dataset = SyntheticPatterns(n_samples or 512, img_size=img_size, split=split, seed=seed)
        norm: dict[str, Any] = {"normalisation": "synthetic data: drawn with about zero mean and unit variance"}
    else:
        source, indices = _source(data, root, split)
        indices, extra["split_from"] = _heldout(source, indices, split, likes)
        info = with_channels(source.info, channels)
        if isinstance(normalise, str):
            if normalise != "dataset":
                raise ValueError(f"normalise must be 'dataset', a model or a (mean, std) pair, got {normalise!r}")
            mean, std, what = info.mean or (0.5,) * channels, info.std or (0.25,) * channels, "dataset statistics"
        elif isinstance(normalise, tuple):
            (mean, std), what = normalise, "given"
        else:
            mean, std = (per_channel(v, channels, "the model's normalisation")
                         for v in (normalise.input_mean, normalise.input_std))
            what = f"{getattr(normalise, 'name', type(normalise).__name__)} input normalisation"
        transform = build_transform(img_size, mean, std, train=False)
        dataset = ImageDataset(source, indices, transform, channels=channels)
        norm = {"normalisation": what, "input_mean": [float(v) for v in mean], "input_std": [float(v) for v in std]}
        if n_samples is not None:
            if n_samples > len(indices):
                raise ValueError(f"n_samples={n_samples} exceeds the {len(indices)} samples of {data} ({split})")
            dataset = Subset(dataset, range(n_samples))
        extra["samples"] = json.dumps([source.ids[i] for i in indices[:len(dataset)]])
    batches = near_equal_batches(len(dataset), batch_size)  # type: ignore[arg-type]
    out = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    out.normalisation = {**norm, "data": str(data), "split": split, "img_size": img_size, **extra}
    return out
