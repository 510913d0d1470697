"""One batching rule for every CKA in repsim (``repsim.data.loader``, ``cka_matrix``, ``repsim cka --batch-size``):
``batch_size`` is the *smallest* batch. The N samples are cut into ``N // batch_size`` contiguous batches of
near-equal size, so each holds at least ``batch_size`` (and fewer than ``2 * batch_size``) samples, and no short
last batch falls below the unbiased estimator's 4 samples."""

from __future__ import annotations

import numpy as np


def near_equal_batches(n: int, batch_size: int) -> list[list[int]]:
    """``max(1, n // batch_size)`` contiguous batches of near-equal size covering ``0..n-1``: none is smaller than
    ``batch_size`` (unless ``n`` is)."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"need at least one sample and a positive batch size, got n={n}, batch_size={batch_size}")
    bounds = np.linspace(0, n, max(1, n // batch_size) + 1).round().astype(int)
    return [list(range(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
