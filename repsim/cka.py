"""Centred kernel alignment: full-batch ``cka`` and the minibatch engine ``MinibatchCKA``.

Notation (Kornblith et al. 2019; Nguyen et al. 2021): X (n x p1), Y (n x p2), K = XX^T, L = YY^T.

* Biased:   HSIC0(K, L) = <HKH, HLH> / (n-1)^2,  H = I - 11^T/n.
* Unbiased: HSIC1(K, L) = <K^U, L^U> / (n(n-3))  with K^U the U-centred Gram (Szekely & Rizzo 2014), which equals
  Song et al. (2012)'s unbiased HSIC.
* CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).

Numerics. Both HSICs are invariant to double centring, so features are centred (O(nd)) before any Gram is formed:
this removes the catastrophic cancellation of the raw-Gram Song form when activations have a large mean (as after
ReLU/GELU). Grams are formed in at least float32 (float64 stays float64), centred, and every inner product between
Grams is taken and accumulated in float64. Unbiased values can be negative; they are never clamped. A zero-variance
representation gives NaN and a warning naming it.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import torch

from repsim.gram import (
    DTYPE_POLICY,
    _as_matrix,
    _check_n,
    _ratio,
    centre_gram,
    check_estimator,
    feature_gram,
    gram_vector,
    linear_gram,
    rbf_gram,
)
from repsim.minibatch import MinibatchCKA
from repsim.types import Estimator

__all__ = ["DTYPE_POLICY", "MinibatchCKA", "centre_gram", "cka", "feature_gram", "gram_vector", "linear_gram",
           "rbf_gram"]


# -------------------------------------------------------------------------------------------------- full-batch CKA
def cka(
    x: Any,
    y: Any,
    *,
    kernel: Literal["linear", "rbf"] = "linear",
    estimator: Estimator = "biased",
    threshold: float = 1.0,
    debiased: bool | None = None,
) -> float:
    """CKA between two representations of the same n samples, computed in float64.

    Args:
        x, y: (n, ...) torch tensors or numpy arrays; trailing dims are flattened.
        kernel: ``"linear"`` (evaluated in feature space when that is cheaper) or ``"rbf"`` with
            sigma = ``threshold`` x median pairwise distance (Kornblith et al.'s convention).
        estimator: ``"biased"`` HSIC0 or ``"unbiased"`` HSIC1 (U-centred; needs n >= 4 and can be negative, never
            clamped). Biased by default, unlike the rest of repsim: this one-batch function is the reference that
            reproduces Kornblith et al.'s published numbers (their ``cka(..., debiased=False)`` default). Everything
            that combines batches (``MinibatchCKA``, ``compare``, ``cka_matrix``, ``repsim cka``) defaults to
            unbiased, because only HSIC1 averages over batches without a batch-size bias (Nguyen et al. 2021).
        debiased: deprecated alias: ``True`` is ``estimator="unbiased"``.

    Returns:
        The CKA value; NaN with a warning when either representation has zero variance.
    """
    if debiased is not None:
        warnings.warn("cka(debiased=...) is deprecated; use estimator='unbiased' or 'biased'", DeprecationWarning,
                      stacklevel=2)
        estimator = "unbiased" if debiased else "biased"
    estimator = check_estimator(estimator)
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
    if kernel == "rbf" and not threshold > 0:
        raise ValueError(f"threshold must be positive (sigma = threshold x median distance), got {threshold!r}")
    a = _as_matrix(x, "x", torch.float64)
    b = _as_matrix(y, "y", torch.float64)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {a.shape[0]} and {b.shape[0]}")
    n = a.shape[0]
    _check_n(n, estimator, "cka")
    b = b.to(a.device)
    da, db = a.shape[1], b.shape[1]
    if kernel == "linear" and da * db + da * da + db * db < n * (da + db + n):
        kab, kaa, kbb = _feature_space_hsics(a, b, estimator == "unbiased")
    else:
        gram = linear_gram if kernel == "linear" else (lambda t: rbf_gram(t, threshold))
        ka, kb = centre_gram(gram(a), estimator), centre_gram(gram(b), estimator)
        kab, kaa, kbb = (float((p * q).sum()) for p, q in ((ka, kb), (ka, ka), (kb, kb)))
    return float(_ratio(np.array([[kab]]), np.array([kaa]), np.array([kbb]), ["x"], ["y"])[0, 0])


def _feature_space_hsics(a: torch.Tensor, b: torch.Tensor, debiased: bool) -> tuple[float, float, float]:
    """<K_c, L_c>, <K_c, K_c>, <L_c, L_c> for linear kernels from (d x d) cross-covariances (n >> d case)."""
    a = a - a.mean(0, keepdim=True)
    b = b - b.mean(0, keepdim=True)
    n = a.shape[0]

    def inner(p: torch.Tensor, q: torch.Tensor) -> float:
        val = float((q.T @ p).square().sum())
        if debiased:  # U-centring correction, expressed with squared row norms of centred features
            sp, sq = p.square().sum(1), q.square().sum(1)
            val += -n / (n - 2) * float(sp @ sq) + float(sp.sum() * sq.sum()) / ((n - 1) * (n - 2))
        return val

    return inner(a, b), inner(a, a), inner(b, b)


