"""Trust: what repsim reads cannot run code, what it writes stays under --out, activation stores know what made
them and survive a kill at any write, MinibatchCKA states are snapshots and refuse mismatched ranks, and every bad
input gets a one-line error naming the file, key or value."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import xarray as xr
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import repsim
import repsim.store
from repsim import MinibatchCKA, models
from repsim.capture import extract
from repsim.data.datasets import medmnist_file
from repsim.files import load_torch
from repsim.train import runner
from repsim.train.config import expand, load_spec, parse_overrides
from repsim.train.loop import train
from repsim.train.runs import load_run

BASE = {"name": "trust", "data": {"dataset": "medmnist", "root": "medmnist", "flag": "breastmnist", "img_size": 28},
        "model": {"name": "test_resnet", "kwargs": {}, "pretrained": False},
        "train": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "num_workers": 0}}


def one_line_error(excinfo: pytest.ExceptionInfo, *names: object) -> str:
    """The message of a raised error, checked to be one line naming each of ``names``."""
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, (name, msg)
    return msg


# ------------------------------------------------------------------------------------- 1. pickles never run
class Payload:
    """Unpickling this creates ``marker``: the stand-in for code a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def plant(path: Path, marker: Path, content: dict | None = None) -> None:
    """Replace ``path`` by a checkpoint of ``content`` (default: a small state dict) carrying a payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(content or {"weight": torch.zeros(2)}), "payload": Payload(marker)}, path)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_payload_is_live(tmp_path) -> None:
    """The payload really runs when unpickled unsafely, so its absence below proves that repsim refused it."""
    plant(tmp_path / "x.pt", tmp_path / "pwned")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert (tmp_path / "pwned").exists()


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """A trainer run folder (the files load_run reads) of a small test_resnet classifier, without training."""
    run = tmp_path / "run"
    backbone = models.create("test_resnet", pretrained=False, img_size=28, in_chans=1)
    model = models.build_classifier(backbone, "unfrozen-linear", 2)
    record = {"name": "test_resnet", "kwargs": {}, "img_size": 28, "in_chans": 1, "scenario": "unfrozen-linear",
              "num_classes": 2, "classifier": {}, "freeze_blocks": None, "decapitate": None}
    (run / "checkpoints").mkdir(parents=True)
    (run / "model.json").write_text(json.dumps(record))
    for name in ("backbone_init.pt", "backbone_best.pt"):
        torch.save(backbone.state_dict(), run / name)
    torch.save({"model": model.state_dict()}, run / "checkpoints" / "best.pt")
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")},
               run / "checkpoints" / "init.pt")
    load_run(run, "best", part="classifier")  # the clean folder loads
    return run


def test_classifier_checkpoint_payload_refused(run_folder, tmp_path) -> None:
    best = run_folder / "checkpoints" / "best.pt"
    plant(best, tmp_path / "pwned", {"model": {}})
    with pytest.raises(ValueError) as err:
        load_run(run_folder, "best", part="classifier")
    one_line_error(err, best)
    assert not (tmp_path / "pwned").exists()


@pytest.fixture(autouse=True)
def one_thread(request: pytest.FixtureRequest) -> None:
    """The steps here are tiny: one intra-op thread avoids oversubscribing the 2 CI cores (10x faster under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(before))


@pytest.mark.parametrize("name", ["backbone_best.pt", "backbone_init.pt"])
def test_backbone_checkpoint_payload_refused(run_folder, tmp_path, name) -> None:
    which = "best" if name == "backbone_best.pt" else "init"
    plant(run_folder / name, tmp_path / "pwned")
    for part in ("backbone", "classifier"):
        with pytest.raises(ValueError) as err:
            load_run(run_folder, which, part=part)
        one_line_error(err, run_folder / name, "refuses")
    assert not (tmp_path / "pwned").exists()
    load_run(run_folder, "init" if which == "best" else "best")  # the other, intact file still loads


