"""CKA heatmaps: one matrix (``heatmap``) or several side by side with one shared colour scale (``heatmap_grid``).

Conventions: rows are ``layer_a`` (y axis), columns ``layer_b`` (x axis), layer 0 at the bottom-left as in Kornblith
et al. and Nguyen et al.; the colour scale is fixed to [0, 1] by default so figures are comparable (unbiased values
below 0 show at the bottom colour but are kept in the data). Figures are plain ``matplotlib.figure.Figure`` objects,
never shown and never registered with pyplot, so scripts and servers can save them without leaking memory.
"""

from __future__ import annotations

import io
import json
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from repsim.matrices import diagonal_values

Matrix = xr.DataArray | xr.Dataset
CELLS = {"cka": "cells: CKA", "ci": "cells: CKA ± half the 95% CI", "none": ""}


class ReprFigure(Figure):
    """A matplotlib Figure that Jupyter renders inline (``_repr_png_``) even without pyplot or a backend."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100)
        return buf.getvalue()


def _figure(ax: Axes) -> Figure:
    """The figure ``ax`` is drawn in."""
    fig = ax.get_figure(root=True)
    if fig is None:
        raise ValueError("ax is not part of a matplotlib figure")
    return fig


def wrap_to_figure(text: str, fig: Figure, fraction: float = 1.0, fontsize: float = 9) -> str:
    """``text`` wrapped to the width of ``fraction`` of ``fig`` (about 0.6 em per character), line by line: the one
    rule for every title and caption repsim draws."""
    chars = max(12, int(fig.get_figwidth() * fraction * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars, break_on_hyphens=False) for line in text.split("\n"))


def short_labels(names: Sequence[str]) -> list[str]:
    """Drop the dotted prefix shared by all names (``blocks.0`` ... -> ``0`` ...); ``model/layer`` names are
    shortened within each model and keep the model part."""
    names = [str(n) for n in names]
    if names and all("/" in n for n in names):
        models = [n.split("/", 1)[0] for n in names]
        layers = [n.split("/", 1)[1] for n in names]
        short = {m: iter(short_labels([lay for mm, lay in zip(models, layers) if mm == m]))
                 for m in dict.fromkeys(models)}
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


def _weights(da: xr.DataArray) -> list[str]:
    """The weights of each side from ``attrs["sources"]`` (``repsim cka``), e.g. ``["pretrained", "random init"]``."""
    try:
        return [str(s.get("weights", "")) for s in json.loads(str(da.attrs.get("sources", "[]")))]
    except (json.JSONDecodeError, AttributeError):
        return []


def default_title(da: xr.DataArray, labels: Sequence[str] | None = None) -> str:
    """Short: "<model_a> vs <model_b>", their weights when known (random init is always said) and the data, from the
    matrix's attrs; empty when absent. The details go to ``caption``."""
    a, b = labels or (da.attrs.get("model_a"), da.attrs.get("model_b"))
    weights = _weights(da)
    if len(weights) == 2 and weights[0] != weights[1]:
        a, b = f"{a} ({weights[0]})", f"{b} ({weights[1]})"
    head = f"{a} vs {b}" if a and b and a != b else str(a or b or "")
    if weights and len(set(weights)) == 1 and weights[0]:
        head += f" ({weights[0]})"
    data = " ".join(str(da.attrs[k]) for k in ("data", "split") if k in da.attrs)
    return f"{head}, {data}" if head and data else head or data


def caption(da: xr.DataArray, annotate: str) -> str:
    """The details under a figure: estimator, samples and batches, pooling, and what the cells hold."""
    n = f"n={da.attrs['n_samples']}" if "n_samples" in da.attrs else None
    batches = f"{da.attrs['n_batches']} batches" if "n_batches" in da.attrs else None
    pool = f"pool={da.attrs['pool']}" if "pool" in da.attrs else None
    return "; ".join(str(x) for x in (da.attrs.get("estimator"), n, batches, pool, CELLS.get(annotate)) if x)


