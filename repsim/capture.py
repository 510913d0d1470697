"""Activation capture on forward hooks (``capture``) and dataset-wide extraction to xarray / zarr (``extract``; the
fingerprinted, crash-consistent zarr store itself is ``repsim.store``).

``capture`` hooks named modules, pools their outputs and keeps them detached in a dict-like ``Activations`` that is
refilled on every call of the model. A module called k > 1 times in one forward pass yields ``name#0`` ...
``name#{k-1}``. Pooling policy for token outputs ``(B, N, C)``: ``cls`` (token 0), ``mean`` (patch tokens only: the
``num_prefix_tokens`` class/register tokens are skipped), ``flatten`` (tokens x channels as features), ``tokens``
(kept as ``(B, N, C)``); for feature maps ``(B, C, H, W)`` / ``(B, H, W, C)``: ``gap`` (spatial mean) and ``flatten``.
Outputs that are already ``(B, C)`` pass through unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import xarray as xr
from torch import nn

from repsim import store as zarr_store
from repsim.layer_names import resolve_layers
from repsim.progress import tqdm
from repsim.shard import shard_batches, world
from repsim.store import open_activations
from repsim.types import POOLS, Pooling

Layout = Literal["auto", "NCHW", "NHWC"]


# ---------------------------------------------------------------------------------------------------- pooling
def output_tensor(output: Any, name: str) -> torch.Tensor:
    """The representation tensor inside a module output: a tensor, the first tensor of a tuple/list, or a dict /
    HF ``ModelOutput``'s ``last_hidden_state`` (else its first tensor value)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("last_hidden_state"), torch.Tensor):
            return output["last_hidden_state"]
        values: Iterable[Any] = output.values()
    elif isinstance(output, (tuple, list)):
        values = output
    else:
        values = ()
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"layer {name!r}: cannot find a tensor in its output of type {type(output).__name__}")


