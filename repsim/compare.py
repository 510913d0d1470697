"""Streaming layer-by-layer CKA between models (``compare``, ``compare_many``) and over stored activations
(``cka_matrix``).

Each batch goes through every model once. Inside each forward hook the layer's output is pooled, turned into its
Gram of centred features (``repsim.feature_gram``) and the activation is dropped at once, so memory is one batch of
Grams whatever the dataset size. ``MinibatchCKA`` then gives all layer pairs in one float64 matmul per batch.

Each model is fed inputs in its own normalisation (``repsim.inputs``: what its weights expect, or what its run
trained with): the loader's images are renormalised per model, so two architectures never share one model's
statistics by accident.

Every function returns an ``xarray.Dataset``: ``cka`` over ``(layer_a, layer_b)``, plus ``lower``/``upper`` when a
``bootstrap`` is asked for, with the provenance (labels, estimator, sample and batch counts, pooling, each model's
input normalisation, processes) in ``Dataset.attrs``. Under ``torchrun`` each process takes whole batches (batch
``i`` goes to rank ``i % world``), the states are all-reduced, and the result equals one process's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import xarray as xr
from torch import nn

from repsim.batches import near_equal_batches
from repsim.capture import capture, open_activations, prepare_input, resolve_layers, split_batch
from repsim.gram import check_estimator, feature_gram
from repsim.inputs import model_normalisation, renormaliser
from repsim.minibatch import MinibatchCKA
from repsim.progress import tqdm
from repsim.shard import shard_batches
from repsim.shard import world as process_world
from repsim.types import Estimator, Pooling

Layers = str | Sequence[str]
Normalise = Literal["model", "loader"]
InputMap = Callable[[torch.Tensor], torch.Tensor] | None


@dataclass(frozen=True)
class Bootstrap:
    """Percentile bootstrap over batches: ``n_boot`` resamples, a ``ci`` interval, resampling ``seed``."""

    n_boot: int = 1000
    ci: float = 0.95
    seed: int = 0


def _as_bootstrap(bootstrap: Bootstrap | int | None) -> Bootstrap | None:
    if bootstrap is None or isinstance(bootstrap, Bootstrap):
        return bootstrap
    if isinstance(bootstrap, int) and not isinstance(bootstrap, bool) and bootstrap > 0:
        return Bootstrap(n_boot=bootstrap)
    raise ValueError(f"bootstrap must be a Bootstrap, a positive number of resamples or None, got {bootstrap!r}")


def default_layers(model: nn.Module) -> list[str]:
    """The layers CKA compares when none are given: a repsim Backbone's blocks (``layer_names()``), else a timm
    model's feature taps (``feature_info``), else every child of a ``blocks`` container."""
    names = getattr(model, "layer_names", None)
    if callable(names):
        return list(names())
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and all(isinstance(i, Mapping) and "module" in i for i in info):
        return [str(i["module"]) for i in info]
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
        return [f"blocks.{i}" for i in range(len(blocks))]
    raise ValueError(f"{type(model).__name__} has no layer_names(), timm feature_info or blocks: give the layers "
                     "(names or glob patterns such as 'layer*.*')")


def _model_name(model: nn.Module, fallback: str) -> str:
    name = getattr(model, "name", None)
    return name if isinstance(name, str) and name else fallback


def _input_maps(models: Mapping[str, nn.Module], labels: Mapping[str, str], loader: Iterable[Any],
                normalise: Normalise) -> tuple[dict[str, InputMap], dict[str, Any]]:
    """Per model: the map from the loader's inputs to the model's own normalisation (None: fed as loaded), and the
    provenance attrs (the loader's normalisation and, as JSON, what each model was fed)."""
    if normalise not in ("model", "loader"):
        raise ValueError(f"normalise must be 'model' (each model's own) or 'loader' (as loaded), got {normalise!r}")
    given = dict(getattr(loader, "normalisation", {}))
    source = (given.pop("input_mean", None), given.pop("input_std", None))
    attrs = {("loader_" + k if k == "normalisation" else k): v for k, v in given.items()}
    if source[0] is not None:
        attrs.update(loader_mean=list(source[0]), loader_std=list(source[1]))
    maps: dict[str, InputMap] = {}
    fed: dict[str, dict[str, Any]] = {}
    for tag, model in models.items():
        own = model_normalisation(model) if normalise == "model" else None
        if own is None or source[0] is None:
            why = ("as loaded (normalise='loader')" if normalise == "loader" else
                   "as loaded (the model has no input_mean/input_std)" if own is None else
                   "as loaded (the loader declares no mean/std to convert from)")
            maps[tag] = None
            fed[labels[tag]] = {"mean": None if source[0] is None else list(source[0]),
                                "std": None if source[1] is None else list(source[1]), "rule": why}
            continue
        maps[tag] = renormaliser((tuple(source[0]), tuple(source[1])), own, len(source[0]))
        fed[labels[tag]] = {"mean": list(own[0]), "std": list(own[1]), "rule": "the model's own: " + str(
            getattr(model, "normalisation_source", "its input_mean/input_std"))}
    attrs["input_normalisation"] = json.dumps(fed)
    return maps, attrs


