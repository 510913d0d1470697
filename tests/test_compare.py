"""repsim.compare: streaming CKA against a float64 reference written from the equations, block consistency,
stored activations, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from repsim.capture import extract
from repsim.compare import cka_matrix, compare, compare_many


def hsic1(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC from raw Grams (float64)."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    return float(np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3))


def hsic0(k: np.ndarray, l: np.ndarray) -> float:
    """Gretton et al. (2005) biased HSIC, tr(KHLH) / (n-1)^2."""
    n = k.shape[0]
    h = np.eye(n) - 1 / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def minibatch_reference(batches_a: list[list[np.ndarray]], batches_b: list[list[np.ndarray]], hsic=hsic1) -> np.ndarray:
    """Nguyen et al. (2021) Eq. 2: HSICs averaged over batches, CKA formed from the averages."""
    la, lb = len(batches_a[0]), len(batches_b[0])
    cross, sa, sb = np.zeros((la, lb)), np.zeros(la), np.zeros(lb)
    for xs, ys in zip(batches_a, batches_b):
        ka = [x.reshape(len(x), -1).astype(np.float64) @ x.reshape(len(x), -1).astype(np.float64).T for x in xs]
        kb = [y.reshape(len(y), -1).astype(np.float64) @ y.reshape(len(y), -1).astype(np.float64).T for y in ys]
        cross += np.array([[hsic(p, q) for q in kb] for p in ka])
        sa += [hsic(p, p) for p in ka]
        sb += [hsic(q, q) for q in kb]
    return cross / np.sqrt(np.outer(sa, sb))


def mlp(seed: int, width: int = 24, depth: int = 4) -> nn.Sequential:
    """ReLU MLP whose activations have a large positive mean (stress for fp32 cancellation)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(10, width)]
    for _ in range(depth - 1):
        layers += [nn.ReLU(), nn.Linear(width, width)]
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.bias, 3.0, 1.0)
    return nn.Sequential(*layers)


def layer_outputs(model: nn.Sequential, x: torch.Tensor, names: list[str]) -> list[np.ndarray]:
    """Outputs of the named children, computed by running the Sequential step by step (no hooks)."""
    outs, h = {}, x
    with torch.no_grad():
        for name, child in model.named_children():
            h = child(h)
            outs[name] = h.numpy().copy()
    return [outs[n] for n in names]


@pytest.fixture(scope="module")
def data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(1)
    x = torch.randn(58, 10) * 2 + 1
    return [(x[s : s + 20], torch.zeros(len(x[s : s + 20]))) for s in range(0, 58, 20)]  # batches 20, 20, 18


LAYERS = ["0", "2", "4", "6"]


def test_minibatch_compare_equals_float64_reference(data) -> None:
    a, b = mlp(0), mlp(1, width=16)
    got = compare(a, b, data, layers_a=LAYERS, layers_b=["1", "4", "6"], progress=False)
    ref = minibatch_reference([layer_outputs(a, x, LAYERS) for x, _ in data], [layer_outputs(b, x, ["1", "4", "6"]) for x, _ in data])
    assert got.dims == ("layer_a", "layer_b") and list(got.layer_b.values) == ["1", "4", "6"]
    assert got.attrs["n_samples"] == 58 and got.attrs["n_batches"] == 3
    np.testing.assert_allclose(got.values, ref, rtol=0, atol=1e-6)


def test_biased_estimator_equals_reference(data) -> None:
    a = mlp(2)
    got = compare(a, None, data, layers_a=LAYERS, estimator="biased", progress=False)
    outs = [layer_outputs(a, x, LAYERS) for x, _ in data]
    np.testing.assert_allclose(got.values, minibatch_reference(outs, outs, hsic0), rtol=0, atol=1e-6)


def test_cross_matrix_is_off_diagonal_block_of_joint_matrix(data) -> None:
    a, b = mlp(3), mlp(4)
    cross = compare(a, b, data, layers_a="*", progress=False)
    joint = compare_many({"a": a, "b": b}, data, layers="*", progress=False)
    assert joint.shape == (14, 14)
    block = joint.sel(layer_a=joint.model_a == "a", layer_b=joint.model_b == "b")
    np.testing.assert_allclose(block.values, cross.values, rtol=0, atol=1e-12)
    assert list(block.module_a.values) == list(cross.layer_a.values)
    within = compare(a, None, data, layers_a="*", progress=False)
    np.testing.assert_allclose(joint.sel(layer_a=joint.model_a == "a", layer_b=joint.model_b == "a").values, within.values, atol=1e-12)
    np.testing.assert_allclose(np.diag(within.values), 1.0, atol=1e-12)
    np.testing.assert_allclose(compare(a, a, data, layers_a="*", progress=False).values, within.values, atol=1e-12)


