"""repsim.plot: orientation, colour scale, labels, titles, shared colourbar, no implicit pyplot figures."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import xarray as xr
from matplotlib.figure import Figure

from repsim.plot import ReprFigure, diagonal, heatmap, heatmap_grid, short_labels


def matrix(la: int = 4, lb: int = 3, model_a: str = "vit_a", model_b: str = "vit_b") -> xr.DataArray:
    values = np.arange(la * lb, dtype=float).reshape(la, lb) / (la * lb)
    return xr.DataArray(
        values,
        dims=("layer_a", "layer_b"),
        coords={"layer_a": [f"blocks.{i}" for i in range(la)], "layer_b": [f"blocks.{i}" for i in range(lb)]},
        attrs={"model_a": model_a, "model_b": model_b, "estimator": "minibatch linear CKA, unbiased HSIC",
               "n_samples": 512},
    )


def test_heatmap_orientation_scale_labels_title() -> None:
    before = plt.get_fignums()
    fig = heatmap(matrix())
    assert isinstance(fig, Figure) and plt.get_fignums() == before  # never registered with pyplot, never shown
    ax, cbar = fig.axes
    mesh = ax.collections[0]
    assert mesh.get_clim() == (0.0, 1.0)
    bottom, top = ax.get_ylim()
    assert bottom < top  # y grows upwards: mesh row 0 (y in [0, 1]) is drawn at the bottom
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(4, 3)[0], matrix().values[0])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2", "3"]
    assert list(ax.get_yticks()) == [0.5, 1.5, 2.5, 3.5]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]  # layer 0 at the left
    assert ax.get_title() == "vit_a vs vit_b"  # short; the details go to the caption line
    caption = fig.get_supxlabel()
    assert "n=512" in caption and "cells: CKA" in caption and "unbiased HSIC" in caption
    assert [t.get_text() for t in ax.texts][:3] == ["0.00", "0.08", "0.17"]  # cells show CKA, not CI widths
    assert ax.get_ylabel() == "vit_a layer" and ax.get_xlabel() == "vit_b layer"
    assert cbar.get_ylabel() == "CKA"


def test_a_value_outside_0_1_widens_the_colour_scale_instead_of_being_clipped() -> None:
    """Unbiased CKA can be slightly negative (and a CI end above 1): the default scale [0, 1] widens to every finite
    value, in one heatmap and across a grid's shared colourbar; given limits are kept."""
    low = matrix(3, 3).copy(data=np.array([[-0.03, 0.2, 0.5], [0.1, 1.0, 0.4], [np.nan, 0.3, 0.9]]))
    assert heatmap(low).axes[0].collections[0].get_clim() == (-0.03, 1.0)
    assert heatmap(low, vmin=-0.5, vmax=2.0).axes[0].collections[0].get_clim() == (-0.5, 2.0)
    grid = heatmap_grid([matrix(3, 3), low.copy(data=low.values + 0.05)])
    assert {ax.collections[0].get_clim() for ax in grid.axes[:2]} == {(0.0, 1.05)}
    assert grid.axes[-1].get_ylim() == pytest.approx((0.0, 1.05))  # the colourbar shows the whole range


def test_heatmap_cells_show_cka_with_half_ci() -> None:
    cka = matrix(3, 3)
    ds = xr.Dataset({"cka": cka, "lower": cka - 0.04, "upper": cka + 0.1}, attrs=cka.attrs)
    fig = heatmap(ds, annotate="ci", vmin=-1.0, title="custom")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts][:2] == ["0.00\n±0.07", "0.11\n±0.07"]
    assert ax.collections[0].get_clim() == (-1.0, 1.0)
    assert ax.get_title() == "custom" and "cells: CKA ± half the 95% CI" in fig.get_supxlabel()  # kept as given
    assert not heatmap(ds, annotate="none").axes[0].texts
    with pytest.raises(ValueError, match="annotate='ci' needs"):
        heatmap(cka, annotate="ci")
    with pytest.raises(ValueError, match="annotate must be one of"):
        heatmap(cka, annotate="widths")


def test_figures_render_inline_and_titles_fit() -> None:
    fig = heatmap(matrix(2, 2, model_a="a_very_long_model_name_" * 3, model_b="b"))
    assert isinstance(fig, ReprFigure) and fig._repr_png_()[:4] == b"\x89PNG"
    fig.canvas.draw()
    title = fig.axes[0].title.get_window_extent()
    assert title.x0 >= 0 and title.x1 <= fig.bbox.width  # wrapped to the figure, never clipped
    labelled = matrix(2, 2).assign_attrs(axis_a="backbone (last block)", axis_b="backbone (last block)")
    ax = heatmap(labelled).axes[0]
    assert ax.get_ylabel() == ax.get_xlabel() == "backbone (last block)"


def test_diagonal_plot_with_bands_and_null() -> None:
    eye = xr.DataArray(np.diag([0.9, 0.8, 0.5]) + 0.01, dims=("layer_a", "layer_b"),
                       coords={"layer_a": list("abc"), "layer_b": list("abc")})
    one = xr.Dataset({"cka": eye, "lower": eye - 0.05, "upper": eye + 0.05})
    seeds = [xr.Dataset({"cka": eye + d}) for d in (-0.02, 0.0, 0.02)]
    fig = diagonal({"pretrained": one, "scratch": seeds}, null=[xr.Dataset({"cka": eye * 0.5})])
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["null reference (1 pair, min–max)", "pretrained (95% CI)", "scratch (mean of 3, min–max)"]
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [0.91, 0.81, 0.51])
    np.testing.assert_allclose(ax.lines[2].get_ydata(), [0.91, 0.81, 0.51])


def test_grid_has_one_shared_colourbar() -> None:
    fig = heatmap_grid([matrix(), matrix(5, 5), matrix(2, 2)], titles=["a", "b", "c"], ncols=2)
    panels = [ax for ax in fig.axes if ax.get_title().split("\n")[0] in ("a", "b", "c")]
    assert len(panels) == 3
    colourbars = [ax for ax in fig.axes if ax.get_ylabel() == "CKA"]
    assert len(colourbars) == 1
    assert {ax.collections[0].get_clim() for ax in panels} == {(0.0, 1.0)}
    with pytest.raises(ValueError, match="2 titles for 3"):
        heatmap_grid([matrix()] * 3, titles=["a", "b"])


def test_grid_caption_names_each_panels_samples_when_they_differ() -> None:
    """Panels on different test sets (400 vs 156 images) must not share the first panel's ``n``."""
    retina, breast = matrix(), matrix()
    retina.attrs.update(n_samples=400, estimator="minibatch linear CKA")
    breast.attrs.update(n_samples=156, estimator="minibatch linear CKA")
    text = heatmap_grid([retina, breast], titles=["retina", "breast"]).get_supxlabel().replace("\n", " ")
    assert "retina: minibatch linear CKA; n=400" in text and "breast: minibatch linear CKA; n=156" in text
    same = heatmap_grid([retina, retina], titles=["a", "b"]).get_supxlabel()
    assert same.startswith("minibatch linear CKA; n=400") and "a:" not in same


def test_short_labels() -> None:
    assert short_labels(["blocks.1", "blocks.10", "blocks.11"]) == ["1", "10", "11"]
    assert short_labels(["model.blocks.0.attn", "model.blocks.1.attn"]) == ["0.attn", "1.attn"]
    assert short_labels(["a/blocks.0", "a/blocks.1", "b/layer1", "b/layer2"]) == ["a/0", "a/1", "b/layer1", "b/layer2"]
    assert short_labels(["norm"]) == ["norm"]
