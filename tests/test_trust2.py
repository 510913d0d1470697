"""Trust, round 2 (issue 19): writes never go through planted symbolic links nor leave their root, pixels and stores
hold what the data holds, one writer per run or store, no orphaned workers or hung ranks, and training that cannot
silently go wrong. Each test reproduces one attack of the issue (D1-D19) and fails without its fix."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import xarray as xr
from PIL import Image
from test_trust import Tiny, one_line_error  # the first trust round's model and error check
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import repsim.store
from repsim.capture import extract
from repsim.files import write_text
from repsim.train import runner
from repsim.train.config import expand
from repsim.train.loop import train

REPO = Path(__file__).resolve().parents[1]
BASE = {"name": "tiny", "data": {"dataset": "medmnist", "root": "medmnist", "flag": "breastmnist", "img_size": 28},
        "model": {"name": "test_resnet", "kwargs": {}, "pretrained": False},
        "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "num_workers": 0}}



@pytest.fixture(autouse=True)
def one_thread(request: pytest.FixtureRequest) -> None:
    """Tiny steps: one intra-op thread avoids oversubscribing the 2 CI cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(before))


def config(**overrides: object) -> dict:
    """The resolved config of BASE with ``overrides`` of its train section."""
    ((_, cfg),) = expand({**BASE, "train": {**BASE["train"], **overrides}})
    return cfg


# ------------------------------------------------------------------ D1, D2, D8: writes go where they say
def test_atomic_write_never_follows_a_planted_temporary(tmp_path) -> None:
    """D1: a symbolic link planted at the old fixed temporary name is neither written through nor renamed."""
    victim = tmp_path / "victim"
    victim.write_text("DATA")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".config.yaml.tmp").symlink_to(victim)
    write_text(tmp_path / "run" / "config.yaml", "a: 1\n")
    assert victim.read_text() == "DATA"
    assert not (tmp_path / "run" / "config.yaml").is_symlink()
    assert (tmp_path / "run" / "config.yaml").read_text() == "a: 1\n"


def test_train_and_report_never_write_through_planted_temporaries(data_root, tmp_path) -> None:
    """D1 as in the issue: ``O/tiny/lr0.001/seed0/.config.yaml.tmp`` and ``RUN/.report.html.tmp`` planted."""
    from repsim.report import write_report

    out, victim = tmp_path / "O", tmp_path / "V"
    victim.write_text("DATA")
    run = out / "tiny" / "lr0.001" / "seed0"
    run.mkdir(parents=True)
    for name in (".config.yaml.tmp", ".report.html.tmp", ".summary.json.tmp", ".last.pt.tmp"):
        (run / name).symlink_to(victim)
    runner.run(config(), data_root=data_root, out=out, progress=False)
    write_report(run)
    assert victim.read_text() == "DATA"
    for name in ("config.yaml", "summary.json", "report.html"):
        assert (run / name).is_file() and not (run / name).is_symlink()


def tensors(seed: int = 0, n: int = 32) -> DataLoader:
    """A loader of ``n`` random 6-feature samples drawn from ``seed``, 8 per batch."""
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 6)).astype(np.float32))
    return DataLoader(TensorDataset(x, torch.arange(n) % 3), batch_size=8)


