"""The transfer study (repsim.study, `repsim study`) end to end on a few dozen real MedMNIST images, its scheduler,
statistics and settings."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

from repsim.cli import main
from repsim.study import PRESETS, Start, Study, resolved_config, run_study, settings_with
from repsim.study.scheduler import Experiment, Scheduler, Workers
from repsim.train.runs import find_runs, load_run

REPO = Path(__file__).resolve().parents[1]
SIZES = {"train": 40, "val": 20, "test": 48}  # 48 test images: 12 CKA batches of 4 (>= 10 for the bootstrap)


def _subset_npz(src: Path, dst: Path, sizes: dict[str, int]) -> None:
    """A MedMNIST-layout copy of ``src`` with ``sizes[split]`` images per split, every class represented."""
    parts = {}
    with np.load(src) as z:
        for split, n in sizes.items():
            y = z[f"{split}_labels"].ravel()
            classes = np.unique(y)
            idx = np.sort(np.concatenate([np.flatnonzero(y == c)[: n // len(classes)] for c in classes]))
            parts[f"{split}_images"], parts[f"{split}_labels"] = z[f"{split}_images"][idx], z[f"{split}_labels"][idx]
    np.savez(dst, **parts)


@pytest.fixture(scope="module")
def tiny_root(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tinydata")
    (root / "medmnist").mkdir()
    for flag in ("pneumoniamnist", "breastmnist"):
        _subset_npz(data_root / "medmnist" / f"{flag}.npz", root / "medmnist" / f"{flag}.npz", SIZES)
    return root


@pytest.fixture(scope="module")
def study_dir(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset through `repsim study` (one target, every stage, two starts)."""
    out = tmp_path_factory.mktemp("study")
    assert main(["study", "--preset", "tiny", "--data-root", str(tiny_root), "--out", str(out), "--jobs", "1",
                 "--threads", "1", "targets=[breastmnist]"]) == 0
    return out


def test_every_stage_writes_its_results(study_dir: Path) -> None:
    summary = json.loads((study_dir / "study.json").read_text())
    assert set(summary["timings_s"]) == {"train", "cka"}  # written during the outputs stage
    (entry,) = summary["wall"]["invocations"]  # the wall time of every invocation, in wall.json too
    assert entry["stages"]["train"] > 0 and entry["jobs"] >= 1 and set(entry["stages"]) == {"train", "cka", "outputs"}
    assert json.loads((study_dir / "wall.json").read_text())[0]["started"] == entry["started"]
    assert "## Wall time" in (study_dir / "tables.md").read_text()
    scenarios = ["frozen-linear", "frozen-stacked", "unfrozen-linear", "unfrozen-stacked"]
    for start in ("in-domain", "scratch"):
        ft = summary["finetune"][start]["breastmnist"]
        assert list(ft) == scenarios  # settings order
        for res in ft.values():
            assert res["lr"] in (1e-3, 1e-4) and set(res["lr_search"]) == {"0.001", "0.0001"}
            assert len(res["test"]["auc"]["values"]) == 2  # two seeds at the chosen LR
        assert set(summary["knn"][start]) == {"breastmnist"}
    # depth-2 backbone: freezing 0..2 (in-domain) and decapitation 1..2 (both starts); end points reuse full runs
    assert set(summary["curves"]["freezing"]["in-domain"]["breastmnist"]["unfrozen-linear"]) == {
        f"freeze_blocks{k}" for k in range(3)}
    assert set(summary["curves"]["decapitation"]["scratch"]["breastmnist"]["frozen-stacked"]) == {
        "decapitate1", "decapitate2"}
    assert not (study_dir / "freezing" / "in-domain" / "breastmnist" / "freeze_blocks0").exists()
    full = summary["finetune"]["in-domain"]["breastmnist"]["unfrozen-linear"]["test"]["auc"]["values"]
    point = summary["curves"]["freezing"]["in-domain"]["breastmnist"]["unfrozen-linear"]["freeze_blocks0"]
    assert point["test"]["auc"]["values"] == full
    # paired differences: in-domain minus scratch for every scenario (no primaries: all secondary), from the
    # bootstrap over both seeds and the 48 test images, with Holm-adjusted p and a verdict
    assert {(p["family"], p["scenario"], p["a"], p["b"]) for p in summary["paired"]} == {
        ("secondary", s, "in-domain", "scratch") for s in scenarios}
    assert all(p["verdict"] in ("helps", "hurts", "no evidence") and p["p"] <= p["p_holm"] and p["n_seeds"] == 2
               and p["n_images"] == SIZES["test"] for p in summary["paired"])
    assert summary["classes"] == {"breastmnist": 2} and summary["models"]["tokens"]["tokens"] == 16  # 28 px / 7
    # the pretraining run is the start of every in-domain run; frozen runs trained on cached outputs
    (run,) = find_runs(study_dir / "pretrain" / "pneumoniamnist")
    cfg = yaml.safe_load((find_runs(study_dir / "finetune" / "in-domain" / "breastmnist" / "frozen-linear")[0]
                          / "config.yaml").read_text())
    assert cfg["model"]["checkpoint"] == str(run / "backbone_best.pt") and cfg["train"]["cache_frozen"]
    assert cfg["train"]["epochs"] == 3  # frozen_train overrides train for the frozen scenarios
    tables = (study_dir / "tables.md").read_text()
    for heading in ("Paired differences", "Secondary comparisons", "LR search", "still improving", "k-NN", "Fig 4",
                    "Fig 5", "Fig 7", "Clock per stage", "Flagged runs"):
        assert heading in tables
    for name in summary["figures"].values():
        assert (study_dir / name).stat().st_size > 5000


