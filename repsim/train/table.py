"""Paper-shaped results table: one row per (model, starting weights, scenario, variant), one column per dataset,
mean ± std over seeds."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from repsim.files import read_json
from repsim.train.runs import RESULT_FILES

RESULT_KEYS = ("dataset", "model", "scenario", "metric", "test")  # what a table row reads of a result


def collect(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every ``results.json`` / ``knn.json`` under ``paths`` (files or folders, searched recursively), each with the
    file it came from under ``"source"``."""
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such run folder: {path}")
        files = [path] if path.is_file() else sorted(p for n in RESULT_FILES for p in path.rglob(n))
        found += [{**_checked(f), "source": str(f)} for f in files]
    if not found:
        raise FileNotFoundError(f"no {' or '.join(RESULT_FILES)} under {[str(p) for p in paths]}")
    return found


def _checked(path: Path) -> dict[str, Any]:
    """The result in ``path``, checked to hold what a table needs (one line naming the file otherwise)."""
    result = read_json(path)
    missing = [k for k in RESULT_KEYS if k not in result] if isinstance(result, dict) else list(RESULT_KEYS)
    if missing:
        raise ValueError(f"{path} lacks {missing} (written by something else, or edited); remove it or rerun its "
                         "experiment")
    return result


def _variant(r: dict[str, Any]) -> str:
    parts = [f"{k}={r[k]}" for k in ("freeze_blocks", "decapitate") if r.get(k) is not None]
    return ", ".join(parts)


def _weights(r: dict[str, Any]) -> str:
    """The result's starting weights; a checkpoint path relative to the working folder where it lies inside it.
    Results written before repsim recorded weights are told apart by their folder."""
    weights = r.get("weights")
    if weights is None:
        return f"unrecorded ({Path(r.get('source', '?')).parent})"
    if weights.startswith("checkpoint "):
        path = weights.removeprefix("checkpoint ")
        rel = os.path.relpath(path) if Path(path).is_absolute() else path
        return f"checkpoint {rel if not rel.startswith('..') else path}"
    return str(weights)


def markdown_table(results: list[dict[str, Any]], digits: int = 3) -> str:
    """Markdown table of the selection metric of each result (test split), ``mean ± std`` over seeds. Results of
    different starting weights get rows of their own; results that would still share a cell (two experiments of
    one configuration) each get a row naming their folder, never one overwriting the other."""
    columns = sorted({(r["dataset"], r["metric"]) for r in results})
    sizes = {r.get("img_size") for r in results}

    def key(r: dict[str, Any], where: bool) -> tuple:
        variant = ", ".join(v for v in (_variant(r), str(Path(r.get("source", "?")).parent) if where else "") if v)
        return r["model"], _weights(r), r["scenario"], variant, r.get("img_size") if len(sizes) > 1 else ""

    seen: dict[tuple, int] = {}
    for r in results:
        seen[key(r, False), r["dataset"], r["metric"]] = seen.get((key(r, False), r["dataset"], r["metric"]), 0) + 1
    rows: dict[tuple, dict[tuple, str]] = {}
    for r in results:
        stat = r["test"][r["metric"]]
        n = len(stat["values"])
        where = seen[key(r, False), r["dataset"], r["metric"]] > 1
        rows.setdefault(key(r, where), {})[(r["dataset"], r["metric"])] = (
            f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}" + ("" if n > 1 else " (n=1)"))
    head = ["Model", "Weights", "Scenario", "Variant", *(["Size"] if len(sizes) > 1 else []),
            *[f"{d}, {m}" for d, m in columns]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(rows, key=lambda k: tuple(map(str, k))):
        cells = [str(k) for k in row[:4]] + ([str(row[4])] if len(sizes) > 1 else [])
        cells += [rows[row].get(c, "") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