def test_store_never_written_through_a_planted_temporary(tmp_path) -> None:
    """D1 for stores: a link at the old fixed temporary name of a zarr store (``acts.zarr.tmp``) pointing at a
    folder; writing the store with ``mode="w"`` through it would have emptied that folder."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("DATA")
    (tmp_path / "acts.zarr.tmp").symlink_to(victim, target_is_directory=True)
    extract(Tiny(), tensors(), layers=["fc1", "fc2"], store=tmp_path / "acts.zarr", progress=False)
    assert [p.name for p in victim.iterdir()] == ["keep.txt"]
    assert (victim / "keep.txt").read_text() == "DATA"


@pytest.mark.parametrize("link", ["tiny/lr0.001", "tiny/lr0.001/seed0/checkpoints", "tiny/lr0.001/seed0/metrics.jsonl"])
def test_links_below_the_experiment_folder_cannot_escape_out(data_root, tmp_path, link) -> None:
    """D2: a symbolic link below ``out/<spec>`` (an LR folder, a run's checkpoints, one of its files) leads
    elsewhere: refused in one line before anything is written there."""
    out, elsewhere = tmp_path / "O", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / link).parent.mkdir(parents=True)
    if link.endswith(".jsonl"):
        (elsewhere / "secret").write_text("SECRET\n")
        (out / link).symlink_to(elsewhere / "secret")
    else:
        (out / link).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError) as err:
        runner.run(config(), data_root=data_root, out=out, progress=False)
    one_line_error(err, elsewhere.resolve(), "outside", "symbolic link")
    assert [p.name for p in elsewhere.iterdir()] == (["secret"] if link.endswith(".jsonl") else [])
    if link.endswith(".jsonl"):
        assert (elsewhere / "secret").read_text() == "SECRET\n"


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory) -> Path:
    """A finished one-epoch run of test_resnet on BreastMNIST (read-only: tests copy it with ``run_copy``)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    train(config(), run, data_root=data_root, progress=False)
    return run


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    """A fresh copy of the finished run."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def test_report_embeds_only_the_runs_own_files(run_copy, tmp_path) -> None:
    """D8: ``figure.png -> secret`` and ``tables.md -> secret`` linked into a run are not embedded."""
    from repsim.report import build_report

    secret_png, secret_text = tmp_path / "secret.png", tmp_path / "secret.md"
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(secret_png)
    secret_text.write_text("| SECRET-TEXT | 1 |\n")
    (run_copy / "figure.png").symlink_to(secret_png)
    (run_copy / "tables.md").symlink_to(secret_text)
    page = build_report(run_copy)
    assert base64.b64encode(secret_png.read_bytes()).decode() not in page
    assert "SECRET-TEXT" not in page
    assert "Run summary" in page  # the run's own summary.json is still read
    assert "figure.png, tables.md" in page  # and the page says what it left out


def test_report_skips_a_section_it_cannot_compute(run_copy, data_root) -> None:
    """D17: 3 test samples are too few for the unbiased CKA of the before/after section: the report says so in that
    section and still holds the rest."""
    from repsim.report import build_report

    page = build_report(run_copy, data_root=data_root, cka_samples=3)
    assert "CKA before vs after" in page and "Not computed" in page
    assert "Run summary" in page and "Training curves" in page


# ------------------------------------------------------------------ D4, D3, D13: pixels and stores hold the data
def twelve_bit_folder(root: Path, n: int = 4) -> Path:
    """Two classes of 12-bit images in 16-bit PNGs: class ``dark`` a ramp over 256..1279, ``bright`` over
    3000..4023 (every pixel above 255: 8-bit conversion makes both one constant)."""
    for name, low in (("dark", 256), ("bright", 3000)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            ramp = (low + np.arange(1024).reshape(32, 32) + i).astype(np.uint16)
            Image.fromarray(ramp).save(root / name / f"{i}.png")
    with Image.open(root / "dark" / "0.png") as img:
        assert img.mode.startswith("I")  # a real 16-bit PNG
    return root


@pytest.mark.parametrize("channels", [1, 3])
def test_sixteen_bit_images_keep_their_depth(tmp_path, channels) -> None:
    """D4: 12-bit pixels reach the model scaled by 1/65535, never clipped to 255; the two classes stay apart."""
    from repsim.data import loader
    from repsim.data.datasets import ImageDataset, image_folder
    from repsim.data.transforms import build_transform

    folder = twelve_bit_folder(tmp_path / "images")
    dl = loader(str(folder), img_size=32, channels=channels, normalise=((0.0,) * channels, (1.0,) * channels),
                batch_size=8)
    x, y = next(iter(dl))
    assert x.shape == (8, channels, 32, 32)
    dark, bright = x[y == 1], x[y == 0]  # classes are the sorted folder names: bright 0, dark 1
    assert float(dark.max()) < 1300 / 65535 < 2900 / 65535 < float(bright.min())
    assert 2999 / 65535 < float(bright.min()) and float(bright.max()) < 4027 / 65535  # (resized) ramp values / 65535
    assert len(np.unique(x.numpy())) > 1000  # the ramp survives: not one constant
    source = image_folder(folder, channels=channels)
    train_view = ImageDataset(source, range(len(source)), build_transform(16, (0.0,) * channels, (1.0,) * channels,
                                                                           train=True), channels=channels)
    assert train_view[0][0].shape == (channels, 16, 16)  # the augmenting transform takes the float image too


def test_store_refuses_same_length_data_of_other_content(tmp_path) -> None:
    """D3: a TensorDataset of the same shape but other values is other data, not a reuse of the store."""
    store = tmp_path / "acts.zarr"
    extract(Tiny(), tensors(seed=0), layers=["fc1", "fc2"], store=store, progress=False)
    again = extract(Tiny(), tensors(seed=0), layers=["fc1", "fc2"], store=store, progress=False)  # same data: reused
    assert again.sizes["sample"] == 32
    with pytest.raises(ValueError) as err:
        extract(Tiny(), tensors(seed=1), layers=["fc1", "fc2"], store=store, progress=False)
    one_line_error(err, store, "other data", "content")


def test_store_refuses_an_image_folder_whose_files_were_rewritten(tmp_path) -> None:
    """D3: the PNGs of a folder rewritten in place (same names and count) are other data."""
    from repsim.data import loader

    folder = tmp_path / "images"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / name / f"{i}.png")
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4), nn.ReLU(), nn.Linear(4, 2))
    store = tmp_path / "acts.zarr"
    extract(model, loader(str(folder), img_size=8, batch_size=4), layers=["1", "3"], store=store, progress=False)
    extract(model, loader(str(folder), img_size=8, batch_size=4), layers=["1", "3"], store=store, progress=False)
    png = folder / "a" / "0.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(png)
    os.utime(png, ns=(png.stat().st_atime_ns, png.stat().st_mtime_ns + 10**9))  # a rewrite a second later
    with pytest.raises(ValueError) as err:
        extract(model, loader(str(folder), img_size=8, batch_size=4), layers=["1", "3"], store=store, progress=False)
    one_line_error(err, store, "other data", "content")


def craft(store: Path, what: str) -> None:
    """Damage the attributes or shapes of a store the way a crafted file would."""
    import zarr

    group = zarr.open_group(str(store), mode="r+")
    if what == "negative count":
        group.attrs["committed_samples"] = -5
    elif what == "text count":
        group.attrs["committed_samples"] = "32"
    elif what == "count beyond arrays":
        group.attrs["committed_samples"] = 40
    elif what == "fingerprint not json":
        group.attrs["fingerprint"] = "{not json"
    elif what == "fingerprint a list":
        group.attrs["fingerprint"] = "[1, 2]"
    else:  # a 10^12-row shape: only metadata, no data behind it
        for name in ("sample", "fc1"):
            array = group[name]
            array.resize((10**12, *array.shape[1:]))


@pytest.mark.parametrize("what", ["negative count", "text count", "count beyond arrays", "fingerprint not json",
                                  "fingerprint a list", "huge shape"])
def test_crafted_store_attributes_refused_in_one_line(tmp_path, what) -> None:
    """D13: a store's attributes and shapes are checked on open (read or resume), in one line naming the store."""
    store = tmp_path / "acts.zarr"
    extract(Tiny(), tensors(), layers=["fc1", "fc2"], store=store, progress=False)
    craft(store, what)
    with pytest.raises(ValueError) as err:
        extract(Tiny(), tensors(), layers=["fc1", "fc2"], store=store, progress=False)
    one_line_error(err, store)
    if what.startswith("fingerprint"):
        return  # reading a store does not need its fingerprint
    with pytest.raises(ValueError) as err:
        repsim.store.open_activations(store)
    one_line_error(err, store)


def test_dangling_symlink_store_refused_before_any_batch(tmp_path, monkeypatch) -> None:
    """D13: a store path that is a dangling symbolic link is refused before the first batch is computed."""
    store = tmp_path / "acts.zarr"
    store.symlink_to(tmp_path / "gone.zarr", target_is_directory=True)
    batches = []
    model = Tiny()
    model.register_forward_hook(lambda *_: batches.append(1))
    with pytest.raises(ValueError) as err:
        extract(model, tensors(), layers=["fc1", "fc2"], store=store, progress=False)
    one_line_error(err, store, "does not exist")
    assert batches == []


# ------------------------------------------------------------------ D6, D5, D15: one writer, no orphans, no hangs
HOLD = """import sys, time
from repsim.files import lock
with lock(sys.argv[1], "run"):
    print("held", flush=True)
    time.sleep(60)
"""


@contextlib.contextmanager
def held(lock_file: Path) -> Iterator[subprocess.Popen]:
    """Another process holding ``lock_file`` (as a writer of its run or store does) for the block."""
    with subprocess.Popen([sys.executable, "-c", HOLD, str(lock_file)], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            yield holder
        finally:
            holder.kill()


def test_second_writer_of_a_store_fails_at_once(tmp_path) -> None:
    """D6 for stores: a second extraction into a store another process writes fails at once, naming its pid."""
    store = tmp_path / "acts.zarr"
    with held(tmp_path / ".acts.zarr.lock") as holder:
        with pytest.raises(RuntimeError) as err:
            extract(Tiny(), tensors(), layers=["fc1", "fc2"], store=store, progress=False)
        one_line_error(err, f"pid {holder.pid}", store)
    assert not store.exists()
    assert extract(Tiny(), tensors(), layers=["fc1", "fc2"], store=store, progress=False).sizes["sample"] == 32


def test_second_writer_of_a_run_fails_at_once_naming_the_holder(data_root, tmp_path) -> None:
    """D6: while another process writes a run, a second ``train`` of the same folder fails at once in one line that
    names the holder's pid; once the holder is gone (killed: the kernel drops its lock), the run trains."""
    run = tmp_path / "run"
    with held(run / ".lock") as holder:
        start = time.perf_counter()
        with pytest.raises(RuntimeError) as err:
            train(config(), run, data_root=data_root, progress=False)
        one_line_error(err, f"pid {holder.pid}", run)
        assert time.perf_counter() - start < 2
        assert not (run / "metrics.jsonl").exists()
    assert train(config(), run, data_root=data_root, progress=False)["epochs_run"] == 1


STUDY = """import os, sys, time
from concurrent.futures import wait
from pathlib import Path

from repsim.study.scheduler import Pool


def stall(folder):
    Path(folder, str(os.getpid())).touch()
    time.sleep(120)


if __name__ == "__main__":
    pool = Pool(2, 1)
    try:
        wait([pool.submit(stall, sys.argv[1]) for _ in range(2)])
    finally:
        pool.close()
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_to_the_study_ends_its_workers(tmp_path) -> None:
    """D5: SIGTERM to a process running a study's worker pool ends its two busy workers and waits for them."""
    script, pids = tmp_path / "study.py", tmp_path / "pids"
    script.write_text(STUDY)
    pids.mkdir()
    with subprocess.Popen([sys.executable, str(script), str(pids)], env={**os.environ, "PYTHONPATH": str(REPO)},
                          stderr=subprocess.DEVNULL) as study:
        try:
            deadline = time.time() + 180  # spawned workers import torch: slow on a loaded machine
            while len(list(pids.iterdir())) < 2 and time.time() < deadline:
                time.sleep(0.1)
            workers = [int(p.name) for p in pids.iterdir()]
            assert len(workers) == 2 and all(alive(w) for w in workers)
            start = time.perf_counter()
            study.send_signal(signal.SIGTERM)
            study.wait(timeout=30)
            assert time.perf_counter() - start < 10
        finally:
            study.kill()
            workers = [int(p.name) for p in pids.iterdir()]
    try:
        assert not [w for w in workers if alive(w)]
    finally:
        for w in workers:  # without the fix they are orphans: end them here
            if alive(w):
                os.kill(w, signal.SIGKILL)


# ------------------------------------------------------------------ D7, D9, D11, D12: training cannot silently go wrong
def test_last_batch_of_one_is_dropped_for_batchnorm(data_root, tmp_path) -> None:
    """D7: ``batch_size=545`` on BreastMNIST's 546 training images leaves a last batch of 1, which BatchNorm cannot
    train on: it is dropped and the summary says so."""
    summary = train(config(batch_size=545), tmp_path / "run", data_root=data_root, progress=False)
    assert summary["train_size"] == 546 and summary["train_dropped"] == 1
    assert summary["iterations"] == 1


@pytest.mark.parametrize(("lr", "batch_size", "what"), [(1e12, 32, "loss is nan"), (1e30, 545, "predictions are NaN")])
def test_divergence_stops_the_run_in_one_line(data_root, tmp_path, lr, batch_size, what) -> None:
    """D9: a diverging run (lr 1e12) stops naming epoch, step and LR; no NaN weights are saved as best (one step
    per epoch at lr 1e30: the loss is finite, the predictions after it are not)."""
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError) as err:
        train(config(lr=lr, epochs=2, batch_size=batch_size), run, data_root=data_root, progress=False)
    one_line_error(err, run, "epoch 0", what, "lr ", "diverged")
    assert not (run / "checkpoints" / "best.pt").exists() and not (run / "backbone_best.pt").exists()


def image_classes(root: Path, counts: dict[str, int]) -> Path:
    """``root/<class>/<i>.png``: ``counts[class]`` small RGB images per class (a class of 0 is an empty folder)."""
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(root / name / f"{i}.png")
    return root


def folder_config(root: Path) -> dict:
    ((_, cfg),) = expand({**BASE, "data": {"dataset": "image_folder", "root": str(root), "img_size": 16},
                          "train": {**BASE["train"], "batch_size": 4}})
    return cfg


def test_single_class_folder_refused(tmp_path) -> None:
    """D11: a one-class image folder does not train to balanced_accuracy 1.0: refused in one line."""
    folder = image_classes(tmp_path / "images", {"only": 20})
    with pytest.raises(ValueError) as err:
        train(folder_config(folder), tmp_path / "run", progress=False)
    one_line_error(err, "single class", "only")


def test_empty_class_folder_refused(tmp_path) -> None:
    """D11: an empty class folder is not a class."""
    from repsim.data.datasets import image_folder

    folder = image_classes(tmp_path / "images", {"a": 3, "b": 3, "empty": 0})
    with pytest.raises(ValueError) as err:
        image_folder(folder)
    one_line_error(err, folder, "empty")


@pytest.mark.parametrize("held", ["summary.json", "checkpoints/last.pt"])
def test_run_without_config_yaml_is_not_resumed_or_reused(run_copy, data_root, held) -> None:
    """D12: with config.yaml deleted, a BreastMNIST run is neither reused (summary.json) nor resumed (last.pt) as a
    PneumoniaMNIST run."""
    (run_copy / "config.yaml").unlink()
    if held == "checkpoints/last.pt":
        (run_copy / "summary.json").unlink()
        torch.save({"model": {}, "state": {"epoch": 0}}, run_copy / held)
    other = config()
    other["data"]["flag"] = "pneumoniamnist"
    with pytest.raises(ValueError) as err:
        runner.train_or_reuse(other, run_copy, data_root, resume=True)
    one_line_error(err, run_copy, "no config.yaml")


# ------------------------------------------------------------------ D10, D14, D18, D16, D19: results and files exact
def _twice_worker(rank: int, out: str) -> None:
    from repsim import MinibatchCKA

    rng = np.random.default_rng(rank)
    mb = MinibatchCKA(keep_batches=True)
    for _ in range(3):
        mb.update({name: rng.standard_normal((8, 3)) for name in ("p", "q")})
    mb.all_reduce()
    first = (mb.n_samples, mb.n_batches, len(mb.batches))
    try:
        mb.all_reduce()
        second = f"reduced again: {(mb.n_samples, mb.n_batches, len(mb.batches))}"
    except RuntimeError as err:
        second = str(err)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"first": first, "second": second}))


