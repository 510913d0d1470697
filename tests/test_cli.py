"""The ``repsim cka``, ``repsim heatmap`` and ``repsim demo`` sub-commands, end to end on small inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from repsim.cli import main
from repsim.data.synthetic import SyntheticPatterns
from repsim.models import create

VIT = ["--model-a", "vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "16"]


def test_cka_with_checkpoint_then_heatmap(tmp_path: Path) -> None:
    torch.manual_seed(0)  # the CLI seeds model A's random init with --seed 0: B loads the same weights
    ckpt = tmp_path / "a.pt"
    torch.save(create("vit_tiny_patch16_224", img_size=32).state_dict(), ckpt)
    out = tmp_path / "out"
    args = [*VIT, "--model-b", "vit_tiny_patch16_224", "--checkpoint-b", str(ckpt), "--layers", "blocks.*", "--n-samples", "48"]
    assert main(["cka", *args, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cka.nc", "cka.png"]
    with xr.open_dataset(out / "cka.nc", engine="h5netcdf") as ds:
        cka = ds["cka"].load()
    assert cka.shape == (12, 12) and cka.attrs["n_samples"] == 48 and cka.attrs["checkpoint_b"] == str(ckpt)
    np.testing.assert_allclose(np.diag(cka.values), 1.0, atol=1e-6)  # same weights
    assert main(["heatmap", str(out / "cka.nc"), "--out", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 1000


def test_cka_on_real_medmnist_with_bootstrap(tmp_path: Path, data_root: Path) -> None:
    npz = data_root / "medmnist" / "breastmnist.npz"  # grayscale, fed as 3 channels
    args = [*VIT, "--data", str(npz), "--n-samples", "48", "--pool", "cls", "--boot", "50", "--layers", "blocks.0", "blocks.5", "blocks.11"]
    assert main(["cka", *args, "--out", str(tmp_path)]) == 0
    with xr.open_dataset(tmp_path / "cka.nc", engine="h5netcdf") as ds:
        assert set(ds.data_vars) == {"cka", "lower", "upper"} and ds.attrs["data"] == str(npz)
        assert np.isfinite(ds["cka"].values).all() and np.allclose(np.diag(ds["cka"].values), 1.0)


def test_cka_rejects_unknown_layer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="close matches"):
        main(["cka", *VIT, "--layers", "blocks.0.atn", "--n-samples", "16", "--out", str(tmp_path)])
    assert not (tmp_path / "cka.nc").exists()


def test_demo_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The reduced transfer study on small synthetic tasks: before/after CKA of the 6 blocks with bootstrap CIs."""
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1", "--n-samples", "200", "--jobs", "1"]) == 0
    with xr.open_dataset(tmp_path / "cka.nc", engine="h5netcdf") as ds:
        ds = ds.load()
    assert ds["cka"].shape == (6, 6) and bool((ds["lower"] <= ds["upper"]).all())
    assert (tmp_path / "cka.png").stat().st_size > 1000
    assert (tmp_path / "tables.md").exists() and (tmp_path / "study.json").exists()
    assert "synthetic" in capsys.readouterr().out


def test_demo_help_says_data_is_synthetic(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "SYNTHETIC" in text and "--data-root" in text


def test_synthetic_data_is_deterministic_with_balanced_classes() -> None:
    a, b = SyntheticPatterns(8, img_size=16), SyntheticPatterns(8, img_size=16)
    torch.testing.assert_close(a[5][0], b[5][0])
    assert [a[i][1] for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert not torch.equal(a[0][0], SyntheticPatterns(8, img_size=16, split="test")[0][0])
