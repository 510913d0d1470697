"""``MinibatchCKA``: minibatch linear CKA between every pair of layers (Nguyen et al. 2021, Eq. 2) as a metric state.

Per batch, each layer's Gram of centred features is formed once, flattened and stacked in float64; one matmul and
the closed-form U-centring (or double centring) of Song et al. give every layer pair's HSIC. HSICs are averaged over
batches (each normalised by its own size, so a short last batch counts like the others) and CKA is formed only in
``compute``.

The accumulated state is declared once, in ``STATE`` with its reduction over processes (as torchmetrics'
``add_state``): ``reset``, ``state_dict``, ``load_state_dict`` and ``all_reduce`` all loop over that table.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import xarray as xr

from repsim.gram import DTYPE_POLICY, _check_n, _ratio, check_estimator, feature_gram, hsic_from_grams, stack_grams
from repsim.types import Estimator

BATCH_WEIGHTING = ("each batch's HSIC is normalised by its own size (1/(n(n-3)) or 1/(n-1)^2) and batches "
                   "averaged equally")
# accumulated state -> how processes combine it: "sum" (tensors added), "cat" (per-batch records concatenated in
# batch-index order, so a sharded run keeps the batches of one process in the same order)
STATE: dict[str, str] = {"cross": "sum", "diag_a": "sum", "diag_b": "sum", "counts": "sum", "batches": "cat"}
MIN_BOOTSTRAP_BATCHES = 10


class MinibatchCKA:
    """Minibatch linear CKA as an update/compute state.

    ``update(acts_a)`` compares the layers of one model with each other; ``update(acts_a, acts_b)`` two models;
    ``update_grams`` takes ``feature_gram``s formed elsewhere (e.g. in forward hooks). ``compute()`` returns the
    ``(layer_a, layer_b)`` matrix, ``bootstrap()`` adds a percentile CI over batches (needs ``keep_batches``).
    ``state_dict`` / ``load_state_dict`` checkpoint the state (plain tensors: ``torch.load(weights_only=True)``
    reads them) and ``all_reduce`` combines the states of ``torch.distributed`` ranks that each saw other batches.
    ``label_a`` / ``label_b`` name the two sides in the result's attrs (``model_a`` / ``model_b``).
    """

    def __init__(self, *, estimator: Estimator = "unbiased", label_a: str = "a", label_b: str | None = None,
                 keep_batches: bool = False) -> None:
        self.estimator = check_estimator(estimator)
        self.label_a, self.label_b = label_a, label_b
        self.keep_batches = keep_batches
        self.reset()

    # -- state ------------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all accumulated batches (layer names are learnt again at the next update)."""
        self.layers_a: list[str] | None = None
        self.layers_b: list[str] | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._set_empty()

    def _set_empty(self) -> None:
        """Zero state for the current layers (none before the first update)."""
        la = len(self.layers_a or [])
        lb = la if self.layers_b is None else len(self.layers_b)
        self.cross = torch.zeros(la, lb, dtype=torch.float64)
        self.diag_a = torch.zeros(la, dtype=torch.float64)
        self.diag_b = torch.zeros(lb, dtype=torch.float64)
        self.counts = torch.zeros(2, dtype=torch.int64)  # samples, batches
        self.batches: list[torch.Tensor] = []  # per batch: [index, cross.ravel(), diag_a, diag_b] in float64
        self.reduced = False  # all_reduce has combined the ranks' states: a second one would count them twice

    @property
    def n_samples(self) -> int:
        return int(self.counts[0])

    @property
    def n_batches(self) -> int:
        return int(self.counts[1])

    @property
    def within(self) -> bool:
        """True while comparing one model's layers with each other."""
        return self.layers_b is None

    def _meta(self) -> dict[str, Any]:
        return {"estimator": self.estimator, "layers_a": self.layers_a, "layers_b": self.layers_b,
                "keep_batches": self.keep_batches, "dtype_policy": DTYPE_POLICY}

    def state_dict(self) -> dict[str, Any]:
        """A snapshot of the state: copies of plain tensors and Python values (``weights_only`` loadable)."""
        state: dict[str, Any] = dict(self._meta())
        for name, reduction in STATE.items():
            value = getattr(self, name)
            state[name] = [t.clone() for t in value] if reduction == "cat" else value.clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict`` (estimator and dtype policy must match this object's)."""
        for key in ("estimator", "dtype_policy"):
            if state.get(key) != self._meta()[key]:
                raise ValueError(f"state has {key}={state.get(key)!r}, this MinibatchCKA has {self._meta()[key]!r}")
        if self.keep_batches and not state["keep_batches"] and int(state["counts"][1]) > 0:
            raise ValueError("state was accumulated without keep_batches; it cannot feed a bootstrap")
        _check_shapes(state)
        self.layers_a, self.layers_b = state["layers_a"], state["layers_b"]
        for name, reduction in STATE.items():
            value = state[name]
            setattr(self, name, [t.clone() for t in value] if reduction == "cat" else value.clone())
        if not self.keep_batches:
            self.batches = []

    def all_reduce(self, group: Any = None) -> None:
        """Combine the state over the ranks of ``torch.distributed``: sums added, batch records gathered in batch
        order. Every rank must compare the same layers with the same estimator; otherwise every rank raises (no
        hang). A rank that saw no batch takes the others' layers."""
        import torch.distributed as dist

        if self.reduced:  # every rank raises here, before any collective, so none hangs
            raise RuntimeError("all_reduce: this MinibatchCKA already holds the combined state of all ranks; a second "
                               "all_reduce would count every batch again (reset() to start over)")
        metas: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(metas, self._meta(), group=group)
        seen = [m for m in metas if m["layers_a"] is not None]
        if not seen:
            raise RuntimeError("all_reduce: no rank has seen a batch")
        for rank, meta in enumerate(metas):
            if meta["layers_a"] is not None and meta != seen[0]:
                diff = sorted(k for k in meta if meta[k] != seen[0][k])
                raise ValueError(f"all_reduce: rank {rank} differs from the first rank with data in {diff}: "
                                 f"{[meta[k] for k in diff]} vs {[seen[0][k] for k in diff]}")
        if self.layers_a is None:
            self.layers_a, self.layers_b = seen[0]["layers_a"], seen[0]["layers_b"]
            self._set_empty()
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
        for name, reduction in STATE.items():
            value = getattr(self, name)
            if reduction == "sum":
                moved = value.to(device) if device is not None else value.clone()
                dist.all_reduce(moved, group=group)
                setattr(self, name, moved.cpu())
            elif self.keep_batches:
                gathered: list[Any] = [None] * len(metas)
                dist.all_gather_object(gathered, value, group=group)
                setattr(self, name, sorted((t for part in gathered for t in part), key=lambda t: float(t[0])))
        self.reduced = True

    # -- updates ----------------------------------------------------------------------------------------------------
    def update(self, acts_a: Mapping[str, Any], acts_b: Mapping[str, Any] | None = None, *,
               index: int | None = None) -> None:
        """Add one batch of activations ``{layer: (n, ...)}``; ``acts_b`` None compares ``acts_a`` with itself.
        ``index``: the batch's position among all processes' batches (see ``update_grams``)."""
        n = _batch_size(acts_a, acts_b)
        vec_a = {k: feature_gram(v, name=k, estimator=self.estimator) for k, v in acts_a.items()}
        vec_b = None if acts_b is None else {k: feature_gram(v, name=k, estimator=self.estimator)
                                             for k, v in acts_b.items()}
        self.update_grams(vec_a, vec_b, n=n, index=index)

    def _buffer(self, side: str, rows: int, n: int, device: torch.device) -> torch.Tensor:
        """A float64 (rows, n^2) stacking buffer kept across batches: a fresh allocation of this size each batch
        goes back to the OS and page-faults in again, which costs more than the copy itself."""
        buf = self._buffers.get(side)
        if buf is None or buf.shape != (rows, n * n) or buf.device != device:
            buf = self._buffers[side] = torch.empty(rows, n * n, dtype=torch.float64, device=device)
        return buf

    def update_grams(self, vecs_a: Mapping[str, torch.Tensor], vecs_b: Mapping[str, torch.Tensor] | None = None, *,
                     n: int, index: int | None = None) -> None:
        """Add one batch given each layer's ``feature_gram`` (its centred ``gram_vector`` gives the same result: the
        closed-form centring of an already centred Gram changes nothing). ``index`` orders the batch among those of all
        processes (default: the count so far), so a sharded run's bootstrap sees one process's batch order."""
        if not vecs_a:
            raise ValueError("update needs at least one layer")
        _check_n(n, self.estimator, "MinibatchCKA.update")
        names_a, names_b = list(vecs_a), None if vecs_b is None else list(vecs_b)
        if self.layers_a is None:
            self.layers_a, self.layers_b = names_a, names_b
            self._set_empty()
        elif names_a != self.layers_a or names_b != self.layers_b:
            raise ValueError(f"layers changed between batches: expected {self.layers_a} / {self.layers_b}, "
                             f"got {names_a} / {names_b}")
        est = self.estimator
        ga = stack_grams(vecs_a, names_a, n, self._buffer("a", len(names_a), n, vecs_a[names_a[0]].device), est)
        if vecs_b is None:
            cross = hsic_from_grams(ga, ga, n, est)
            da = db = torch.diagonal(cross)
        else:
            gb = stack_grams(vecs_b, names_b or [], n, self._buffer("b", len(vecs_b), n, ga.grams.device), est)
            cross = hsic_from_grams(ga, gb, n, est)
            da, db = hsic_from_grams(ga, ga, n, est, pairs=False), hsic_from_grams(gb, gb, n, est, pairs=False)
        cross, da, db = cross.cpu(), da.cpu(), db.cpu()
        if self.keep_batches:
            at = torch.tensor([float(self.n_batches if index is None else index)], dtype=torch.float64)
            self.batches.append(torch.cat([at, cross.reshape(-1), da, db]))
        self.cross += cross
        self.diag_a += da
        self.diag_b += db
        self.counts += torch.tensor([n, 1])

    # -- results ----------------------------------------------------------------------------------------------------
    def _names(self) -> tuple[list[str], list[str]]:
        if self.layers_a is None or self.n_batches == 0:
            raise RuntimeError("MinibatchCKA.compute called before any update")
        return self.layers_a, self.layers_a if self.layers_b is None else self.layers_b

    def compute(self) -> xr.DataArray:
        """The (layer_a, layer_b) CKA matrix as an xarray.DataArray with its provenance in ``attrs``."""
        names_a, names_b = self._names()
        values = _ratio(self.cross.numpy(), self.diag_a.numpy(), self.diag_b.numpy(), names_a, names_b)
        return xr.DataArray(values, dims=("layer_a", "layer_b"), coords={"layer_a": names_a, "layer_b": names_b},
                            name="cka", attrs=self._attrs())

    def _attrs(self) -> dict[str, Any]:
        unbiased = self.estimator == "unbiased"
        return {"estimator": f"minibatch linear CKA, {self.estimator} HSIC" + (" (U-centred)" if unbiased else ""),
                "kernel": "linear", "n_samples": self.n_samples, "n_batches": self.n_batches,
                "dtype_policy": DTYPE_POLICY, "batch_weighting": BATCH_WEIGHTING, "model_a": self.label_a,
                "model_b": self.label_a if self.label_b is None and self.within else (self.label_b or "b")}

    def bootstrap(self, n_boot: int = 1000, ci: float = 0.95, seed: int = 0) -> xr.Dataset:
        """Percentile bootstrap over batches: a Dataset with ``cka``, ``lower`` and ``upper`` (``keep_batches``).
        Warns below ``MIN_BOOTSTRAP_BATCHES`` batches: percentile intervals from so few are unreliable."""
        names_a, names_b = self._names()
        if not self.keep_batches or len(self.batches) != self.n_batches:
            raise RuntimeError("bootstrap needs MinibatchCKA(keep_batches=True) from the first batch on")
        if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 1:
            raise ValueError(f"n_boot must be a positive number of resamples, got {n_boot!r}")
        if not 0 < ci < 1:
            raise ValueError(f"ci must be in (0, 1), got {ci!r}")
        if self.n_batches < 2:
            raise ValueError("bootstrap needs at least 2 batches")
        if self.n_batches < MIN_BOOTSTRAP_BATCHES:
            warnings.warn(f"bootstrap over only {self.n_batches} batches: percentile intervals from fewer than "
                          f"{MIN_BOOTSTRAP_BATCHES} batches are unreliable; use smaller batches", UserWarning,
                          stacklevel=2)
        la, lb = len(names_a), len(names_b)
        records = torch.stack(self.batches).numpy()[:, 1:]
        cross, da, db = np.split(records, [la * lb, la * lb + la], axis=1)
        cross = cross.reshape(-1, la, lb)
        idx = np.random.default_rng(seed).integers(0, self.n_batches, size=(n_boot, self.n_batches))
        with np.errstate(invalid="ignore", divide="ignore"):
            boots = cross[idx].sum(1) / np.sqrt(da[idx].sum(1)[:, :, None] * db[idx].sum(1)[:, None, :])
        alpha = (1 - ci) / 2
        lower, upper = np.nanquantile(boots, [alpha, 1 - alpha], axis=0)
        point = self.compute()
        ds = xr.Dataset({"cka": point, "lower": point.copy(data=lower), "upper": point.copy(data=upper)})
        ds.attrs.update(point.attrs, ci=ci, n_boot=n_boot, bootstrap="percentile, batches resampled with replacement")
        return ds


def _check_shapes(state: Mapping[str, Any]) -> None:
    """Refuse a state whose layer names do not fit its tensors (one line naming both)."""
    la = len(state["layers_a"] or [])
    lb = la if state["layers_b"] is None else len(state["layers_b"])
    want = {"cross": (la, lb), "diag_a": (la,), "diag_b": (lb,), "counts": (2,)}
    for name, shape in want.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"state's {name} has shape {tuple(state[name].shape)}, but its {la} layers_a and {lb} "
                             f"layers_b need {shape}")
    bad = [tuple(t.shape) for t in state["batches"] if tuple(t.shape) != (1 + la * lb + la + lb,)]
    if bad:
        raise ValueError(f"state's batch records have shapes {bad[:3]}, but its layers need ({1 + la * lb + la + lb},)")


def _rows(name: str, value: Any) -> int:
    shape = np.shape(value) if value is not None else ()
    if not shape:
        raise ValueError(f"{name}: expected activations of shape (n_samples, ...), got {type(value).__name__} "
                         f"{value!r:.40}")
    return int(shape[0])


def _batch_size(acts_a: Mapping[str, Any], acts_b: Mapping[str, Any] | None) -> int:
    if not acts_a:
        raise ValueError("update needs at least one layer")
    sizes = {k: _rows(k, v) for k, v in acts_a.items()}
    if acts_b is not None:
        sizes.update({f"b:{k}": _rows(k, v) for k, v in acts_b.items()})
    if len(set(sizes.values())) != 1:
        raise ValueError(f"all layers (of both models) must have the same number of samples, got {sizes}")
    return next(iter(sizes.values()))
