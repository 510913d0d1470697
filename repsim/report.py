"""``repsim report RUN_DIR``: one self-contained HTML page (PNGs embedded as base64) for a trainer run, a folder of
experiments or a transfer study: metrics tables, training curves and CKA heatmaps.

What goes in, by what the folder holds:

* tables: a study's ``tables.md``; else every ``results.json``/``knn.json`` below (``repsim table``); else the
  ``summary.json`` of a single run;
* training curves: one figure per experiment (train loss and validation metric per epoch, one line per LR/seed)
  from every ``metrics.jsonl`` below;
* figures: the PNGs at the top of the folder (a study's figures, ``repsim cka``/``demo`` heatmaps);
* CKA of a single run: its backbone before (``backbone_init.pt``) vs after (``backbone_best.pt``) fine-tuning on
  up to ``cka_samples`` test images, when the run's data can be found (``--data-root``).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from repsim.files import read_json, write_text
from repsim.train.runs import RunFiles, experiment_of
from repsim.train.table import RESULT_FILES

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;font-size:.9em}
th{background:#f2f2f2}img{max-width:100%;margin:.5em 0}pre{background:#f7f7f7;padding:.6em;overflow-x:auto}
.note{color:#a33}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}"""


def _own(root: Path, path: Path) -> bool:
    """Whether ``path`` is a regular file of the run itself: not a symbolic link and resolving inside ``root``, so a
    file linked into a run folder (``figure.png -> ~/secret``) is never read into the page."""
    return path.is_file() and not path.is_symlink() and path.resolve().is_relative_to(root.resolve())


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return _img(buf.getvalue())


def _img(data: bytes, alt: str = "") -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def markdown_to_html(text: str) -> str:
    """The subset of markdown that repsim writes: ``#`` headings, pipe tables and paragraphs."""
    out: list[str] = []
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            head, body = rows[0], [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body) + "</table>")
            rows.clear()

    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|"):
            rows.append([c.strip() for c in s.strip("|").split("|")])
            continue
        flush()
        if s.startswith("#"):
            level = min(len(s) - len(s.lstrip("#")) + 1, 4)  # the page title is <h1>
            out.append(f"<h{level}>{html.escape(s.lstrip('#').strip())}</h{level}>")
        elif s:
            out.append(f"<p>{html.escape(s)}</p>")
    flush()
    return "\n".join(out)


def _tables(root: Path) -> str:
    from repsim.train.table import collect, markdown_table

    if _own(root, root / "tables.md"):
        return markdown_to_html((root / "tables.md").read_text())
    if any(next(root.rglob(n), None) for n in RESULT_FILES):
        return ("<h2>Results (test split, mean ± std over seeds)</h2>"
                + markdown_to_html(markdown_table(collect([root]))))
    if _own(root, RunFiles(root).summary):
        s = RunFiles(root).read_summary()
        rows = [("dataset", s["dataset"]), ("model", s["model"]), ("scenario", s["scenario"]), ("lr", s["lr"]),
                ("seed", s["seed"]), ("best epoch", s["best_epoch"]), ("iterations to best", s["iterations_to_best"]),
                ("inference ms/image", f"{s['inference_ms_per_image']:.3f}"),
                (f"validation {s['metric']} (best)", f"{s['val'][s['metric']]:.4f}"),
                *((f"test {k}", f"{v:.4f}") for k, v in s["test"].items())]
        return "<h2>Run summary (test metrics of the best checkpoint)</h2>" + markdown_to_html(
            "| | |\n" + "\n".join(f"| {k} | {v} |" for k, v in rows))
    return (f'<h2>Results</h2><p class="note">No run summary, {" or ".join(RESULT_FILES)} or tables.md here (the '
            'run has not finished).</p>')


def _selection_metric(run: Path) -> str | None:
    """The metric a run selects its checkpoint on (from its summary, else its config when set there)."""
    files = RunFiles(run)
    if _own(run, files.summary):
        return files.read_summary().get("metric")  # None for a self-supervised run: it selects on nothing
    if _own(run, files.config):
        return (files.read_config().get("train") or {}).get("metric")
    return None


def curves_figure(runs: Iterable[Path], title: str) -> Figure:
    """Train loss and validation selection metric per epoch, one line per run folder (labelled by its path; a
    self-supervised run shows its loss only)."""
    fig = Figure(figsize=(8.5, 2.8), layout="constrained")
    loss_ax, val_ax = fig.subplots(1, 2)
    metric = ""
    for run in runs:
        rows = RunFiles(run).read_metrics()
        if not rows:
            continue
        metric = _selection_metric(run) or metric
        label = f"{run.parent.name}/{run.name}"
        epochs = [r["epoch"] for r in rows]
        loss_ax.plot(epochs, [r.get("train_loss", r.get("loss")) for r in rows], marker=".", label=label)
        if f"val_{metric}" in rows[0]:
            val_ax.plot(epochs, [r[f"val_{metric}"] for r in rows], marker=".", label=label)
    loss_ax.set(xlabel="epoch", ylabel="train loss")
    val_ax.set(xlabel="epoch", ylabel=f"validation {metric}")
    if val_ax.lines:
        val_ax.legend(fontsize=6, ncols=2)
    fig.suptitle(title, fontsize=9)
    return fig