def test_cka_results_have_bootstrap_intervals_and_references(study_dir: Path) -> None:
    cka = json.loads((study_dir / "study.json").read_text())["cka"]["breastmnist"]
    fig7 = cka["fig7/in-domain/seed0"]
    assert fig7["layers_a"] == ["model.blocks.0", "model.blocks.1"] and np.shape(fig7["cka"]) == (2, 2)
    d = fig7["diagonal"]
    assert all(lo <= c <= hi for lo, c, hi in zip(d["lower"], d["cka"], d["upper"]))
    assert {"fig7/in-domain/seed1", "fig7/scratch/seed0", "spread/scratch/seed0-1", "spread/in-domain/seed0-1",
            "floor/init0-1", "floor/init2-3", "floor/init4-5"} <= set(cka)
    assert not any(k.startswith(("null", "adabn")) for k in cka)  # a ViT has no BatchNorm: no AdaBN curve
    assert cka["figA1/in-domain/frozen-stacked"]["layers_a"] == ["classifier.blocks.0"]
    fig8 = np.array(cka["fig8"]["cka"])
    assert [n.split("/")[0] for n in cka["fig8"]["layers_a"]] == [
        "in-domain start", "in-domain fine-tuned", "scratch start", "scratch fine-tuned"]
    np.testing.assert_allclose(np.diag(fig8), 1.0, atol=1e-6)


@pytest.fixture
def one_thread(request: pytest.FixtureRequest) -> None:
    """One intra-op thread for the tiny models here: two oversubscribe a loaded 2-core machine (measured: the AdaBN
    test 21 s with two threads, 4 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(before))


def _unbiased_hsic(k: np.ndarray, l_: np.ndarray) -> float:
    """Song et al. (2012)'s unbiased HSIC of two Gram matrices (the float64 reference, written out here)."""
    n = len(k)
    k, l_ = k - np.diag(np.diag(k)), l_ - np.diag(np.diag(l_))
    one = np.ones(n)
    return float(np.trace(k @ l_) + (one @ k @ one) * (one @ l_ @ one) / ((n - 1) * (n - 2))
                 - 2 / (n - 2) * (one @ k @ l_ @ one)) / (n * (n - 3))


def _test_batches(tiny_root: Path) -> list[torch.Tensor]:
    """The study's CKA batches: BreastMNIST's test split as the tiny study reads it."""
    from repsim.data import bootstrap_batches, prepare
    from repsim.study.workspace import Workspace

    ws = Workspace(replace(PRESETS["tiny"], targets=("breastmnist",)), tiny_root / "ws", data_root=tiny_root)
    test = prepare(ws.data_block("breastmnist"), ws.data_root).datasets["test"]
    return [torch.stack([test[i][0] for i in b]) for b in bootstrap_batches(len(test), ws.settings.cka_batch_size)]


