"""A built-in, procedurally generated image dataset with class structure, for the demo and tests (no download).

Each image shows a disc or square patch at a random position, size and colour on a noisy random background; the
class is the texture inside the patch (horizontal, vertical or diagonal stripes, checkerboard, dots, plain) with a
random period and phase, so it is visible locally and a small ViT learns it within a few epochs on a CPU.
Sample ``i`` of a split is a pure function of ``(seed, split, i)``, so the dataset is identical on every machine and
in every worker, and needs no storage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

PATTERNS: tuple[str, ...] = ("horizontal", "vertical", "diagonal", "checker", "dots", "plain")
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}


class SyntheticPatterns(Dataset):
    """``n`` images ``(3, img_size, img_size)`` (float32, about zero mean and unit variance) with integer labels
    ``i % num_classes`` (balanced), from the first ``num_classes`` of ``PATTERNS``."""

    def __init__(self, n: int = 1024, *, img_size: int = 32, num_classes: int = 4, split: str = "train",
                 seed: int = 0) -> None:
        if not 2 <= num_classes <= len(PATTERNS):
            raise ValueError(f"num_classes must be in 2..{len(PATTERNS)}, got {num_classes}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if n < 1 or img_size < 8:
            raise ValueError(f"need n >= 1 and img_size >= 8, got n={n}, img_size={img_size}")
        self.n, self.img_size, self.num_classes, self.split, self.seed = n, img_size, num_classes, split, seed
        self.classes = list(PATTERNS[:num_classes])
        grid = (np.arange(img_size) + 0.5) / img_size
        self._yy, self._xx = np.meshgrid(grid, grid, indexing="ij")

    def __len__(self) -> int:
        return self.n

    def _mask(self, pattern: str, rng: np.random.Generator) -> np.ndarray:
        """Pixels of the patch (a disc or a square) that carry the foreground colour of ``pattern``."""
        r = rng.uniform(0.25, 0.4)
        cy, cx = rng.uniform(r, 1 - r, size=2)
        dy, dx = self._yy - cy, self._xx - cx
        region = (dy**2 + dx**2 <= r**2) if rng.random() < 0.5 else ((abs(dy) <= r * 0.85) & (abs(dx) <= r * 0.85))
        period = rng.uniform(3.0, 5.0) / self.img_size
        phase = rng.uniform(0.0, period)
        on = lambda u: np.mod(u + phase, period) < period / 2  # noqa: E731
        texture = {
            "horizontal": on(self._yy),
            "vertical": on(self._xx),
            "diagonal": on((self._yy + self._xx) / np.sqrt(2)),
            "checker": on(self._yy) ^ on(self._xx),
            "dots": on(self._yy) & on(self._xx),
            "plain": np.ones_like(self._yy, dtype=bool),
        }[pattern]
        return region & texture

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} samples")
        label = i % self.num_classes
        rng = np.random.default_rng([self.seed, SPLITS[self.split], i])
        background = rng.uniform(0.2, 0.8, size=3)
        # a colour in visible contrast to the background
        colour = np.clip(background + rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.45, size=3), 0.0, 1.0)
        img = background[:, None, None] + rng.normal(0.0, 0.12, size=(3, self.img_size, self.img_size))
        mask = self._mask(self.classes[label], rng)
        img[:, mask] = colour[:, None] + rng.normal(0.0, 0.05, size=(3, int(mask.sum())))
        return torch.from_numpy(((img - 0.5) / 0.25).astype(np.float32)), label


def write_image_folder(folder: str | Path, n: int, *, img_size: int, num_classes: int, seed: int) -> Path:
    """Write ``n`` images of ``SyntheticPatterns`` as an image folder ``folder/<class>/<i>.png`` (once: a
    ``.complete`` marker says it is whole), for the trainer's ``image_folder`` reader."""
    from PIL import Image

    from repsim.progress import tqdm

    folder = Path(folder)
    if (folder / ".complete").exists():
        return folder
    data = SyntheticPatterns(n, img_size=img_size, num_classes=num_classes, seed=seed)
    for i in tqdm(range(len(data)), desc=f"writing {folder.name}", leave=False):
        x, y = data[i]
        pixels = ((x.numpy() * 0.25 + 0.5).clip(0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
        (folder / data.classes[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / data.classes[y] / f"{i:05d}.png")
    (folder / ".complete").write_text("")
    return folder