def test_second_all_reduce_refused(run_gloo, tmp_path) -> None:
    """D10: a second all_reduce would double n_samples, n_batches and the batch records (narrowing the bootstrap
    CI); every rank refuses it in one line, and none hangs."""
    run_gloo(_twice_worker, str(tmp_path))
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["first"] == [48, 6, 6]
        assert "\n" not in got["second"] and got["second"].startswith("all_reduce: this MinibatchCKA already"), got


def test_truncated_image_named(tmp_path) -> None:
    """D16: "image file is truncated" names the image."""
    from repsim.data import loader

    folder = image_classes(tmp_path / "images", {"a": 4, "b": 4})
    png = folder / "b" / "2.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(png)
    png.write_bytes(png.read_bytes()[:300])
    with pytest.raises(ValueError) as err:
        list(loader(str(folder), img_size=8, batch_size=4))
    one_line_error(err, png, "replace or remove")


@pytest.mark.parametrize("damage", ["summary", "results", "metrics", "state"])
def test_damaged_run_files_named(run_copy, tmp_path, damage) -> None:
    """D16: an empty summary.json, a results.json of ``{}``, a metrics.jsonl line cut short and a checkpoint of
    another head each fail in one line naming the file (not "Expecting value", "'dataset'", "Unterminated string"
    or the first line of torch's state-dict error)."""
    from repsim.report import build_report
    from repsim.train.runs import load_run
    from repsim.train.table import collect

    if damage == "summary":
        (run_copy / "summary.json").write_text("")
        with pytest.raises(ValueError) as err:
            runner.train_or_reuse(config(), run_copy, None)
        one_line_error(err, run_copy / "summary.json", "not valid JSON")
    elif damage == "results":
        (tmp_path / "exp").mkdir()
        (tmp_path / "exp" / "results.json").write_text("{}")
        with pytest.raises(ValueError) as err:
            collect([tmp_path / "exp"])
        one_line_error(err, tmp_path / "exp" / "results.json", "dataset")
    elif damage == "metrics":
        with open(run_copy / "metrics.jsonl", "a") as fh:
            fh.write('{"epoch": 1, "train_lo')
        with pytest.raises(ValueError) as err:
            build_report(run_copy)
        one_line_error(err, run_copy / "metrics.jsonl", "line 2")
    else:
        best = run_copy / "checkpoints" / "best.pt"
        state = torch.load(best, weights_only=True)
        state["model"] = {k: torch.cat([v, v]) if k.startswith("head") else v for k, v in state["model"].items()}
        torch.save(state, best)
        with pytest.raises(ValueError) as err:
            load_run(run_copy, "best", part="classifier")
        one_line_error(err, best, "size mismatch", "head")


