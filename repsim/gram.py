"""Gram matrices for CKA: linear and RBF Grams of feature-centred inputs, double and U-centring, the flattened
centred Gram (``gram_vector``) the minibatch engine takes inner products of, and the HSIC -> CKA ratio.

Numerics: features are centred before any Gram is formed (HSIC is invariant to it), which removes the catastrophic
cancellation of the raw-Gram Song form when activations have a large mean; Grams are formed in at least float32 and
every inner product between Grams is taken in float64 by the callers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from repsim.types import ESTIMATORS, Estimator

DTYPE_POLICY = "features centred in >=float32; Gram >=float32; Gram inner products and sums in float64"


# ----------------------------------------------------------------------------------------------------------- helpers
def _as_matrix(x: Any, name: str, dtype: torch.dtype | None = None, check: bool = True) -> torch.Tensor:
    """(n, ...) tensor/array -> (n, d) tensor with trailing dims flattened, in ``dtype`` or at least float32 (integer
    and bool inputs such as uint8 images are converted, so their Grams cannot overflow); rejects non-numeric and
    complex data, a batch of 0 samples and (``check``) NaN/Inf, naming ``name``."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        a = np.asarray(x)
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{name}: expected numbers, got an array of dtype {a.dtype}")
        t = torch.as_tensor(a)
    if t.is_complex():
        raise ValueError(f"{name}: expected real numbers, got {t.dtype} (torch.view_as_real(x) gives both parts)")
    if t.ndim < 1:
        raise ValueError(f"{name}: expected an array of shape (n_samples, ...), got a scalar")
    if t.shape[0] == 0:
        raise ValueError(f"{name}: a batch of 0 samples (shape {tuple(t.shape)}); CKA needs samples in every batch")
    t = t.reshape(t.shape[0], math.prod(t.shape[1:]))
    if dtype is not None:
        t = t.to(dtype)
    elif not t.is_floating_point() or t.element_size() < 4:
        t = t.to(torch.float32)
    if check:
        _check_finite(t, name)
    return t


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not (math.isfinite(float(t)) if t.numel() == 1 else bool(torch.isfinite(t).all())):
        raise ValueError(f"{name}: activations contain NaN or Inf (or overflow their Gram matrix)")


def _check_n(n: int, estimator: Estimator, what: str) -> None:
    need = 4 if estimator == "unbiased" else 2
    if n < need:
        raise ValueError(
            f"{what}: the {estimator} estimator needs at least {need} samples per batch, got {n}"
            + (" (HSIC1 divides by n(n-3))" if estimator == "unbiased" else "")
        )