def _curves(root: Path) -> str:
    groups: dict[Path, list[Path]] = {}
    for path in sorted(p for p in root.rglob(RunFiles(".").metrics.name) if _own(root, p)):
        run = path.parent
        exp = experiment_of(run) if run != root and run.parent != root else None
        exp = exp or run
        groups.setdefault(exp, []).append(run)
    if not groups:
        return ""
    parts = ["<h2>Training curves</h2>"]
    for exp, runs in groups.items():
        title = str(exp.relative_to(root)) if exp != root else root.name
        parts.append(_png(curves_figure(runs, title)))
    return "\n".join(parts)


def _figures(root: Path) -> str:
    pngs = sorted(p for p in root.glob("*.png") if _own(root, p))
    if not pngs:
        return ""
    return "<h2>Figures</h2>" + "\n".join(f"<h3>{html.escape(p.name)}</h3>{_img(p.read_bytes(), p.name)}" for p in pngs)


def run_cka(run: Path, data_root: str | Path | None, n_samples: int) -> Figure:
    """Heatmap of a trainer run's backbone blocks before vs after fine-tuning on its test split."""
    from torch.utils.data import DataLoader, Subset

    from repsim.compare import Bootstrap, compare
    from repsim.data import bootstrap_batches, prepare
    from repsim.plot import heatmap
    from repsim.train.runs import load_run

    cfg = RunFiles(run).read_config()
    test = prepare(cfg["data"], data_root).datasets["test"]
    subset = Subset(test, range(min(n_samples, len(test))))
    loader = DataLoader(subset, batch_sampler=bootstrap_batches(len(subset)))
    before, after = load_run(run, "init"), load_run(run, "best")
    ds = compare(before, after, loader, labels=("before", "after"),  # layers: the backbone's blocks
                 bootstrap=Bootstrap(n_boot=200), progress=False)
    # heatmap's title says what the cells hold
    return heatmap(ds, annotate="ci" if ds.sizes["layer_a"] <= 12 else "none",
                   title=f"before vs after fine-tuning, n={len(subset)}")


def _run_cka(root: Path, data_root: str | Path | None, n_samples: int) -> str:
    files = RunFiles(root)
    if not all(_own(root, f) for f in (files.backbone("init"), files.backbone("best"), files.model, files.config)):
        return ""
    try:
        fig = run_cka(root, data_root, n_samples)
    except FileNotFoundError as err:
        return ('<h2>CKA before vs after</h2><p class="note">Not computed: '
                f'{html.escape(str(err))} (pass --data-root).</p>')
    except (ValueError, RuntimeError) as err:  # e.g. a test split too small for the estimator: skip this section
        return f'<h2>CKA before vs after</h2><p class="note">Not computed: {html.escape(str(err))}</p>'
    return "<h2>CKA before vs after fine-tuning</h2>" + _png(fig)


def build_report(run_dir: str | Path, *, data_root: str | Path | None = None, cka_samples: int = 256) -> str:
    """The HTML text of the report of ``run_dir`` (a trainer run, experiment folders or a study)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no such run folder: {root}")
    head = [f"<h1>repsim report: {html.escape(root.resolve().name)}</h1>",
            f"<p><code>{html.escape(str(root.resolve()))}</code></p>"]
    if _own(root, root / "study.json"):
        study = read_json(root / "study.json")
        head.append(f"<p>Transfer study of <b>{html.escape(study['label'])}</b>; stage seconds: "
                    f"{html.escape(json.dumps(study['timings_s']))}</p>")
        settings = html.escape(json.dumps(study["settings"], indent=2))
        head.append(f"<details><summary>settings</summary><pre>{settings}</pre></details>")
    links = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_symlink())
    if links:
        head.append(f'<p class="note">Not read (symbolic links; a report embeds only the run\'s own regular files): '
                    f'{html.escape(", ".join(links))}</p>')
    body = [_tables(root), _figures(root), _run_cka(root, data_root, cka_samples), _curves(root)]
    return ("<!doctype html><html><head><meta charset='utf-8'><title>repsim report</title><style>" + STYLE +
            "</style></head><body>" + "\n".join(head + [b for b in body if b]) + "</body></html>")


def write_report(run_dir: str | Path, out: str | Path | None = None, **kwargs: Any) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``run_dir/report.html``), atomically."""
    path = Path(out) if out else Path(run_dir) / "report.html"
    return write_text(path, build_report(run_dir, **kwargs))
