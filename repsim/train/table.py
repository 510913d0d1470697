"""Paper-shaped results table: one row per (model, scenario, variant), one column per dataset, mean ± std."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from repsim.files import read_json

RESULT_FILES = ("results.json", "knn.json")
RESULT_KEYS = ("dataset", "model", "scenario", "metric", "test")  # what a table row reads of a result


def collect(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Every ``results.json`` / ``knn.json`` under ``paths`` (files or folders, searched recursively)."""
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such run folder: {path}")
        files = [path] if path.is_file() else sorted(p for n in RESULT_FILES for p in path.rglob(n))
        found += [_checked(f) for f in files]
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


def markdown_table(results: list[dict[str, Any]], digits: int = 3) -> str:
    """Markdown table of the selection metric of each result (test split), ``mean ± std`` over seeds."""
    columns = sorted({(r["dataset"], r["metric"]) for r in results})
    sizes = {r.get("img_size") for r in results}
    rows: dict[tuple, dict[tuple, str]] = {}
    for r in results:
        key = (r["model"], r["scenario"], _variant(r), r.get("img_size") if len(sizes) > 1 else "")
        stat = r["test"][r["metric"]]
        n = len(stat["values"])
        rows.setdefault(key, {})[(r["dataset"], r["metric"])] = (
            f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}" + ("" if n > 1 else " (n=1)"))
    head = ["Model", "Scenario", "Variant", *(["Size"] if len(sizes) > 1 else []),
            *[f"{d}, {m}" for d, m in columns]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in sorted(rows, key=lambda k: tuple(map(str, k))):
        cells = [str(k) for k in key[:3]] + ([str(key[3])] if len(sizes) > 1 else [])
        cells += [rows[key].get(c, "") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