def pool_tensor(
    t: torch.Tensor, pool: Pooling, *, name: str = "layer", num_prefix_tokens: int = 0, layout: Layout = "auto"
) -> torch.Tensor:
    """Pool one layer output ``t`` (B, ...) per the module-level policy; ``name`` is used in error messages."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if t.ndim == 2:
        return t
    if pool == "flatten":
        return t.reshape(t.shape[0], -1)
    if t.ndim == 3:
        if pool == "tokens":
            return t
        if pool == "cls":
            if num_prefix_tokens < 1:
                raise ValueError(
                    f"layer {name!r}: pool='cls' but the model has no class/prefix token (num_prefix_tokens=0)"
                )
            return t[:, 0]
        if pool == "mean":
            if t.shape[1] <= num_prefix_tokens:
                raise ValueError(
                    f"layer {name!r}: {t.shape[1]} tokens leave no patch token after {num_prefix_tokens} prefix tokens"
                )
            return t[:, num_prefix_tokens:].mean(1)
        raise ValueError(
            f"layer {name!r}: pool='gap' is for (B, C, H, W) maps, this output is tokens {tuple(t.shape)}; use 'mean'"
        )
    if t.ndim == 4:
        if pool == "gap":
            return t.mean((1, 2) if _channels_last(t, layout) else (2, 3))
        raise ValueError(
            f"layer {name!r}: pool={pool!r} is for token outputs, this output is a feature map {tuple(t.shape)}; "
            "use 'gap' or 'flatten'"
        )
    raise ValueError(
        f"layer {name!r}: pool={pool!r} does not apply to an output of shape {tuple(t.shape)}; use 'flatten'"
    )


def _channels_last(t: torch.Tensor, layout: Layout) -> bool:
    """NHWC when asked, or (auto) when dims 1 and 2 are square but 2 and 3 are not; square-spatial NCHW otherwise."""
    if layout != "auto":
        return layout == "NHWC"
    return t.shape[1] == t.shape[2] and t.shape[2] != t.shape[3]


def model_prefix_tokens(model: nn.Module) -> int:
    """Class + register tokens before the patch tokens: ``model.num_prefix_tokens`` (timm, repsim Backbone); else,
    when the model (or its Hugging Face ``embeddings``) has a ``cls_token``, 1 + ``config.num_register_tokens``;
    else 0."""
    n = getattr(model, "num_prefix_tokens", None)
    if n is not None:
        return int(n)
    embeddings = getattr(model, "embeddings", None)
    if getattr(model, "cls_token", None) is None and getattr(embeddings, "cls_token", None) is None:
        return 0
    return 1 + int(getattr(getattr(model, "config", None), "num_register_tokens", 0) or 0)


# ------------------------------------------------------------------------------------------------------ capture
class Activations(Mapping[str, Any]):
    """Captured outputs of the current forward pass: ``{name: value}``, or ``name#k`` for a module called k > 1 times.

    Refilled at the start of every call of the captured model; ``clear()`` starts over when only submodules are
    called directly (calls then accumulate as ``name#k``).
    """

    def __init__(self, order: Sequence[str]) -> None:
        self._order = list(order)
        self._calls: dict[str, list[Any]] = {}

    def clear(self) -> None:
        """Forget everything captured so far."""
        self._calls = {}

    def _add(self, name: str, value: Any) -> None:
        self._calls.setdefault(name, []).append(value)

    def _items(self) -> Iterator[tuple[str, Any]]:
        for name in self._order:
            calls = self._calls.get(name, [])
            if len(calls) == 1:
                yield name, calls[0]
            else:
                yield from ((f"{name}#{k}", v) for k, v in enumerate(calls))

    def __getitem__(self, key: str) -> Any:
        for k, v in self._items():
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items())

    def __len__(self) -> int:
        return sum(len(v) for v in self._calls.values())

    def __repr__(self) -> str:
        return "Activations({" + ", ".join(f"{k!r}: {tuple(getattr(v, 'shape', ()))}" for k, v in self._items()) + "})"


@contextmanager
def capture(
    model: nn.Module,
    layers: str | Sequence[str],
    pool: Pooling = "flatten",
    *,
    num_prefix_tokens: int | None = None,
    layout: Layout = "auto",
    transform: Callable[[str, torch.Tensor], Any] | None = None,
    eval_mode: bool = True,
) -> Iterator[Activations]:
    """Hook ``layers`` of ``model`` and yield an ``Activations`` mapping filled on each forward pass.

    Outputs are detached and pooled (see module docstring); ``num_prefix_tokens`` defaults to the model's.
    ``transform(name, pooled)`` runs inside the hook (e.g. ``feature_gram``) and its result is stored instead, so the
    activation itself is dropped at once. ``eval_mode`` puts the model in eval mode while capturing. On exit, even
    after an exception, every hook is removed and each module's train/eval flag restored.
    """
    names = resolve_layers(model, layers)
    modules = dict(model.named_modules())
    prefix = model_prefix_tokens(model) if num_prefix_tokens is None else int(num_prefix_tokens)
    acts = Activations(names)
    modes = {m: m.training for m in model.modules()}
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            t = output_tensor(output, name).detach()
            t = pool_tensor(t, pool, name=name, num_prefix_tokens=prefix, layout=layout)
            acts._add(name, t if transform is None else transform(name, t))

        return hook

    try:
        handles.append(model.register_forward_pre_hook(lambda *_: acts.clear()))
        handles.extend(modules[n].register_forward_hook(make_hook(n)) for n in names)
        if eval_mode:
            model.eval()
        yield acts
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training


# ------------------------------------------------------------------------------------------------------ extract
def split_batch(batch: Any) -> tuple[torch.Tensor, Any]:
    """(inputs, labels or None) from a loader item: ``(x, y, ...)``, ``{"image"/"x", "label"/"y"}`` or ``x``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in ("image", "pixel_values", "x") if k in batch), None)
        if x is None:
            raise TypeError(f"a dict batch needs an 'image', 'pixel_values' or 'x' key, got {list(batch)}")
        return x, next((batch[k] for k in ("label", "labels", "y") if k in batch), None)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"loader items must be a tensor, an (x, y) pair or a dict, got {type(batch).__name__}")


