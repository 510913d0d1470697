"""The sections of ``tables.md`` that report the study's statistics and bookkeeping (``Findings``: numbers read from
the run folders once by ``repsim.study.outputs``): headline results with bootstrap intervals, the paired
differences (primary and secondary families, Holm), the LR search, runs still improving, the budget curve, the
clock per stage, the self-supervised starts, the stacked classifier's tokens and Fig 7's CKA curves with their
references. Markdown strings only."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from repsim.study.results import CKA_FEATURE, CKA_POOL, Matrices, diagonal_groups
from repsim.study.settings import Settings
from repsim.study.stats import ALPHA, IMPROVING_TARGET, metric_label

Key = tuple[str, str, str]  # (start, target, scenario)


@dataclass
class Findings:
    """What the tables, figures and ``study.json`` report beyond the organised results: ``means`` (each
    experiment's seed-mean with its bootstrap interval), ``paired`` (``stats.comparisons`` rows), ``flags`` (the
    flagged runs at the chosen LRs), ``improving`` (runs at the chosen LR, of them still improving),
    ``budget[start][target]`` (the budget curve), ``clock`` (``clock.stage_clock``), ``classes`` per target and
    ``facts`` about the models (``params`` per model, ``tokens`` of the stacked classifier, ``after_blocks``: what
    trains when every block is frozen), computed by the pipeline."""

    means: dict[Key, dict[str, Any]] = field(default_factory=dict)
    paired: list[dict[str, Any]] = field(default_factory=list)
    unestimated: list[dict[str, Any]] = field(default_factory=list)
    flags: dict[Key, list[dict[str, Any]]] = field(default_factory=dict)
    improving: dict[Key, tuple[int, int]] = field(default_factory=dict)
    budget: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    clock: dict[str, dict[str, float]] = field(default_factory=dict)
    wall: dict[str, Any] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def improving_share(self) -> dict[str, Any]:
        """Runs at the chosen LRs still improving at their end, over all experiments, against the target share."""
        runs, still = (sum(v[i] for v in self.improving.values()) for i in (0, 1))
        return {"runs": runs, "still_improving": still, "share": still / runs if runs else math.nan,
                "target": IMPROVING_TARGET}

    def as_json(self) -> dict[str, Any]:
        """The findings as ``study.json`` holds them (experiments named ``start/target/scenario``)."""
        return {"intervals": {"/".join(k): v for k, v in self.means.items()}, "paired": self.paired,
                "primaries_not_estimated": self.unestimated,
                "flags": {"/".join(k): v for k, v in self.flags.items() if v},
                "still_improving": {**self.improving_share(), "per_experiment": {
                    "/".join(k): {"runs": n, "still_improving": m} for k, (n, m) in self.improving.items()}},
                "budget_curve": self.budget, "clock": self.clock, "wall": self.wall, "classes": self.classes,
                "models": self.facts}


def _ci(lower: float, upper: float) -> str:
    return f"[{lower:+.3f}, {upper:+.3f}]" if math.isfinite(lower) else "(no defined replicate)"


def _undefined(stat: Mapping[str, Any]) -> str:
    return f"; {stat['undefined']} of {stat['n_boot']} replicates undefined" if stat["undefined"] else ""


def headline(ft: Mapping[str, Mapping[str, Mapping[str, Any]]], f: Findings, order: Sequence[str]) -> list[str]:
    """Per target, scenario and start: the per-seed test values, mean ± std and the bootstrap interval of the mean."""
    parts = ["## Test metric per target, scenario and start (at the LR chosen on validation)", "",
             "Mean ± std over seeds; 95% CI of the mean: percentile interval of a bootstrap that resamples the seeds "
             "and the test images.", "",
             "| Target | Scenario | Start | metric | per seed | mean ± std | 95% CI of the mean | LR | flagged runs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for st in order:
        for t, by_sc in ft.get(st, {}).items():
            for sc, r in by_sc.items():
                v, ci = r["test"][r["metric"]], f.means[(st, t, sc)]
                cells = [t, sc, st, metric_label(r["metric"]), ", ".join(f"{x:.3f}" for x in v["values"]),
                         f"{v['mean']:.3f} ± {v['std']:.3f}", _ci(ci["lower"], ci["upper"]).replace("+", "")
                         + _undefined(ci), f"{r['lr']:g}", str(len(f.flags.get((st, t, sc), [])) or "")]
                parts.append("| " + " | ".join(cells) + " |")
    return parts


def paired(rows: Sequence[Mapping[str, Any]], n_boot: int, unestimated: Sequence[Mapping[str, Any]] = ()
           ) -> list[str]:
    """The paired differences a − b, primary then secondary family, and the declared primaries that could not be
    estimated (a start without results there)."""
    if not rows and not unestimated:
        return []
    parts = ["## Paired differences between starts (a − b, paired by seed and test image)", "",
             f"Hierarchical paired bootstrap ({n_boot} replicates; seeds and test images resampled, the same for both "
             "starts): mean difference on the test set, percentile 95% CI, two-sided bootstrap p; Holm-adjusted "
             f"within each family; verdict from the adjusted p at {ALPHA}."]
    for family in ("primary", "secondary"):
        mine = [r for r in rows if r["family"] == family]
        if not mine:
            continue
        parts += ["", f"### {family.capitalize()} comparisons", "",
                  "| Target | Scenario | a − b | metric | mean [95% CI] | per seed | seeds x images | p | Holm p | "
                  "verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
        parts += [f"| {r['target']} | {r['scenario']} | {r['a']} − {r['b']} | {metric_label(r['metric'])} | "
                  f"{r['mean']:+.3f} {_ci(r['lower'], r['upper'])}{_undefined(r)} | "
                  f"{', '.join(f'{d:+.3f}' for d in r['differences'])} | {r['n_seeds']} x {r['n_images']} | "
                  f"{r['p']:.4f} | {r['p_holm']:.4f} | {r['verdict']} |" for r in mine]
    if unestimated:
        parts += ["", "Declared primaries not estimated (outside the Holm family: no result to compare):", ""]
        parts += [f"- {u['target']} / {u['scenario']}: {u['a']} − {u['b']}: no results of "
                  f"{' and '.join(u['missing'])} (see the self-supervised starts and the experiments skipped)"
                  for u in unestimated]
    return parts


def lr_search(ft: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """The validation value of every LR tried (seed 0), those added beyond the grid's edge marked."""
    parts = ["## LR search (validation metric, seed 0; * an LR added beyond the grid's edge)", "",
             "| Target | Scenario | Start | values | chosen | note |", "|---|---|---|---|---|---|"]
    for st, by_t in ft.items():
        for t, by_sc in by_t.items():
            for sc, r in by_sc.items():
                extended = {f"{lr:g}" for lr in r.get("lr_grid_extended", [])}
                vals = ", ".join(f"{lr}{'*' if lr in extended else ''}: {v:.3f}" for lr, v in r["lr_search"].items())
                note = "LR on grid edge" if r.get("lr_on_grid_edge") else ""
                parts.append(f"| {t} | {sc} | {st} | {vals or '(fixed LR)'} | {r['lr']:g} | {note} |")
    return parts


