"""Seeded train/val/test splits, grouped by patient or lesion so that no group straddles two splits, and stratified
by class so that every split holds every class the data has enough of."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def _assign(sizes: np.ndarray, order: np.ndarray, target: np.ndarray, filled: np.ndarray, out: np.ndarray) -> None:
    """Give each group of ``order`` in turn to the split furthest below its ``target`` share (relative deficit)."""
    for g in order:
        s = int(np.argmax(1.0 - filled / np.maximum(target, 1e-12)))
        out[g] = s
        filled[s] += sizes[g]


def split_indices(n: int, fractions: Sequence[float], seed: int, groups: Sequence | np.ndarray | None = None,
                  labels: Sequence | np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Indices of ``n`` samples split ``fractions`` (train, val, test) of the samples, whole groups at a time.

    Groups (every sample its own when ``groups`` is None) are shuffled with ``numpy.random.default_rng(seed)``; each
    in turn goes to the split furthest below its target share (relative deficit), so every split gets a group as
    soon as there are three and the sample fractions are met up to one group. With single-label ``labels`` the
    split is stratified: each class's groups (a group's class is its most common label) are split that way on their
    own, so a class with three groups or more is in every split; a class with fewer is named in a warning.
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {list(fractions)}")
    keys = np.arange(n) if groups is None else np.asarray(groups)
    if len(keys) != n:
        raise ValueError(f"{len(keys)} group ids for {n} samples")
    uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    rng = np.random.default_rng(seed)
    share = np.asarray(fractions, dtype=np.float64)
    group_split = np.empty(len(uniq), dtype=np.int64)
    classes = None if labels is None else np.asarray(labels)
    if classes is None or classes.ndim != 1:  # unlabelled or multilabel: one stratum
        _assign(counts, rng.permutation(len(uniq)), share * n, np.zeros(3), group_split)
    else:
        if len(classes) != n:
            raise ValueError(f"{len(classes)} labels for {n} samples")
        names, label_index = np.unique(classes, return_inverse=True)
        table = np.zeros((len(uniq), len(names)), dtype=np.int64)  # samples of each class in each group
        np.add.at(table, (inverse, label_index), 1)
        group_class = table.argmax(1)
        for c in range(len(names)):
            members = np.flatnonzero(group_class == c)
            if len(members) < 3:
                warnings.warn(f"class {names[c]} has {len(members)} group(s) of samples, fewer than the 3 splits: "
                              "it is missing from some split", UserWarning, stacklevel=3)
            _assign(counts, members[rng.permutation(len(members))], share * counts[members].sum(), np.zeros(3),
                    group_split)
    sample_split = group_split[inverse]
    out = {name: np.flatnonzero(sample_split == s) for s, name in enumerate(SPLITS)}
    empty = [k for k, v in out.items() if len(v) == 0]
    if empty:
        raise ValueError(f"split {empty} is empty: {n} samples in {len(uniq)} groups are too few for {list(fractions)}")
    return out