def _axis(da: xr.DataArray, side: str, label: str | None, layer_names: str) -> tuple[str, list[str]]:
    """(axis label, tick names) of one axis: ``attrs["axis_<side>"]`` when set, else "<model or label> layer"
    (block index with ``layer_names="indices"``); a block of a ``compare_many`` matrix from a single model is
    labelled with that model and its module names."""
    names = [str(n) for n in da[f"layer_{side}"].values]
    models = da.coords.get(f"model_{side}")
    if models is not None and models.ndim == 1 and len(set(models.values.tolist())) == 1:
        names, model = [str(n) for n in da[f"module_{side}"].values], str(models.values[0])
    else:
        model = str(da.attrs.get(f"model_{side}", side))
    model = label or model
    if layer_names == "indices":
        return f"{model} block", [str(i) for i in range(len(names))]
    return str(da.attrs.get(f"axis_{side}", f"{model} layer")), short_labels(names)


def _ticks(labels: list[str], max_ticks: int) -> tuple[list[float], list[str]]:
    step = max(1, math.ceil(len(labels) / max_ticks))
    idx = list(range(0, len(labels), step))
    return [i + 0.5 for i in idx], [labels[i] for i in idx]


def _cells(da: xr.DataArray, width: xr.DataArray | None, annotate: str) -> np.ndarray | bool:
    if annotate == "none":
        return False
    values = np.asarray(da.values, dtype=float)
    if annotate == "cka":
        return np.vectorize(lambda v: f"{v:.2f}")(values)
    if width is None:
        raise ValueError("annotate='ci' needs a Dataset with 'lower' and 'upper' (compare(..., bootstrap=...))")
    return np.vectorize(lambda v, w: f"{v:.2f}\n±{w / 2:.2f}")(values, np.asarray(width.values, dtype=float))


MAX_INCHES = 40.0  # the largest side of a heatmap's figure: its memory would otherwise grow with layers²


def colour_limits(values: Sequence[Any], vmin: float | None, vmax: float | None) -> tuple[float, float]:
    """The colour scale: ``vmin``/``vmax`` where given, else [0, 1] widened to every finite value of ``values``
    (arrays), so a cell outside [0, 1] -- unbiased CKA can be slightly negative -- gets its own colour instead of
    being clipped to the end of the scale."""
    finite = np.concatenate([np.ravel(np.asarray(v, dtype=float)) for v in values] or [np.zeros(0)])
    finite = finite[np.isfinite(finite)]
    low = vmin if vmin is not None else min(0.0, float(finite.min())) if finite.size else 0.0
    high = vmax if vmax is not None else max(1.0, float(finite.max())) if finite.size else 1.0
    if not low < high:
        raise ValueError(f"vmin ({low}) must be below vmax ({high}): they bound the colour scale")
    return low, high


