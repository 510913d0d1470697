"""The ``repsim`` command line, run as a user runs it (a subprocess for the entry points, ``main`` in process for the
rest): help, one-line errors, cka over models and run folders, heatmap, demo."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import repsim
from repsim.cli import main
from repsim.data.synthetic import SyntheticPatterns
from repsim.models import create

VIT = ["--model-a", "vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "16"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "repsim", *args], capture_output=True, text=True, env=ENV,
                          timeout=600)


def test_help_is_fast_and_describes_every_command() -> None:
    start = time.perf_counter()
    out = _run("--help")
    assert out.returncode == 0 and time.perf_counter() - start < 5  # < 1 s on a quiet machine (no torch import)
    for command in ("models", "cka", "heatmap", "demo", "study", "train", "knn", "table", "report"):
        assert command in out.stdout
    cka_help = _run("cka", "--help").stdout
    assert "(default: 64)" in cka_help and "--run-a" in cka_help and "--pretrained" in cka_help


def test_errors_are_one_line_with_exit_2(tmp_path: Path) -> None:
    out = _run("cka", *VIT, "--layers", "blocks.0.atn", "--n-samples", "16", "--out", str(tmp_path))
    assert out.returncode == 2 and not (tmp_path / "cka.nc").exists()
    assert out.stderr.strip().count("\n") == 0 and "close matches" in out.stderr and "Traceback" not in out.stderr
    debug = _run("--debug", "heatmap", str(tmp_path / "missing.nc"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "missing.nc does not exist" in debug.stderr


def test_pretrained_weights_offline_name_the_model(tmp_path: Path) -> None:
    """Offline with an empty hub cache, --pretrained on a hub model fails in one line naming the model and the way
    out, not with the hub library's message alone."""
    out = subprocess.run([sys.executable, "-m", "repsim", "cka", "--model-a", "test_vit", "--pretrained",
                          "--n-samples", "16", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         env={**ENV, "HF_HOME": str(tmp_path / "hf")}, timeout=600)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert "test_vit: its pretrained weights could not be loaded" in out.stderr and "--checkpoint-a" in out.stderr


def test_cka_with_checkpoint_then_heatmap(tmp_path: Path) -> None:
    torch.manual_seed(0)  # the CLI seeds model A's random init with --seed 0: B loads the same weights
    ckpt = tmp_path / "a.pt"
    torch.save(create("vit_tiny_patch16_224", img_size=32).state_dict(), ckpt)
    out = tmp_path / "out"
    args = [*VIT, "--model-b", "vit_tiny_patch16_224", "--checkpoint-b", str(ckpt), "--layers", "blocks.*",
            "--n-samples", "48"]
    assert main(["cka", *args, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cka.nc", "cka.png"]
    ds = repsim.load(out / "cka.nc")
    assert ds.cka.shape == (12, 12) and ds.attrs["n_samples"] == 48 and str(ckpt) in ds.attrs["sources"]
    assert ds.attrs["model_a"] != ds.attrs["model_b"]  # same architecture, other weights: labels tell them apart
    np.testing.assert_allclose(np.diag(ds.cka.values), 1.0, atol=1e-6)  # same weights
    assert main(["heatmap", str(out / "cka.nc"), "--out", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 1000


def test_cka_between_architectures_expands_patterns_on_each(tmp_path: Path) -> None:
    args = ["--model-a", "vit_tiny_patch16_224", "--model-b", "test_vit", "--img-size", "32", "--layers", "blocks.*",
            "--n-samples", "32", "--batch-size", "8", "--out", str(tmp_path)]
    assert main(["cka", *args]) == 0
    ds = repsim.load(tmp_path / "cka.nc")
    assert ds.cka.shape[0] == 12 and ds.cka.shape[1] == len(create("test_vit", img_size=32).layer_names())


def test_cka_on_real_medmnist_with_bootstrap(tmp_path: Path, data_root: Path) -> None:
    npz = data_root / "medmnist" / "breastmnist.npz"  # grayscale, fed as 3 channels
    args = [*VIT, "--data", str(npz), "--n-samples", "80", "--batch-size", "8", "--pool", "cls", "--boot", "50",
            "--layers", "blocks.0", "blocks.5", "blocks.11", "--labels", "first", "second"]
    assert main(["cka", *args, "--out", str(tmp_path)]) == 0
    ds = repsim.load(tmp_path / "cka.nc")
    assert set(ds.data_vars) == {"cka", "lower", "upper"} and ds.attrs["data"] == str(npz)
    assert (ds.attrs["model_a"], ds.attrs["model_b"]) == ("first", "second")  # the labels given win
    assert np.isfinite(ds["cka"].values).all() and np.allclose(np.diag(ds["cka"].values), 1.0)


def test_cka_compares_a_run_before_and_after(tmp_path: Path, data_root: Path) -> None:
    """A folder written by `repsim train` loads by name: its architecture comes from model.json."""
    run = tmp_path / "runs"
    assert main(["train", "--spec", "breastmnist_tiny", "--data-root", str(data_root), "--out", str(run),
                 "train.epochs=1", "train.seeds=1", "train.lr_grid=null"]) == 0
    (folder,) = {p.parent for p in run.rglob("summary.json")}
    out = tmp_path / "cka"
    assert main(["cka", "--run-a", str(folder), "--which-a", "init", "--run-b", str(folder), "--data", "breastmnist",
                 "--data-root", str(data_root), "--n-samples", "64", "--batch-size", "16", "--out", str(out)]) == 0
    ds = repsim.load(out / "cka.nc")
    assert ds.attrs["model_a"].endswith("(init)") and ds.attrs["model_b"].endswith("(best)")
    assert ds.cka.shape[0] == ds.cka.shape[1] >= 2


def test_python_dash_m_and_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0" in out and "segment-anything" in out


def test_demo_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The reduced transfer study on small synthetic tasks: Lite0 before/after CKA with bootstrap CIs."""
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1", "--n-samples", "400", "--jobs", "1"]) == 0
    ds = repsim.load(tmp_path / "cka.nc")
    assert ds["cka"].shape == (7, 7) and bool((ds["lower"] <= ds["upper"]).all())
    assert (tmp_path / "cka.png").stat().st_size > 1000
    assert (tmp_path / "tables.md").exists() and (tmp_path / "study.json").exists()
    out = capsys.readouterr().out
    assert "synthetic" in out and "start: imagenet" in out  # the [imagenet] extra is installed with [test]


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


def test_cka_under_torchrun_equals_one_process(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m repsim cka`: whole batches per process, rank 0 writes, same result."""
    args = [*VIT, "--model-b", "test_vit", "--n-samples", "96", "--batch-size", "8", "--boot", "200"]
    env = {**ENV, "OMP_NUM_THREADS": "1"}  # torchrun's default: the same kernels, hence the same bits, in both runs
    single = subprocess.run([sys.executable, "-m", "repsim", "cka", *args, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "repsim", "cka", *args, "--out", str(tmp_path / "two")], capture_output=True,
                         text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one, two = repsim.load(tmp_path / "one" / "cka.nc"), repsim.load(tmp_path / "two" / "cka.nc")
    assert (one.attrs["world_size"], two.attrs["world_size"]) == (1, 2)
    assert one.attrs["n_samples"] == two.attrs["n_samples"] == 96 and two.attrs["n_batches"] == 12
    for var in ("cka", "lower", "upper"):
        np.testing.assert_allclose(two[var].values, one[var].values, rtol=0, atol=1e-12)