@pytest.mark.parametrize("damage", ["payload", "truncated"])
def test_create_with_bad_checkpoint(tmp_path, damage) -> None:
    path = tmp_path / "backbone.pt"
    state = models.create("test_resnet", img_size=28, in_chans=1).state_dict()
    torch.save(state, path)
    models.create("test_resnet", checkpoint=path, img_size=28, in_chans=1)  # the intact file loads
    if damage == "payload":
        plant(path, tmp_path / "pwned", dict(state))
    else:
        truncate(path)
    with pytest.raises(ValueError) as err:
        models.create("test_resnet", checkpoint=path, img_size=28, in_chans=1)
    one_line_error(err, path, "refuses" if damage == "payload" else "truncated")
    assert not (tmp_path / "pwned").exists()


def test_resume_from_bad_last_checkpoint(data_root, tmp_path) -> None:
    ((_, cfg),) = expand(BASE)
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.pt"
    plant(last, tmp_path / "pwned", {"model": {}, "state": {"epoch": 0}})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))  # a run without it is refused before last.pt is read
    with pytest.raises(ValueError) as err:
        train(cfg, run, data_root=data_root, resume=True, progress=False)
    one_line_error(err, last, "refuses")
    assert not (tmp_path / "pwned").exists()
    torch.save({"model": {}, "state": {"epoch": 0}}, last)
    truncate(last)
    with pytest.raises(ValueError) as err:
        train(cfg, run, data_root=data_root, resume=True, progress=False)
    one_line_error(err, last, "truncated")


def test_minibatch_state_file_payload_refused(tmp_path) -> None:
    rng = np.random.default_rng(0)
    mb = MinibatchCKA()
    mb.update({"p": rng.standard_normal((8, 5)), "q": rng.standard_normal((8, 3))})
    path = tmp_path / "state.pt"
    torch.save(mb.state_dict(), path)
    back = MinibatchCKA()
    back.load_state_dict(load_torch(path))  # the clean state file loads
    xr.testing.assert_identical(back.compute(), mb.compute())
    plant(path, tmp_path / "pwned", mb.state_dict())
    legacy = tmp_path / "state.pkl"  # torch's legacy (non-zip) format is a stream of protocol-2 pickles
    with open(legacy, "wb") as fh:
        pickle.dump({**mb.state_dict(), "payload": Payload(tmp_path / "pwned")}, fh, protocol=2)
    for bad in (path, legacy):
        with pytest.raises(ValueError) as err:
            load_torch(bad)
        one_line_error(err, bad, "refuses")
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------- 2. outputs stay under --out
def with_value(spec: dict, key: str, value: object) -> dict:
    """A deep copy of ``spec`` with the dotted ``key`` set to ``value``."""
    out = json.loads(json.dumps(spec))
    *parents, leaf = key.split(".")
    node = out
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return out


def test_spec_name_must_be_a_slug(tmp_path) -> None:
    out = tmp_path / "out"
    for name in ("../../x", str(tmp_path / "abs"), "a/b", ".hidden", ""):
        with pytest.raises(ValueError) as err:
            runner.run({**BASE, "name": name}, out=out, progress=False)
        one_line_error(err, "spec name", repr(name), "cannot name an output folder")
    spec = tmp_path / "escape.yaml"
    spec.write_text(yaml.safe_dump({**BASE, "name": "../../x"}))
    with pytest.raises(ValueError) as err:
        load_spec(spec)
    one_line_error(err, spec, "spec name", "'../../x'")
    assert not out.exists() and not (tmp_path / "abs").exists()


def test_grid_labels_must_be_slugs(tmp_path) -> None:
    out = tmp_path / "out"
    for axis, values, label in (("data.flag", ["breastmnist", "../x"], "../x"),
                                ("model.classifier", [{"name": "../../../x"}], "../../../x"),
                                ("model.kwargs", [{"depth": "x/y"}], "x/y")):
        spec = {**BASE, "grid": {axis: values}}
        with pytest.raises(ValueError) as err:
            expand(spec)
        one_line_error(err, f"grid axis {axis}", repr(label), "cannot name an output folder")
        with pytest.raises(ValueError):
            runner.run(spec, out=out, progress=False)
    assert not out.exists()