def test_study_with_zero_jobs_named(tmp_path) -> None:
    """D16: ``study --jobs 0`` says what is wrong, not "integer division or modulo by zero"."""
    proc = subprocess.run([sys.executable, "-m", "repsim", "study", "--preset", "tiny", "--jobs", "0", "--out",
                           str(tmp_path / "S")], capture_output=True, text=True, env={**os.environ,
                                                                                     "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "jobs must be >= 1" in proc.stderr and len(proc.stderr.splitlines()) == 1


def cka_dataset(n: int = 3) -> xr.Dataset:
    names = [f"l{i}" for i in range(n)]
    values = np.random.default_rng(0).random((n, n))
    return xr.Dataset({"cka": (("layer_a", "layer_b"), values)}, coords={"layer_a": names, "layer_b": names})


def test_netcdf3_files_load(tmp_path) -> None:
    """D18: ``to_netcdf(engine="scipy")`` (netCDF3) output loads, as the README says ``to_netcdf`` files do."""
    import repsim

    ds = cka_dataset()
    ds.to_netcdf(tmp_path / "cka3.nc", engine="scipy")
    xr.testing.assert_identical(repsim.load(tmp_path / "cka3.nc"), ds)


def test_netcdf_external_storage_refused(tmp_path) -> None:
    """D14: an HDF5 variable stored in another file (external storage) is never read: it returned that file's
    bytes."""
    import h5py

    import repsim

    secret = tmp_path / "secret"
    secret.write_bytes(b"SECRET-HOSTNAME\n")
    path = tmp_path / "crafted.nc"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("cka", shape=(16,), dtype="u1", external=[(str(secret), 0, 16)])
    with pytest.raises(ValueError) as err:
        repsim.load(path)
    one_line_error(err, path, "outside the file")


def test_netcdf_decompression_bomb_refused(tmp_path) -> None:
    """D14: a small file declaring more than 1 GiB of (compressed or unwritten) data is refused before reading."""
    import h5py

    import repsim

    path = tmp_path / "bomb.nc"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("cka", shape=(12_000, 12_000), dtype="f8", chunks=(1000, 1000), compression="gzip")
    assert path.stat().st_size < 100_000
    with pytest.raises(ValueError) as err:
        repsim.load(path)
    one_line_error(err, path, "GiB", "before decompressing")


def test_heatmap_of_many_layers_is_bounded() -> None:
    """D14: the figure of a 1,200-layer heatmap grew with the layer count (421 in a side, > 6 GB to render)."""
    from repsim.plot import heatmap

    fig = heatmap(cka_dataset(1200)["cka"], annotate="none")
    assert max(fig.get_size_inches()) <= 40


def test_api_gaps_get_one_line_errors() -> None:
    """D19: each call that used to go through (or fail deep inside numpy or torch) gets a one-line error."""
    from repsim import MinibatchCKA, models
    from repsim.data import loader
    from repsim.plot import heatmap

    rng = np.random.default_rng(0)
    mb = MinibatchCKA(keep_batches=True)
    for _ in range(3):
        mb.update({name: rng.standard_normal((8, 3)) for name in ("p", "q")})
    state = mb.state_dict()
    state["layers_a"] = ["p", "q", "r"]  # three names for 2x2 tensors
    with pytest.raises(ValueError) as err:
        MinibatchCKA(keep_batches=True).load_state_dict(state)
    one_line_error(err, "cross", "(2, 2)", "(3, 3)")
    with pytest.raises(ValueError) as err:
        models.create("test_resnet", in_chans=0, img_size=28)
    one_line_error(err, "in_chans", "0")
    with pytest.raises(ValueError) as err:
        loader("synthetic", n_samples=-3, img_size=8)
    one_line_error(err, "n_samples", "-3")
    with pytest.raises(ValueError) as err:
        mb.bootstrap(n_boot=True)
    one_line_error(err, "n_boot", "True")
    with pytest.raises(ValueError) as err:
        heatmap(mb.compute(), vmin=1.0, vmax=0.0)
    one_line_error(err, "vmin", "vmax")


def _stall_worker(rank: int, port: int, out: str) -> None:
    from repsim.train.utils import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      REPSIM_COLLECTIVE_TIMEOUT="3")
    distributed()
    if rank == 1:  # the stalled rank: never reaches the collective
        time.sleep(60)
        return
    start = time.perf_counter()
    try:
        dist.barrier()
        what = "barrier passed"
    except RuntimeError as err:
        what = str(err)
    Path(out, "rank0.json").write_text(json.dumps({"seconds": time.perf_counter() - start, "error": what}))


def test_stalled_rank_times_out_the_collective(tmp_path, free_port) -> None:
    """D15: under torch.distributed (gloo), a rank stalled before a collective made the other wait 30 min; with
    REPSIM_COLLECTIVE_TIMEOUT=3 the waiting rank fails after about 3 s."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx = mp.spawn(_stall_worker, args=(free_port, str(tmp_path)), nprocs=2, join=False)
        deadline = time.monotonic() + 60
        while not (tmp_path / "rank0.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        for proc in ctx.processes:
            proc.kill()
            proc.join()
    assert (tmp_path / "rank0.json").exists(), "rank 0 still blocked in the collective after 60 s"
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert got["error"] != "barrier passed" and got["seconds"] < 20, got
