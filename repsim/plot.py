"""CKA heatmaps: one matrix (``heatmap``) or several side by side with one shared colour scale (``heatmap_grid``).

Conventions: rows are ``layer_a`` (y axis), columns ``layer_b`` (x axis), layer 0 at the bottom-left as in Kornblith
et al. and Nguyen et al.; the colour scale is fixed to [0, 1] by default so figures are comparable (unbiased values
below 0 show at the bottom colour but are kept in the data). Figures are plain ``matplotlib.figure.Figure`` objects,
never shown and never registered with pyplot, so scripts and servers can save them without leaking memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

Matrix = xr.DataArray | xr.Dataset


def short_labels(names: Sequence[str]) -> list[str]:
    """Drop the dotted prefix shared by all names (``blocks.0`` ... -> ``0`` ...); ``model/layer`` names are
    shortened within each model and keep the model part."""
    names = [str(n) for n in names]
    if names and all("/" in n for n in names):
        models = [n.split("/", 1)[0] for n in names]
        layers = [n.split("/", 1)[1] for n in names]
        short = {m: iter(short_labels([lay for mm, lay in zip(models, layers) if mm == m])) for m in dict.fromkeys(models)}
        return [f"{m}/{next(short[m])}" for m in models]
    if len(names) < 2:
        return names
    prefix = os.path.commonprefix(names)
    cut = prefix.rfind(".") + 1
    return [n[cut:] or n for n in names]


def _split(m: Matrix) -> tuple[xr.DataArray, xr.DataArray | None]:
    """(CKA matrix, CI width or None) from a DataArray or a bootstrap Dataset (cka/lower/upper)."""
    if isinstance(m, xr.Dataset):
        if "cka" not in m:
            raise ValueError(f"a Dataset to plot needs a 'cka' variable, got {list(m.data_vars)}")
        width = m["upper"] - m["lower"] if "lower" in m and "upper" in m else None
        return m["cka"].assign_attrs({**m.attrs, **m["cka"].attrs}), width
    return m, None


def default_title(da: xr.DataArray) -> str:
    """"<model_a> vs <model_b>" and the estimator / sample count from the matrix's attrs (empty when absent)."""
    a, b = da.attrs.get("model_a"), da.attrs.get("model_b")
    head = f"{a} vs {b}" if a and b and a != b else str(a or b or "")
    n = f"n={da.attrs['n_samples']}" if "n_samples" in da.attrs else None
    details = ", ".join(str(x) for x in (da.attrs.get("estimator"), n) if x)
    return "\n".join(x for x in (head, details) if x)


def _axis(da: xr.DataArray, side: str) -> tuple[str, list[str]]:
    """(model name, layer names) of one axis; a block of a ``compare_many`` matrix from a single model is labelled
    with that model and its module names."""
    names = [str(n) for n in da[f"layer_{side}"].values]
    models = da.coords.get(f"model_{side}")
    if models is not None and models.ndim == 1 and len(set(models.values.tolist())) == 1:
        return str(models.values[0]), [str(n) for n in da[f"module_{side}"].values]
    return str(da.attrs.get(f"model_{side}", side)), names


def _ticks(labels: list[str], max_ticks: int) -> tuple[list[float], list[str]]:
    step = max(1, math.ceil(len(labels) / max_ticks))
    idx = list(range(0, len(labels), step))
    return [i + 0.5 for i in idx], [labels[i] for i in idx]


def heatmap(
    m: Matrix,
    *,
    ax: Axes | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "magma",
    title: str | None = None,
    annotate_ci: bool = False,
    cbar: bool = True,
    max_ticks: int = 24,
) -> Figure:
    """Draw a ``(layer_a, layer_b)`` CKA matrix (DataArray, or the Dataset of ``compare(..., keep_batches=True)``).

    Layer 0 is at the bottom-left, tick labels are shortened (``short_labels``), the title defaults to the models
    and estimator in ``attrs``. ``annotate_ci`` writes each cell's bootstrap CI width (needs a Dataset with
    ``lower``/``upper``). Draws into ``ax`` when given; returns the Figure, which is never shown.
    """
    da, width = _split(m)
    if da.dims != ("layer_a", "layer_b"):
        raise ValueError(f"expected dims ('layer_a', 'layer_b'), got {da.dims}")
    if annotate_ci and width is None:
        raise ValueError("annotate_ci needs a Dataset with 'lower' and 'upper' (compare(..., keep_batches=True))")
    if ax is None:
        size = (1.6 + 0.35 * max(6, da.sizes["layer_b"]), 1.2 + 0.3 * max(6, da.sizes["layer_a"]))
        fig = Figure(figsize=size, layout="constrained")
        ax = fig.add_subplot()
    annot = np.asarray(width.values) if annotate_ci and width is not None else False
    sns.heatmap(
        np.asarray(da.values, dtype=float), ax=ax, vmin=vmin, vmax=vmax, cmap=cmap, square=True, cbar=cbar,
        cbar_kws={"label": "CKA"} if cbar else None, annot=annot, fmt=".2f", annot_kws={"fontsize": 6},
        xticklabels=False, yticklabels=False,
    )
    ax.invert_yaxis()  # row 0 (first layer) at the bottom
    (model_a, names_a), (model_b, names_b) = _axis(da, "a"), _axis(da, "b")
    xt, xl = _ticks(short_labels(names_b), max_ticks)
    yt, yl = _ticks(short_labels(names_a), max_ticks)
    ax.set_xticks(xt, xl, rotation=90, fontsize=7)
    ax.set_yticks(yt, yl, rotation=0, fontsize=7)
    ax.set_xlabel(f"{model_b} layer")
    ax.set_ylabel(f"{model_a} layer")
    ax.set_title(default_title(da) if title is None else title, fontsize=9)
    return ax.get_figure(root=True)


def heatmap_grid(
    matrices: Sequence[Matrix],
    *,
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "magma",
    annotate_ci: bool = False,
    panel_size: float = 3.2,
) -> Figure:
    """Several CKA matrices in a grid with one shared colourbar (same ``vmin``/``vmax`` for all panels)."""
    if not matrices:
        raise ValueError("heatmap_grid needs at least one matrix")
    if titles is not None and len(titles) != len(matrices):
        raise ValueError(f"got {len(titles)} titles for {len(matrices)} matrices")
    ncols = min(len(matrices), ncols or 3)
    nrows = math.ceil(len(matrices) / ncols)
    fig = Figure(figsize=(panel_size * ncols + 1.0, panel_size * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, m in enumerate(matrices):
        title = None if titles is None else titles[i]
        heatmap(m, ax=axes.flat[i], vmin=vmin, vmax=vmax, cmap=cmap, title=title, annotate_ci=annotate_ci, cbar=False)
    for ax in axes.flat[len(matrices) :]:
        ax.set_axis_off()
    fig.colorbar(axes.flat[0].collections[0], ax=list(axes.flat), label="CKA", shrink=0.8)
    return fig
