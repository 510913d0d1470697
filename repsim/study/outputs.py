"""The study's outputs: ``tables.md``, the figures and ``study.json``, from the organised results, the CKA
matrices, the run folders' saved predictions and records (``findings``) and what the pipeline measured of the models
(no model code: redrawing a figure imports numpy, xarray and matplotlib only)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from repsim.files import save_png, write_text
from repsim.study import figures
from repsim.study import tables as sections
from repsim.study.bootstrap import Run
from repsim.study.clock import budget_curve, stage_clock
from repsim.study.results import (
    CKA_FEATURE,
    CKA_POOL,
    FIG7_CURVES,
    Matrices,
    Place,
    Results,
    cka_summary,
    diagonal_groups,
    same_block,
)
from repsim.study.settings import Settings
from repsim.study.stats import comparisons, load_runs, mean_interval, metric_label, run_flags, spread, unestimated
from repsim.study.tables import Findings

FIG_DPI = 110  # small multi-panel PNGs
CLOCK_STAGES = ("pretrain", "ssl", "finetune", "knn", "freezing", "decapitation", "sizes")  # folders under the study


def _fmt(stat: Mapping[str, Any]) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def findings(s: Settings, out: Path, res: Results, facts: Mapping[str, Any]) -> Findings:
    """Everything read from the fine-tuning runs at their chosen LRs: bootstrap intervals of each experiment's mean
    and of the paired differences (``s.stat_boot`` replicates over seeds and test images), flagged and still
    improving runs, the budget curve, the clock per stage and each target's number of classes."""
    ft = res.finetune

    def folder(st: str, t: str, sc: str) -> Path:
        return out.joinpath(*Place("finetune", st, t, sc).parts())

    @functools.cache
    def runs(st: str, t: str, sc: str) -> dict[int, Run]:
        return load_runs(folder(st, t, sc), ft[st][t][sc]["lr"])

    f = Findings(facts=dict(facts))
    for st, by_t in ft.items():
        for t, by_sc in by_t.items():
            for sc, r in by_sc.items():
                key = (st, t, sc)
                f.means[key] = mean_interval(runs(*key), r["metric"], s.stat_boot)
                f.classes.setdefault(t, int(next(iter(runs(*key).values()))[0].shape[1]))
                f.flags[key] = run_flags(folder(*key), r["lr"])
                f.improving[key] = (len(runs(*key)), sum(x["still_improving"] for x in f.flags[key]))
    f.paired, f.unestimated = comparisons(s, ft, runs), unestimated(s, ft)
    for st in s.budget_starts if s.budget_points else ():
        for t in s.targets:
            r = ft.get(st, {}).get(t, {}).get(s.budget_scenario)
            if r is not None:
                curve = budget_curve(folder(st, t, s.budget_scenario), r["lr"], r["metric"], s.budget_points)
                f.budget.setdefault(st, {})[t] = {"scenario": s.budget_scenario, "metric": r["metric"], "lr": r["lr"],
                                                  "points": {b: spread(v) for b, v in curve.items()}}
    f.clock = stage_clock({stage: [out / stage] for stage in CLOCK_STAGES})
    return f