def improving(f: Findings) -> list[str]:
    """Runs still improving at the end of their budget, per experiment at its chosen LR and over all."""
    total = f.improving_share()
    share = f"{total['share']:.0%}" if total["runs"] else "no runs"
    parts = ["## Runs still improving at the end of their budget (at the chosen LRs)", "",
             "Step budget: best validation in the last 10% of the steps of a run the plateau rule did not stop; epoch "
             f"budget: best at the last of all its epochs. Over all: {total['still_improving']} of {total['runs']} "
             f"runs ({share}; target at most {IMPROVING_TARGET:.0%}"
             + ("; ABOVE TARGET" if total["runs"] and total["share"] > IMPROVING_TARGET else "") + ").", "",
             "| Start | Target | Scenario | runs | still improving |", "|---|---|---|---|---|"]
    parts += [f"| {st} | {t} | {sc} | {n} | {m} |" for (st, t, sc), (n, m) in f.improving.items()]
    return parts


def budget(f: Findings) -> list[str]:
    """The budget curve: test metric of the best-on-validation checkpoint after B optimiser steps."""
    if not f.budget:
        return []
    parts = ["## Budget curve (test metric of the checkpoint best on validation after B optimiser steps; nan: no "
             "validation yet)", "", "| Start | Target | Scenario | steps B | metric | mean ± std | per seed |",
             "|---|---|---|---|---|---|---|"]
    for st, by_t in f.budget.items():
        for t, r in by_t.items():
            for b, v in r["points"].items():
                parts.append(f"| {st} | {t} | {r['scenario']} | {b} | {metric_label(r['metric'])} | "
                             f"{v['mean']:.3f} ± {v['std']:.3f} | {', '.join(f'{x:.3f}' for x in v['values'])} |")
    return parts