def test_overrides_cannot_escape(tmp_path) -> None:
    out = tmp_path / "out"
    spec = {**BASE, "grid": {"data.flag": ["breastmnist"]}}
    assert parse_overrides(["name=../../x"]) == {"name": "../../x"}  # parsed fine, refused when expanded
    for item, key, value in (("name=../../x", "name", "../../x"), (f"name={tmp_path / 'abs'}", "name", None),
                             ("data.flag=../../x", "data.flag", "../../x"),
                             ("data.flag={flag: ../../x}", "data.flag", "../../x")):
        with pytest.raises(ValueError) as err:
            runner.run(spec, out=out, overrides=[item], progress=False)
        one_line_error(err, f"override {key}", "cannot name an output folder", *([repr(value)] if value else []))
    assert not out.exists() and not (tmp_path / "abs").exists()


def test_experiment_folder_resolved_inside_out(tmp_path) -> None:
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    assert runner.experiment_dir(out, "trust", "trust") == out / "trust" / "trust"
    (out / "trust").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError) as err:
        runner.experiment_dir(out, "trust", "trust")
    one_line_error(err, out / "trust" / "trust", outside.resolve(), "outside --out")
    with pytest.raises(ValueError) as err:
        runner.run(BASE, out=out, progress=False)
    one_line_error(err, "outside --out")
    (out / "inner").mkdir()
    (out / "inner" / "point").symlink_to(outside, target_is_directory=True)  # a link one level further down
    with pytest.raises(ValueError) as err:
        runner.experiment_dir(out, "inner", "point")
    one_line_error(err, "outside --out")
    assert list(outside.iterdir()) == []
    link = tmp_path / "link"  # --out itself may be a link: the folder is checked against where it resolves
    link.symlink_to(out, target_is_directory=True)
    assert runner.experiment_dir(link, "fresh", "point") == link / "fresh" / "point"
    (out / "ok").mkdir()
    (out / "alias").symlink_to(out / "ok", target_is_directory=True)  # a link that stays inside is fine
    assert runner.experiment_dir(out, "alias", "point") == out / "alias" / "point"


# ------------------------------------------------------------------------------- 3. stores know what made them
LAYERS = ["fc1", "fc2"]


