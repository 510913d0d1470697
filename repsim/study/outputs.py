"""The study's outputs: ``tables.md``, the figures and ``study.json``, from the organised results and the CKA
matrices (no model code: redrawing a figure imports numpy, xarray and matplotlib only)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from repsim.files import save_png, write_text
from repsim.study import figures
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
from repsim.study.stats import comparisons, run_flags

Flags = Mapping[tuple[str, str, str], list]  # (start, target, scenario) -> the runs flagged by ``run_flags``

FIG_DPI = 110  # small multi-panel PNGs


def _fmt(stat: Mapping[str, Any]) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def tables(s: Settings, res: Results, paired: list[dict], flags: Flags, cka: Mapping[str, Matrices]) -> str:
    """``tables.md``: headline results with per-seed values, paired differences, LR search, k-NN, curves, sizes,
    Fig 7's CKA curves with their references, and the flagged runs."""
    ft = res.finetune
    parts = [f"# Transfer study: {s.model} at {s.img_size} px", "",
             "Starts: " + "; ".join(f"**{st.name}** ({st.kind}{': ' + st.source if st.source else ''})"
                                    for st in s.starts), ""]
    parts += ["## Test metric per target, scenario and start (mean ± std over seeds at the LR chosen on validation)",
              "", "| Target | Scenario | Start | metric | mean ± std | per seed | LR | flagged runs |",
              "|---|---|---|---|---|---|---|---|"]
    for st in s.starts:
        for t, by_sc in ft.get(st.name, {}).items():
            for sc, r in by_sc.items():
                v = r["test"][r["metric"]]
                n_flags = len(flags.get((st.name, t, sc), []))
                parts.append(f"| {t} | {sc} | {st.name} | {r['metric']} | {_fmt(v)} | "
                             f"{', '.join(f'{x:.3f}' for x in v['values'])} | {r['lr']:g} | {n_flags or ''} |")
    if paired:
        parts += ["", "## Paired differences (same seed; mean and 95% t-interval over seeds)", "",
                  "| Target | Scenario | Difference | metric | mean [95% CI] | verdict |", "|---|---|---|---|---|---|"]
        parts += [f"| {p['target']} | {p['scenario']} | {p['a']} − {p['b']} | {p['metric']} | {p['mean']:+.3f} "
                  + (f"[{p['lower']:+.3f}, {p['upper']:+.3f}]" if math.isfinite(p["lower"]) else
                     f"(no interval: {p['n']} seed)") + f" | {p['verdict']} |" for p in paired]
    parts += ["", "## LR search (validation metric, seed 0)", "", "| Target | Scenario | Start | values | chosen |",
              "|---|---|---|---|---|"]
    for st_name, by_t in ft.items():
        for t, by_sc in by_t.items():
            for sc, r in by_sc.items():
                vals = ", ".join(f"{lr}: {v:.3f}" for lr, v in r["lr_search"].items()) or "(fixed LR)"
                parts.append(f"| {t} | {sc} | {st_name} | {vals} | {r['lr']:g} |")
    parts += ["", f"## k-NN on frozen features (Fig 2; k={s.knn['k']}, T={s.knn['temperature']}, test split)", "",
              "| Target | Features | metric | value |", "|---|---|---|---|"]
    rows = [(t, name, r) for name, by_t in res.knn.items() for t, r in by_t.items()]
    rows += [(t, f"{m} (pretrained)", r["knn"]) for m, by_t in res.sizes.items() for t, r in by_t.items()]
    parts += [f"| {t} | {name} | {r['metric']} | {r['test'][r['metric']]['mean']:.3f} |" for t, name, r in rows]
    for curve, what in (("freezing", "first k blocks frozen, linear head"), ("decapitation", "first k blocks kept")):
        if curve in res.curves:
            parts += ["", f"## {'Fig 4' if curve == 'freezing' else 'Fig 5'}: {curve} ({what}; test metric, "
                      f"mean ± std over {s.curve_seeds} seed(s))", "", "| Start | Target | Scenario | k | metric |",
                      "|---|---|---|---|---|"]
            for start, by_t in res.curves[curve].items():
                for t, by_sc in by_t.items():
                    for sc, points in by_sc.items():
                        for k in sorted(points):
                            r = points[k]
                            parts.append(f"| {start} | {t} | {sc} | {k} | {_fmt(r['test'][r['metric']])} "
                                         f"{r['metric']} |")
    if res.sizes:
        parts += ["", "## Fig 6: model size (pretrained, frozen; test metric mean ± std over seeds)", "",
                  "| Model | Target | Scenario | metric |", "|---|---|---|---|"]
        parts += [f"| {m} | {t} | {sc} | {_fmt(r['test'][r['metric']])} {r['metric']} |"
                  for m, by_t in res.sizes.items() for t, by_sc in by_t.items() for sc, r in by_sc.items()
                  if sc != "knn"]
    parts += _fig7_table(s, cka)
    parts += ["", "## Flagged runs", ""]
    flat = [("/".join(exp), f) for exp, fl in flags.items() for f in fl]
    parts += [f"- `{exp}` lr {f['lr']:g} seed {f['seed']}: {'; '.join(f['reasons'])}" for exp, f in flat] or ["none"]
    return "\n".join(parts) + "\n"