def prepare_input(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Move ``x`` to the model's device and floating dtype."""
    p = next(model.parameters(), None)
    if p is None:
        return x
    return x.to(p.device, p.dtype if x.is_floating_point() and p.is_floating_point() else x.dtype)


def _batch_dataset(acts: Mapping[str, torch.Tensor], labels: Any, start: int, n: int) -> xr.Dataset:
    """One batch of pooled activations as a Dataset: dims (sample, <layer>:token?, <layer>:feature)."""
    data = {}
    for name, t in acts.items():
        if t.shape[0] != n:
            raise ValueError(f"layer {name!r}: output has {t.shape[0]} rows for a batch of {n} samples")
        if t.ndim not in (2, 3):
            raise ValueError(f"layer {name!r}: cannot store pooled output of shape {tuple(t.shape)}")
        a = t.float().cpu().numpy() if t.dtype in (torch.float16, torch.bfloat16) else t.cpu().numpy()
        dims = ("sample", f"{name}:feature") if a.ndim == 2 else ("sample", f"{name}:token", f"{name}:feature")
        data[name] = (dims, a)
    coords: dict[str, Any] = {"sample": np.arange(start, start + n)}
    if labels is not None:
        lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        coords["label"] = ("sample",) + tuple(f"label_dim{i}" for i in range(1, lab.ndim)), lab
    return xr.Dataset(data, coords=coords)


@zarr_store.one_writer
def extract(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    layers: str | Sequence[str],
    pool: Pooling = "flatten",
    store: str | os.PathLike[str] | None = None,
    num_prefix_tokens: int | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """Run ``loader`` through ``model`` and return every selected layer's pooled activations as an xarray Dataset.

    One variable per layer with dims ``(sample, <layer>:feature)`` (``pool="tokens"``: ``(sample, <layer>:token,
    <layer>:feature)``), a running ``sample`` index and, when the loader yields labels, a ``label`` coordinate.
    With ``store="x.zarr"`` each batch is appended to a zarr store as it is computed (memory stays one batch) and the
    returned Dataset reads lazily from it (see ``repsim.store``). The store records a fingerprint of the model, its
    weights, the layers, the pooling and the data; if it already holds the first m samples of the same extraction
    (an interrupted run) those are skipped, so re-running the same call completes it with no sample lost or
    duplicated, and a store made by anything else is refused. The loader must yield samples in the same order.
    """
    path = None if store is None else Path(store)
    names = resolve_layers(model, layers)
    prefix = model_prefix_tokens(model) if num_prefix_tokens is None else int(num_prefix_tokens)
    attrs = {"pool": pool, "model": str(getattr(model, "name", type(model).__name__))}
    fp: dict[str, Any] = {}
    done = 0
    if path is not None:
        fp = zarr_store.fingerprint(model, loader, layers=names, pool=pool, prefix_tokens=prefix)
        done = zarr_store.start(path, fp)
    rank, world_size = world()
    if world_size > 1:
        return _extract_sharded(model, loader, names, pool, prefix, attrs, path, fp, progress, rank, world_size)
    parts: list[xr.Dataset] = []
    start = 0
    with capture(model, names, pool, num_prefix_tokens=prefix) as acts, torch.no_grad():
        for batch in tqdm(loader, desc="extract", unit="batch", disable=not progress):
            x, y = split_batch(batch)
            n = x.shape[0]
            if start + n <= done:  # already on disk
                start += n
                continue
            model(prepare_input(x, model))
            ds = _batch_dataset(acts, y, start, n)
            ds.attrs.update(attrs, layers=list(ds.data_vars))
            if start < done:  # a batch straddling the resume point (different batch size than before)
                ds = ds.isel(sample=slice(done - start, None))
            start += n
            _keep(ds, parts, path, fp)
    return _result(parts, path)


def _keep(part: xr.Dataset, parts: list[xr.Dataset], path: Path | None, fp: Mapping[str, Any]) -> None:
    """One batch's activations into the store (the first batch creates it) or into the in-memory ``parts``."""
    if path is None:
        parts.append(part)
    elif not path.exists():
        zarr_store.create(path, part, fp)
    else:
        zarr_store.append(path, part, fp)


def _result(parts: list[xr.Dataset], path: Path | None) -> xr.Dataset:
    """What ``extract`` returns: the store read lazily, or the in-memory batches concatenated."""
    if (path is not None and not path.exists()) or (path is None and not parts):
        raise ValueError("the loader yielded no samples")
    return open_activations(path) if path is not None else xr.concat(parts, dim="sample", combine_attrs="override")


def _extract_sharded(model: nn.Module, loader: Iterable[Any], names: list[str], pool: Pooling, prefix: int,
                     attrs: Mapping[str, Any], path: Path | None, fp: Mapping[str, Any], progress: bool, rank: int,
                     world_size: int) -> xr.Dataset:
    """``extract`` under torchrun: batch ``i`` runs on rank ``i % world``; in each round the ranks' batches go to
    rank 0 (all ranks without a store), which appends them in batch order, so the store equals one process's."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    if not isinstance(loader, DataLoader) or loader.batch_sampler is None:
        raise ValueError("extract under torchrun needs a torch DataLoader (without shuffle) to split into batches")
    sizes = [len(b) for b in loader.batch_sampler]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    box = [zarr_store.start(path, fp) if rank == 0 and path is not None else 0]
    dist.broadcast_object_list(box, src=0)
    done = int(box[0])
    parts: list[xr.Dataset] = []
    batches = shard_batches(loader, rank, world_size)
    rounds = -(-len(sizes) // world_size)
    with capture(model, names, pool, num_prefix_tokens=prefix) as acts, torch.no_grad():
        for r in tqdm(range(rounds), desc="extract", unit="round", disable=not progress or rank != 0):
            ds = None
            if r * world_size + rank < len(sizes):
                index, batch = next(batches)
                start, n = int(starts[index]), sizes[index]
                if start + n > done:
                    x, y = split_batch(batch)
                    model(prepare_input(x, model))
                    ds = _batch_dataset(acts, y, start, n).assign_attrs(attrs, layers=list(names))
                    if start < done:
                        ds = ds.isel(sample=slice(done - start, None))
            gathered: list[Any] = [None] * world_size
            if path is None:
                dist.all_gather_object(gathered, ds)
            else:
                dist.gather_object(ds, gathered if rank == 0 else None, dst=0)
            for part in gathered if rank == 0 or path is None else ():
                if part is not None:
                    _keep(part, parts, path, fp)
    dist.barrier()
    return _result(parts, path)
