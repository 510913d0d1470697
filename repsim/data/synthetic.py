"""A built-in, procedurally generated image dataset with class structure, for the demo and tests (no download).

Each image shows one shape whose kind is the class (disc, square, ring, cross, triangle, stripes) at a random
position, size and colour on a noisy random background. Sample ``i`` of a split is a pure function of
``(seed, split, i)``, so the dataset is identical on every machine and in every worker, and needs no storage.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES: tuple[str, ...] = ("disc", "square", "ring", "cross", "triangle", "stripes")
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}


class SyntheticShapes(Dataset):
    """``n`` images ``(3, img_size, img_size)`` (float32, about zero mean and unit variance) with integer labels
    ``i % num_classes`` (balanced), from the first ``num_classes`` of ``SHAPES``."""

    def __init__(self, n: int = 1024, *, img_size: int = 32, num_classes: int = 4, split: str = "train", seed: int = 0) -> None:
        if not 2 <= num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be in 2..{len(SHAPES)}, got {num_classes}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if n < 1 or img_size < 8:
            raise ValueError(f"need n >= 1 and img_size >= 8, got n={n}, img_size={img_size}")
        self.n, self.img_size, self.num_classes, self.split, self.seed = n, img_size, num_classes, split, seed
        self.classes = list(SHAPES[:num_classes])
        grid = (np.arange(img_size) + 0.5) / img_size
        self._yy, self._xx = np.meshgrid(grid, grid, indexing="ij")

    def __len__(self) -> int:
        return self.n

    def _mask(self, shape: str, rng: np.random.Generator) -> np.ndarray:
        r = rng.uniform(0.18, 0.32)
        cy, cx = rng.uniform(r, 1 - r, size=2)
        dy, dx = self._yy - cy, self._xx - cx
        if shape == "disc":
            return dy**2 + dx**2 <= r**2
        if shape == "square":
            return (abs(dy) <= r * 0.85) & (abs(dx) <= r * 0.85)
        if shape == "ring":
            d = np.sqrt(dy**2 + dx**2)
            return (d <= r) & (d >= 0.55 * r)
        if shape == "cross":
            return ((abs(dy) <= r * 0.3) & (abs(dx) <= r)) | ((abs(dx) <= r * 0.3) & (abs(dy) <= r))
        if shape == "triangle":
            return (dy <= r * 0.8) & (dy >= 2 * abs(dx) - r)
        period = rng.uniform(0.12, 0.2)  # stripes: a striped square patch
        return (abs(dy) <= r) & (abs(dx) <= r) & (np.mod(dy, period) < period / 2)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} samples")
        label = i % self.num_classes
        rng = np.random.default_rng([self.seed, SPLITS[self.split], i])
        background = rng.uniform(0.2, 0.8, size=3)
        colour = np.clip(background + rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.45, size=3), 0.0, 1.0)  # visible contrast
        img = background[:, None, None] + rng.normal(0.0, 0.12, size=(3, self.img_size, self.img_size))
        mask = self._mask(self.classes[label], rng)
        img[:, mask] = colour[:, None] + rng.normal(0.0, 0.05, size=(3, int(mask.sum())))
        return torch.from_numpy(((img - 0.5) / 0.25).astype(np.float32)), label
