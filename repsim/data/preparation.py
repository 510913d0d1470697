"""``prepare``: a spec's ``data`` block -> train/val/test datasets (read, split, transforms), and ``Data``."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from repsim.data.datasets import DatasetInfo, ImageDataset, Source, with_channels
from repsim.data.registry import READERS, load_source
from repsim.data.splits import SPLITS, split_indices
from repsim.data.transforms import build_transform, default_resize
from repsim.files import write_text

# Keys of a spec's ``data`` block that are not passed on to the dataset reader.
GENERAL_KEYS = {"dataset", "root", "img_size", "resize", "augment", "crop_scale", "channels", "split", "split_seed",
                "fractions", "mean", "std"}


@dataclass
class Data:
    """A prepared dataset: its (channel-adjusted) info, the split indices and one ImageDataset per split.

    ``datasets`` holds ``train`` (augmented), ``val``, ``test`` and ``train_eval`` (train images, eval transform,
    the k-NN feature bank).
    """

    source: Source
    info: DatasetInfo
    split: dict[str, np.ndarray]
    datasets: dict[str, ImageDataset]

    def write_split(self, path: str | Path, split_seed: int | None) -> None:
        """Write the sample ids of each split to ``path`` (JSON, atomically)."""
        doc: dict[str, Any] = {"dataset": self.info.name, "split_seed": split_seed,
                               **{k: [self.source.ids[i] for i in v] for k, v in self.split.items()}}
        write_text(path, json.dumps(doc))


def check_data_block(cfg: dict[str, Any], data_root: str | Path | None = None) -> Path:
    """The resolved root of a spec's ``data`` block, or a one-line error before anything is read: no or an unknown
    ``dataset``, keys its reader does not take (a typo such as ``img_szie``), a root that does not exist."""
    if "dataset" not in cfg:
        raise ValueError("data block needs a 'dataset' key; one of " + ", ".join(sorted(READERS)))
    reader = READERS.get(cfg["dataset"])
    if reader is None:
        raise ValueError(f"unknown dataset {cfg['dataset']!r}; expected one of {', '.join(sorted(READERS))} "
                         "(an image folder with class sub-folders is dataset: image_folder)")
    accepted = set(inspect.signature(reader).parameters) - {"root"}
    unknown = sorted(set(cfg) - GENERAL_KEYS - accepted)
    if unknown:
        raise ValueError(f"data keys {unknown} are not understood by dataset {cfg['dataset']!r}; "
                         f"it accepts {sorted(accepted)} plus {sorted(GENERAL_KEYS)}")
    root = Path(cfg.get("root", ".")).expanduser()
    if data_root is not None and not root.is_absolute():
        root = Path(data_root) / root
    if not root.exists():
        raise FileNotFoundError(f"data folder for {cfg['dataset']!r} not found: {root}"
                                + ("" if data_root is not None else " (relative to the working folder: give "
                                   "--data-root the folder that holds it)"))
    return root


def prepare(cfg: dict[str, Any], data_root: str | Path | None = None, seed: int = 0) -> Data:
    """Read, split and wrap the dataset described by ``cfg`` (a spec's ``data`` block).

    ``cfg["root"]`` is resolved against ``data_root`` when relative. ``split``: "official" (the dataset's own split,
    MedMNIST) or "random" (seeded by ``split_seed``, fractions from the dataset, grouped by patient/lesion);
    the default is official where one exists. ``seed`` seeds the augmentation.
    """
    root = check_data_block(cfg, data_root)
    source = load_source(cfg["dataset"], root, **{k: v for k, v in cfg.items() if k not in GENERAL_KEYS})
    info = with_channels(source.info, int(cfg.get("channels") or source.info.channels))
    mean, std = tuple(cfg.get("mean") or info.mean or ()), tuple(cfg.get("std") or info.std or ())
    if len(mean) != info.channels or len(std) != info.channels:
        raise ValueError(f"mean/std {mean}/{std} do not have {info.channels} channel(s)")
    if cfg.get("mean") is not None or cfg.get("std") is not None:
        info = replace(info, mean=mean, std=std)

    mode = cfg.get("split") or ("official" if source.official else "random")
    if mode == "official":
        if not source.official:
            raise ValueError(f"dataset {info.name!r} has no official split; use split: random")
        split = source.official
    elif mode == "random":
        split = split_indices(len(source), cfg.get("fractions") or info.fractions, int(cfg.get("split_seed", 42)),
                              source.groups, source.targets if info.task != "multilabel" else None)
    else:
        raise ValueError(f"split must be 'official' or 'random', got {mode!r}")

    img_size = int(cfg.get("img_size", 224))
    resize = cfg.get("resize") or default_resize(img_size)
    train_tf = build_transform(img_size, mean, std, train=True, resize=resize, augment=bool(cfg.get("augment", True)),
                               crop_scale=tuple(cfg.get("crop_scale", (0.8, 1.0))))
    eval_tf = build_transform(img_size, mean, std, train=False, resize=resize)
    datasets = {s: ImageDataset(source, split[s], train_tf if s == "train" else eval_tf, channels=info.channels,
                                seed=seed) for s in SPLITS}
    datasets["train_eval"] = ImageDataset(source, split["train"], eval_tf, channels=info.channels, seed=seed)
    return Data(source, info, split, datasets)
