"""Zarr activation stores written by ``repsim.extract``: fingerprinted, appended batch by batch, crash-consistent.

A store is a zarr group with one array per layer (plus the ``sample`` and ``label`` coordinates), all along the
``sample`` axis, and two group attributes:

* ``fingerprint`` (JSON): what made the store (model class and weight hash, layers, pooling, data identity with a
  content hash, see ``content_hash``). A resume or reuse with anything else is refused with an error naming what
  differs, so a store never mixes activations of two models or two datasets.
* ``committed_samples``: the samples whose rows are complete in every array. A batch writes every array in sorted
  name order and only then this count, so a kill at any point leaves rows beyond it at most; a resume trusts the
  count alone, truncates those rows and appends from there. Readers (``open_activations``) see committed rows only.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import torch
import xarray as xr
from torch import nn

from repsim.files import lock

P = ParamSpec("P")
R = TypeVar("R")
COMMITTED = "committed_samples"
FINGERPRINT = "fingerprint"
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# dataset attributes that identify what it reads, when it has them
_DATA_ATTRS = ("root", "path", "file", "filename", "flag", "split", "seed", "img_size", "num_classes")
# fingerprint key -> how a mismatch is described
MAX_BATCH = 2**16  # rows an array may hold beyond its stored chunks: a batch whose write a kill cut short
_METADATA = ("zarr.json", ".zarray", ".zattrs")  # the files of a zarr array folder that are not chunks
CONTENT_SAMPLES = 16  # samples hashed into a store's fingerprint (see content_hash)
_WHAT = {"model": "another model", "weights": "other weights", "layers": "other layers", "pool": "another pooling",
         "prefix_tokens": "another number of prefix tokens", "data": "other data"}


# ------------------------------------------------------------------------------------------------- fingerprint
def weights_hash(model: nn.Module) -> str:
    """BLAKE2b of every state-dict tensor (name, dtype, shape and bytes): equal iff the weights are equal."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()}|".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def _one_line(text: str, limit: int = 200) -> str:
    """``text`` on one line without memory addresses (so a repr is the same in every process), at most ``limit``."""
    text = " ".join(_ADDRESS.sub("", text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def data_identity(loader: Iterable[Any]) -> dict[str, Any]:
    """What is known of the data behind ``loader``: its dataset's class and length, the file or folder it reads,
    the ids of its samples (repsim datasets) and its transform. Empty for a loader without a ``dataset``."""
    ds = getattr(loader, "dataset", None)
    if ds is None:
        return {}
    out: dict[str, Any] = {"class": type(ds).__qualname__}
    try:
        out["length"] = len(ds)
    except TypeError:  # an IterableDataset
        pass
    base = ds
    while isinstance(getattr(base, "dataset", None), torch.utils.data.Dataset):  # Subset and similar wrappers
        base = base.dataset
    if base is not ds:
        out["inner"] = type(base).__qualname__
    for attr in _DATA_ATTRS:
        value = getattr(base, attr, None)
        if isinstance(value, (str, os.PathLike, int, float)) and not isinstance(value, bool):
            out[attr] = str(value)
    source, indices = getattr(base, "source", None), getattr(base, "indices", None)
    if source is not None and getattr(source, "info", None) is not None:
        out["source"] = str(source.info.name)
    if source is not None and getattr(source, "ids", None) is not None and indices is not None:
        ids = "\n".join(str(source.ids[int(i)]) for i in indices)
        out["ids"] = hashlib.blake2b(ids.encode(), digest_size=16).hexdigest()
    if getattr(base, "transform", None) is not None:
        out["transform"] = _one_line(repr(base.transform))
    if "length" in out:
        out["content"] = content_hash(ds, base)
    return out


def content_hash(ds: Any, base: Any) -> str:
    """BLAKE2b of what the data holds, cheaply: for a repsim dataset of image files, the path, size and modification
    time (ns) of every file it reads (a rewrite that keeps all three is not seen); for any other dataset, the bytes
    of up to ``CONTENT_SAMPLES`` evenly spaced samples as the loader gets them (a change confined to other samples is
    not seen)."""
    h = hashlib.blake2b(digest_size=16)
    images, indices = getattr(getattr(base, "source", None), "images", None), getattr(base, "indices", None)
    if isinstance(images, list) and indices is not None:
        for i in indices:
            st = os.stat(images[int(i)])
            h.update(f"{images[int(i)]}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return "files:" + h.hexdigest()
    n = len(ds)
    for i in sorted({round(k * (n - 1) / max(1, CONTENT_SAMPLES - 1)) for k in range(min(n, CONTENT_SAMPLES))}):
        _hash_leaves(h, ds[i])
    return "samples:" + h.hexdigest()


def _hash_leaves(h: Any, obj: Any) -> None:
    """Feed the tensors, arrays and plain values of one sample into ``h``."""
    if isinstance(obj, (list, tuple)):
        for v in obj:
            _hash_leaves(h, v)
    elif isinstance(obj, Mapping):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _hash_leaves(h, obj[k])
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}|{tuple(obj.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    else:
        a = np.asarray(obj)
        h.update(f"{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes() if a.dtype != object else repr(obj).encode())


def fingerprint(model: nn.Module, loader: Iterable[Any], *, layers: Sequence[str], pool: str,
                prefix_tokens: int) -> dict[str, Any]:
    """What makes a store's activations: model class and weights, layers, pooling and the data (JSON values)."""
    cls = type(model)
    return json.loads(json.dumps({
        "model": f"{cls.__module__}.{cls.__qualname__}" + (f" ({model.name})" if hasattr(model, "name") else ""),
        "weights": weights_hash(model), "layers": list(layers), "pool": pool, "prefix_tokens": int(prefix_tokens),
        "data": data_identity(loader)}))


def _differences(path: Path, stored: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """One line naming every part of two fingerprints that differs."""
    parts = []
    for key in sorted(set(stored) | set(now), key=lambda k: list(_WHAT).index(k) if k in _WHAT else len(_WHAT)):
        old, new = stored.get(key), now.get(key)
        if old == new:
            continue
        if key == "weights":
            parts.append(f"other weights (hash {str(old)[:12]}… vs {str(new)[:12]}… now)")
        elif isinstance(old, Mapping) and isinstance(new, Mapping):
            sub = ", ".join(f"{k} {_one_line(repr(old.get(k)), 80)} vs {_one_line(repr(new.get(k)), 80)}"
                            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
            parts.append(f"{_WHAT.get(key, key)} ({sub} now)")
        else:
            parts.append(f"{_WHAT.get(key, key)} ({_one_line(repr(old), 80)} vs {_one_line(repr(new), 80)} now)")
    return f"store {path} holds an extraction made with {'; '.join(parts)}; remove it or choose another path"


# ------------------------------------------------------------------------------------------------ the store
def _dims(array: Any) -> tuple[str, ...]:
    """Dimension names of a zarr array written by xarray (zarr v3 metadata or the v2 ``_ARRAY_DIMENSIONS`` attr)."""
    return tuple(getattr(array.metadata, "dimension_names", None) or array.attrs.get("_ARRAY_DIMENSIONS", ()))


def _sample_arrays(group: Any) -> dict[str, Any]:
    """The arrays of ``group`` along the sample axis, by name."""
    return {k: a for k, a in group.arrays() if _dims(a)[:1] == ("sample",)}


def _open_group(path: Path, fp: Mapping[str, Any]) -> Any:
    """The store's zarr group, after checking that it is a repsim store made by ``fp``."""
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r+")
    except Exception as err:  # zarr raises several types for a folder that is not a group
        raise ValueError(f"{path} is not a zarr store ({type(err).__name__}); remove it or choose another path") \
            from None
    if COMMITTED not in group.attrs or FINGERPRINT not in group.attrs:
        raise ValueError(f"{path} is not a fingerprinted repsim extraction (written by another tool or an older "
                         "repsim); remove it or choose another path")
    _committed_checked(path, group)
    try:
        stored = json.loads(str(group.attrs[FINGERPRINT]))
    except json.JSONDecodeError as err:
        stored = err
    if not isinstance(stored, dict):
        raise ValueError(f"store {path}: its fingerprint attribute is not a JSON object (damaged or crafted); "
                         "remove it or choose another path")
    if stored != fp:
        raise ValueError(_differences(path, stored, fp))
    return group


def _committed_checked(path: Path, group: Any) -> int:
    """The committed count of a store after checking it against its arrays: a count >= 0 that every sample array
    holds, and no array longer than the chunks it stores plus one batch that a kill cut short (a crafted shape would
    otherwise be allocated on open)."""
    n = group.attrs.get(COMMITTED)
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"store {path}: its {COMMITTED} attribute is {n!r}, not a count >= 0 (damaged or crafted); "
                         "remove it")
    for name, a in sorted(_sample_arrays(group).items()):
        per_row = math.prod(math.ceil(s / c) for s, c in zip(a.shape[1:], a.chunks[1:]))
        chunks = sum(1 for f in (path / name).rglob("*") if f.is_file() and f.name not in _METADATA)
        stored = chunks // max(1, per_row) * a.chunks[0]
        if a.shape[0] < n or a.shape[0] > max(stored, n) + MAX_BATCH:
            raise ValueError(f"store {path} is damaged: array {name!r} has {a.shape[0]} rows for {n} committed "
                             f"samples, with data stored for at most {stored}; remove it")
    return n


def writer_lock(path: Path) -> contextlib.AbstractContextManager[None]:
    """The lock that makes one process at a time write the store at ``path`` (a sibling ``.<name>.lock`` file: the
    store folder itself is renamed into place by ``create``)."""
    return lock(path.parent / f".{path.name}.lock", f"store {path}")


def one_writer(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` (``extract``) with its ``store`` argument held by one writer: the process that writes it (rank 0)
    holds ``writer_lock`` for the call, so a second writer of the same store fails at once."""
    from repsim.shard import world

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        store = kwargs.get("store")
        if store is None or world()[0] != 0:
            return fn(*args, **kwargs)
        with writer_lock(Path(str(store))):
            return fn(*args, **kwargs)

    return wrapper


def start(path: str | os.PathLike[str], fp: Mapping[str, Any]) -> int:
    """The samples already in the store at ``path`` (0 for none; ``resume`` for an existing store); a dangling
    symbolic link there is refused before any work."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ValueError(f"store {path} is a symbolic link to {os.readlink(path)}, which does not exist; remove the "
                         "link or choose another path")
    return resume(path, fp) if path.exists() else 0


def resume(path: str | os.PathLike[str], fp: Mapping[str, Any]) -> int:
    """The committed sample count of an existing store made by ``fp``; rows beyond it (a batch cut short by a kill)
    are truncated, so the next append continues with no sample lost, duplicated or half written."""
    path = Path(path)
    group = _open_group(path, fp)
    n = _committed(group)
    arrays = _sample_arrays(group)
    if "sample" not in arrays:
        raise ValueError(f"store {path} is damaged: it has no 'sample' array; remove it")
    for a in arrays.values():
        if a.shape[0] != n:
            a.resize((n, *a.shape[1:]))
    if not np.array_equal(arrays["sample"][:], np.arange(n)):
        raise ValueError(f"store {path}: the stored 'sample' coordinate is not 0..{n - 1}; cannot resume safely")
    return n


def create(path: str | os.PathLike[str], ds: xr.Dataset, fp: Mapping[str, Any]) -> None:
    """Write the first batch ``ds`` as a new store; written under a temporary name and renamed, so a store that
    exists holds at least one committed batch. The temporary folder is made exclusively under a random name (a
    planted symbolic link is never written through); those a kill left behind (real folders only) are removed."""
    import shutil
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    ds = ds.copy()
    ds.attrs.update({FINGERPRINT: json.dumps(fp, sort_keys=True), COMMITTED: int(ds.sizes["sample"])})
    encoding = {k: {"chunks": v.shape} for k, v in ds.variables.items() if "sample" in v.dims}
    ds.to_zarr(tmp, mode="w", consolidated=False, encoding=encoding)
    os.replace(tmp, path)


def _write_variable(array: Any, start: int, values: np.ndarray) -> None:
    """Rows ``start:start + len(values)`` of one zarr array (grown to hold them)."""
    array.resize((start + len(values), *array.shape[1:]))
    array[start:] = values


def _committed(group: Any) -> int:
    """The committed sample count of a store's group."""
    return int(group.attrs[COMMITTED])


def _commit(group: Any, n: int) -> None:
    """Record ``n`` committed samples: the last write of a batch."""
    group.attrs[COMMITTED] = int(n)


def append(path: str | os.PathLike[str], ds: xr.Dataset, fp: Mapping[str, Any]) -> None:
    """Append the batch ``ds`` (its ``sample`` coordinate starts at the committed count) to the store at ``path``:
    every array in sorted name order, then the new committed count."""
    path = Path(path)
    group = _open_group(path, fp)
    arrays, n = _sample_arrays(group), _committed(group)
    variables = {str(k): v for k, v in ds.variables.items() if "sample" in v.dims}
    if set(arrays) != set(variables):
        raise ValueError(f"store {path} holds variables {sorted(arrays)}, this batch {sorted(variables)}; remove "
                         "it or choose another path")
    if int(ds["sample"].values[0]) != n:
        raise ValueError(f"store {path}: a batch starting at sample {int(ds['sample'].values[0])} cannot follow "
                         f"its {n} committed samples")
    for name in sorted(variables):
        array, values = arrays[name], np.asarray(variables[name].values)
        if values.shape[1:] != array.shape[1:] or not np.can_cast(values.dtype, array.dtype, casting="same_kind"):
            raise ValueError(f"store {path}: {name!r} holds {array.dtype} rows of shape {array.shape[1:]}, this "
                             f"batch gives {values.dtype} rows of shape {values.shape[1:]}")
    for name in sorted(variables):
        _write_variable(arrays[name], n, np.asarray(variables[name].values))
    _commit(group, n + ds.sizes["sample"])


def open_activations(store: str | os.PathLike[str]) -> xr.Dataset:
    """A zarr store written by ``extract``, read lazily: its committed samples, variables in layer order."""
    import zarr

    group = zarr.open_group(str(store), mode="r")
    n = _committed_checked(Path(store), group) if COMMITTED in group.attrs else None
    arrays = _sample_arrays(group)
    if n is None or all(a.shape[0] == n for a in arrays.values()):
        ds = xr.open_zarr(store, consolidated=False, chunks=None)
    else:  # a batch cut short: its arrays disagree in length, so each is opened alone and cut to the committed rows
        alone: list[xr.Dataset] = [xr.open_zarr(store, consolidated=False, chunks=None,
                                                drop_variables=[k for k in arrays if k != name]) for name in arrays]
        ds = xr.merge([part.isel(sample=slice(0, n)) for part in alone], combine_attrs="override")
        ds = ds.set_coords([k for k in ds.data_vars if k not in ds.attrs.get("layers", list(arrays))])
    if n is not None:
        ds = ds.isel(sample=slice(0, n))
    return ds[list(ds.attrs.get("layers", ds.data_vars))]
