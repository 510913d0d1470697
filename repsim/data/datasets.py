"""The dataset model (:class:`Source`, :class:`DatasetInfo`, :class:`ImageDataset`) and the readers of array and
folder data (MedMNIST ``.npz`` files, image folders); the csv-described datasets are in :mod:`repsim.data.csv_readers`.

Each reader returns a :class:`Source`: every image (an in-memory uint8 array or a file path), its target, an id, an
optional group (patient or lesion), the task description and, where the data ships one, the official split.
:class:`ImageDataset` views a subset of a source through a transform. Readers never write into the data directory.
"""

from __future__ import annotations

import math
import re
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from repsim.inputs import IMAGENET_MEAN, IMAGENET_STD

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Pillow modes of 16-bit and float grayscale images -> the divisor that scales them to [0, 1] (float as stored)
HIGH_DEPTH = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}
PIXEL_SCALING = ("8-bit pixels / 255 (torchvision ToTensor); 16-bit grayscale (Pillow modes I;16*, and I, as which "
                 "Pillow may read 16-bit PNGs) / 65535 as float, never through 8 bits, so a 12-bit image spans "
                 "[0, 0.0625]; float (mode F) as stored; a gray image given to a 3-channel model is repeated")


# MedMNIST v2 flags: class count, task and the metric the paper would select on for that kind of task.
MEDMNIST = {
    "pathmnist": (9, "multiclass"), "chestmnist": (14, "multilabel"), "dermamnist": (7, "multiclass"),
    "octmnist": (4, "multiclass"), "pneumoniamnist": (2, "binary"), "retinamnist": (5, "ordinal"),
    "breastmnist": (2, "binary"), "bloodmnist": (8, "multiclass"), "tissuemnist": (8, "multiclass"),
    "organamnist": (11, "multiclass"), "organcmnist": (11, "multiclass"), "organsmnist": (11, "multiclass"),
}


@dataclass
class DatasetInfo:
    """What a trainer needs to know about a dataset.

    ``task`` is binary | multiclass | multilabel (ordinal grading is multiclass scored by κ). ``metric`` is the
    validation metric used for model selection (a key of ``repsim.metrics.compute_metrics``).
    """

    name: str
    task: str
    classes: list[str]
    channels: int
    metric: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    warmup: tuple[str, int] = ("epochs", 5)  # the paper code's per-dataset linear warmup: ("epochs"|"iters", n)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Source:
    """All samples of a dataset: ``images`` is a uint8 array (N, H, W[, C]) or a list of file paths."""

    images: np.ndarray | list[Path]
    targets: np.ndarray
    ids: list[str]
    info: DatasetInfo
    groups: np.ndarray | None = None
    official: dict[str, np.ndarray] | None = field(default=None)

    def __len__(self) -> int:
        return len(self.targets)


class ImageDataset(Dataset):
    """``(image tensor, target)`` for ``indices`` of a source, loaded as ``channels`` and passed through ``transform``.

    Random augmentation is seeded per (seed, epoch, index) so a sample's view does not depend on the process,
    worker or batch that loads it: runs resume exactly and DDP shards see what a single process would.
    Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, source: Source, indices: Sequence[int] | np.ndarray, transform: Callable, *, channels: int,
                 seed: int = 0) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.source, self.indices, self.transform = source, np.asarray(indices, dtype=np.int64), transform
        self.mode, self.seed, self.epoch = ("L" if channels == 1 else "RGB"), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> Image.Image | torch.Tensor:
        """The image of position ``i`` (not transformed): a PIL image of 8-bit pixels, or for a 16-bit or float image
        a float (channels, H, W) tensor scaled as ``PIXEL_SCALING`` says (Pillow's ``convert`` would clip it to
        8 bits)."""
        j = self.indices[i]
        img = self.source.images[j]
        if isinstance(img, np.ndarray):
            return Image.fromarray(img).convert(self.mode)
        try:
            with Image.open(img) as fh:
                if fh.mode in HIGH_DEPTH:
                    return _high_depth(fh, Path(img), 1 if self.mode == "L" else 3)
                return fh.convert(self.mode)
        except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # Pillow's errors for a bad file
            raise ValueError(f"{img} cannot be read as an image ({_first_line(err)}); replace or remove it") from None

    def target(self, i: int) -> torch.Tensor:
        t = self.source.targets[self.indices[i]]
        return torch.as_tensor(t, dtype=torch.float32 if self.source.info.task == "multilabel" else torch.long)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.load(i)
        # torchvision's random transforms draw from the default CPU generator: seed it for this sample, then
        # restore it so the caller's stream (dropout, shuffling) is untouched.
        gen = torch.default_generator
        saved = gen.get_state()
        gen.manual_seed((self.seed * 1_000_003 + self.epoch * 7_919 + int(self.indices[i])) % 2**63)
        try:
            x = self.transform(img)
        finally:
            gen.set_state(saved)
        return x, self.target(i)


# --------------------------------------------------------------------------------------------------- helpers
def _high_depth(img: Image.Image, path: Path, channels: int) -> torch.Tensor:
    """A 16-bit or float grayscale image as a float (channels, H, W) tensor, scaled by its bit depth."""
    pixels = np.asarray(img, dtype=np.float64)
    if img.mode == "I" and (pixels.min() < 0 or pixels.max() > 65535):
        raise ValueError(f"{path}: 32-bit integer pixels outside 0..65535 (min {pixels.min():g}, max "
                         f"{pixels.max():g}); store the image as 8- or 16-bit, or as float in [0, 1]")
    x = torch.from_numpy((pixels / HIGH_DEPTH[img.mode]).astype(np.float32))
    return x.expand(channels, *x.shape).clone()


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _single_label_task(num_classes: int) -> tuple[str, str]:
    return ("binary", "auc") if num_classes == 2 else ("multiclass", "balanced_accuracy")


def _fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """``fractions`` as DatasetInfo's (train, val, test) triple; :func:`split_indices` checks their values."""
    if len(fractions) != 3:
        raise ValueError(f"fractions must be three numbers (train, val, test), got {list(fractions)}")
    train, val, test = fractions
    return train, val, test