@pytest.mark.usefixtures("one_thread")
def test_cka_floor_is_two_random_initialisations_on_the_test_split(study_dir: Path, tiny_root: Path) -> None:
    """The floor equals a float64 minibatch CKA, written out here, between the study's backbone under two seeds,
    on flattened block outputs of the same test batches; every matrix says its comparison and feature."""
    from repsim.files import load_netcdf
    from repsim.models import create

    s = PRESETS["tiny"]
    batches = _test_batches(tiny_root)
    feats = []
    for seed in (2, 3):
        torch.manual_seed(seed)
        net, acts = create(s.model, img_size=s.img_size, in_chans=3, **s.model_kwargs).eval(), {}
        for name in net.layer_names():
            net.get_submodule(name).register_forward_hook(
                lambda _, __, out, name=name, acts=acts: acts.setdefault(name, []).append(
                    out.flatten(1).double().numpy()))
        with torch.no_grad():
            for x in batches:
                net(x)
        feats.append(acts)
    ds = load_netcdf(study_dir / "cka" / "breastmnist" / "floor_init2-3.nc")
    assert ds.attrs["comparison"] == "floor/init2-3" and ds.attrs["model_a"] == "random init 2"
    for k, name in enumerate(ds["layer_a"].values):
        hsic = np.array([[_unbiased_hsic(a @ a.T, b @ b.T), _unbiased_hsic(a @ a.T, a @ a.T),
                          _unbiased_hsic(b @ b.T, b @ b.T)] for a, b in zip(feats[0][name], feats[1][name])])
        expected = hsic[:, 0].sum() / np.sqrt(hsic[:, 1].sum() * hsic[:, 2].sum())
        assert float(ds["cka"][k, k]) == pytest.approx(expected, abs=1e-4)
    for f in (study_dir / "cka" / "breastmnist").glob("*.nc"):
        attrs = load_netcdf(f).attrs
        assert (attrs["pool"], attrs["feature"]) == ("flatten", "flattened stage outputs"), f.name
    assert json.loads((study_dir / "study.json").read_text())["cka_feature"] == {
        "pool": "flatten", "feature": "flattened stage outputs"}


@pytest.mark.usefixtures("one_thread")
def test_cka_seed_spread_compares_two_seeds_of_the_same_start(study_dir: Path, tiny_root: Path) -> None:
    """spread/<start>/seed0-1 is CKA(after seed 0, after seed 1) of that start's unfrozen-linear runs."""
    from repsim.compare import compare
    from repsim.files import load_netcdf

    summary = json.loads((study_dir / "study.json").read_text())
    lr = summary["finetune"]["in-domain"]["breastmnist"]["unfrozen-linear"]["lr"]
    runs = find_runs(study_dir / "finetune" / "in-domain" / "breastmnist" / "unfrozen-linear", lr)
    stored = load_netcdf(study_dir / "cka" / "breastmnist" / "spread_in-domain_seed0-1.nc")
    assert (stored.attrs["model_a"], stored.attrs["model_b"]) == ("in-domain seed 0", "in-domain seed 1")
    again = compare(load_run(runs[0]), load_run(runs[1]), _test_batches(tiny_root), progress=False)
    np.testing.assert_allclose(again["cka"].values, stored["cka"].values, atol=1e-6)
    scratch = load_netcdf(study_dir / "cka" / "breastmnist" / "spread_scratch_seed0-1.nc")
    assert not np.allclose(scratch["cka"].values, stored["cka"].values)


