"""repsim.plot: orientation, colour scale, labels, titles, shared colourbar, no implicit pyplot figures."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import xarray as xr
from matplotlib.figure import Figure

from repsim.plot import heatmap, heatmap_grid, short_labels


def matrix(la: int = 4, lb: int = 3, model_a: str = "vit_a", model_b: str = "vit_b") -> xr.DataArray:
    values = np.arange(la * lb, dtype=float).reshape(la, lb) / (la * lb)
    return xr.DataArray(
        values,
        dims=("layer_a", "layer_b"),
        coords={"layer_a": [f"blocks.{i}" for i in range(la)], "layer_b": [f"blocks.{i}" for i in range(lb)]},
        attrs={"model_a": model_a, "model_b": model_b, "estimator": "minibatch linear CKA, unbiased HSIC", "n_samples": 512},
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
    assert "vit_a vs vit_b" in ax.get_title() and "n=512" in ax.get_title()
    assert ax.get_ylabel() == "vit_a layer" and ax.get_xlabel() == "vit_b layer"
    assert cbar.get_ylabel() == "CKA"


def test_heatmap_annotates_ci_width() -> None:
    cka = matrix(3, 3)
    ds = xr.Dataset({"cka": cka, "lower": cka - 0.05, "upper": cka + 0.1}, attrs=cka.attrs)
    fig = heatmap(ds, annotate_ci=True, vmin=-1.0, title="custom")
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["0.15"] * 9
    assert ax.collections[0].get_clim() == (-1.0, 1.0) and ax.get_title() == "custom"
    with pytest.raises(ValueError, match="annotate_ci needs"):
        heatmap(cka, annotate_ci=True)


def test_grid_has_one_shared_colourbar() -> None:
    fig = heatmap_grid([matrix(), matrix(5, 5), matrix(2, 2)], titles=["a", "b", "c"], ncols=2)
    panels = [ax for ax in fig.axes if ax.get_title() in ("a", "b", "c")]
    assert len(panels) == 3
    colourbars = [ax for ax in fig.axes if ax.get_ylabel() == "CKA"]
    assert len(colourbars) == 1
    assert {ax.collections[0].get_clim() for ax in panels} == {(0.0, 1.0)}
    with pytest.raises(ValueError, match="2 titles for 3"):
        heatmap_grid([matrix()] * 3, titles=["a", "b"])


def test_short_labels() -> None:
    assert short_labels(["blocks.1", "blocks.10", "blocks.11"]) == ["1", "10", "11"]
    assert short_labels(["model.blocks.0.attn", "model.blocks.1.attn"]) == ["0.attn", "1.attn"]
    assert short_labels(["a/blocks.0", "a/blocks.1", "b/layer1", "b/layer2"]) == ["a/0", "a/1", "b/layer1", "b/layer2"]
    assert short_labels(["norm"]) == ["norm"]
