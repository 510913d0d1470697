"""``repsim report``: self-contained HTML for a trainer run and an experiment folder (a study folder: test_study)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest

from repsim.cli import main
from repsim.report import build_report, markdown_to_html
from repsim.study import PRESETS, resolved_config
from repsim.train.runs import find_runs


def _images(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', text)]


@pytest.fixture(scope="module")
def experiment(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data root, experiment folder): two epochs of a tiny ViT on a 60/30/40 subset of BreastMNIST, two seeds."""
    from repsim.train import run_experiment

    root = tmp_path_factory.mktemp("data")
    (root / "medmnist").mkdir()
    with np.load(data_root / "medmnist" / "breastmnist.npz") as z:
        keep = {"train": 60, "val": 30, "test": 40}
        np.savez(root / "medmnist" / "breastmnist.npz",
                 **{f"{s}_{k}": z[f"{s}_{k}"][:n] for s, n in keep.items() for k in ("images", "labels")})
    s = PRESETS["tiny"]
    cfg = resolved_config({"dataset": "medmnist", "root": "medmnist", "flag": "breastmnist", "img_size": 28},
                          {"name": s.model, "kwargs": s.model_kwargs, "pretrained": False},
                          {**s.train, "epochs": 2, "lr_grid": None, "lr": 1e-3, "seeds": 2})
    exp = tmp_path_factory.mktemp("exp")
    run_experiment(cfg, exp, data_root=root, progress=False)
    return root, exp


def test_run_report_has_summary_curves_and_cka(experiment: tuple[Path, Path], tmp_path: Path) -> None:
    root, exp = experiment
    run = find_runs(exp)[0]
    out = tmp_path / "run.html"
    assert main(["report", str(run), "--out", str(out), "--data-root", str(root)]) == 0
    text = out.read_text()
    assert "Run summary" in text and "test auc" in text and "CKA before vs after" in text and "Training curves" in text
    pngs = _images(text)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)
    assert "http" not in text.replace("http-equiv", "")  # self-contained: nothing fetched


def test_run_report_without_data_says_why_cka_is_missing(experiment: tuple[Path, Path]) -> None:
    text = build_report(find_runs(experiment[1])[0])
    assert "Not computed" in text and "--data-root" in text and "Run summary" in text


def test_experiment_report_tables_every_seed(experiment: tuple[Path, Path]) -> None:
    text = build_report(experiment[1])
    assert "mean ± std" in text and "breastmnist, auc" in text
    assert len(_images(text)) == 1  # one curves figure: the experiment's two runs together
    assert "lr0.001/seed0" not in text  # labels live inside the PNG, not as text


def test_missing_folder_and_unfinished_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        build_report(tmp_path / "nope")
    assert "has not finished" in build_report(tmp_path)


def test_markdown_tables_become_html() -> None:
    html = markdown_to_html("# Title\n\n## Part\n| a | b |\n|---|---|\n| 1 < 2 | x |\ntext")
    assert "<h2>Title</h2>" in html and "<h3>Part</h3>" in html
    assert "<th>a</th><th>b</th>" in html and "<td>1 &lt; 2</td>" in html and "<p>text</p>" in html
    assert "---" not in html
