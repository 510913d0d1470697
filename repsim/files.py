"""Atomic file writes: every result, checkpoint and figure is written to a temporary name and renamed into place,
so a path that exists is complete (a crash or kill leaves the previous file or none, never a truncated one)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xarray as xr

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def atomic(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` for a temporary sibling of ``path``, then rename it onto ``path``.

    The temporary file is created exclusively under a fresh random name (``tempfile.mkstemp``: ``O_CREAT|O_EXCL``,
    so a symbolic link planted at a predictable name is never followed), and the rename replaces ``path`` itself
    (a symbolic link at ``path`` is replaced, not written through)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0o022)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # the permissions a plain open() would give, not mkstemp's 0600
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> Path:
    """``path`` after checking that it resolves (symbolic links followed) inside ``root`` (resolved too): a link
    planted in a run, study or ``--out`` folder that points elsewhere is refused in one line."""
    path, root = Path(path), Path(root)
    where, base = path.resolve(), root.resolve()
    if not where.is_relative_to(base):
        raise ValueError(f"{path} resolves to {where}, outside {root} ({base}); remove the symbolic link that leads "
                         "there or choose another folder")
    return path


@contextlib.contextmanager
def lock(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock (``fcntl.flock``) on the lock file ``path`` for the block, so one process at
    a time writes ``what``; a second one fails at once in one line naming the holder's pid. The kernel releases
    the lock when its holder exits, however it ends, so a killed writer never leaves a stale lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            raise RuntimeError(f"{what} is being written by another process (pid {holder}, lock {path}); wait for "
                               "it to end or choose another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON value in ``path``; a file that is not JSON (half written, edited) raises one line naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); remove it to recompute it") from None


def load_state(model: Any, state: Any, path: str | os.PathLike[str]) -> None:
    """``model.load_state_dict(state)`` where ``state`` was read from ``path``; torch's many-line error becomes one
    line naming the file."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as err:
        detail = " ".join(str(err).split())
        raise ValueError(f"{path} does not fit the model ({detail[:400]}{'…' if len(detail) > 400 else ''})") \
            from None


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic(path, lambda tmp: tmp.write_text(text))


def save_torch(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    import torch

    return atomic(path, lambda tmp: torch.save(obj, tmp))


def save_npz(path: str | os.PathLike[str], **arrays: Any) -> Path:
    """``np.savez`` of ``arrays`` to ``path``, atomically."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to the temporary file's name
            np.savez(fh, **arrays)

    return atomic(path, write)


def load_torch(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors and plain containers only: a pickle that would run code is
    refused), with errors that name the file and say why it cannot be read."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported (global|operand)[^.\n]*", str(err))
        what = found.group(0) if found else "an object torch's safe loader does not accept"
        if found and found.group(1) == "operand":
            raise ValueError(f"{path} is not a torch.save file that can be read safely ({what}: a plain pickle or "
                             "another format); repsim reads checkpoints with weights_only=True only") from None
        raise ValueError(f"{path} holds objects other than tensors and plain containers ({what}); repsim refuses to "
                         "unpickle them, since that could run code") from None
    except (EOFError, RuntimeError, OSError) as err:
        raise ValueError(f"{path} is truncated or not a torch checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None


FIGURE_FORMATS = ("png", "pdf", "svg")


def figure_format(path: str | os.PathLike[str]) -> str:
    """The format a figure file's extension names (``png``, ``pdf``, ``svg``); other extensions are refused."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"{path}: a figure is written as {', '.join('.' + f for f in FIGURE_FORMATS)}, "
                         f"not {Path(path).suffix or 'a name without extension'}")
    return fmt


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 150) -> Path:
    """Save a figure atomically in the format its extension names: a file named ``.pdf`` is a PDF."""
    fmt = figure_format(path)
    return atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))


def save_png(fig: Figure, path: str | os.PathLike[str], dpi: int = 150) -> Path:
    """Save a figure as PNG atomically."""
    return atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def save_netcdf(obj: xr.DataArray | xr.Dataset, path: str | os.PathLike[str]) -> Path:
    """Write a CKA matrix (or bootstrap Dataset) to netCDF via h5netcdf atomically; a DataArray is stored as the
    variable of its name (``cka`` when unnamed)."""
    ds = obj.to_dataset(name=obj.name or "cka") if isinstance(obj, xr.DataArray) else obj
    return atomic(path, lambda tmp: ds.to_netcdf(tmp, engine="h5netcdf"))


MAX_NC_BYTES = 2**30  # the most a netCDF file may hold once decompressed (a 1,000-layer CKA result is ~24 MB)


def _check_hdf5(path: Path) -> None:
    """Refuse an HDF5 (netCDF4) file whose data lives outside it (external or virtual storage, which HDF5 reads
    from any file named in it) or whose datasets decompress to more than ``MAX_NC_BYTES``; checked before any data
    is read."""
    import h5py

    found: list[tuple[str, int, bool]] = []
    with h5py.File(path, "r") as fh:
        fh.visititems(lambda name, obj: found.append((name, int(obj.size) * obj.dtype.itemsize,
                                                       bool(obj.external or obj.is_virtual)))
                      if isinstance(obj, h5py.Dataset) else None)
    outside = [name for name, _, ext in found if ext]
    if outside:
        raise ValueError(f"{path}: variables {outside} are stored outside the file (HDF5 external or virtual "
                         "storage), which repsim never reads; write the file with to_netcdf")
    total = sum(size for _, size, _ in found)
    if total > MAX_NC_BYTES:
        raise ValueError(f"{path} holds {total / 2**30:.1f} GiB once decompressed, more than a CKA result "
                         f"({MAX_NC_BYTES / 2**30:.0f} GiB at most); refused before decompressing")


def load_netcdf(path: str | os.PathLike[str]) -> xr.Dataset:
    """Read a netCDF file fully into memory (the file is closed on return): netCDF4/HDF5 as ``save_netcdf`` writes
    it (checked first by ``_check_hdf5``) or netCDF3 (``to_netcdf(engine="scipy")``, uncompressed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as fh:
        magic = fh.read(8)
    try:
        if magic.startswith(b"CDF"):
            if path.stat().st_size > MAX_NC_BYTES:
                raise ValueError(f"{path.stat().st_size / 2**30:.1f} GiB, more than a CKA result")
            engine = "scipy"
        else:
            _check_hdf5(path)
            engine = "h5netcdf"
        with xr.open_dataset(path, engine=engine) as ds:
            return ds.load()
    except (OSError, ValueError, TypeError) as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path} is not a netCDF file repsim can read: {str(err).splitlines()[0]}") from None


def load(path: str | os.PathLike[str]) -> xr.Dataset:
    """A CKA result saved by repsim (``cka.nc``; ``Dataset.to_netcdf`` output works too), as an xarray Dataset."""
    return load_netcdf(path)