def _stream_grams(models: Mapping[str, nn.Module], layers: Mapping[str, list[str]], loader: Iterable[Any], *,
                  pool: Mapping[str, Pooling], estimator: Estimator, progress: bool, desc: str, rank: int,
                  world_size: int, inputs: Mapping[str, InputMap]
                  ) -> Generator[tuple[int, int, dict[str, Mapping[str, torch.Tensor]]], None, None]:
    """Yield ``(batch index, n, {tag: {layer: feature_gram}})`` for this process's batches, each model run once on
    its own input (``inputs[tag]`` maps the loader's batch to it) with Grams formed in its hooks. Consume it inside
    ``contextlib.closing`` so the hooks go as soon as the consumer stops, even on an error."""
    batch_n = [0]

    def to_gram(tag: str) -> Any:
        def transform(layer: str, t: torch.Tensor) -> torch.Tensor:
            if t.shape[0] != batch_n[0]:
                raise ValueError(f"{tag}:{layer}: output has {t.shape[0]} rows for a batch of {batch_n[0]} samples "
                                 "(not one row per sample)")
            return feature_gram(t, name=f"{tag}:{layer}", estimator=estimator)

        return transform

    with ExitStack() as stack:
        acts = {tag: stack.enter_context(capture(m, layers[tag], pool[tag], transform=to_gram(tag)))
                for tag, m in models.items()}
        stack.enter_context(torch.inference_mode())
        total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        for index, batch in tqdm(shard_batches(loader, rank, world_size), desc=desc, unit="batch",
                                 total=None if total is None else -(-total // world_size),
                                 disable=not progress or rank != 0):
            x, _ = split_batch(batch)
            batch_n[0] = int(x.shape[0])
            for tag, m in models.items():
                xm, to_model = prepare_input(x, m), inputs[tag]
                m(xm if to_model is None else to_model(xm))
            yield index, batch_n[0], {tag: dict(a) for tag, a in acts.items()}


def _finish(engine: MinibatchCKA, bootstrap: Bootstrap | None, world_size: int, **attrs: Any) -> xr.Dataset:
    """All-reduce over processes, then the result as a Dataset with every provenance attribute on the Dataset."""
    if world_size > 1:
        engine.all_reduce()
    if engine.n_batches == 0:
        raise ValueError("the loader yielded no batches")
    ds = engine.compute().to_dataset() if bootstrap is None else engine.bootstrap(
        bootstrap.n_boot, bootstrap.ci, bootstrap.seed)
    given = {k: v for k, v in attrs.items() if v is not None}
    meta = {**ds["cka"].attrs, **ds.attrs, **given, "world_size": world_size}
    for var in ds.data_vars:
        ds[var].attrs = {}
    return ds.assign_attrs(meta)


def _labels(labels: Sequence[str] | None, default: tuple[str, str]) -> tuple[str, str]:
    if labels is None:
        return default
    if isinstance(labels, str) or len(labels) != 2:
        raise ValueError(f"labels must be two names (a, b), got {labels!r}")
    return str(labels[0]), str(labels[1])


def compare(model_a: nn.Module, model_b: nn.Module | None, loader: Iterable[Any], *, layers_a: Layers | None = None,
            layers_b: Layers | None = None, labels: Sequence[str] | None = None, pool: Pooling = "flatten",
            device: str | torch.device | None = None, estimator: Estimator = "unbiased",
            bootstrap: Bootstrap | int | None = None, normalise: Normalise = "model", progress: bool = True
            ) -> xr.Dataset:
    """Minibatch CKA between the layers of two models (or of one model with itself) over ``loader``.

    Args:
        model_a, model_b: the models; ``model_b`` None (or ``model_a`` itself) gives the within-model matrix, each
            batch running once.
        loader: batches ``(x, y)``, ``x`` or dicts with an ``image``/``x`` key; the same samples for both models.
        layers_a: names or glob patterns (``"blocks.*"``); default: ``default_layers(model_a)``.
        layers_b: names or patterns expanded on model B; default: ``layers_a``'s patterns when given, else
            ``default_layers(model_b)``.
        labels: names of the two sides in the result (default: the models' ``name``; "before"/"after" for a
            before/after comparison of one architecture).
        device: move both models there (default: each runs where its parameters are).
        bootstrap: a ``Bootstrap`` (or a number of resamples) adds ``lower``/``upper``.
        normalise: ``"model"``: each model gets the loader's images in its own normalisation (``repsim.inputs``;
            the loader's ``normalisation`` attribute says what it applied); ``"loader"``: both get them as loaded.

    Returns:
        Dataset with ``cka`` (layer_a, layer_b) [``lower``, ``upper``]; provenance in ``attrs``.
    """
    check_estimator(estimator)
    boot = _as_bootstrap(bootstrap)
    same = model_b is None or model_b is model_a
    mb: nn.Module = model_a if model_b is None else model_b
    if device is not None:
        model_a.to(device)
        mb.to(device)
    names_a = resolve_layers(model_a, default_layers(model_a) if layers_a is None else layers_a)
    if layers_b is None and same:
        names_b = names_a
    else:
        spec_b = layers_b if layers_b is not None else (layers_a if layers_a is not None else default_layers(mb))
        try:
            names_b = resolve_layers(mb, spec_b)
        except ValueError as err:
            raise ValueError(f"model B: {err}") from None
    name_a, name_b = _model_name(model_a, "a"), _model_name(mb, "a" if same else "b")
    if not same and name_a == name_b:
        name_a, name_b = f"{name_a} (a)", f"{name_b} (b)"
    label_a, label_b = _labels(labels, (name_a, name_b))
    within = same and names_b == names_a
    rank, world_size = process_world()
    engine = MinibatchCKA(estimator=estimator, label_a=label_a, label_b=label_b, keep_batches=boot is not None)
    tags = {"a": model_a} if same else {"a": model_a, "b": mb}
    layers = {"a": list(dict.fromkeys(names_a + names_b))} if same else {"a": names_a, "b": names_b}
    sel_a, sel_b = set(names_a), set(names_b)
    inputs, provenance = _input_maps(tags, {"a": label_a, "b": label_b}, loader, normalise)
    stream = _stream_grams(tags, layers, loader, pool=dict.fromkeys(tags, pool), estimator=estimator,
                           progress=progress, desc="cka", rank=rank, world_size=world_size, inputs=inputs)
    with closing(stream):
        for index, n, grams in stream:
            ga = {k: v for k, v in grams["a"].items() if _base(k) in sel_a}
            gb = None if within else {k: v for k, v in grams["a" if same else "b"].items() if _base(k) in sel_b}
            engine.update_grams(ga, gb, n=n, index=index)
    return _finish(engine, boot, world_size, pool=pool, **provenance)


def _base(key: str) -> str:
    """Module name of a capture key (``name#k`` -> ``name``)."""
    return key.split("#", 1)[0]


def compare_many(models: Mapping[str, nn.Module], loader: Iterable[Any], *,
                 layers: Layers | Mapping[str, Layers] | None = None, pool: Pooling | Mapping[str, Pooling] = "flatten",
                 device: str | torch.device | None = None, estimator: Estimator = "unbiased",
                 bootstrap: Bootstrap | int | None = None, normalise: Normalise = "model", progress: bool = True
                 ) -> xr.Dataset:
    """One block CKA matrix over the layers of several models: each model runs once per batch, on its own input
    normalisation (``normalise`` as in ``compare``), and every pair of layers (within and across models) comes from
    one matmul.

    ``layers`` and ``pool`` are one spec for all models or a mapping ``{model name: spec}`` (default: each model's
    ``default_layers``). Rows/columns are named ``"<model>/<layer>"`` and carry ``model_*`` and ``module_*``
    coordinates, so ``m.cka.sel(layer_a=m.model_a == "x", layer_b=m.model_b == "y")`` is the x-vs-y block.
    """
    check_estimator(estimator)
    boot = _as_bootstrap(bootstrap)
    if not models:
        raise ValueError("compare_many needs at least one model")
    if len({id(m) for m in models.values()}) != len(models):
        raise ValueError("compare_many: the same model object appears under two names; pass it once")
    if isinstance(layers, Mapping):
        missing = [k for k in models if k not in layers]
        if missing:
            raise ValueError(f"compare_many: layers has no entry for models {missing} (it has {list(layers)})")
    if isinstance(pool, Mapping):
        missing = [k for k in models if k not in pool]
        if missing:
            raise ValueError(f"compare_many: pool has no entry for models {missing} (it has {list(pool)})")
    if device is not None:
        for m in models.values():
            m.to(device)
    resolved: dict[str, list[str]] = {}
    for k, m in models.items():
        spec = layers[k] if isinstance(layers, Mapping) else layers
        resolved[k] = resolve_layers(m, default_layers(m) if spec is None else spec)
    pools = {k: (pool[k] if isinstance(pool, Mapping) else pool) for k in models}
    rank, world_size = process_world()
    engine = MinibatchCKA(estimator=estimator, label_a=", ".join(models), keep_batches=boot is not None)
    inputs, provenance = _input_maps(models, {k: k for k in models}, loader, normalise)
    stream = _stream_grams(models, resolved, loader, pool=pools, estimator=estimator, progress=progress, desc="cka",
                           rank=rank, world_size=world_size, inputs=inputs)
    with closing(stream):  # hooks are removed at once if an update raises
        for index, n, grams in stream:
            engine.update_grams({f"{tag}/{k}": v for tag, g in grams.items() for k, v in g.items()}, None, n=n,
                                index=index)
    out = _finish(engine, boot, world_size, pool=str(pool) if isinstance(pool, str) else None, **provenance)
    keys = [str(k) for k in out["layer_a"].values]
    model_of, module_of = [k.split("/", 1)[0] for k in keys], [k.split("/", 1)[1] for k in keys]
    return out.assign_coords(model_a=("layer_a", model_of), module_a=("layer_a", module_of),
                             model_b=("layer_b", model_of), module_b=("layer_b", module_of))


def _open(ds: xr.Dataset | str | os.PathLike[str]) -> xr.Dataset:
    return ds if isinstance(ds, xr.Dataset) else open_activations(ds)


def cka_matrix(ds_a: xr.Dataset | str | os.PathLike[str], ds_b: xr.Dataset | str | os.PathLike[str] | None = None,
               *, batch_size: int = 256, layers_a: Sequence[str] | None = None, layers_b: Sequence[str] | None = None,
               labels: Sequence[str] | None = None, estimator: Estimator = "unbiased",
               bootstrap: Bootstrap | int | None = None, progress: bool = True) -> xr.Dataset:
    """Minibatch CKA over activations stored by ``extract`` (Datasets in memory or zarr paths), read batch by batch.

    Samples are split as ``repsim.data.loader`` splits them (``repsim.batches.near_equal_batches``: ``N //
    batch_size`` contiguous near-equal batches of at least ``batch_size`` samples, so no tiny last batch).
    ``ds_b`` None compares ``ds_a``'s variables with each other. The two must hold the same samples in the same
    order: different sample counts or ``sample`` coordinates raise ``ValueError``.
    """
    check_estimator(estimator)
    boot = _as_bootstrap(bootstrap)
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
            raise ValueError(f"ds_a has {n} samples but ds_b has {b.sizes.get('sample')}; CKA needs the same samples "
                             "in both")
        if ("sample" in a.coords and "sample" in b.coords
                and not np.array_equal(a["sample"].values, b["sample"].values)):
            raise ValueError("ds_a and ds_b hold different 'sample' coordinates (not the same samples in the same "
                             "order)")
    model_a = str(a.attrs.get("model", "a"))
    default = (model_a, model_a if b is None else str(b.attrs.get("model", "b")))
    label_a, label_b = _labels(labels, default)
    engine = MinibatchCKA(estimator=estimator, label_a=label_a, label_b=None if b is None else label_b,
                          keep_batches=boot is not None)
    for batch in tqdm(near_equal_batches(n, batch_size), desc="cka", unit="batch", disable=not progress):
        lo, hi = batch[0], batch[-1] + 1
        rows = slice(lo, hi)
        ga = {str(v): feature_gram(a[v].isel(sample=rows).values, name=f"a:{v}", estimator=estimator) for v in vars_a}
        gb = None if b is None else {str(v): feature_gram(b[v].isel(sample=rows).values, name=f"b:{v}",
                                                    estimator=estimator) for v in vars_b or []}
        engine.update_grams(ga, gb, n=int(hi - lo))
    return _finish(engine, boot, 1)