def test_same_model_different_layer_sets(data) -> None:
    a = mlp(5)
    sub = compare(a, a, data, layers_a=["0", "2"], layers_b=["4", "6", "2"], progress=False)
    full = compare(a, None, data, layers_a=LAYERS, progress=False)
    assert list(sub.layer_b.values) == ["2", "4", "6"]  # model order
    np.testing.assert_allclose(sub.values, full.sel(layer_a=["0", "2"], layer_b=["2", "4", "6"]).values, atol=1e-12)


def test_stored_activations_match_streaming(data, tmp_path) -> None:
    a, b = mlp(6), mlp(7)
    loader = data[:2]  # 2 x 20 samples: the same batches as cka_matrix(batch_size=20)
    streamed = compare(a, b, loader, layers_a=LAYERS, progress=False)
    ds_a = extract(a, loader, layers=LAYERS, progress=False)
    extract(b, loader, layers=LAYERS, store=tmp_path / "b.zarr", progress=False)
    stored = cka_matrix(ds_a, tmp_path / "b.zarr", batch_size=20, progress=False)
    np.testing.assert_allclose(stored.values, streamed.values, rtol=0, atol=1e-9)
    uneven = cka_matrix(ds_a, tmp_path / "b.zarr", batch_size=15, progress=False)  # 3 batches of 13-14 samples
    batches = (slice(0, 13), slice(13, 27), slice(27, 40))
    x = torch.cat([x for x, _ in loader])
    ref = minibatch_reference([layer_outputs(a, x[s], LAYERS) for s in batches], [layer_outputs(b, x[s], LAYERS) for s in batches])
    assert uneven.attrs["n_batches"] == 3
    np.testing.assert_allclose(uneven.values, ref, rtol=0, atol=1e-6)
    within = cka_matrix(ds_a, batch_size=40, progress=False)
    np.testing.assert_allclose(np.diag(within.values), 1.0, atol=1e-12)


def test_keep_batches_gives_bootstrap_interval(data) -> None:
    a, b = mlp(8), mlp(9)
    ds = compare(a, b, data, layers_a=LAYERS, keep_batches=True, n_boot=200, progress=False)
    assert isinstance(ds, xr.Dataset) and set(ds.data_vars) == {"cka", "lower", "upper"}
    assert bool((ds.lower <= ds.cka + 1e-12).all() and (ds.cka <= ds.upper + 1e-12).all())
    xr.testing.assert_allclose(ds.cka, compare(a, b, data, layers_a=LAYERS, progress=False))


# ------------------------------------------------------------------------------------------------ bad input (item 8)
def test_pattern_matching_nothing_lists_close_matches(data) -> None:
    with pytest.raises(ValueError, match=r"'blocks\.\*' matches no module.*e\.g\. 0, 1, 2"):
        compare(mlp(0), mlp(1), data, layers_a="blocks.*", progress=False)
    with pytest.raises(ValueError, match=r"'66' matches no module.*close matches: 6"):
        compare_many({"a": mlp(0)}, data, layers=["6", "66"], progress=False)


def test_different_sample_counts_rejected(data) -> None:
    a = extract(mlp(0), data, layers=LAYERS, progress=False)
    with pytest.raises(ValueError, match="58 samples but ds_b has 40"):
        cka_matrix(a, a.isel(sample=slice(0, 40)), progress=False)
    with pytest.raises(ValueError, match="different 'sample' coordinates"):
        cka_matrix(a, a.isel(sample=slice(None, None, -1)), progress=False)


def test_nan_activation_names_the_layer(data) -> None:
    a = mlp(0)
    with torch.no_grad():
        a[4].weight[0, 0] = float("nan")
    b = mlp(1).train()
    with pytest.raises(ValueError, match=r"\b4\b.*NaN"):
        compare(b, a, data, layers_a=LAYERS, progress=False)
    for m in (*a.modules(), *b.modules()):  # hooks gone and mode restored while the error is still referenced
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert b.training and all(m.training for m in b.modules())


def test_batch_smaller_than_four_rejected() -> None:
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="at least 4 samples"):
        compare(mlp(0), mlp(1), [x], layers_a=LAYERS, progress=False)


def test_output_not_one_row_per_sample(data) -> None:
    class Folds(nn.Module):  # a layer that reshapes samples into rows (as attention heads can)
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(10, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).reshape(-1, 2)

    with pytest.raises(ValueError, match="0: output has 40 rows for a batch of 20"):
        compare(nn.Sequential(Folds()), None, data, layers_a="0", progress=False)
