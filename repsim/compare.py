"""Streaming layer-by-layer CKA between models (``compare``, ``compare_many``) and over stored activations
(``cka_matrix``).

Each batch goes through every model once. Inside each forward hook the layer's output is pooled, turned into its
centred-Gram vector (``repsim.gram_vector``) and the activation is dropped at once, so memory is one batch of Grams
whatever the dataset size. ``MinibatchCKA`` then gives all layer pairs in one float64 matmul per batch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, closing
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn
from tqdm.auto import tqdm

from repsim.capture import Pool, capture, open_activations, prepare_input, resolve_layers, split_batch
from repsim.cka import Estimator, MinibatchCKA, gram_vector

Layers = str | Sequence[str]


def _model_name(model: nn.Module, fallback: str) -> str:
    name = getattr(model, "name", None)
    return name if isinstance(name, str) and name else fallback


def _stream_grams(
    models: Mapping[str, nn.Module],
    layers: Mapping[str, list[str]],
    loader: Iterable[Any],
    *,
    pool: Mapping[str, Pool],
    estimator: Estimator,
    progress: bool,
    desc: str,
) -> Iterator[tuple[int, dict[str, Mapping[str, torch.Tensor]]]]:
    """Yield ``(n, {tag: {layer: gram_vector}})`` per batch, each model run once with Grams formed in its hooks.
    Consume it inside ``contextlib.closing`` so the hooks go as soon as the consumer stops, even on an error."""
    batch_n = [0]

    def to_gram(tag: str) -> Any:
        def transform(layer: str, t: torch.Tensor) -> torch.Tensor:
            if t.shape[0] != batch_n[0]:
                raise ValueError(
                    f"{tag}:{layer}: output has {t.shape[0]} rows for a batch of {batch_n[0]} samples "
                    "(not one row per sample)"
                )
            return gram_vector(t, name=f"{tag}:{layer}", estimator=estimator)

        return transform

    with ExitStack() as stack:
        acts = {
            tag: stack.enter_context(capture(m, layers[tag], pool[tag], transform=to_gram(tag)))
            for tag, m in models.items()
        }
        stack.enter_context(torch.no_grad())
        for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
            x, _ = split_batch(batch)
            batch_n[0] = int(x.shape[0])
            for tag, m in models.items():
                m(prepare_input(x, m))
            yield batch_n[0], {tag: dict(a) for tag, a in acts.items()}


def _finish(engine: MinibatchCKA, keep_batches: bool, n_boot: int, ci: float, seed: int) -> xr.DataArray | xr.Dataset:
    if engine.n_batches == 0:
        raise ValueError("the loader yielded no batches")
    return engine.bootstrap(n_boot, ci, seed) if keep_batches else engine.compute()


def _base(key: str) -> str:
    """Module name of a capture key (``name#k`` -> ``name``)."""
    return key.split("#", 1)[0]


def compare(
    model_a: nn.Module,
    model_b: nn.Module | None,
    loader: Iterable[Any],
    *,
    layers_a: Layers,
    layers_b: Layers | None = None,
    pool: Pool = "flatten",
    device: str | torch.device | None = None,
    keep_batches: bool = False,
    estimator: Estimator = "unbiased",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    progress: bool = True,
) -> xr.DataArray | xr.Dataset:
    """Minibatch CKA between the layers of two models (or of one model with itself) over ``loader``.

    ``model_b`` None or the same object as ``model_a`` gives the within-model matrix (each batch runs once).
    ``layers_b`` defaults to ``layers_a``; both accept exact names and glob patterns. ``device`` moves the models
    there; by default each runs where its parameters are. Returns the ``(layer_a, layer_b)`` DataArray, or with
    ``keep_batches=True`` a Dataset with ``cka``, ``lower`` and ``upper`` (percentile bootstrap over batches).
    """
    same = model_b is None or model_b is model_a
    mb: nn.Module = model_a if model_b is None else model_b
    if device is not None:
        model_a.to(device)
        mb.to(device)
    names_a = resolve_layers(model_a, layers_a)
    names_b = names_a if layers_b is None else resolve_layers(mb, layers_b)
    name_a, name_b = _model_name(model_a, "a"), _model_name(mb, "a" if same else "b")
    within = same and names_b == names_a
    engine = MinibatchCKA(estimator=estimator, model_a=name_a, model_b=None if same else name_b, keep_batches=keep_batches)
    if same:
        models, layers = {name_a: model_a}, {name_a: list(dict.fromkeys(names_a + names_b))}
    else:
        if name_a == name_b:
            name_a, name_b = f"{name_a}(a)", f"{name_b}(b)"
        models, layers = {name_a: model_a, name_b: mb}, {name_a: names_a, name_b: names_b}
    pools = dict.fromkeys(models, pool)
    sel_a, sel_b = set(names_a), set(names_b)
    stream = _stream_grams(models, layers, loader, pool=pools, estimator=estimator, progress=progress, desc="cka")
    with closing(stream):
        for n, grams in stream:
            ga = {k: v for k, v in grams[name_a].items() if _base(k) in sel_a}
            if within:
                engine.update_grams(ga, None, n=n)
            else:
                gb = {k: v for k, v in grams[name_a if same else name_b].items() if _base(k) in sel_b}
                engine.update_grams(ga, gb, n=n)
    return _finish(engine, keep_batches, n_boot, ci, seed)


def compare_many(
    models: Mapping[str, nn.Module],
    loader: Iterable[Any],
    *,
    layers: Layers | Mapping[str, Layers],
    pool: Pool | Mapping[str, Pool] = "flatten",
    device: str | torch.device | None = None,
    keep_batches: bool = False,
    estimator: Estimator = "unbiased",
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    progress: bool = True,
) -> xr.DataArray | xr.Dataset:
    """One block CKA matrix over the layers of several models: each model runs once per batch and every pair of
    layers (within and across models) comes from one matmul.

    ``layers`` and ``pool`` are one spec for all models or a mapping ``{model name: spec}``. Rows/columns are named
    ``"<model>/<layer>"`` and carry ``model_*`` and ``module_*`` coordinates, so
    ``m.sel(layer_a=m.model_a == "x", layer_b=m.model_b == "y")`` is the x-vs-y block.
    """
    if not models:
        raise ValueError("compare_many needs at least one model")
    if len({id(m) for m in models.values()}) != len(models):
        raise ValueError("compare_many: the same model object appears under two names; pass it once")
    if device is not None:
        for m in models.values():
            m.to(device)
    spec = {k: (layers[k] if isinstance(layers, Mapping) else layers) for k in models}
    resolved = {k: resolve_layers(m, spec[k]) for k, m in models.items()}
    pools = {k: (pool[k] if isinstance(pool, Mapping) else pool) for k in models}
    engine = MinibatchCKA(estimator=estimator, model_a=", ".join(models), keep_batches=keep_batches)
    stream = _stream_grams(models, resolved, loader, pool=pools, estimator=estimator, progress=progress, desc="cka")
    with closing(stream):
        for n, grams in stream:  # closing: hooks are removed at once if an update raises
            engine.update_grams({f"{tag}/{k}": v for tag, g in grams.items() for k, v in g.items()}, None, n=n)
    out = _finish(engine, keep_batches, n_boot, ci, seed)
    keys = [str(k) for k in out["layer_a"].values]
    model_of = [k.split("/", 1)[0] for k in keys]
    module_of = [k.split("/", 1)[1] for k in keys]
    return out.assign_coords(
        model_a=("layer_a", model_of),
        module_a=("layer_a", module_of),
        model_b=("layer_b", model_of),
        module_b=("layer_b", module_of),
    )


def _open(ds: xr.Dataset | str | os.PathLike[str]) -> xr.Dataset:
    return ds if isinstance(ds, xr.Dataset) else open_activations(ds)


def cka_matrix(
    ds_a: xr.Dataset | str | os.PathLike[str],
    ds_b: xr.Dataset | str | os.PathLike[str] | None = None,
    *,
    batch_size: int = 256,
    layers_a: Sequence[str] | None = None,
    layers_b: Sequence[str] | None = None,
    estimator: Estimator = "unbiased",
    keep_batches: bool = False,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    progress: bool = True,
) -> xr.DataArray | xr.Dataset:
    """Minibatch CKA over activations stored by ``extract`` (Datasets in memory or zarr paths), read batch by batch.

    Samples are split into ``ceil(N / batch_size)`` contiguous batches of near-equal size (so no tiny last batch).
    ``ds_b`` None compares ``ds_a``'s variables with each other. The two must hold the same samples in the same
    order: different sample counts or ``sample`` coordinates raise ``ValueError``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    a = _open(ds_a)
    b = None if ds_b is None else _open(ds_b)
    vars_a = list(layers_a or a.data_vars)
    vars_b = None if b is None else list(layers_b or b.data_vars)
    n = a.sizes.get("sample")
    if n is None:
        raise ValueError("ds_a has no 'sample' dimension")
    if b is not None:
        if b.sizes.get("sample") != n:
            raise ValueError(f"ds_a has {n} samples but ds_b has {b.sizes.get('sample')}; CKA needs the same samples in both")
        if "sample" in a.coords and "sample" in b.coords and not np.array_equal(a["sample"].values, b["sample"].values):
            raise ValueError("ds_a and ds_b hold different 'sample' coordinates (not the same samples in the same order)")
    engine = MinibatchCKA(
        estimator=estimator,
        model_a=str(a.attrs.get("model", "a")),
        model_b=None if b is None else str(b.attrs.get("model", "b")),
        keep_batches=keep_batches,
    )
    bounds = np.linspace(0, n, math.ceil(n / batch_size) + 1).round().astype(int)
    for lo, hi in tqdm(list(zip(bounds[:-1], bounds[1:])), desc="cka", unit="batch", disable=not progress):
        rows = slice(lo, hi)
        ga = {v: gram_vector(a[v].isel(sample=rows).values, name=f"a:{v}", estimator=estimator) for v in vars_a}
        gb = None
        if b is not None:
            gb = {v: gram_vector(b[v].isel(sample=rows).values, name=f"b:{v}", estimator=estimator) for v in vars_b or []}
        engine.update_grams(ga, gb, n=int(hi - lo))
    return _finish(engine, keep_batches, n_boot, ci, seed)