def _fig7_table(s: Settings, cka: Mapping[str, Matrices]) -> list[str]:
    """The Fig 7 section of ``tables.md``: per target the same-block CKA curves with their references and bands."""
    parts = ["", f"## Fig 7: same-block CKA on {CKA_FEATURE}, before vs after fine-tuning (unfrozen-linear), with "
             "references", "",
             "Unbiased minibatch CKA on each target's test split (near-equal batches, at least 10 where the split "
             f"allows, the smallest of min({s.cka_batch_size}, N/10) images), "
             f"CKA(block k of a, block k of b) on {CKA_FEATURE} (pool={CKA_POOL!r}). Per start: *before vs after* "
             "(the start vs the model fine-tuned from it, per seed), *AdaBN-before vs after* (the start with its "
             "BatchNorm statistics re-estimated on the target's train images first, so weight change and "
             "statistics change are told apart) and the *seed spread* (two seeds of the start after fine-tuning); "
             f"the *floor*: two random initialisations of the backbone ({s.reference_pairs} disjoint pairs). Each "
             "cell: the mean over seeds (or pairs) [band]; the row says which band: the min–max over seeds/pairs, "
             "or with one matrix its 95% bootstrap CI over batches.", "",
             "| Target | Curve | block 0 … last |", "|---|---|---|"]
    for t, mats in cka.items():
        for c in diagonal_groups(mats):
            cells = ", ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in zip(c.mean, c.lower, c.upper))
            parts.append(f"| {t} | {c.label} | {cells} |")
    return parts


def write_outputs(s: Settings, out: Path, depth: int, timings: Mapping[str, float], res: Results,
                  cka: Mapping[str, Matrices]) -> dict[str, Any]:
    """Write ``tables.md``, the figures and ``study.json`` into ``out``; return the summary."""
    paired = comparisons(res.finetune, s.starts[0].name)
    flags = {(st, t, sc): run_flags(out.joinpath(*Place("finetune", st, t, sc).parts()))
             for st, by_t in res.finetune.items() for t, by_sc in by_t.items() for sc in by_sc}
    flags = {k: v for k, v in flags.items() if v}
    order = [st.name for st in s.starts]
    made = {
        "fig_transfer": figures.transfer(res.finetune, s.starts),
        "fig2_knn": figures.knn(res.knn, res.sizes, order),
        "fig7_cka_before_after": figures.fig7(cka),
        "fig7_diagonal": figures.fig7_diagonal(cka),
        "figA1_stacked_classifier": figures.figA1(cka),
        "fig8_last_block": figures.fig8(cka),
        "fig4_freezing": figures.curve(res.curves, res.finetune, "freezing", order),
        "fig5_decapitation": figures.curve(res.curves, res.finetune, "decapitation", order),
        "fig6_sizes": figures.sizes(res.sizes, res.finetune, s),
    }
    names = {k: save_png(fig, out / f"{k}.png", dpi=FIG_DPI).name for k, fig in made.items() if fig is not None}
    write_text(out / "tables.md", tables(s, res, paired, flags, cka))
    summary = {
        "settings": asdict(s), "label": f"{s.model} from {', '.join(st.name for st in s.starts)}",
        "depth": depth, "timings_s": timings, "figures": names, **res.as_json(), "paired": paired,
        "flags": {"/".join(k): v for k, v in flags.items()},
        "cka": {t: {str(c): cka_summary(v) for c, v in m.items()} for t, m in cka.items()},
        "cka_feature": {"pool": CKA_POOL, "feature": CKA_FEATURE},
        "fig7_diagonals": {t: {str(c): same_block(v) for c, v in m.items() if c.figure in ("floor", *FIG7_CURVES)}
                           for t, m in cka.items()},
        "fig7_curves": {t: [{**asdict(c), "label": c.label} for c in diagonal_groups(m)] for t, m in cka.items()},
    }
    write_text(out / "study.json", json.dumps(summary, indent=2, default=float))
    return summary
