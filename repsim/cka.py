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
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import xarray as xr

from repsim.types import Estimator

DTYPE_POLICY = "features centred in >=float32; Gram >=float32; Gram inner products and sums in float64"
BATCH_WEIGHTING = "each batch's HSIC is normalised by its own size (1/(n(n-3)) or 1/(n-1)^2) and batches averaged equally"


# ----------------------------------------------------------------------------------------------------------- helpers
def _as_matrix(x: Any, name: str, dtype: torch.dtype | None = None, check: bool = True) -> torch.Tensor:
    """(n, ...) tensor/array -> (n, d) tensor with trailing dims flattened; rejects NaN/Inf naming ``name``."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim < 1:
        raise ValueError(f"{name}: expected an array of shape (n_samples, ...), got a scalar")
    t = t.reshape(t.shape[0], -1)
    if dtype is not None:
        t = t.to(dtype)
    elif not t.is_floating_point() or t.element_size() < 4:
        t = t.to(torch.float32)
    if check:
        _check_finite(t, name)
    return t


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: activations contain NaN or Inf (or overflow their Gram matrix)")


def _check_n(n: int, estimator: Estimator, what: str) -> None:
    need = 4 if estimator == "unbiased" else 2
    if n < need:
        raise ValueError(
            f"{what}: the {estimator} estimator needs at least {need} samples per batch, got {n}"
            + (" (HSIC1 divides by n(n-3))" if estimator == "unbiased" else "")
        )


def _check_estimator(estimator: str) -> Estimator:
    if estimator not in ("unbiased", "biased"):
        raise ValueError(f"estimator must be 'unbiased' or 'biased', got {estimator!r}")
    return estimator  # type: ignore[return-value]


def centre_gram(k: torch.Tensor, estimator: Estimator, *, inplace: bool = False) -> torch.Tensor:
    """Double-centre (biased, HKH) or U-centre (unbiased) a symmetric Gram matrix (in place when ``inplace``)."""
    n = k.shape[0]
    if estimator == "biased":
        k = k - k.mean(0, keepdim=True)
        return k - k.mean(1, keepdim=True)
    if not inplace:
        k = k.clone()
    k.fill_diagonal_(0)
    r = k.sum(1, dtype=torch.float64)
    total = r.sum()
    r = (r / (n - 2)).to(k.dtype)
    k -= r[:, None]
    k -= r[None, :]
    k += (total / ((n - 1) * (n - 2))).to(k.dtype)
    k.fill_diagonal_(0)
    return k


def linear_gram(x: torch.Tensor) -> torch.Tensor:
    """Gram of feature-centred ``x`` (n, d) in its own dtype; centring first is exact for HSIC and avoids cancellation."""
    xc = x - x.mean(0, keepdim=True)
    return xc @ xc.T


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
    _check_finite(torch.diagonal(k).sum(), name)
    return centre_gram(k, estimator, inplace=True).reshape(-1)


def _stack64(vecs: Mapping[str, torch.Tensor], names: Sequence[str], n: int, out: torch.Tensor) -> torch.Tensor:
    """Copy ``gram_vector``s into the float64 (L, n^2) buffer ``out``, converting while copying (one pass)."""
    for i, key in enumerate(names):
        v = vecs[key]
        if v.ndim != 1 or v.shape[0] != n * n:
            raise ValueError(f"{key}: expected a gram_vector of length {n * n} for a batch of {n}, got shape {tuple(v.shape)}")
        out[i].copy_(v)
    return out


def _sq_norms(g: torch.Tensor) -> torch.Tensor:
    """Row-wise squared norms as batched dot products (no (L, n^2) temporary)."""
    return torch.bmm(g.unsqueeze(1), g.unsqueeze(2)).reshape(-1)


def _hsic_norm(n: int, estimator: Estimator) -> float:
    return float(n * (n - 3)) if estimator == "unbiased" else float((n - 1) ** 2)


def _ratio(cross: np.ndarray, diag_a: np.ndarray, diag_b: np.ndarray, names_a: Sequence[str], names_b: Sequence[str]) -> np.ndarray:
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
        denom = np.sqrt(np.where(diag_a > 0, diag_a, np.nan))[:, None] * np.sqrt(np.where(diag_b > 0, diag_b, np.nan))[None, :]
        return cross / denom


# -------------------------------------------------------------------------------------------------- full-batch CKA
def cka(
    x: Any,
    y: Any,
    *,
    kernel: Literal["linear", "rbf"] = "linear",
    debiased: bool = False,
    threshold: float = 1.0,
) -> float:
    """CKA between two representations of the same n samples, computed in float64.

    ``x``, ``y``: (n, ...) torch tensors or numpy arrays; trailing dims are flattened. ``kernel="rbf"`` uses
    sigma = ``threshold`` x median pairwise distance. ``debiased=True`` uses the U-centred (unbiased HSIC) estimator,
    which needs n >= 4 and can be negative. The linear kernel is evaluated in feature space when that is cheaper.
    Returns NaN with a warning when either representation has zero variance.
    """
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
    a = _as_matrix(x, "x", torch.float64)
    b = _as_matrix(y, "y", torch.float64)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {a.shape[0]} and {b.shape[0]}")
    estimator: Estimator = "unbiased" if debiased else "biased"
    n = a.shape[0]
    _check_n(n, estimator, "cka")
    b = b.to(a.device)
    da, db = a.shape[1], b.shape[1]
    if kernel == "linear" and da * db + da * da + db * db < n * (da + db + n):
        kab, kaa, kbb = _feature_space_hsics(a, b, debiased)
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


# ------------------------------------------------------------------------------------------------- minibatch engine
class MinibatchCKA:
    """Minibatch linear CKA between every pair of layers (Nguyen et al. 2021, Eq. 2), as an update/compute state.

    Per batch, each layer's Gram is formed once, centred (U-centred for the unbiased estimator), flattened, stacked,
    and one float64 matmul gives every layer pair's HSIC. HSICs are averaged over batches (each batch normalised by its
    own size, so a short last batch counts like the others) and CKA is formed only in ``compute``.

    ``update(acts_a)`` compares the layers of one model with each other; ``update(acts_a, acts_b)`` two models.
    The state is additive: ``state_dict``/``load_state_dict`` checkpoint it, ``all_reduce`` sums it over DDP ranks
    (each rank feeding different batches). ``keep_batches=True`` also keeps per-batch HSICs for ``bootstrap``.
    """

    def __init__(
        self,
        *,
        estimator: Estimator = "unbiased",
        model_a: str = "a",
        model_b: str | None = None,
        keep_batches: bool = False,
    ) -> None:
        self.estimator = _check_estimator(estimator)
        self.model_a = model_a
        self.model_b = model_b
        self.keep_batches = keep_batches
        self.reset()

    def reset(self) -> None:
        """Forget all accumulated batches (layer names are learnt again at the next update)."""
        self.layers_a: list[str] | None = None
        self.layers_b: list[str] | None = None
        self.cross: torch.Tensor | None = None  # (La, Lb) float64 sum over batches of per-batch HSIC
        self.diag_a: torch.Tensor | None = None
        self.diag_b: torch.Tensor | None = None
        self.n_samples = 0
        self.n_batches = 0
        self.batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def within(self) -> bool:
        """True while comparing one model's layers with each other."""
        return self.layers_b is None

    # -- updates ---------------------------------------------------------------------------------------------------
    def update(self, acts_a: Mapping[str, Any], acts_b: Mapping[str, Any] | None = None) -> None:
        """Add one batch of activations ``{layer: (n, ...)}``; ``acts_b`` None compares ``acts_a`` with itself."""
        n = _batch_size(acts_a, acts_b)
        vec_a = {k: gram_vector(v, name=k, estimator=self.estimator) for k, v in acts_a.items()}
        vec_b = None if acts_b is None else {k: gram_vector(v, name=k, estimator=self.estimator) for k, v in acts_b.items()}
        self.update_grams(vec_a, vec_b, n=n)

    def _buffer(self, side: str, rows: int, n: int, device: torch.device) -> torch.Tensor:
        """A float64 (rows, n^2) stacking buffer kept across batches: a fresh allocation of this size each batch
        goes back to the OS and page-faults in again, which costs more than the copy itself."""
        buf = self._buffers.get(side)
        if buf is None or buf.shape != (rows, n * n) or buf.device != device:
            buf = self._buffers[side] = torch.empty(rows, n * n, dtype=torch.float64, device=device)
        return buf

    def update_grams(self, vecs_a: Mapping[str, torch.Tensor], vecs_b: Mapping[str, torch.Tensor] | None = None, *, n: int) -> None:
        """Add one batch given each layer's ``gram_vector`` (formed e.g. inside a forward hook)."""
        if not vecs_a:
            raise ValueError("update needs at least one layer")
        _check_n(n, self.estimator, "MinibatchCKA.update")
        names_a = list(vecs_a)
        names_b = None if vecs_b is None else list(vecs_b)
        if self.layers_a is None:
            self.layers_a, self.layers_b = names_a, names_b
        elif names_a != self.layers_a or names_b != self.layers_b:
            raise ValueError(
                f"layers changed between batches: expected {self.layers_a} / {self.layers_b}, got {names_a} / {names_b}"
            )
        ga = _stack64(vecs_a, names_a, n, self._buffer("a", len(names_a), n, vecs_a[names_a[0]].device))
        norm = _hsic_norm(n, self.estimator)
        if vecs_b is None:
            cross = (ga @ ga.T) / norm
            da = db = torch.diagonal(cross)
        else:
            gb = _stack64(vecs_b, names_b or [], n, self._buffer("b", len(vecs_b), n, ga.device))
            cross = (ga @ gb.T) / norm
            da, db = _sq_norms(ga) / norm, _sq_norms(gb) / norm
        cross, da, db = cross.cpu(), da.cpu(), db.cpu()
        if self.cross is None:
            self.cross, self.diag_a, self.diag_b = cross.clone(), da.clone(), db.clone()
        else:
            self.cross += cross
            self.diag_a += da  # type: ignore[operator]
            self.diag_b += db  # type: ignore[operator]
        self.n_samples += n
        self.n_batches += 1
        if self.keep_batches:
            self.batches.append((cross.numpy().copy(), da.numpy().copy(), db.numpy().copy()))

    # -- results ---------------------------------------------------------------------------------------------------
    def _names(self) -> tuple[list[str], list[str]]:
        if self.layers_a is None or self.cross is None:
            raise RuntimeError("MinibatchCKA.compute called before any update")
        return self.layers_a, self.layers_a if self.layers_b is None else self.layers_b

    def compute(self) -> xr.DataArray:
        """The (layer_a, layer_b) CKA matrix as an xarray.DataArray with its provenance in ``attrs``."""
        names_a, names_b = self._names()
        values = _ratio(self.cross.numpy(), self.diag_a.numpy(), self.diag_b.numpy(), names_a, names_b)  # type: ignore[union-attr]
        return self._wrap(values)

    def bootstrap(self, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> xr.Dataset:
        """Percentile bootstrap over batches: Dataset with ``cka``, ``lower`` and ``upper`` (needs ``keep_batches``)."""
        names_a, names_b = self._names()
        if not self.keep_batches or len(self.batches) != self.n_batches:
            raise RuntimeError("bootstrap needs MinibatchCKA(keep_batches=True) from the first batch on")
        if self.n_batches < 2:
            raise ValueError("bootstrap needs at least 2 batches")
        cross = np.stack([b[0] for b in self.batches])
        da = np.stack([b[1] for b in self.batches])
        db = np.stack([b[2] for b in self.batches])
        idx = np.random.default_rng(seed).integers(0, self.n_batches, size=(n_boot, self.n_batches))
        with np.errstate(invalid="ignore", divide="ignore"):
            boots = cross[idx].sum(1) / np.sqrt(da[idx].sum(1)[:, :, None] * db[idx].sum(1)[:, None, :])
        alpha = (1 - ci) / 2
        lower, upper = np.nanquantile(boots, [alpha, 1 - alpha], axis=0)
        point = self.compute()
        ds = xr.Dataset({"cka": point, "lower": point.copy(data=lower), "upper": point.copy(data=upper)})
        ds.attrs.update(point.attrs, ci=ci, n_boot=n_boot, bootstrap="percentile, batches resampled with replacement")
        return ds

    def _wrap(self, values: np.ndarray) -> xr.DataArray:
        names_a, names_b = self._names()
        return xr.DataArray(
            values,
            dims=("layer_a", "layer_b"),
            coords={"layer_a": names_a, "layer_b": names_b},
            name="cka",
            attrs={
                "estimator": f"minibatch linear CKA, {self.estimator} HSIC" + (" (U-centred)" if self.estimator == "unbiased" else ""),
                "kernel": "linear",
                "n_samples": self.n_samples,
                "n_batches": self.n_batches,
                "dtype_policy": DTYPE_POLICY,
                "batch_weighting": BATCH_WEIGHTING,
                "model_a": self.model_a,
                "model_b": self.model_a if self.model_b is None and self.within else (self.model_b or "b"),
            },
        )

    # -- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue accumulating (tensors and plain Python values)."""
        return {
            "estimator": self.estimator,
            "layers_a": self.layers_a,
            "layers_b": self.layers_b,
            "cross": self.cross,
            "diag_a": self.diag_a,
            "diag_b": self.diag_b,
            "n_samples": self.n_samples,
            "n_batches": self.n_batches,
            "batches": list(self.batches) if self.keep_batches else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` (the estimator must match)."""
        if state["estimator"] != self.estimator:
            raise ValueError(f"state was accumulated with the {state['estimator']} estimator, this object is {self.estimator}")
        self.layers_a, self.layers_b = state["layers_a"], state["layers_b"]
        self.cross, self.diag_a, self.diag_b = (None if state[k] is None else state[k].clone() for k in ("cross", "diag_a", "diag_b"))
        self.n_samples, self.n_batches = int(state["n_samples"]), int(state["n_batches"])
        self.batches = list(state["batches"] or []) if self.keep_batches else []

    def all_reduce(self, group: Any = None) -> None:
        """Sum the state over the ranks of ``torch.distributed`` (each rank must have seen at least one batch)."""
        import torch.distributed as dist

        if self.cross is None:
            raise RuntimeError("all_reduce needs at least one update on every rank")
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        la, lb = self.cross.shape
        flat = torch.cat([self.cross.reshape(-1), self.diag_a, self.diag_b, torch.tensor([self.n_samples, self.n_batches], dtype=torch.float64)]).to(device)  # type: ignore[list-item]
        dist.all_reduce(flat, group=group)
        flat = flat.cpu()
        self.cross = flat[: la * lb].reshape(la, lb).clone()
        self.diag_a = flat[la * lb : la * lb + la].clone()
        self.diag_b = flat[la * lb + la : la * lb + la + lb].clone()
        self.n_samples, self.n_batches = int(flat[-2]), int(flat[-1])
        if self.keep_batches:
            gathered: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, self.batches, group=group)
            self.batches = [b for rank in gathered for b in rank]


def _batch_size(acts_a: Mapping[str, Any], acts_b: Mapping[str, Any] | None) -> int:
    sizes = {k: int(np.shape(v)[0]) for k, v in acts_a.items()}
    if acts_b is not None:
        sizes.update({f"b:{k}": int(np.shape(v)[0]) for k, v in acts_b.items()})
    if len(set(sizes.values())) != 1:
        raise ValueError(f"all layers (of both models) must have the same number of samples, got {sizes}")
    return next(iter(sizes.values()))