def clock(f: Findings) -> list[str]:
    """Where the study's time went: the wall time over every invocation, and per stage (finished runs under each
    stage's folders) the run seconds and their shares."""
    parts = []
    if f.wall:
        runs = f.wall["invocations"]
        stages = ", ".join(f"{k} {v / 3600:.2f} h" for k, v in f.wall["by_stage_s"].items())
        parts += ["## Wall time", "", f"{f.wall['total_s'] / 3600:.2f} h over {len(runs)} invocation(s) of "
                  f"`repsim study` ({stages}; a stopped invocation counts up to its last tick, at most a minute "
                  "short). "
                  "Invocations: " + "; ".join(f"{e['started']} {e['seconds'] / 3600:.2f} h ({e.get('jobs')} jobs x "
                                              f"{e.get('threads')} threads)" for e in runs) + ".", ""]
    if not f.clock:
        return parts
    parts += ["## Clock per stage (training-loop and evaluation seconds summed over finished runs)", "",
             "| Stage | runs | run seconds | optimiser steps | img/s | data share | step share | eval share |",
             "|---|---|---|---|---|---|---|---|"]
    parts += [f"| {stage} | {c['runs']} | {c['run_seconds']:.1f} | {c['steps']} | {c['img_per_s']} | "
              f"{c['data_share']} | {c['step_share']} | {c['eval_share']} |" for stage, c in f.clock.items()]
    return parts


def ssl(runs: Mapping[str, Mapping[str, Mapping[str, Any]]], skipped: Mapping[str, str]) -> list[str]:
    """The self-supervised starts (their pretraining per target, or why it collapsed) and the experiments skipped."""
    parts = []
    if runs:
        parts += ["## Self-supervised starts (pretraining on each target's train split)", "",
                  "| Start | Target | epochs | final loss (chance) | teacher entropy | val effective rank | status |",
                  "|---|---|---|---|---|---|---|"]
        for st, by_t in runs.items():
            for t, r in by_t.items():
                if "collapsed" in r:
                    parts.append(f"| {st} | {t} | | | | | collapsed: {r['collapsed']} |")
                    continue
                entropy = r.get("teacher_entropy")
                parts.append(f"| {st} | {t} | {r['epochs_run']} | {r['final_loss']:.3f} ({r['chance_loss']:.3f}) | "
                             f"{'' if entropy is None else f'{entropy:.3f}'} | {r['val_effective_rank']:.1f} | ok |")
    if skipped:
        parts += ["", "## Experiments skipped (their start collapsed, or not finished yet)", ""]
        by_reason: dict[str, list[str]] = {}
        for place, reason in skipped.items():
            by_reason.setdefault(reason, []).append(f"`{place}`")
        parts += [f"- {reason} ({len(places)}): {', '.join(places)}" for reason, places in by_reason.items()]
    return parts


def tokens(facts: Mapping[str, Any]) -> list[str]:
    """How many tokens the stacked classifier attends over."""
    tok = facts.get("tokens")
    if not tok:
        return []
    pooled = (f", average-pooled to {tok['side']}x{tok['side']} (classifier max_grid {tok['max_grid']})"
              if tok["side"] < tok["grid"] else "")
    return [f"Stacked classifier input: the last block's {tok['grid']}x{tok['grid']} token grid at "
            f"{tok['img_size']} px{pooled}: it sees {tok['tokens']} tokens (+ its CLS token).", ""]


def fig7(s: Settings, cka: Mapping[str, Matrices]) -> list[str]:
    """The Fig 7 section of ``tables.md``: per target the same-block CKA curves with their references and bands."""
    parts = [f"## Fig 7: same-block CKA on {CKA_FEATURE}, before vs after fine-tuning (unfrozen-linear), with "
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
             "| Target | Curve | block 1 … last (1-based, as Fig 4/5) |", "|---|---|---|"]
    for t, mats in cka.items():
        for c in diagonal_groups(mats):
            cells = ", ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in zip(c.mean, c.lower, c.upper))
            parts.append(f"| {t} | {c.label} | {cells} |")
    return parts
