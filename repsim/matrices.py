"""Numbers read off a CKA matrix (an xarray Dataset or DataArray, ``layer_a`` x ``layer_b``), numpy/xarray only, so
the plots, the study's tables and its figures read them the same way."""

from __future__ import annotations

import numpy as np
import xarray as xr


def diagonal_values(ds: xr.Dataset | xr.DataArray, var: str = "cka") -> np.ndarray:
    """The diagonal of variable ``var`` (a Dataset) or of the DataArray itself: CKA(layer k of a, layer k of b)."""
    da = ds[var] if isinstance(ds, xr.Dataset) else ds
    return np.diagonal(np.asarray(da.values, dtype=float))