def tables(s: Settings, res: Results, f: Findings, cka: Mapping[str, Matrices]) -> str:
    """``tables.md``: headline results with per-seed values and bootstrap intervals, paired differences (primary
    and secondary, Holm), LR search, runs still improving, the budget curve, k-NN, curves, sizes, Fig 7's CKA curves
    with their references, the self-supervised starts, the clock and the flagged runs."""
    ft = res.finetune
    depth, after = f.facts.get("depth", 0), f.facts.get("after_blocks", [])
    parts = [f"# Transfer study: {s.model} at {s.img_size} px", "",
             "Starts: " + "; ".join(f"**{st.name}** ({st.kind}{': ' + st.source if st.source else ''})"
                                    for st in s.starts), "", *sections.tokens(f.facts)]
    parts += sections.headline(ft, f, [st.name for st in s.starts])
    parts += ["", *sections.paired(f.paired, s.stat_boot, f.unestimated), "", *sections.lr_search(ft), "",
              *sections.improving(f), "", *sections.budget(f)]
    parts += ["", f"## k-NN on frozen features (Fig 2; k={s.knn['k']}, T={s.knn['temperature']}, test split)", "",
              "| Target | Features | metric | value |", "|---|---|---|---|"]
    rows = [(t, name, r) for name, by_t in res.knn.items() for t, r in by_t.items()]
    rows += [(t, f"{m} (pretrained)", r["knn"]) for m, by_t in res.sizes.items() for t, r in by_t.items()]
    parts += [f"| {t} | {name} | {metric_label(r['metric'])} | {r['test'][r['metric']]['mean']:.3f} |"
              for t, name, r in rows]
    for curve, what in (("freezing", "first k blocks frozen, unfrozen-linear"),
                        ("decapitation", "first k blocks kept")):
        if curve in res.curves:
            parts += ["", f"## {'Fig 4' if curve == 'freezing' else 'Fig 5'}: {curve} ({what}, k counted from 1 of "
                      f"{depth}; test metric, mean ± std over {s.curve_seeds} seed(s))", "",
                      "| Start | Target | Scenario | k | metric |", "|---|---|---|---|---|"]
            for start, by_t in res.curves[curve].items():
                for t, by_sc in by_t.items():
                    for sc, points in by_sc.items():
                        for k in sorted(points):
                            r = points[k]
                            label = f"{k}: {figures.frozen_end(depth, after)}" if curve == "freezing" and k == depth \
                                else str(k)
                            parts.append(f"| {start} | {t} | {sc} | {label} | {_fmt(r['test'][r['metric']])} "
                                         f"{metric_label(r['metric'])} |")
    if res.sizes:
        params = f.facts.get("params", {})
        parts += ["", "## Fig 6: model size (pretrained, frozen; test metric mean ± std over seeds)", "",
                  "| Model | backbone parameters | Target | Scenario | metric |", "|---|---|---|---|---|"]
        parts += [f"| {m} | {params.get(m, '')} | {t} | {sc} | {_fmt(r['test'][r['metric']])} "
                  f"{metric_label(r['metric'])} |"
                  for m, by_t in res.sizes.items() for t, by_sc in by_t.items() for sc, r in by_sc.items()
                  if sc != "knn"]
    parts += ["", *sections.fig7(s, cka)]
    parts += ["", *sections.ssl(res.ssl, res.skipped), "", *sections.clock(f), "",
              "## Flagged runs (at the chosen LRs)", ""]
    flat = [("/".join(exp), run) for exp, fl in f.flags.items() for run in fl]
    parts += [f"- `{exp}` lr {run['lr']:g} seed {run['seed']}: {'; '.join(run['reasons'])}"
              for exp, run in flat] or ["none"]
    return "\n".join(parts) + "\n"


def write_outputs(s: Settings, out: Path, depth: int, timings: Mapping[str, float], res: Results,
                  cka: Mapping[str, Matrices], facts: Mapping[str, Any],
                  wall: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write ``tables.md``, the figures and ``study.json`` into ``out``; return the summary. ``facts``: what the
    pipeline measured of the models (``Findings.facts``); ``wall``: the wall time of every invocation so far
    (``clock.WallLog.summary``)."""
    f = findings(s, out, res, {**facts, "depth": depth})
    order = [st.name for st in s.starts]
    scratch = next((st.name for st in s.starts if st.kind == "scratch"), None)  # the curves' reference runs
    after = f.facts.get("after_blocks", ())
    made = {
        "fig_transfer": figures.transfer(res.finetune, s.starts, f.classes),
        "fig_forest": figures.forest(f.paired),
        "fig_budget": figures.budget(f.budget, order, f.classes),
        "fig2_knn": figures.knn(res.knn, res.sizes, order, f.classes),
        "fig7_cka_before_after": figures.fig7(cka),
        "fig7_diagonal": figures.fig7_diagonal(cka),
        "figA1_stacked_classifier": figures.figA1(cka),
        "fig8_last_block": figures.fig8(cka),
        "fig4_freezing": figures.curve(res.curves, res.finetune, "freezing", order, f.classes, depth, scratch,
                                       after),
        "fig5_decapitation": figures.curve(res.curves, res.finetune, "decapitation", order, f.classes, depth,
                                            scratch, after),
        "fig6_sizes": figures.sizes(res.sizes, res.finetune, s, f.facts.get("params", {}), f.classes),
    }
    names = {k: save_png(fig, out / f"{k}.png", dpi=FIG_DPI).name for k, fig in made.items() if fig is not None}
    f.wall = wall() if wall else {}
    write_text(out / "tables.md", tables(s, res, f, cka))
    summary = {
        "settings": asdict(s), "label": f"{s.model} from {', '.join(st.name for st in s.starts)}",
        "depth": depth, "timings_s": timings, "figures": names, **res.as_json(), **f.as_json(),
        "cka": {t: {str(c): cka_summary(v) for c, v in m.items()} for t, m in cka.items()},
        "cka_feature": {"pool": CKA_POOL, "feature": CKA_FEATURE},
        "fig7_diagonals": {t: {str(c): same_block(v) for c, v in m.items() if c.figure in ("floor", *FIG7_CURVES)}
                           for t, m in cka.items()},
        "fig7_curves": {t: [{**asdict(c), "label": c.label} for c in diagonal_groups(m)] for t, m in cka.items()},
    }
    write_text(out / "study.json", json.dumps(summary, indent=2, default=float))
    return summary