def heatmap(
    m: Matrix,
    *,
    ax: Axes | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "magma",
    title: str | None = None,
    annotate: str = "auto",
    cbar: bool = True,
    max_ticks: int = 24,
    labels: Sequence[str] | None = None,
    layer_names: str = "names",
) -> Figure:
    """Draw a ``(layer_a, layer_b)`` CKA matrix (a DataArray, or a result Dataset of ``repsim.compare``).

    Layer 0 is at the bottom-left, tick labels are shortened (``short_labels``) or block indices
    (``layer_names="indices"``). The title defaults to a short line (models, their weights, the data:
    ``default_title``) and a custom ``title`` is kept as given; on a figure of its own, a caption line under it gives
    the estimator, samples, pooling and what the cells hold. ``labels`` names the two models (default: the attrs').
    ``annotate``: ``"cka"`` writes each cell's CKA, ``"ci"`` CKA ± half its bootstrap CI (needs ``lower``/``upper``),
    ``"none"`` nothing, ``"auto"`` CKA up to 12x12 cells. Draws into ``ax`` when given; returns the Figure (rendered
    inline by Jupyter), never shown by pyplot. The colour scale is ``vmin``..``vmax``, by default [0, 1] widened to
    any value outside it (``colour_limits``).
    """
    if layer_names not in ("names", "indices"):
        raise ValueError(f"layer_names must be 'names' or 'indices', got {layer_names!r}")
    if labels is not None and (isinstance(labels, str) or len(labels) != 2):
        raise ValueError(f"labels must be two names (a, b), got {labels!r}")
    da, width = _split(m)
    if da.dims != ("layer_a", "layer_b"):
        raise ValueError(f"expected dims ('layer_a', 'layer_b'), got {da.dims}")
    vmin, vmax = colour_limits([da.values], vmin, vmax)
    if annotate == "auto":
        annotate = "cka" if max(da.shape) <= 12 else "none"
    if annotate not in CELLS:
        raise ValueError(f"annotate must be one of {['auto', *CELLS]}, got {annotate!r}")
    own = ax is None
    if ax is None:  # cells big enough for 8 pt text: 0.5 in (CKA) or 0.75 in (CKA ± CI) at paper print size
        cell = (0.75 if annotate == "ci" else 0.5) if annotate != "none" else 0.3
        size = (2.2 + cell * max(6, da.sizes["layer_b"]), 1.9 + cell * 0.9 * max(6, da.sizes["layer_a"]))
        size = (min(size[0], MAX_INCHES), min(size[1], MAX_INCHES))  # many layers: smaller cells, bounded memory
        ax = ReprFigure(figsize=size, layout="constrained").add_subplot()
    sns.heatmap(
        np.asarray(da.values, dtype=float), ax=ax, vmin=vmin, vmax=vmax, cmap=cmap, square=True, cbar=cbar,
        cbar_kws={"label": "CKA"} if cbar else None, annot=_cells(da, width, annotate), fmt="",
        annot_kws={"fontsize": 8 if own else 6}, xticklabels=False, yticklabels=False,
    )
    ax.invert_yaxis()  # row 0 (first layer) at the bottom
    given = [None, None] if labels is None else list(labels)
    (label_a, names_a), (label_b, names_b) = (_axis(da, "a", given[0], layer_names),
                                              _axis(da, "b", given[1], layer_names))
    xt, xl = _ticks(names_b, max_ticks)
    yt, yl = _ticks(names_a, max_ticks)
    ax.set_xticks(xt, xl, rotation=90, fontsize=8)
    ax.set_yticks(yt, yl, rotation=0, fontsize=8)
    ax.set_xlabel(label_b)
    ax.set_ylabel(label_a)
    fig = _figure(ax)
    share = ax.get_position().width if ax.get_position().width < 1 else 1.0
    if title is not None:
        ax.set_title(title, fontsize=10)
    elif own:
        ax.set_title(wrap_to_figure(default_title(da, labels), fig, share, 10), fontsize=10)
    else:  # a panel of a grid: the short title and what the cells hold
        text = "\n".join(x for x in (default_title(da, labels), f"({CELLS[annotate]})" if CELLS[annotate] else "")
                         if x)
        ax.set_title(wrap_to_figure(text, fig, share, 9), fontsize=9)
    if own:
        fig.supxlabel(wrap_to_figure(caption(da, annotate), fig, 1.0, 7), fontsize=7, color="0.3")
    return fig


