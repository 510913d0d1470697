"""repsim.compare: streaming CKA against a float64 reference written from the equations, block consistency,
stored activations, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import xarray as xr
from torch import nn

import repsim
from repsim.capture import extract
from repsim.compare import Bootstrap, cka_matrix, compare, compare_many
from repsim.files import save_netcdf


def hsic1(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC from raw Grams (float64)."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    return float(np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
                 - 2 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3))


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
    ref = minibatch_reference([layer_outputs(a, x, LAYERS) for x, _ in data],
                              [layer_outputs(b, x, ["1", "4", "6"]) for x, _ in data])
    assert isinstance(got, xr.Dataset) and got.cka.dims == ("layer_a", "layer_b")
    assert list(got.layer_b.values) == ["1", "4", "6"] and list(got.data_vars) == ["cka"]
    assert got.attrs["n_samples"] == 58 and got.attrs["n_batches"] == 3 and got.attrs["world_size"] == 1
    assert got.cka.attrs == {}  # provenance lives on the Dataset only
    np.testing.assert_allclose(got.cka.values, ref, rtol=0, atol=1e-6)


def test_biased_estimator_equals_reference(data) -> None:
    a = mlp(2)
    got = compare(a, None, data, layers_a=LAYERS, estimator="biased", progress=False)
    outs = [layer_outputs(a, x, LAYERS) for x, _ in data]
    np.testing.assert_allclose(got.cka.values, minibatch_reference(outs, outs, hsic0), rtol=0, atol=1e-6)


def test_cross_matrix_is_off_diagonal_block_of_joint_matrix(data) -> None:
    a, b = mlp(3), mlp(4)
    cross = compare(a, b, data, layers_a="*", progress=False).cka
    joint = compare_many({"a": a, "b": b}, data, layers="*", progress=False).cka
    assert joint.shape == (14, 14)
    block = joint.sel(layer_a=joint.model_a == "a", layer_b=joint.model_b == "b")
    np.testing.assert_allclose(block.values, cross.values, rtol=0, atol=1e-12)
    assert list(block.module_a.values) == list(cross.layer_a.values)
    within = compare(a, None, data, layers_a="*", progress=False).cka
    np.testing.assert_allclose(joint.sel(layer_a=joint.model_a == "a", layer_b=joint.model_b == "a").values,
                               within.values, atol=1e-12)
    np.testing.assert_allclose(np.diag(within.values), 1.0, atol=1e-12)
    np.testing.assert_allclose(compare(a, a, data, layers_a="*", progress=False).cka.values, within.values, atol=1e-12)


def test_same_model_different_layer_sets(data) -> None:
    a = mlp(5)
    sub = compare(a, a, data, layers_a=["0", "2"], layers_b=["4", "6", "2"], progress=False).cka
    full = compare(a, None, data, layers_a=LAYERS, progress=False).cka
    assert list(sub.layer_b.values) == ["2", "4", "6"]  # model order
    np.testing.assert_allclose(sub.values, full.sel(layer_a=["0", "2"], layer_b=["2", "4", "6"]).values, atol=1e-12)


def test_stored_activations_match_streaming(data, tmp_path) -> None:
    a, b = mlp(6), mlp(7)
    loader = data[:2]  # 2 x 20 samples: the same batches as cka_matrix(batch_size=20)
    streamed = compare(a, b, loader, layers_a=LAYERS, progress=False).cka
    ds_a = extract(a, loader, layers=LAYERS, progress=False)
    extract(b, loader, layers=LAYERS, store=tmp_path / "b.zarr", progress=False)
    stored = cka_matrix(ds_a, tmp_path / "b.zarr", batch_size=20, progress=False).cka
    np.testing.assert_allclose(stored.values, streamed.values, rtol=0, atol=1e-9)
    uneven = cka_matrix(ds_a, tmp_path / "b.zarr", batch_size=13, progress=False)  # 3 batches of 13-14 samples
    batches = (slice(0, 13), slice(13, 27), slice(27, 40))
    x = torch.cat([x for x, _ in loader])
    ref = minibatch_reference([layer_outputs(a, x[s], LAYERS) for s in batches],
                              [layer_outputs(b, x[s], LAYERS) for s in batches])
    assert uneven.attrs["n_batches"] == 3
    np.testing.assert_allclose(uneven.cka.values, ref, rtol=0, atol=1e-6)
    within = cka_matrix(ds_a, batch_size=40, progress=False).cka
    np.testing.assert_allclose(np.diag(within.values), 1.0, atol=1e-12)


def test_bootstrap_gives_interval_and_round_trips(data, tmp_path) -> None:
    a, b = mlp(8), mlp(9)
    many = [(x[i : i + 4], y[i : i + 4]) for x, y in data for i in range(0, 16, 4)]  # 12 batches of 4
    ds = compare(a, b, many, layers_a=LAYERS, bootstrap=Bootstrap(n_boot=200, ci=0.9), labels=("A", "B"),
                 progress=False)
    assert set(ds.data_vars) == {"cka", "lower", "upper"} and ds.attrs["ci"] == 0.9 and ds.attrs["n_boot"] == 200
    assert (ds.attrs["model_a"], ds.attrs["model_b"]) == ("A", "B")
    assert bool((ds.lower <= ds.cka + 1e-12).all() and (ds.cka <= ds.upper + 1e-12).all())
    xr.testing.assert_allclose(ds.cka, compare(a, b, many, layers_a=LAYERS, progress=False).cka)
    save_netcdf(ds, tmp_path / "r.nc")
    ds.to_netcdf(tmp_path / "plain.nc", engine="h5netcdf")
    for path in (tmp_path / "r.nc", tmp_path / "plain.nc"):
        back = repsim.load(path)
        xr.testing.assert_identical(back, ds)
    with pytest.warns(UserWarning, match="only 3 batches"):
        compare(a, b, data, layers_a=LAYERS, bootstrap=50, progress=False)


def test_default_layers_and_patterns_expanded_on_model_b() -> None:
    """No layers: a Backbone's blocks, a timm model's feature taps; 'blocks.*' expands on each model separately."""
    from repsim.compare import default_layers
    from repsim.models import create

    torch.manual_seed(0)
    x = [(torch.randn(8, 3, 32, 32), torch.zeros(8)) for _ in range(2)]
    deep = create("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)
    shallow = create("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    ds = compare(deep, shallow, x, progress=False)
    assert list(ds.layer_a.values) == deep.layer_names() and list(ds.layer_b.values) == shallow.layer_names()
    ds = compare(deep, shallow, x, layers_a="model.blocks.*", progress=False)
    assert ds.cka.shape == (3, 2)
    assert default_layers(timm.create_model("resnet18", num_classes=0)) == ["act1", "layer1", "layer2", "layer3",
                                                                          "layer4"]
    with pytest.raises(ValueError, match="no layer_names"):
        default_layers(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model B: layer 'model.blocks.2' matches no module"):
        compare(deep, shallow, x, layers_a=["model.blocks.2"], progress=False)


def test_loader_normalisation_goes_into_attrs(data_root) -> None:
    loader = repsim.data.loader(str(data_root / "medmnist" / "breastmnist.npz"), img_size=32, batch_size=16,
                                n_samples=40)
    assert [len(b) for b in loader.batch_sampler] == [20, 20]  # near-equal, none below batch_size
    ds = compare(mlp_image(), None, loader, layers_a=["1"], progress=False)
    assert ds.attrs["loader_normalisation"] == "dataset statistics" and len(ds.attrs["loader_mean"]) == 3
    assert ds.attrs["split"] == "test" and ds.attrs["img_size"] == 32


def mlp_image() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8), nn.ReLU())


def _ddp_compare(rank: int, out: str) -> None:
    ds = compare(mlp(10), mlp(11), _ddp_loader(), layers_a=LAYERS, bootstrap=Bootstrap(300, seed=2),
                 progress=False)
    if rank == 0:
        ds.to_netcdf(out, engine="h5netcdf")


def _ddp_loader() -> torch.utils.data.DataLoader:
    torch.manual_seed(5)
    data = torch.utils.data.TensorDataset(torch.randn(130, 10) * 2 + 1, torch.zeros(130))
    return torch.utils.data.DataLoader(data, batch_size=10)  # 13 batches: rank 0 takes 7, rank 1 takes 6


def test_compare_under_two_gloo_processes_equals_one_process(tmp_path, run_gloo) -> None:
    out = str(tmp_path / "ddp.nc")
    run_gloo(_ddp_compare, out)
    got = repsim.load(out)
    want = compare(mlp(10), mlp(11), _ddp_loader(), layers_a=LAYERS, bootstrap=Bootstrap(300, seed=2), progress=False)
    assert got.attrs["world_size"] == 2 and got.attrs["n_samples"] == want.attrs["n_samples"] == 130
    assert got.attrs["n_batches"] == want.attrs["n_batches"] == 13
    for var in ("cka", "lower", "upper"):
        np.testing.assert_allclose(got[var].values, want[var].values, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ bad input (item 8)
def test_pattern_matching_nothing_lists_close_matches(data) -> None:
    with pytest.raises(ValueError, match=r"'blocks\.\*' matches no module.*e\.g\. 0, 1, 2"):
        compare(mlp(0), mlp(1), data, layers_a="blocks.*", progress=False)
    with pytest.raises(ValueError, match=r"'66' matches no module.*close matches: 6"):
        compare_many({"a": mlp(0)}, data, layers=["6", "66"], progress=False)
    with pytest.raises(ValueError, match=r"layers has no entry for models \['b'\]"):
        compare_many({"a": mlp(0), "b": mlp(1)}, data, layers={"a": "0"}, progress=False)


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


@pytest.mark.parametrize("batch_size", [7, 13, 15, 40])
def test_cka_matrix_batches_as_the_loader_does(data, batch_size: int) -> None:
    """One meaning of batch_size: cka_matrix cuts N samples into N // batch_size batches, as repsim.data.loader."""
    from repsim.data import near_equal_batches

    ds = extract(mlp(6), data[:2], layers=LAYERS, progress=False)
    got = cka_matrix(ds, batch_size=batch_size, progress=False)
    assert got.attrs["n_batches"] == len(near_equal_batches(40, batch_size)) == 40 // batch_size
