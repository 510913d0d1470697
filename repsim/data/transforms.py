"""The paper's image transforms (resize 256 -> crop 224 at full size), scaled to any ``img_size`` for small runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as T


class ToTensor(T.ToTensor):
    """torchvision's ``ToTensor`` (a PIL image of 8-bit pixels -> float in [0, 1]) that passes through a float
    tensor: 16-bit and float images are read as such tensors, already scaled
    (``repsim.data.datasets.PIXEL_SCALING``)."""

    def __call__(self, pic: Image.Image | torch.Tensor) -> torch.Tensor:
        return pic if isinstance(pic, torch.Tensor) else super().__call__(pic)


def default_resize(img_size: int) -> int:
    """Resize edge that keeps the paper's 256/224 ratio for a crop of ``img_size``."""
    return round(img_size * 256 / 224)


def build_transform(img_size: int, mean: Sequence[float], std: Sequence[float], *, train: bool,
                    resize: int | None = None, augment: bool = True,
                    crop_scale: tuple[float, float] = (0.8, 1.0)) -> T.Compose:
    """PIL image -> normalised tensor.

    Eval: Resize(resize x resize) -> CenterCrop(img_size). Train additionally (when ``augment``):
    RandomResizedCrop(img_size, crop_scale) -> vertical and horizontal flips -> ColorJitter(0.2, 0.2, 0.1, 0.1) with
    p=0.8, as in the paper's code (whose crop scale upper bound 1.2 only triggers retries, hence 1.0 here).
    """
    if img_size < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")
    resize = default_resize(img_size) if resize is None else resize
    if resize < img_size:
        raise ValueError(f"resize ({resize}) must be at least img_size ({img_size})")
    steps: list = [T.Resize((resize, resize)), T.CenterCrop(img_size)]
    if train and augment:
        steps += [T.RandomResizedCrop(img_size, scale=crop_scale),
                  T.RandomVerticalFlip(), T.RandomHorizontalFlip(),
                  T.RandomApply([T.ColorJitter(0.2, 0.2, 0.1, 0.1)], p=0.8)]
    steps += [ToTensor(), T.Normalize(list(mean), list(std))]
    return T.Compose(steps)
