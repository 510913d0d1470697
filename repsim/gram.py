"""Gram matrices for CKA: linear and RBF Grams of feature-centred inputs, double and U-centring, the flattened
feature Gram (``feature_gram``) the minibatch engine stacks, the closed-form centred inner products of stacked Grams
(``hsic_from_grams``), and the HSIC -> CKA ratio.

Numerics: features are centred before any Gram is formed (HSIC is invariant to it), which removes the catastrophic
cancellation of the raw-Gram Song form when activations have a large mean; Grams are formed in at least float32, and
every inner product between Grams, and the closed-form centring of them, is taken in float64.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

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


def gram_block_rows(n: int, d: int) -> int:
    """Rows per block of ``symmetric_product``'s upper triangle for an (n, d) input: ``n`` (one plain matmul) below
    128 rows or under 48 Mi multiply-adds (n^2 d), else blocks of ``max(64, n // 4)`` rows capped at 256. Measured on
    2 CPU threads (interleaved medians against one ``x @ x.T`` in two runs of bench/gram_blocks.py): 1.04-1.14x
    faster at 128 x 3,264, 0.95-1.25x at n = 256 (d = 768-3,264), 1.06-1.4x at 512 and 1.5-1.56x at 1,024; 0.75-0.97x
    below that size, where the smaller GEMMs lose more speed than the skipped lower triangle saves."""
    return n if n < 128 or n * n * d < 48 * 2**20 else min(256, max(64, n // 4))


def symmetric_product(x: torch.Tensor, block_rows: int | None = None) -> torch.Tensor:
    """``x @ x.T`` (n, d) -> (n, n), computing only the upper block triangle and mirroring it.

    Row block ``i`` is multiplied by the rows from ``i`` on (``n^2 d (1 + 1/blocks)`` multiply-adds instead of
    ``2 n^2 d``), each product written straight into its place in the result; the strictly lower blocks are then
    copied from their transposes. ``block_rows`` defaults to ``gram_block_rows(n, d)``. On a GPU, where small GEMMs
    are launch-bound, one matmul.
    """
    n = x.shape[0]
    b = gram_block_rows(n, x.shape[1]) if block_rows is None else block_rows
    if b < 1:
        raise ValueError(f"block_rows must be a positive number of rows, got {b}")
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


def _centred_feature_gram(x: Any, name: str, estimator: Estimator) -> torch.Tensor:
    """(n, n) Gram of ``x``'s centred features, checked for a batch size the estimator allows and for NaN/Inf."""
    t = _as_matrix(x, name, check=False)
    _check_n(t.shape[0], estimator, name)
    k = linear_gram(t)
    # NaN/Inf in any feature spreads through its column mean to every diagonal entry of the centred Gram, and
    # |K_ij| <= sqrt(K_ii K_jj): checking the trace costs O(n), not O(nd) or O(n^2).
    _check_finite(torch.trace(k), name)
    return k


def feature_gram(x: Any, *, name: str = "activations", estimator: Estimator = "unbiased") -> torch.Tensor:
    """The Gram of a layer's feature-centred activations, flattened (length n^2, dtype max(float32, x)): what
    ``MinibatchCKA.update_grams`` takes.

    It is not yet U- or double-centred: the engine applies that centring in closed form to the stacked Grams of a
    batch (``hsic_from_grams``), instead of three passes over every Gram. ``x`` is (n, ...) in any float dtype;
    centring the features first, which HSIC is invariant to, removes the fp32 cancellation of large activation means.
    ``estimator`` sets the smallest batch (4 samples for the unbiased HSIC)."""
    return _centred_feature_gram(x, name, estimator).reshape(-1)


def gram_vector(x: Any, *, name: str = "activations", estimator: Estimator = "unbiased") -> torch.Tensor:
    """A layer's centred linear Gram, flattened: ``v_a . v_b = <K_c, L_c>_F`` (length n^2, dtype max(float32, x)).

    U-centred for the unbiased estimator, double-centred (HKH) for the biased one: ``feature_gram`` centred as a
    matrix, for analyses that want the centred Gram itself (the engine centres in closed form instead)."""
    return centre_gram(_centred_feature_gram(x, name, estimator), estimator, inplace=True).reshape(-1)


class StackedGrams(NamedTuple):
    """One side's ``feature_gram``s of a batch stacked in float64 (L, n^2), with what the closed-form centring needs:
    each Gram's diagonal and row sums (L, n; off the diagonal for the unbiased estimator) and their totals (L, 1)."""

    grams: torch.Tensor
    diag: torch.Tensor
    rows: torch.Tensor
    total: torch.Tensor


def stack_grams(vecs: Mapping[str, torch.Tensor], names: Sequence[str], n: int, out: torch.Tensor,
                estimator: Estimator) -> StackedGrams:
    """Copy ``feature_gram``s into the float64 (L, n^2) buffer ``out`` (converting while copying) and take the diagonals
    and row sums of all of them in one batched pass."""
    for i, key in enumerate(names):
        v = vecs[key]
        if v.ndim != 1 or v.shape[0] != n * n:
            raise ValueError(f"{key}: expected a feature_gram of length {n * n} for a batch of {n}, "
                             f"got shape {tuple(v.shape)}")
        out[i].copy_(v)
    square = out.view(-1, n, n)
    diag = torch.diagonal(square, dim1=1, dim2=2)
    rows = square.sum(2)
    if estimator == "unbiased":
        rows -= diag
    return StackedGrams(out, diag, rows, rows.sum(1, keepdim=True))


def _dots(u: torch.Tensor, v: torch.Tensor, pairs: bool) -> torch.Tensor:
    """Inner products of the rows of ``u`` and ``v``: all pairs, or row by row (batched, no (L, m) temporary)."""
    return u @ v.T if pairs else torch.bmm(u.unsqueeze(1), v.unsqueeze(2)).reshape(-1)


def hsic_from_grams(a: StackedGrams, b: StackedGrams, n: int, estimator: Estimator, *, pairs: bool = True
                    ) -> torch.Tensor:
    """The HSIC estimate (already divided by its normalisation) of every layer pair (L_a, L_b), or of row i with
    row i (``pairs=False``), from stacked feature Grams.

    The centred inner product in closed form (float64): unbiased, with K^ = K off its diagonal (Song et al. 2012),
    ``tr(K^L^) + 1'K^1 1'L^1 / ((n-1)(n-2)) - 2/(n-2) 1'K^L^1``; biased,
    ``tr(KHLH) = tr(KL) - 2/n 1'KL1 + 1'K1 1'L1/n^2`` — each divided by ``n(n-3)`` or ``(n-1)^2``. Equal to
    U-/double-centring every Gram first (``gram_vector``)."""
    cross = _dots(a.grams, b.grams, pairs)
    outer = _dots(a.total, b.total, pairs)
    if estimator == "unbiased":
        num = (cross - _dots(a.diag, b.diag, pairs) + outer / ((n - 1) * (n - 2))
               - 2 / (n - 2) * _dots(a.rows, b.rows, pairs))
    else:
        num = cross - 2 / n * _dots(a.rows, b.rows, pairs) + outer / n**2
    return num / _hsic_norm(n, estimator)


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
