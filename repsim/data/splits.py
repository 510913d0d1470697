"""Seeded train/val/test splits, grouped by patient or lesion so that no group straddles two splits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def split_indices(n: int, fractions: Sequence[float], seed: int, groups: Sequence | np.ndarray | None = None
                  ) -> dict[str, np.ndarray]:
    """Indices of ``n`` samples split ``fractions`` (train, val, test) of the samples, whole groups at a time.

    Groups (every sample its own when ``groups`` is None) are shuffled with ``numpy.random.default_rng(seed)``; each
    in turn goes to the split furthest below its target share (relative deficit), so every split gets a group as
    soon as there are three and the sample fractions are met up to one group.
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {list(fractions)}")
    keys = np.arange(n) if groups is None else np.asarray(groups)
    if len(keys) != n:
        raise ValueError(f"{len(keys)} group ids for {n} samples")
    uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    target = np.asarray(fractions, dtype=np.float64) * n
    filled = np.zeros(3)
    group_split = np.empty(len(uniq), dtype=np.int64)
    for g in np.random.default_rng(seed).permutation(len(uniq)):
        s = int(np.argmax(1.0 - filled / target))
        group_split[g] = s
        filled[s] += counts[g]
    sample_split = group_split[inverse]
    out = {name: np.flatnonzero(sample_split == s) for s, name in enumerate(SPLITS)}
    empty = [k for k, v in out.items() if len(v) == 0]
    if empty:
        raise ValueError(f"split {empty} is empty: {n} samples in {len(uniq)} groups are too few for {list(fractions)}")
    return out
