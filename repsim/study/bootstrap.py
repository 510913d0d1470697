"""The hierarchical bootstrap of the study's test metrics: each replicate resamples the seeds (the same seed indices
for every group compared) and the test images (the same image indices for every group and seed: it is one test
set), scores every run from its saved test predictions on the resampled images, and averages over the resampled
seeds. So an interval holds both sources of chance: which seeds trained and which images were tested.

A replicate draws each image ``c`` times (``c`` a count, mostly 0, 1 or 2), so a metric of a replicate is a metric
of the original images weighted by their counts: ``resampled_metric`` computes it for a whole batch of replicates at
once (AUC from the ranks of the original scores, κ and accuracies from a weighted confusion matrix), which makes
2,000 replicates of 5 seeds x 2 starts on a few hundred images a fraction of a second. A metric undefined on a
replicate (a class absent from it) is NaN there: the NaN replicates are counted and reported, never dropped
silently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# metrics of single-label tasks that ``resampled_metric`` computes (``repsim.metrics.compute_metrics`` names)
RESAMPLED = ("auc", "auc_ovr", "kappa", "accuracy", "balanced_accuracy")
_CHUNK = 2_000_000  # replicates x images per batch: bounds the memory of the count matrices

Run = tuple[np.ndarray, np.ndarray]  # one run's test (probs [n, classes], targets [n])


def _ordered(pos: np.ndarray, w_pos: np.ndarray, neg: np.ndarray, w_neg: np.ndarray) -> np.ndarray:
    """Per replicate (a row of the weights: how often each image is drawn), the (positive, negative) pairs whose
    scores ``pos`` > ``neg``, ties counting half, each image counted as often as it is drawn: the AUC numerator.
    From the sorted negative scores and the cumulative weights of the negatives below each positive."""
    order = np.argsort(neg, kind="stable")
    below = np.zeros((len(w_neg), len(neg) + 1))
    np.cumsum(w_neg[:, order], axis=1, out=below[:, 1:])
    lt, le = np.searchsorted(neg[order], pos, "left"), np.searchsorted(neg[order], pos, "right")
    return (w_pos * (below[:, lt] + below[:, le])).sum(1) / 2


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den``, NaN where ``den`` is 0 (a metric undefined on that replicate)."""
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), math.nan)


def _confusion(targets: np.ndarray, pred: np.ndarray, classes: int, counts: np.ndarray) -> np.ndarray:
    """Confusion matrices (replicates x true x predicted) of the count-weighted images."""
    cells = np.zeros((len(targets), classes * classes))
    cells[np.arange(len(targets)), targets * classes + pred] = 1.0
    return (counts @ cells).reshape(len(counts), classes, classes)