def heatmap_grid(
    matrices: Sequence[Matrix],
    *,
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "magma",
    annotate: str = "auto",
    panel_size: float = 3.2,
    title: str | None = None,
) -> Figure:
    """Several CKA matrices in a grid with one shared colourbar (same ``vmin``/``vmax`` for all panels, by default
    [0, 1] widened to every panel's values) and an optional overall ``title`` (wrapped to the figure's width)."""
    if not matrices:
        raise ValueError("heatmap_grid needs at least one matrix")
    vmin, vmax = colour_limits([_split(m)[0].values for m in matrices], vmin, vmax)
    if titles is not None and len(titles) != len(matrices):
        raise ValueError(f"got {len(titles)} titles for {len(matrices)} matrices")
    ncols = min(len(matrices), ncols or 3)
    nrows = math.ceil(len(matrices) / ncols)
    fig = ReprFigure(figsize=(panel_size * ncols + 1.0, (panel_size + 0.4) * nrows + (0.5 if title else 0)),
                     layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, m in enumerate(matrices):
        heatmap(m, ax=axes.flat[i], vmin=vmin, vmax=vmax, cmap=cmap, title=None if titles is None else titles[i],
                annotate=annotate, cbar=False)
    for ax in axes.flat[len(matrices) :]:
        ax.set_axis_off()
    fig.colorbar(axes.flat[0].collections[0], ax=list(axes.flat), label="CKA", shrink=0.8)
    if title:
        fig.suptitle(wrap_to_figure(title, fig, 1.0, 10), fontsize=10)
    first, _ = _split(matrices[0])
    shown = ("cka" if max(first.shape) <= 12 else "none") if annotate == "auto" else annotate
    groups: dict[str, list[str]] = {}  # caption -> the panels it describes (panels on other data differ in n)
    for i, m in enumerate(matrices):
        groups.setdefault(caption(_split(m)[0], shown), []).append(titles[i] if titles else f"panel {i + 1}")
    text = next(iter(groups)) if len(groups) == 1 else " | ".join(f"{', '.join(p)}: {c}" for c, p in groups.items())
    fig.supxlabel(wrap_to_figure(text, fig, 1.0, 7), fontsize=7, color="0.3")
    return fig


def diagonal(
    results: xr.Dataset | Mapping[str, xr.Dataset | Sequence[xr.Dataset]],
    *,
    null: Sequence[xr.Dataset] | xr.Dataset | None = None,
    ax: Axes | None = None,
    title: str | None = "Same-layer CKA before vs after",
    xlabel: str = "block",
) -> Figure:
    """CKA(layer k of a, layer k of b) against k: one line per label.

    A single Dataset draws its diagonal with the bootstrap CI as a band (when it has ``lower``/``upper``); a list
    (e.g. one per seed) draws the mean with the min–max over the list as the band. ``null`` (one or several
    Datasets, e.g. two independently trained models) is drawn as a grey band: a layer whose line falls into it changed
    as much as two unrelated trainings differ. ``results`` may also be one Dataset (labelled by its models).
    """
    if isinstance(results, (xr.Dataset, xr.DataArray)):
        a, b = results.attrs.get("model_a", "a"), results.attrs.get("model_b", "b")
        results = {f"{a} vs {b}" if a != b else str(a): results}
    if not isinstance(results, Mapping) or not all(
            isinstance(v, (xr.Dataset, xr.DataArray)) or (isinstance(v, Sequence) and not isinstance(v, str)
                                                         and all(isinstance(d, (xr.Dataset, xr.DataArray)) for d in v))
            for v in results.values()):
        raise TypeError("diagonal takes a CKA Dataset or a dict {label: Dataset or list of Datasets}, got "
                        f"{type(results).__name__}" + (f" of {sorted(map(str, results))}" if isinstance(
                            results, Mapping) else ""))
    if ax is None:
        ax = ReprFigure(figsize=(5.0, 3.4), layout="constrained").add_subplot()
    if null is not None:
        nulls = [null] if isinstance(null, (xr.Dataset, xr.DataArray)) else null
        rows = np.array([diagonal_values(d) for d in nulls])
        x = np.arange(rows.shape[1])
        ax.fill_between(x, rows.min(0), rows.max(0), color="grey", alpha=0.3,
                        label=f"null reference ({len(rows)} pair{'s' * (len(rows) > 1)}, min–max)")
        ax.plot(x, rows.mean(0), color="grey", linestyle="--")
    for i, (label, res) in enumerate(results.items()):
        if isinstance(res, (xr.Dataset, xr.DataArray)):
            mean = diagonal_values(res)
            band = (diagonal_values(res, "lower"), diagonal_values(res, "upper")) if "lower" in res else None
            what = "95% CI" if band is not None else ""
        else:
            rows = np.array([diagonal_values(d) for d in res])
            mean, band, what = rows.mean(0), (rows.min(0), rows.max(0)), f"mean of {len(rows)}, min–max"
        x = np.arange(len(mean))
        if band is not None:
            ax.fill_between(x, band[0], band[1], color=f"C{i}", alpha=0.2)
        ax.plot(x, mean, marker="o", color=f"C{i}", label=f"{label} ({what})" if what else label)
    ax.set(xlabel=xlabel, ylabel="CKA(before, after)", ylim=(min(0.0, ax.get_ylim()[0]), 1.05))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    fig = _figure(ax)
    if title:
        ax.set_title(wrap_to_figure(title, fig, ax.get_position().width, 9), fontsize=9)
    return fig