def check_estimator(estimator: str) -> Estimator:
    """``estimator`` if it is one of ``ESTIMATORS``, else a ValueError naming the choices."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be 'unbiased' or 'biased', got {estimator!r}")
    return estimator  # type: ignore[return-value]


def centre_gram(k: torch.Tensor, estimator: Estimator, *, inplace: bool = False) -> torch.Tensor:
    """Double-centre (biased, HKH) or U-centre (unbiased) a symmetric Gram matrix (in place when ``inplace``).

    Both are ``K - a 1^T - 1 a^T`` off the diagonal, with ``a`` from the row sums ``r`` and total ``t`` (in float64):
    ``a = r/n - t/(2n^2)`` for HKH; for U-centring the diagonal is zeroed first and again after, and
    ``a = r/(n-2) - t/(2(n-1)(n-2))``. Two passes over ``K`` instead of one per term."""
    n = k.shape[0]
    if not inplace:
        k = k.clone()
    unbiased = estimator == "unbiased"
    if unbiased:
        k.fill_diagonal_(0)
    r = k.sum(1, dtype=torch.float64)
    t = r.sum()
    a = (r / (n - 2) - t / (2 * (n - 1) * (n - 2))) if unbiased else (r / n - t / (2 * n * n))
    a = a.to(k.dtype)
    k -= a[:, None]
    k -= a[None, :]
    if unbiased:
        k.fill_diagonal_(0)
    return k


def linear_gram(x: torch.Tensor) -> torch.Tensor:
    """Gram of feature-centred ``x`` (n, d) in its own dtype; centring first is exact for HSIC and avoids
    cancellation."""
    return symmetric_product(x - x.mean(0, keepdim=True))


def gram_block_rows(n: int) -> int:
    """Rows per block of ``symmetric_product``'s upper triangle: plain matmul (``n``) below 128 rows, then blocks of
    ``max(64, n // 4)`` rows capped at 256 (measured on 2 CPU threads, interleaved medians against one ``x @ x.T``:
    1.14x faster at n = 128, 1.25x at 256, 1.34-1.40x at 512 and 1.51-1.56x at 1024 with d = 3,264; bench/gram.py)."""
    return n if n < 128 else min(256, max(64, n // 4))


def symmetric_product(x: torch.Tensor) -> torch.Tensor:
    """``x @ x.T`` (n, d) -> (n, n), computing only the upper block triangle and mirroring it.

    Row block ``i`` is multiplied by the rows from ``i`` on (``n^2 d (1 + 1/blocks)`` multiply-adds instead of
    ``2 n^2 d``), each product written straight into its place in the result; the strictly lower blocks are then
    copied from their transposes. On a GPU, where small GEMMs are launch-bound, one matmul.
    """
    n = x.shape[0]
    b = gram_block_rows(n)
    if x.device.type != "cpu" or b >= n:
        return x @ x.T
    out = torch.empty(n, n, dtype=x.dtype)
    for i in range(0, n, b):
        torch.mm(x[i:i + b], x[i:].T, out=out[i:i + b, i:])
    for i in range(0, n - b, b):
        out[i + b:, i:i + b].copy_(out[i:i + b, i + b:].T)
    return out


def rbf_gram(x: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """RBF Gram with sigma^2 = threshold^2 * median squared distance (Kornblith et al. 2019's convention)."""
    xc = x - x.mean(0, keepdim=True)
    sq = (xc * xc).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * (xc @ xc.T)).clamp_min_(0)  # rounding can give -0; distances are >= 0
    v = d2.reshape(-1).sort().values
    med = (v[(v.numel() - 1) // 2] + v[v.numel() // 2]) / 2  # the usual median (mean of the middle two), as numpy
    if float(med) == 0.0:
        return torch.full_like(d2, float("nan"))
    return torch.exp(-d2 / (2 * threshold**2 * med))


def gram_vector(x: Any, *, name: str = "activations", estimator: Estimator = "unbiased") -> torch.Tensor:
    """A layer's centred linear Gram, flattened: ``v_a . v_b = <K_c, L_c>_F`` (length n^2, dtype max(float32, x)).

    U-centred for the unbiased estimator, double-centred (HKH) for the biased one. ``x`` is (n, ...) in any float
    dtype; features are centred before the Gram is formed, which HSIC is invariant to and which removes the fp32
    cancellation of large activation means. ``MinibatchCKA.update_grams`` takes the inner products in float64.
    (The full n^2 vector is kept rather than the strict upper triangle of the symmetric Gram: gathering a triangle
    costs more than the float64 matmul it would halve.)
    """
    t = _as_matrix(x, name, check=False)
    n = t.shape[0]
    _check_n(n, estimator, name)
    k = linear_gram(t)
    # NaN/Inf in any feature spreads through its column mean to every diagonal entry of the centred Gram, and
    # |K_ij| <= sqrt(K_ii K_jj): checking the trace costs O(n), not O(nd) or O(n^2).
    _check_finite(torch.trace(k), name)
    return centre_gram(k, estimator, inplace=True).reshape(-1)


def _stack64(vecs: Mapping[str, torch.Tensor], names: Sequence[str], n: int, out: torch.Tensor) -> torch.Tensor:
    """Copy ``gram_vector``s into the float64 (L, n^2) buffer ``out``, converting while copying (one pass)."""
    for i, key in enumerate(names):
        v = vecs[key]
        if v.ndim != 1 or v.shape[0] != n * n:
            raise ValueError(f"{key}: expected a gram_vector of length {n * n} for a batch of {n}, "
                             f"got shape {tuple(v.shape)}")
        out[i].copy_(v)
    return out


def _sq_norms(g: torch.Tensor) -> torch.Tensor:
    """Row-wise squared norms as batched dot products (no (L, n^2) temporary)."""
    return torch.bmm(g.unsqueeze(1), g.unsqueeze(2)).reshape(-1)


def _hsic_norm(n: int, estimator: Estimator) -> float:
    return float(n * (n - 3)) if estimator == "unbiased" else float((n - 1) ** 2)


def _ratio(cross: np.ndarray, diag_a: np.ndarray, diag_b: np.ndarray, names_a: Sequence[str],
           names_b: Sequence[str]) -> np.ndarray:
    """cross / sqrt(diag_a diag_b^T), NaN (with a warning naming the layer) where a self-HSIC is not positive."""
    bad = [(n, v) for n, v in zip(list(names_a) + list(names_b), np.concatenate([diag_a, diag_b])) if not v > 0]
    if bad:
        seen = dict(bad)
        warnings.warn(
            "CKA is undefined (NaN) for layers whose self-HSIC is not positive "
            "(zero variance, or a negative unbiased estimate on too few samples): "
            + ", ".join(f"{n} (HSIC={v:.3g})" for n, v in seen.items()),
            RuntimeWarning,
            stacklevel=3,
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        root_a, root_b = np.sqrt(np.where(diag_a > 0, diag_a, np.nan)), np.sqrt(np.where(diag_b > 0, diag_b, np.nan))
        denom = root_a[:, None] * root_b[None, :]
        return cross / denom