class Tiny(nn.Module):
    """Two linear layers with weights drawn from ``seed``; every instance has the same name."""

    name = "tiny"

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Scale:
    """A transform with a stable repr (what a store's fingerprint records of a transform)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def __repr__(self) -> str:
        return f"Scale({self.factor})"


class Points(Dataset):
    """``n`` fixed samples ``(x, label)`` read, nominally, from ``file``, passed through ``transform``."""

    def __init__(self, n: int = 30, file: str = "points.npy", transform: Scale | None = None) -> None:
        self.x = torch.from_numpy(np.random.default_rng(0).standard_normal((n, 6)).astype(np.float32))
        self.y = torch.arange(n) % 3
        self.file, self.transform = file, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        return (x if self.transform is None else self.transform(x)), self.y[i]


def loader(dataset: Dataset | None = None, batch_size: int = 8) -> DataLoader:
    return DataLoader(Points() if dataset is None else dataset, batch_size=batch_size, shuffle=False)


def committed(path: Path) -> int:
    import zarr

    return int(zarr.open_group(str(path), mode="r").attrs[repsim.store.COMMITTED])


def test_store_refuses_another_model_layers_pool_or_data(tmp_path) -> None:
    path = tmp_path / "acts.zarr"
    first = extract(Tiny(0), loader(), layers=LAYERS, store=path, progress=False).load()
    again = extract(Tiny(0), loader(), layers=LAYERS, store=path, progress=False).load()  # the same call reuses it
    xr.testing.assert_identical(again, first)
    cases = [
        (dict(model=Tiny(1)), ["other weights"]),  # same class, same name, other weights
        (dict(layers=["fc1"]), ["other layers", "fc2"]),
        (dict(pool="gap"), ["another pooling", "'flatten'", "'gap'"]),
        (dict(data=loader(Points(n=40))), ["other data", "length"]),
        (dict(data=loader(Points(file="scans.npy"))), ["other data", "file", "scans.npy"]),
        (dict(data=loader(TensorDataset(Points().x, Points().y))), ["other data", "class", "TensorDataset"]),
    ]
    for change, names in cases:
        args = {"model": Tiny(0), "data": loader(), "layers": LAYERS, "pool": "flatten", **change}
        with pytest.raises(ValueError) as err:
            extract(args["model"], args["data"], layers=args["layers"], pool=args["pool"], store=path, progress=False)
        msg = one_line_error(err, path, *names)
        headings = ("another model", "other weights", "other layers", "another pooling", "other data")
        assert [h for h in headings if h in msg] == names[:1], msg  # what differs, and nothing else
    assert committed(path) == 30
    xr.testing.assert_identical(repsim.store.open_activations(path).load(), first)


def test_store_refuses_another_transform(tmp_path) -> None:
    path = tmp_path / "acts.zarr"
    extract(Tiny(0), loader(Points(transform=Scale(1.0))), layers=LAYERS, store=path, progress=False)
    for transform in (Scale(2.0), None):
        with pytest.raises(ValueError) as err:
            extract(Tiny(0), loader(Points(transform=transform)), layers=LAYERS, store=path, progress=False)
        one_line_error(err, path, "other data", "transform", "Scale(1.0)", repr(transform))
    assert committed(path) == 30


def test_store_from_elsewhere_refused(tmp_path) -> None:
    foreign = tmp_path / "foreign.zarr"
    xr.Dataset({"fc1": (("sample", "f"), np.ones((4, 5), np.float32))},
               coords={"sample": np.arange(4)}).to_zarr(foreign, mode="w", consolidated=False)
    plain = tmp_path / "plain.zarr"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a store")
    for path, why in ((foreign, "not a fingerprinted repsim extraction"), (plain, "is not a zarr store")):
        with pytest.raises(ValueError) as err:
            extract(Tiny(0), loader(), layers=LAYERS, store=path, progress=False)
        one_line_error(err, path, why)
    np.testing.assert_array_equal(xr.open_zarr(foreign, consolidated=False)["fc1"].values, 1.0)
    assert [p.name for p in plain.iterdir()] == ["notes.txt"]


# -------------------------------------------------------------------------- 4. a kill at any write, then resume
class Killed(Exception):
    """Stands for the process being killed between two writes of a store."""


def watch_writes(monkeypatch: pytest.MonkeyPatch, kill_after: int | None = None) -> list[str]:
    """Log the store's writes (each variable's rows, then the commit) into the returned list; with ``kill_after``,
    raise ``Killed`` instead of the write that would follow ``kill_after`` writes."""
    log: list[str] = []
    write, commit = repsim.store._write_variable, repsim.store._commit

    def check() -> None:
        if kill_after is not None and len(log) >= kill_after:
            raise Killed(f"killed after {len(log)} writes")

    def write_variable(array: object, start: int, values: np.ndarray) -> None:
        check()
        write(array, start, values)
        log.append(array.basename)

    def commit_count(group: object, n: int) -> None:
        check()
        commit(group, n)
        log.append("commit")

    monkeypatch.setattr(repsim.store, "_write_variable", write_variable)
    monkeypatch.setattr(repsim.store, "_commit", commit_count)
    return log


BATCH_WRITES = ["fc1", "fc2", "label", "sample", "commit"]  # one appended batch: variables in sorted order, then commit
APPENDS = 3  # 30 samples in batches of 8: the first batch creates the store, three are appended


def test_write_points_are_counted(tmp_path, monkeypatch) -> None:
    log = watch_writes(monkeypatch)
    extract(Tiny(0), loader(), layers=["fc2", "fc1"], store=tmp_path / "acts.zarr", progress=False)
    assert log == BATCH_WRITES * APPENDS


def check_equal(got: xr.Dataset, want: xr.Dataset, exact: bool = True) -> None:
    """``got`` (read back from a store) holds exactly the samples, labels and layers of ``want``."""
    assert list(got.data_vars) == list(want.data_vars)
    np.testing.assert_array_equal(got["sample"].values, np.arange(want.sizes["sample"]))
    np.testing.assert_array_equal(got["label"].values, want["label"].values)
    for name in want.data_vars:
        values = got[name].values
        assert np.isfinite(values).all() and (np.abs(values).sum(1) > 0).all(), name
        if exact:
            np.testing.assert_array_equal(values, want[name].values)
        else:  # other batch sizes may change the last bits of a matmul
            np.testing.assert_allclose(values, want[name].values, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kill_after", range(len(BATCH_WRITES) * APPENDS))
def test_kill_at_any_write_then_resume_equals_uninterrupted(tmp_path, monkeypatch, kill_after) -> None:
    want = extract(Tiny(0), loader(), layers=LAYERS, progress=False)
    clean = extract(Tiny(0), loader(), layers=LAYERS, store=tmp_path / "clean.zarr", progress=False).load()
    path = tmp_path / "acts.zarr"
    with monkeypatch.context() as patch:
        watch_writes(patch, kill_after)
        with pytest.raises(Killed):
            extract(Tiny(0), loader(), layers=LAYERS, store=path, progress=False)
    done = 8 * (1 + kill_after // len(BATCH_WRITES))  # the created batch and every appended batch committed
    assert committed(path) == done
    partial = repsim.store.open_activations(path).load()  # readers see the committed rows only
    check_equal(partial, want.isel(sample=slice(0, done)))
    got = extract(Tiny(0), loader(), layers=LAYERS, store=path, progress=False).load()
    check_equal(got, want)
    xr.testing.assert_identical(got, clean)
    assert committed(path) == 30


def test_resume_with_other_batches_and_a_stale_temporary(tmp_path, monkeypatch) -> None:
    want = extract(Tiny(0), loader(), layers=LAYERS, progress=False)
    path = tmp_path / "acts.zarr"
    stale = path.with_name(f".{path.name}.k1ll3d.tmp")  # what a kill while the first batch was written leaves
    stale.mkdir()
    (stale / "zarr.json").write_text('{"half written')
    for batch_size, kill_after, done in ((8, 6, 16), (5, 7, 20)):
        with monkeypatch.context() as patch:
            watch_writes(patch, kill_after)
            with pytest.raises(Killed):
                extract(Tiny(0), loader(batch_size=batch_size), layers=LAYERS, store=path, progress=False)
        assert committed(path) == done
        assert not stale.exists()
    stale.mkdir()  # a stale temporary next to an existing store is no part of it
    (stale / "zarr.json").write_text('{"half written')
    got = extract(Tiny(0), loader(batch_size=7), layers=LAYERS, store=path, progress=False).load()
    check_equal(got, want, exact=False)
    assert committed(path) == 30


# ------------------------------------------------------------------- 5. mismatched ranks raise, never hang
# rank 1's difference from rank 0 (layers p, q; unbiased; no kept batches): its MinibatchCKA kwargs and layers
MISMATCHES: dict[str, tuple[dict, list[str], str]] = {
    "layer order": ({}, ["q", "p"], "layers_a"),
    "layer names": ({}, ["p", "r"], "layers_a"),
    "estimator": ({"estimator": "biased"}, ["p", "q"], "estimator"),
    "keep_batches": ({"keep_batches": True}, ["p", "q"], "keep_batches"),
    "none": ({}, ["p", "q"], ""),  # the same state: the group still works after the refusals
}


def _mismatch_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rng = np.random.default_rng(rank)
        results = {}
        for case, (kwargs, layers, _) in MISMATCHES.items():
            mb = MinibatchCKA(**kwargs) if rank == 1 else MinibatchCKA()
            mb.update({name: rng.standard_normal((8, 3)) for name in (layers if rank == 1 else ["p", "q"])})
            try:
                mb.all_reduce()
                results[case] = f"reduced {mb.n_samples} samples"
            except ValueError as err:
                results[case] = str(err)
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_all_reduce_mismatch_raises_on_every_rank(tmp_path, free_port: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ctx = mp.spawn(_mismatch_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=False)
        deadline = time.monotonic() + 180
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail("all_reduce with mismatched states hung for 180 s")
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case, (_, _, key) in MISMATCHES.items():
            msg = results[case]
            if not key:
                assert msg == "reduced 16 samples", (rank, msg)
                continue
            assert "\n" not in msg and msg.startswith("all_reduce: rank 1 differs") and key in msg, (rank, case, msg)


# -------------------------------------------------------------------- 6. MinibatchCKA state: snapshot, round trip
@pytest.mark.parametrize("keep_batches", [False, True])
def test_state_dict_is_a_snapshot_and_round_trips(tmp_path, keep_batches) -> None:
    rng = np.random.default_rng(1)
    batches = [{"p": rng.standard_normal((8, 5)), "q": rng.standard_normal((8, 3))} for _ in range(12)]
    mb = MinibatchCKA(keep_batches=keep_batches)
    for batch in batches[:11]:
        mb.update(batch)
    state = mb.state_dict()
    want = mb.compute()
    want_boot = mb.bootstrap(n_boot=100, seed=1) if keep_batches else None
    mb.update(batches[11])  # after the snapshot: the saved state must not move
    assert mb.n_batches == 12 and int(state["counts"][1]) == 11 and int(state["counts"][0]) == 88
    assert len(state["batches"]) == (11 if keep_batches else 0)
    path = tmp_path / "state.pt"
    torch.save(state, path)
    for source in (state, torch.load(path, weights_only=True)):
        back = MinibatchCKA(keep_batches=keep_batches)
        back.load_state_dict(source)
        xr.testing.assert_identical(back.compute(), want)
        if keep_batches:
            xr.testing.assert_identical(back.bootstrap(n_boot=100, seed=1), want_boot)
        else:
            with pytest.raises(RuntimeError, match="keep_batches"):
                back.bootstrap(n_boot=100)
        back.update(batches[11])  # a restored state continues exactly
        xr.testing.assert_identical(back.compute(), mb.compute())
    assert int(state["counts"][1]) == 11  # restoring and updating copies did not touch the snapshot
    if not keep_batches:
        with pytest.raises(ValueError, match="without keep_batches"):
            MinibatchCKA(keep_batches=True).load_state_dict(state)
    with pytest.raises(ValueError) as err:
        MinibatchCKA(estimator="biased").load_state_dict(state)
    one_line_error(err, "estimator", "'unbiased'", "'biased'")


# ------------------------------------------------------------------------------- 7. bad input: one-line errors
BAD_VALUES = [
    ("train.lr", 0, "a number > 0"),
    ("train.lr", -1, "a number > 0"),
    ("train.lr", "1e-3", "write 1.0e-3"),
    ("train.weight_decay", -5, "a number >= 0"),
    ("train.epochs", "five", "an integer >= 1"),
    ("train.epochs", 0, "an integer >= 1"),
    ("train.epochs", 2.5, "an integer >= 1"),
    ("train.epochs", True, "an integer >= 1"),
    ("train", 5, "must be a mapping"),
    ("train.batch_size", 0, "an integer >= 1"),
    ("train.eval_batch_size", -1, "an integer >= 1 or null"),
    ("train.seeds", 0, "an integer >= 1"),
    ("train.patience", 0, "an integer >= 1"),
    ("train.max_plateaus", 0, "an integer >= 1"),
    ("train.lr_grid", [1e-3, 0], "numbers > 0"),
    ("train.lr_grid", [1e-3, -1e-4], "numbers > 0"),
    ("train.lr_grid", [], "non-empty list"),
    ("train.amp", "yes", "true or false"),
    ("train.optimizer", "sgd", "unknown train keys"),
    ("data.img_size", 0, "an integer >= 1"),
    ("data.img_size", "big", "an integer >= 1"),
    ("model.scenario", "sideways", "unknown scenario"),
    ("model.freeze_blocks", -1, "an integer >= 0 or null"),
    ("knn.k", 0, "an integer >= 1"),
    ("kind", "eval", "kind must be one of"),
]
# keys whose message names them in another way than the dotted key
NAMED_BY = {"train.optimizer": "train keys ['optimizer']", "model.scenario": "scenario 'sideways'"}


@pytest.mark.parametrize(("key", "value", "why"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_spec_values_checked(key, value, why) -> None:
    with pytest.raises(ValueError) as err:
        expand(with_value(BASE, key, value))
    one_line_error(err, NAMED_BY.get(key, key), why)


def test_spec_file_errors_name_the_file(tmp_path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: trust\ntrain: {lr: 1.0e-3\n")
    with pytest.raises(ValueError) as err:
        load_spec(broken)
    one_line_error(err, broken, "not valid YAML", "line")
    listing = tmp_path / "listing.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ValueError) as err:
        load_spec(listing)
    one_line_error(err, listing, "mapping")
    for name, spec, key in (("bad_value.yaml", with_value(BASE, "train.epochs", 0), "train.epochs"),
                            ("bad_grid.yaml", {**BASE, "grid": {"train.lr": [1.0e-3, -1]}}, "train.lr")):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(spec))
        with pytest.raises(ValueError) as err:
            load_spec(path)
        one_line_error(err, path, key)
        with pytest.raises(ValueError) as err:
            runner.run(path, out=tmp_path / "out", progress=False)
        one_line_error(err, path, key)
    assert not (tmp_path / "out").exists()


def test_override_errors_name_the_override(tmp_path) -> None:
    assert parse_overrides(["train.lr=1e-3", "model.kwargs={}"]) == {"train.lr": 1e-3, "model.kwargs": {}}
    for item, why in (("train.lr", "not key=value"), ("=3", "not key=value"), ("train.lr=[1,", "not valid YAML"),
                      ("--resume", "unknown option")):
        with pytest.raises(ValueError) as err:
            parse_overrides([item])
        one_line_error(err, repr(item), why)
    for item, key in (("train.lr=-1", "train.lr"), ("train.epochs=five", "train.epochs"), ("train=5", "train"),
                      ("train.optimizr=adam", "train.optimizr"), ("data.img_size=0", "data.img_size")):
        with pytest.raises(ValueError) as err:
            expand(BASE, parse_overrides([item]))
        one_line_error(err, f"override {key}:")
        with pytest.raises(ValueError) as err:
            runner.run(BASE, out=tmp_path / "out", overrides=[item], progress=False)
        one_line_error(err, f"override {key}:")
    assert not (tmp_path / "out").exists()


def test_changed_lr_warns_before_replacing_results(data_root, tmp_path) -> None:
    ((_, cfg),) = expand(BASE)
    exp = tmp_path / "exp"
    results = exp / "results.json"
    runner.run_experiment(cfg, exp, data_root=data_root, progress=False)  # no earlier results: no warning
    runner.run_experiment(cfg, exp, data_root=data_root, progress=False)  # the same LR again: no warning
    ((_, other),) = expand(BASE, {"train.lr": 1e-2})
    with pytest.warns(UserWarning, match=re.escape(f"replacing {results} (lr 0.001 -> 0.01)")):
        runner.run_experiment(other, exp, data_root=data_root, progress=False)
    assert json.loads(results.read_text())["lr"] == 0.01
    results.write_text("{ not json")
    with pytest.warns(UserWarning, match=re.escape(f"replacing {results}, which is not valid JSON")):
        runner.run_experiment(other, exp, data_root=data_root, progress=False)
    assert json.loads(results.read_text())["lr"] == 0.01


def medmnist_arrays(sizes: tuple[int, int, int] = (12, 6, 6)) -> dict[str, np.ndarray]:
    """MedMNIST's six arrays for small random 8x8 gray images with labels 0..2."""
    rng = np.random.default_rng(0)
    out = {}
    for split, n in zip(("train", "val", "test"), sizes):
        out[f"{split}_images"] = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
        out[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1)
    return out