@pytest.mark.usefixtures("one_thread")
def test_fig7_labels_every_curve_and_band(study_dir: Path, tiny_root: Path) -> None:
    """Tables and Fig 7 name the feature, each reference and what each band is; nothing is called a null."""
    from repsim.study import figures
    from repsim.study.similarity import study_cka
    from repsim.study.workspace import Workspace

    tables = (study_dir / "tables.md").read_text()
    section = tables[tables.index("## Fig 7"):tables.index("## Flagged runs")]
    assert "## Fig 7: same-block CKA on flattened stage outputs" in section and "null" not in section
    for row in ("| breastmnist | floor (random init vs random init) (3 pairs; band: min–max over pairs) |",
                "| breastmnist | in-domain: before vs after (2 seeds; band: min–max over seeds) |",
                "| breastmnist | scratch: seed spread (after vs after) (1 pair; band: 95% bootstrap CI over "
                "batches) |"):
        assert row in section
    summary = json.loads((study_dir / "study.json").read_text())
    curves = {c["label"]: c for c in summary["fig7_curves"]["breastmnist"]}
    assert len(curves) == 5 and len(curves["floor (random init vs random init) (3 pairs; band: min–max over pairs)"][
        "mean"]) == 2
    ws = Workspace(replace(PRESETS["tiny"], targets=("breastmnist",)), study_dir, data_root=tiny_root)
    fig = figures.fig7_diagonal(study_cka(ws, summary["finetune"]))  # every matrix read back from cka/
    assert fig is not None and "flattened stage outputs" in fig.get_suptitle()
    assert "no AdaBN curve (the backbone has no BatchNorm)" in fig.get_suptitle().replace("\n", " ")
    labels = [t.get_text().replace("\n", " ") for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert [ax.get_title() for ax in fig.axes] == ["breastmnist: in-domain", "breastmnist: scratch"]
    assert "scratch: seed spread (after vs after) (1 pair; band: 95% bootstrap CI over batches)" in labels
    assert labels.count("floor (random init vs random init) (3 pairs; band: min–max over pairs)") == 2


@pytest.mark.usefixtures("one_thread")
def test_cka_adabn_before_of_a_batchnorm_backbone(tiny_root: Path, tmp_path: Path) -> None:
    """A BatchNorm backbone gets AdaBN-before vs after per seed: the start's running statistics re-estimated on the
    target's train images (the fine-tuning's batch size), the weights its own; tables and Fig 7 say so."""
    from repsim.compare import compare
    from repsim.data import prepare
    from repsim.files import load_netcdf
    from repsim.surgery import adapt_batchnorm

    settings = replace(PRESETS["tiny"], model="test_resnet", model_kwargs={}, starts=(Start("scratch", "scratch"),),
                       targets=("breastmnist",), scenarios=("unfrozen-linear",), freeze_blocks=[], decapitate=[],
                       train={**PRESETS["tiny"].train, "lr_grid": None, "lr": 1e-3, "seeds": 1}, cka_seeds=1,
                       curve_seeds=1, reference_pairs=1)
    summary = Study(settings, tmp_path, data_root=tiny_root, threads=1).run()
    cka = summary["cka"]["breastmnist"]
    assert set(cka) == {"floor/init0-1", "fig7/scratch/seed0", "adabn/scratch/seed0", "fig8"}
    (run,) = find_runs(tmp_path / "finetune" / "scratch" / "breastmnist" / "unfrozen-linear")
    stored = load_netcdf(tmp_path / "cka" / "breastmnist" / "adabn_scratch_seed0.nc")
    assert (stored.attrs["model_a"], stored.attrs["run"]) == ("AdaBN-before", str(run))
    # its start is the run's initial backbone with the train images' statistics: different from before vs after
    assert not np.allclose(cka["adabn/scratch/seed0"]["cka"], cka["fig7/scratch/seed0"]["cka"], atol=1e-3)
    train = prepare(yaml.safe_load((run / "config.yaml").read_text())["data"], tiny_root).datasets["train_eval"]
    images = torch.stack([train[i][0] for i in range(len(train))])
    adapted = adapt_batchnorm(load_run(run, "init"), [images[:20], images[20:]])  # batches of the run's size, >= 16
    again = compare(adapted, load_run(run), _test_batches(tiny_root), labels=("AdaBN-before", "after"),
                    progress=False)
    np.testing.assert_allclose(again["cka"].values, stored["cka"].values, atol=1e-5)
    tables = (tmp_path / "tables.md").read_text()
    assert "| breastmnist | scratch: AdaBN-before vs after (1 seed; band: 95% bootstrap CI over batches) |" in tables


def test_report_command_beside_a_finished_study_trains_nothing(study_dir: Path, tiny_root: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`repsim study --report` on a study folder: the same tables from the finished runs, no run touched."""
    stamps = {p: p.stat().st_mtime_ns for p in study_dir.rglob("*.pt")}
    assert main(["study", "--preset", "tiny", "--data-root", str(tiny_root), "--out", str(study_dir), "--report",
                 "--threads", "1", "targets=[breastmnist]"]) == 0
    assert {p: p.stat().st_mtime_ns for p in study_dir.rglob("*.pt")} == stamps
    printed = capsys.readouterr().out
    assert "## Test metric per target" in printed and "not finished yet" not in printed


def test_rerun_reuses_everything_and_other_settings_are_refused(study_dir: Path, tiny_root: Path) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in study_dir.rglob("*") if p.suffix in (".pt", ".nc")}
    settings = replace(PRESETS["tiny"], targets=("breastmnist",))
    saved = json.loads((study_dir / "settings.json").read_text())
    del saved["fig8_models"]  # a setting added after the study was written is compatible at its default
    (study_dir / "settings.json").write_text(json.dumps(saved))
    summary = Study(settings, study_dir, data_root=tiny_root, threads=1).run()
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert summary["timings_s"]["train"] < 20
    first, again = summary["wall"]["invocations"]  # a resumed study adds its invocation to the wall time
    assert summary["wall"]["total_s"] == pytest.approx(first["seconds"] + again["seconds"], abs=0.11)
    assert summary["wall"]["by_stage_s"]["train"] == pytest.approx(first["stages"]["train"] + again["stages"]["train"],
                                                                   abs=0.11)
    with pytest.raises(ValueError, match="other settings.*train"):
        Study(settings_with(settings, ["train.epochs=2"]), study_dir, data_root=tiny_root).run()


def test_loaded_initial_classifier_is_the_trainers(study_dir: Path, tiny_root: Path) -> None:
    """load_run(init, classifier) holds exactly the model the trainer built before its first step."""
    from repsim.data import prepare
    from repsim.train.utils import build_model, seed_everything

    run = find_runs(study_dir / "finetune" / "scratch" / "breastmnist" / "unfrozen-stacked")[0]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    seed_everything(int(cfg["train"]["seed"]))
    built, _ = build_model(cfg, prepare(cfg["data"], tiny_root, seed=int(cfg["train"]["seed"])))
    loaded = load_run(run, "init", "classifier")
    for (name, a), b in zip(built.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    best = load_run(run, "best", "classifier")
    assert not all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), best.state_dict().values()))


def test_report_of_a_study_embeds_its_tables_and_figures(study_dir: Path) -> None:
    from repsim.report import build_report

    text = build_report(study_dir)
    assert "Transfer study of" in text and "Paired differences" in text and "fig7_diagonal.png" in text
    summary = json.loads((study_dir / "study.json").read_text())
    assert text.count("data:image/png;base64,") >= len(summary["figures"]) + 5  # figures + one curve per experiment


def test_scheduler_refuses_unknown_and_circular_dependencies(tmp_path: Path) -> None:
    cfg = resolved_config({"dataset": "medmnist", "root": "medmnist", "flag": "breastmnist"},
                          {"name": "test_vit", "pretrained": False}, {})
    scheduler = Scheduler(Workers(1, 1), None)
    with pytest.raises(ValueError, match=r"unknown experiments \['c'\]"):
        scheduler.run([Experiment("a", cfg, tmp_path / "a", after=("c",))])
    with pytest.raises(ValueError, match="wait on each other"):
        scheduler.run([Experiment("a", cfg, tmp_path / "a", after=("b",)),
                       Experiment("b", cfg, tmp_path / "b", lr_from="a")])


def _logged_run(cfg: dict, run: str, data_root: str | None) -> dict:
    """A stand-in trainer run (picklable, for worker processes): logs its folder; validation value = its LR."""
    with open(Path(run).parents[2] / "order.log", "a") as log:
        log.write(str(Path(*Path(run).parts[-3:])) + "\n")
    return {"val": {"auc": cfg["train"]["lr"]}, "metric": "auc"}


@pytest.mark.parametrize("jobs", [1, 2])
def test_scheduler_finishes_experiments_one_after_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          jobs: int) -> None:
    """Depth first: experiments marked first (a study's primaries), then the longest experiment's LR search, then its
    seeds, then the next experiment's runs, so a study stopped early leaves whole experiments (the natural preset
    runs over several sessions); with worker processes every run is made once."""
    from repsim.study import scheduler as sch

    monkeypatch.setattr(sch, "_train_run", _logged_run)
    monkeypatch.setattr("repsim.train.runner.run_experiment", lambda cfg, folder, **kw: {"lr": cfg["train"]["lr"]})
    train = {"lr_grid": [1e-3, 1e-2], "lr": None, "seeds": 3, "extend_lr_grid": False}
    exps = [Experiment(n, {"train": dict(train)}, tmp_path / n, cost=c, first=n == "primary")
            for n, c in (("short", 1.0), ("long", 2.0), ("primary", 0.5))]
    pool = Workers(jobs, 1)
    try:
        results = Scheduler(pool, None).run(exps)
    finally:
        pool.close()
    assert set(results) == {"primary", "long", "short"}
    order = (tmp_path / "order.log").read_text().split()
    each = (("0.001", 0), ("0.01", 0), ("0.01", 1), ("0.01", 2))
    runs = [f"{n}/lr{lr}/seed{s}" for n in ("primary", "long", "short") for lr, s in each]
    assert order == runs if jobs == 1 else sorted(order) == sorted(runs)  # processes: the order is the workers'


def test_settings_overrides_and_inconsistent_settings_are_named() -> None:
    s = settings_with(PRESETS["tiny"], ["train.epochs=3", "targets=[breastmnist]", "n_boot=50"])
    assert s.train["epochs"] == 3 and s.train["seeds"] == 2 and s.targets == ("breastmnist",) and s.n_boot == 50
    with pytest.raises(ValueError, match="unknown study setting 'epochs'"):
        settings_with(PRESETS["tiny"], ["epochs=3"])
    with pytest.raises(ValueError, match="starts cannot be overridden"):
        settings_with(PRESETS["tiny"], ["starts=[]"])
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        replace(PRESETS["tiny"], targets=("nope",)).check()
    with pytest.raises(ValueError, match="start name '../x' cannot name an output folder"):
        replace(PRESETS["tiny"], starts=(Start("../x", "scratch"),)).check()
    with pytest.raises(ValueError, match="reference_pairs must be >= 0"):
        replace(PRESETS["tiny"], reference_pairs=-1).check()
    with pytest.raises(ValueError, match="freezing curve of start 'in-domain'.*unfrozen-linear"):
        replace(PRESETS["tiny"], scenarios=("frozen-linear", "frozen-stacked"), decapitate=[]).check()


def test_natural_preset_plans_the_papers_question() -> None:
    """The natural preset: ImageNet, in-domain SSL (DINO on each target's train split), ImageNet -> SSL and scratch of
    one architecture, one step budget for every start and scenario, 5 seeds, declared primaries, the budget curve."""
    from repsim.study.plan import plan
    from repsim.study.workspace import Workspace

    s = PRESETS["natural"]
    s.check()
    assert [(st.kind, st.method) for st in s.starts] == [("pretrained", None), ("ssl", None), ("ssl", "simclr"),
                                                         ("scratch", None)] and s.ssl["method"] == "dino"
    assert s.train["seeds"] == 5 and s.curve_seeds >= 3 and s.cka_seeds == 5 and len(s.train["lr_grid"]) >= 3
    assert s.train["steps"] == max(s.budget_points) and s.train["extend_lr_grid"] and s.train["test_at_best"]
    assert not s.frozen_train and all(set(u) <= {"patience"} for u in s.target_train.values())  # equal budgets
    keys = {(st.name, t, sc) for st, t, sc in s.experiments()}
    assert {("ssl", t, sc) for t in s.targets for sc in ("frozen-linear", "unfrozen-linear")} <= keys
    assert ("imagenet", "retinamnist", "unfrozen-stacked") in keys and ("scratch", "breastmnist", "unfrozen-stacked") \
        not in keys  # the first cut of the issue's order after ImageNet -> SSL's stacked runs
    assert ("ssl", "imagenet", "frozen-linear") in s.primaries and ("imagenet", "scratch", "unfrozen-linear") in \
        s.primaries
    ws = Workspace(s, "/nonexistent-study")
    ssl = [e for e in plan(ws) if e.kind == "pretrain"]
    assert sorted(str(e.key) for e in ssl) == sorted(f"ssl/{st}/{t}" for st in ("ssl", "ssl-simclr")
                                                     for t in s.targets)
    assert all(e.cfg["data"]["img_size"] == 48 and not e.cfg["model"]["pretrained"] for e in ssl)
    assert sorted(e.cfg["method"] for e in ssl) == ["dino", "dino", "simclr", "simclr"]
    assert {(a, t, sc) for a, b, sc in s.primaries for t in s.targets} <= keys
    assert {(b, t, sc) for a, b, sc in s.primaries for t in s.targets} <= keys
    assert ("imagenet", "retinamnist", "unfrozen-stacked") in keys and ("ssl", "breastmnist", "frozen-stacked") in keys
    assert max(s.budget_points) <= s.train["steps"] and s.stat_boot >= 1000
    assert s.sizes == ("efficientnet_lite1", "efficientnet_lite2") and "mobilenetv2_imagenet" in s.fig8_models


def test_ssl_starts_pretrain_on_each_target_and_a_collapsed_start_is_a_finding(tiny_root: Path, tmp_path: Path) -> None:
    """An ssl start pretrains (DINO) on the target's own train split and fine-tunes from its teacher backbone; a
    start whose pretraining collapses is never fine-tuned: its experiments are listed as skipped, with the reason."""
    small = {"freeze_blocks": [], "decapitate": [], "scenarios": ("frozen-linear",), "cka_seeds": 1, "curve_seeds": 1,
             "train": {**PRESETS["tiny"].train, "seeds": 1, "lr_grid": None, "lr": 1e-3}}
    ssl = {"method": "dino", "train": {"epochs": 1, "batch_size": 16, "num_workers": 0},
           "views": {"local_crops": 0}}  # the tiny ViT takes 28 px only
    good = replace(PRESETS["tiny"], starts=(Start("ssl", "ssl"), Start("scratch", "scratch")), targets=("breastmnist",),
                   ssl=ssl, **small)
    summary = Study(good, tmp_path / "good", data_root=tiny_root).run()
    run = tmp_path / "good" / "ssl" / "ssl" / "breastmnist"
    assert summary["ssl"]["ssl"]["breastmnist"]["epochs_run"] == 1 and (run / "backbone_best.pt").is_file()
    (ft,) = find_runs(tmp_path / "good" / "finetune" / "ssl" / "breastmnist" / "frozen-linear")
    assert yaml.safe_load((ft / "config.yaml").read_text())["model"]["checkpoint"] == str(run / "backbone_best.pt")
    assert json.loads((run / "split.json").read_text())["train"] == json.loads((ft / "split.json").read_text())["train"]
    from repsim.report import curves_figure

    assert curves_figure([run, ft], "ssl and its fine-tuning").axes[0].lines  # the report draws both kinds of run

    bad = replace(good, ssl={**ssl, "collapse": {"min_rank": 1.0e9, "patience": 1}})
    summary = Study(bad, tmp_path / "bad", data_root=tiny_root).run()
    assert "collapsed at epoch 0" in summary["ssl"]["ssl"]["breastmnist"]["collapsed"]
    assert set(summary["skipped"]) == {"finetune/ssl/breastmnist/frozen-linear", "knn/ssl/breastmnist"}
    assert "ssl" not in summary["finetune"] and "scratch" in summary["finetune"]



@pytest.mark.usefixtures("one_thread")
def test_a_collapsed_start_in_a_full_study_leaves_every_later_stage_standing(tiny_root: Path, tmp_path: Path) -> None:
    """The natural preset's case: DINO collapses while a second SSL start (SimCLR), scratch, fine-tuning, the
    decapitation curve, CKA (Fig 7 and its references) and a declared primary that names the collapsed start all go
    on. The study finishes, lists what it skipped and why, and draws its figures from what ran."""
    ssl = {"method": "dino", "train": {"epochs": 1, "batch_size": 16, "num_workers": 0}, "views": {"local_crops": 0},
           "collapse": {"max_entropy": 1.0e-6, "min_rank": 0.0, "patience": 1}}  # DINO's signal only: SimCLR lives
    s = replace(PRESETS["tiny"], starts=(Start("ssl", "ssl"), Start("ssl-simclr", "ssl", method="simclr"),
                                         Start("scratch", "scratch")),
                targets=("breastmnist",), scenarios=("frozen-linear", "frozen-stacked", "unfrozen-linear"),
                ssl=ssl, freeze_blocks=[], decapitate=[1], decapitation_starts=("ssl", "ssl-simclr"), cka_seeds=2,
                curve_seeds=1, reference_pairs=1, primaries=(("ssl", "scratch", "unfrozen-linear"),),
                train={**PRESETS["tiny"].train, "seeds": 2, "lr_grid": None, "lr": 1e-3})
    out = tmp_path / "study"
    summary = Study(s, out, data_root=tiny_root).run()
    assert "collapsed at epoch 0" in summary["ssl"]["ssl"]["breastmnist"]["collapsed"]
    assert summary["ssl"]["ssl-simclr"]["breastmnist"]["epochs_run"] == 1
    skipped = set(summary["skipped"])
    assert {f"finetune/ssl/breastmnist/{sc}" for sc in s.scenarios} | {"knn/ssl/breastmnist"} <= skipped
    assert any(k.startswith("decapitation/ssl/") for k in skipped)
    assert not any("simclr" in k or "scratch" in k for k in skipped)
    assert set(summary["finetune"]) == {"ssl-simclr", "scratch"}
    assert {c["start"] for c in summary["fig7_curves"]["breastmnist"]} >= {"ssl-simclr", "scratch"}
    assert summary["primaries_not_estimated"] == [{"a": "ssl", "b": "scratch", "target": "breastmnist",
                                                    "scenario": "unfrozen-linear", "missing": ["ssl"]}]
    assert {(r["family"], r["a"], r["b"]) for r in summary["paired"]} == {("secondary", "ssl-simclr", "scratch")}
    tables = (out / "tables.md").read_text()
    assert "- breastmnist / unfrozen-linear: ssl − scratch: no results of ssl" in tables
    assert "Experiments skipped (their start collapsed" in tables and "| ssl-simclr − scratch |" in tables
    assert {"fig_transfer", "fig_forest", "fig5_decapitation", "fig7_diagonal"} <= set(summary["figures"])
    assert all((out / name).is_file() for name in summary["figures"].values())

    # a report beside a running study: what finished, the rest listed as not finished, nothing trained
    (out / "finetune/scratch/breastmnist/unfrozen-linear/results.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    wall = (out / "wall.json").read_text()
    report = run_study(s, out, data_root=tiny_root, threads=1, report=True)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == stamps and (out / "wall.json").read_text() == wall
    assert "not finished yet" in report["skipped"]["finetune/scratch/breastmnist/unfrozen-linear"]
    assert "unfrozen-linear" not in report["finetune"]["scratch"]["breastmnist"]
    assert {(r["scenario"]) for r in report["paired"]} == {"frozen-linear", "frozen-stacked"}
    assert report["primaries_not_estimated"][0]["missing"] == ["ssl", "scratch"]


def test_cka_cache_is_remade_when_its_inputs_change(tmp_path: Path) -> None:
    """A cached matrix made from other inputs (another run; Fig 8 before every start had fine-tuned) is recomputed,
    not read back: a report written while the study ran once froze Fig 8 with one backbone."""
    from repsim.study.similarity import _cached

    made: list[int] = []

    def make(v: int) -> xr.Dataset:
        made.append(v)
        return xr.Dataset({"cka": ((), float(v))})

    path = tmp_path / "fig8_last_block.nc"
    _cached(path, lambda: make(1), members="mobilenetv2_imagenet")
    assert float(_cached(path, lambda: make(2), members="mobilenetv2_imagenet")["cka"]) == 1.0  # same inputs
    assert float(_cached(path, lambda: make(3), members="run-a, mobilenetv2_imagenet")["cka"]) == 3.0
    assert made == [1, 3]