# --------------------------------------------------------------------------------------------------- readers
def read_npz(path: Path, keys: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (and those of ``optional`` it has) of the ``.npz`` file ``path``, read in full; a file that
    is missing, truncated, corrupt, not an ``.npz`` archive or holding pickled objects (never loaded) raises one line
    naming it and why."""
    _require_file(path, "npz file")
    try:
        with open(path, "rb") as fh:
            npz = np.load(fh, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError(f"{path} holds a single .npy array, not an .npz archive of named arrays")
            with npz:
                missing = [k for k in keys if k not in npz.files]
                if missing:
                    raise ValueError(f"{path}: missing arrays {missing}; it has {sorted(npz.files)}")
                return {k: npz[k] for k in [*keys, *optional] if k in npz.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as err:
        raise ValueError(f"{path} is truncated or corrupt ({type(err).__name__}: {_first_line(err)})") from None
    except ValueError as err:
        if "Object arrays" in str(err):
            raise ValueError(f"{path} holds object arrays (pickled Python objects), which repsim never loads; "
                             "store numeric arrays") from None
        if "pickled" in str(err):  # numpy's guess for a file that is neither a zip archive nor .npy data
            raise ValueError(f"{path} is not an .npz archive (neither zip nor .npy data)") from None
        raise


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else "no detail"


def medmnist(root: Path, flag: str, size: int = 28) -> Source:
    """A MedMNIST ``{flag}.npz`` (``{flag}_{size}.npz`` for MedMNIST+) with its official train/val/test split.

    Normalisation constants are the train split's per-channel pixel mean and std.
    """
    if flag not in MEDMNIST:
        raise ValueError(f"unknown MedMNIST flag {flag!r}; known: {sorted(MEDMNIST)}")
    path = _require_file(root / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"), f"MedMNIST {flag}")
    return _npz_source(path, flag, *MEDMNIST[flag])


def medmnist_file(path: str | Path, *, partial: bool = False) -> Source:
    """An ``.npz`` with MedMNIST's ``{train,val,test}_{images,labels}`` arrays, under any file name.

    A file named after a MedMNIST flag (``breastmnist.npz``, ``breastmnist_64.npz``) gets that flag's classes and
    task; any other is read as a single-label dataset whose classes are ``0..max(label)``. ``partial=True`` (images
    for CKA) reads whichever splits the file has, labels or not.
    """
    path = Path(path)
    match = re.fullmatch(r"([a-z]+)(?:_\d+)?", path.stem.lower())
    if match and match.group(1) in MEDMNIST:
        return _npz_source(path, match.group(1), *MEDMNIST[match.group(1)], partial=partial)
    names = [f"{s}_labels" for s in ("train", "val", "test")]
    labels = read_npz(path, [], names) if partial else read_npz(path, names)
    if partial:
        found = [v.reshape(-1) for v in labels.values()]
        top = int(max(v.max() for v in found)) if found and all(v.size for v in found) else 0
        return _npz_source(path, path.stem, top + 1, "multiclass", partial=True)
    flat = np.concatenate([v.reshape(len(v), -1) for v in labels.values()])
    if flat.shape[1] != 1 or not np.issubdtype(flat.dtype, np.integer) or flat.size == 0 or flat.min() < 0:
        raise ValueError(f"{path}: labels must be integers >= 0, one per image, to be read as a single-label "
                         f"dataset (got {flat.dtype} labels of shape {flat.shape}); name a MedMNIST file after its "
                         "flag (e.g. chestmnist.npz)")
    num_classes = int(flat.max()) + 1
    if num_classes < 2:
        raise ValueError(f"{path}: every label is 0; a classification dataset needs at least 2 classes")
    return _npz_source(path, path.stem, num_classes, "binary" if num_classes == 2 else "multiclass")


def _npz_source(path: Path, name: str, num_classes: int, kind: str, partial: bool = False) -> Source:
    """A MedMNIST-layout ``.npz`` as a Source with its official split; normalisation from the train split (from
    the splits it has, with ``partial``, where labels may be missing too: they read as class 0)."""
    keys = [f"{s}_{k}" for s in ("train", "val", "test") for k in ("images", "labels")]
    arrays = read_npz(path, [] if partial else keys, keys if partial else ())
    present = [s for s in ("train", "val", "test") if f"{s}_images" in arrays]
    if not present:
        raise ValueError(f"{path}: no train_images, val_images or test_images array; it has {sorted(arrays)}")
    parts = {s: (arrays[f"{s}_images"], arrays.get(f"{s}_labels", np.zeros(len(arrays[f"{s}_images"]), np.int64)))
             for s in present}
    images = np.concatenate([p[0] for p in parts.values()])
    if images.ndim == 3:
        channels = 1
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        channels = images.shape[-1]
        images = images[..., 0] if channels == 1 else images
    else:
        raise ValueError(f"{path}: images of shape {images.shape} are neither (N, H, W) nor (N, H, W, 1|3)")
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 pixels, got {images.dtype}")
    labels = np.concatenate([p[1] for p in parts.values()])
    if len(labels) != len(images):
        raise ValueError(f"{path}: {len(labels)} labels for {len(images)} images")
    if kind == "multilabel":
        targets, task, metric = labels.astype(np.float32), "multilabel", "auc"
    else:
        targets = labels.reshape(-1).astype(np.int64)
        task, metric = ("multiclass", "kappa") if kind == "ordinal" else _single_label_task(num_classes)
    if task != "multilabel" and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"{path}: labels outside 0..{num_classes - 1}")
    n_train = len(parts[present[0]][0])  # the train split, or the first split the file has
    pixels = images[:n_train].reshape(n_train, -1, channels).astype(np.float64) / 255.0
    mean, std = tuple(pixels.mean((0, 1)).tolist()), tuple(pixels.std((0, 1)).tolist())
    bounds = np.cumsum([len(p[0]) for p in parts.values()])
    official = {s: np.arange(lo, hi) for s, lo, hi in zip(parts, [0, *bounds[:-1]], bounds)}
    ids = [f"{s}/{i}" for s in parts for i in range(len(parts[s][0]))]
    info = DatasetInfo(name, task, [str(c) for c in range(num_classes)], channels, metric, mean, std)
    return Source(images, targets, ids, info, official=official)


def image_folder(root: Path, *, channels: int = 3, name: str | None = None, metric: str | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> Source:
    """``root/<class>/<image>`` (torchvision ImageFolder layout); classes are the sorted sub-folder names."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(p, c) for c, d in enumerate(classes) for p in sorted((root / d).rglob("*"))
             if p.suffix.lower() in IMAGE_EXTS]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in class folders under {root}")
    empty = sorted(set(classes) - {classes[c] for _, c in files})
    if empty:
        raise ValueError(f"{root}: class folder(s) {empty} hold no images ({', '.join(IMAGE_EXTS)}); remove them or "
                         "add their images")
    task = _single_label_task(len(classes))[0]
    mean = tuple(mean) if mean is not None else (IMAGENET_MEAN if channels == 3 else (0.5,))
    std = tuple(std) if std is not None else (IMAGENET_STD if channels == 3 else (0.25,))
    info = DatasetInfo(name or root.name, task, classes, channels,
                       metric or ("auc" if task == "binary" else "balanced_accuracy"), mean, std, _fractions(fractions))
    return Source([p for p, _ in files], np.array([c for _, c in files], np.int64),
                  [str(p.relative_to(root)) for p, _ in files], info)


def with_channels(info: DatasetInfo, channels: int) -> DatasetInfo:
    """``info`` for images converted to ``channels``: gray statistics repeated for 3 channels, RGB ones averaged."""
    if channels == info.channels:
        return info
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    mean, std = info.mean or (0.5,), info.std or (0.25,)
    if channels == 3:
        mean, std = mean * 3 if len(mean) == 1 else mean, std * 3 if len(std) == 1 else std
    else:
        mean, std = (float(np.mean(mean)),), (math.sqrt(float(np.mean(np.square(std)))),)
    return replace(info, channels=channels, mean=tuple(mean), std=tuple(std))


__all__ = ["DatasetInfo", "Source", "ImageDataset", "with_channels", "medmnist", "medmnist_file", "read_npz",
           "image_folder"]