def test_npz_under_any_name_and_corrupt_npz(tmp_path) -> None:
    arrays = medmnist_arrays()
    path = tmp_path / "my_scans.data"  # any name, any suffix
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    src = medmnist_file(path)
    assert (src.info.name, src.info.task, src.info.classes, src.info.channels) == \
        ("my_scans", "multiclass", ["0", "1", "2"], 1)
    np.testing.assert_array_equal(src.images, np.concatenate([arrays[f"{s}_images"] for s in ("train", "val", "test")]))
    assert {s: len(v) for s, v in src.official.items()} == {"train": 12, "val": 6, "test": 6}

    good = path.read_bytes()
    with open(tmp_path / "compressed.npz", "wb") as fh:
        np.savez_compressed(fh, **arrays)
    flipped = bytearray((tmp_path / "compressed.npz").read_bytes())
    flipped[200:400] = bytes(b ^ 0xFF for b in flipped[200:400])  # damage inside the deflated data
    marker = tmp_path / "pwned"
    variants: dict[str, tuple[object, str]] = {
        "truncated.npz": (good[: len(good) // 2], "truncated or corrupt"),
        "flipped.npz": (bytes(flipped), "truncated or corrupt"),
        "text.npz": (b"just some text, not an archive\n" * 4, "not an .npz archive"),
        "objects.npz": ({**arrays, "train_labels": np.array([Payload(marker)] * 12, dtype=object)}, "object arrays"),
        "single.npz": (arrays["train_images"], "single .npy array"),
        "partial.npz": ({"train_images": arrays["train_images"]}, "missing arrays"),
    }
    for name, (content, why) in variants.items():
        bad = tmp_path / name
        with open(bad, "wb") as fh:
            if isinstance(content, bytes):
                fh.write(content)
            elif isinstance(content, dict):
                np.savez(fh, **content)
            else:
                np.save(fh, content)
        with pytest.raises(ValueError) as err:
            medmnist_file(bad)
        msg = one_line_error(err, bad, why)
        assert "allow_pickle" not in msg, msg
    assert not marker.exists()


def test_real_medmnist_file_under_another_name(data_root, tmp_path) -> None:
    other = tmp_path / "other.npz"
    shutil.copy(data_root / "medmnist" / "breastmnist.npz", other)
    src, ref = medmnist_file(other), medmnist_file(data_root / "medmnist" / "breastmnist.npz")
    assert ref.info.name == "breastmnist" and src.info.name == "other"
    assert (src.info.task, src.info.classes, src.info.metric) == (ref.info.task, ref.info.classes, ref.info.metric)
    np.testing.assert_array_equal(src.images, ref.images)
    np.testing.assert_array_equal(src.targets, ref.targets)
    assert src.ids == ref.ids and src.info.mean == ref.info.mean and src.info.std == ref.info.std
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(src.official[split], ref.official[split])


def test_integer_and_empty_activations() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(200, 256, (24, 40), dtype=np.uint8)  # a uint8 Gram of these would overflow
    y = rng.standard_normal((24, 7))
    for estimator in ("biased", "unbiased"):
        want = repsim.cka(x.astype(np.float64), y, estimator=estimator)
        assert repsim.cka(x, y, estimator=estimator) == pytest.approx(want, abs=1e-12)
        assert repsim.cka(torch.from_numpy(x), y, estimator=estimator) == pytest.approx(want, abs=1e-12)
        vec = repsim.gram_vector(x, estimator=estimator)
        assert vec.dtype == torch.float32
        torch.testing.assert_close(vec, repsim.gram_vector(x.astype(np.float32), estimator=estimator))
    mb = MinibatchCKA()
    mb.update({"u8": x, "f32": x.astype(np.float32)})
    np.testing.assert_allclose(mb.compute().values, 1.0, atol=1e-6)

    empty = np.zeros((0, 5), np.uint8)
    with pytest.raises(ValueError) as err:
        repsim.cka(empty, empty)
    one_line_error(err, "x", "0 samples")
    with pytest.raises(ValueError) as err:
        repsim.gram_vector(empty, name="blocks.3")
    one_line_error(err, "blocks.3", "0 samples")
    with pytest.raises(ValueError) as err:
        MinibatchCKA().update({"blocks.3": torch.zeros(0, 4)})
    one_line_error(err, "blocks.3", "0 samples")