def resampled_metric(metric: str, probs: np.ndarray, targets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``metric`` of one run on each replicate, a row of ``counts`` (replicates x images: how often each test image
    is drawn; a row of ones is the test set itself), as ``repsim.metrics.compute_metrics`` defines it: binary AUC of
    the last column or one-vs-one macro AUC (``auc``), one-vs-rest macro AUC (``auc_ovr``), quadratic-weighted κ,
    accuracy, balanced accuracy (over the classes present). NaN where a replicate leaves it undefined."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets).astype(np.int64)
    c = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    if p.ndim != 2 or y.shape != (len(p),) or c.shape[1] != len(p):
        raise ValueError(f"probs (n, classes), targets (n,) and counts (replicates, n) must agree, got {p.shape}, "
                         f"{y.shape} and {c.shape}")
    k = p.shape[1]
    if metric in ("kappa", "accuracy", "balanced_accuracy"):
        conf = _confusion(y, p.argmax(1), k, c)
        total, diag, rows = conf.sum((1, 2)), np.diagonal(conf, axis1=1, axis2=2), conf.sum(2)
        if metric == "accuracy":
            return diag.sum(1) / total
        if metric == "balanced_accuracy":
            present = rows > 0
            return np.where(present, _ratio(diag, rows), 0.0).sum(1) / present.sum(1)
        i, j = np.indices((k, k))
        weight = (i - j) ** 2.0
        expected = rows[:, :, None] * conf.sum(1)[:, None, :] / total[:, None, None]
        den = (weight * expected).sum((1, 2))
        return 1.0 - _ratio((weight * conf).sum((1, 2)), den)
    if metric not in ("auc", "auc_ovr"):
        raise ValueError(f"the test-set bootstrap computes {', '.join(RESAMPLED)} of single-label tasks, not "
                         f"{metric!r}; choose one of them as the study's metric (train.metric)")
    members = [y == j for j in range(k)]

    def auc(column: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
        w_pos, w_neg = c[:, positive], c[:, negative]
        return _ratio(_ordered(column[positive], w_pos, column[negative], w_neg), w_pos.sum(1) * w_neg.sum(1))

    if metric == "auc" and k == 2:
        return auc(p[:, -1], members[1], members[0])
    p = p / p.sum(1, keepdims=True)  # as repsim.metrics: exact for softmax outputs and vote fractions
    if metric == "auc_ovr":
        return np.mean([auc(p[:, a], members[a], ~members[a]) for a in range(k)], axis=0)
    return np.mean([(auc(p[:, a], members[a], members[b]) + auc(p[:, b], members[b], members[a])) / 2
                    for a in range(k) for b in range(a + 1, k)], axis=0)


def hierarchical(groups: Sequence[Sequence[Run]], metric: str, n_boot: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(per_run, replicates)``: the metric of every run on the test set (groups x seeds), and ``n_boot``
    replicates of every group's seed-averaged metric (replicates x groups). ``groups[g][s]`` is seed ``s`` of group
    ``g``: every group has the same seeds and the same test targets.

    The draws, in order, from ``numpy.random.default_rng(seed)``: the seed indices of every replicate
    (``integers(0, seeds, (n_boot, seeds))``), then the image indices replicate batch by replicate batch
    (``integers(0, n, (batch, n))``, ``batch = max(1, 2_000_000 // n)``)."""
    seeds = len(groups[0])
    targets = groups[0][0][1]
    for g, runs in enumerate(groups):
        if len(runs) != seeds or seeds == 0:
            raise ValueError(f"every group needs the same number (>= 1) of seeds, got {[len(r) for r in groups]}")
        for s, (probs, y) in enumerate(runs):
            if not np.array_equal(y, targets) or len(probs) != len(y):
                raise ValueError(f"group {g} seed {s} was tested on other images (its test targets differ from "
                                 "group 0 seed 0's): paired runs must share one test set")
    n = len(targets)
    rng = np.random.default_rng(seed)
    seed_idx = rng.integers(0, seeds, (n_boot, seeds))
    per_run = np.array([[resampled_metric(metric, p, y, np.ones((1, n)))[0] for p, y in runs] for runs in groups])
    batch = max(1, _CHUNK // n)
    scores = []  # per replicate batch: groups x seeds x replicates
    for start in range(0, n_boot, batch):
        draws = rng.integers(0, n, (min(batch, n_boot - start), n))
        flat = (draws + n * np.arange(len(draws))[:, None]).ravel()
        counts = np.bincount(flat, minlength=draws.size).reshape(draws.shape).astype(np.float64)
        scores.append(np.array([[resampled_metric(metric, p, y, counts) for p, y in runs] for runs in groups]))
    every = np.concatenate(scores, axis=2) if scores else np.zeros((len(groups), seeds, 0))
    reps = np.take_along_axis(every, seed_idx.T[None], axis=1).mean(1)  # groups x replicates
    return per_run, reps.T


def interval(values: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """Percentile interval of bootstrap ``values`` and the two-sided bootstrap p-value of "the centre is 0":
    ``min(1, 2 min(#(v <= 0) + 1, #(v >= 0) + 1) / (B + 1))`` over the B defined replicates (the interval excludes
    0 about when p < 1 - level). NaN replicates (undefined metric) are left out and counted in ``undefined``."""
    v = np.asarray(values, dtype=np.float64)
    ok = v[np.isfinite(v)]
    out: dict[str, Any] = {"n_boot": len(v), "undefined": int(len(v) - len(ok))}
    if not len(ok):
        return {**out, "lower": math.nan, "upper": math.nan, "p": math.nan}
    lower, upper = np.percentile(ok, [50 * (1 - level), 50 * (1 + level)])
    tail = min(int((ok <= 0).sum()), int((ok >= 0).sum())) + 1
    return {**out, "lower": float(lower), "upper": float(upper), "p": min(1.0, 2 * tail / (len(ok) + 1))}
