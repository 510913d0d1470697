"""The study's figures: results per start (headline), the paired differences (forest plot), the budget curve, k-NN
(Fig 2), freezing and decapitation curves (Figs 4, 5), model size (Fig 6), CKA before vs after with its references
(Fig 7: floor, seed spread, AdaBN-before), the stacked classifier (Fig A.1) and the last block across backbones
(Fig 8), every CKA on flattened stage outputs. Each returns a matplotlib Figure (never shown), or None when there is
no data. Every metric axis shows the chance level of its metric (``repsim.study.stats.chance_level``; ``classes``
gives each target's number of classes)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from repsim.plot import wrap_to_figure
from repsim.study.results import CKA_FEATURE, Matrices, diagonal_groups
from repsim.study.settings import Settings, Start
from repsim.study.stats import chance_level, metric_label

ByStart = Mapping[str, Mapping[str, Mapping[str, dict]]]
VERDICT_COLOURS = {"helps": "tab:green", "hurts": "tab:red", "no evidence": "grey"}


def _axes(n: int, title: str, width: float = 4.2, height: float = 3.2) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width * n, height), layout="constrained")
    fig.suptitle(wrap_to_figure(title, fig, fontsize=10), fontsize=10)
    return fig, fig.subplots(1, n, squeeze=False)[0]


def _targets(res: ByStart) -> list[str]:
    return list(dict.fromkeys(t for by_t in res.values() for t in by_t))


def _in_order(by_start: Mapping[str, Any], order: Sequence[str]) -> list[tuple[str, Any]]:
    """``by_start``'s items in the study's start order (unknown names last)."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(by_start.items(), key=lambda kv: rank.get(kv[0], len(rank)))


def _colour(name: str, order: Sequence[str], spare: int = 0) -> str:
    """A start's colour in every figure: ``C<i>``, ``i`` its place in the study; other names (size variants) take
    colours after the starts' (``spare`` tells them apart)."""
    return f"C{order.index(name) if name in order else len(order) + spare}"


def _metric_axis(ax: Any, metric: str, classes: int | None, what: str = "test") -> None:
    """Label a metric axis and draw the metric's chance level on it (dotted, in the legend)."""
    ax.set_ylabel(f"{what} {metric_label(metric)}")
    level = chance_level(metric, classes) if metric else None
    if level is not None:
        ax.axhline(level, color="black", linewidth=0.8, linestyle=":", label=f"chance ({level:.3g})")


def _legend(ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)


def transfer(ft: ByStart, starts: Sequence[Start], classes: Mapping[str, int]) -> Figure | None:
    """Test metric per scenario, one marker per start: mean ± std and every seed as a dot."""
    targets = _targets(ft)
    if not targets:
        return None
    fig, axes = _axes(len(targets), "Test metric by scenario and start (mean ± std; dots: seeds)", width=4.6)
    names = [st.name for st in starts]
    for ax, t in zip(axes, targets):
        scenarios = list(dict.fromkeys(sc for st in names for sc in ft.get(st, {}).get(t, {})))
        metric = ""
        for i, st in enumerate(names):
            offset, colour = (i - (len(names) - 1) / 2) * 0.18, _colour(st, names)
            for j, sc in enumerate(scenarios):
                r = ft.get(st, {}).get(t, {}).get(sc)
                if r is None:
                    continue
                metric = r["metric"]
                v = r["test"][metric]
                ax.errorbar(j + offset, v["mean"], yerr=v["std"], fmt="o", color=colour, capsize=3,
                            label=st if j == 0 or sc == scenarios[0] else None)
                ax.scatter(np.full(len(v["values"]), j + offset + 0.06), v["values"], s=6, color=colour, alpha=0.5)
        ax.set_xticks(range(len(scenarios)), [sc.replace("-", "\n") for sc in scenarios], fontsize=7)
        ax.set_title(t)
        _metric_axis(ax, metric, classes.get(t))
        _legend(ax)
    return fig


def forest(paired: Sequence[Mapping[str, Any]]) -> Figure | None:
    """The paired differences a − b with their 95% bootstrap intervals, one row each, per target: filled circles
    the primary comparisons, open squares the secondary ones; colour and row label the verdict from the
    Holm-adjusted p within the family."""
    targets = list(dict.fromkeys(p["target"] for p in paired))
    if not targets:
        return None
    rows = max(sum(p["target"] == t for p in paired) for t in targets)
    fig, axes = _axes(len(targets), "Paired differences between starts (a − b; 95% bootstrap CI over seeds and test "
                      "images; filled: primary, open: secondary; verdict from the Holm-adjusted p within its family)",
                      width=5.6, height=1.3 + 0.5 * rows)
    for ax, t in zip(axes, targets):
        mine = list(reversed([p for p in paired if p["target"] == t]))  # the first row on top
        for y, p in enumerate(mine):
            colour, primary = VERDICT_COLOURS[p["verdict"]], p["family"] == "primary"
            ax.errorbar(p["mean"], y, xerr=[[p["mean"] - p["lower"]], [p["upper"] - p["mean"]]],
                        fmt="o" if primary else "s", color=colour, mfc=colour if primary else "white", capsize=3)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(mine)), [f"{p['a']} − {p['b']}, {p['scenario']}\n{p['family']}: p {p['p']:.3f}, "
                                         f"Holm {p['p_holm']:.3f}: {p['verdict']}" for p in mine], fontsize=7)
        for label, p in zip(ax.get_yticklabels(), mine):
            label.set_color(VERDICT_COLOURS[p["verdict"]])
        ax.set_ylim(-0.7, len(mine) - 0.3)
        ax.set(title=t, xlabel=f"difference in test {metric_label(mine[0]['metric'])}")
    return fig


def budget(curve_res: Mapping[str, Mapping[str, Mapping[str, Any]]], order: Sequence[str],
           classes: Mapping[str, int]) -> Figure | None:
    """The validation-selected test metric after B optimiser steps (log2 axis), per start: mean ± std over seeds
    and every seed as a dot."""
    targets = list(dict.fromkeys(t for by_t in curve_res.values() for t in by_t))
    if not targets:
        return None
    fig, axes = _axes(len(targets), "Budget curve: test metric of the best-on-validation checkpoint after B "
                      "optimiser steps (mean ± std; dots: seeds)")
    for ax, t in zip(axes, targets):
        metric, ticks = "", set()
        for start, by_t in _in_order(curve_res, order):
            if t not in by_t:
                continue
            r = by_t[t]
            metric, colour = r["metric"], _colour(start, order)
            budgets = sorted(r["points"], key=int)
            xs = [int(b) for b in budgets]
            ticks.update(xs)
            ax.errorbar(xs, [r["points"][b]["mean"] for b in budgets], yerr=[r["points"][b]["std"] for b in budgets],
                        marker="o", capsize=3, color=colour, label=f"{start} ({r['scenario']})")
            for x, b in zip(xs, budgets):
                ax.scatter(np.full(len(r["points"][b]["values"]), x * 1.04), r["points"][b]["values"], s=6,
                           color=colour, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(b) for b in sorted(ticks)])
        ax.minorticks_off()
        ax.set(title=t, xlabel="optimiser steps B (log2 axis)")
        _metric_axis(ax, metric, classes.get(t))
        _legend(ax)
    return fig


def knn(knn_res: ByStart, sizes: ByStart, order: Sequence[str], classes: Mapping[str, int]) -> Figure | None:
    """k-NN test metric of each start's frozen features (and of the size variants), per target."""
    targets = _targets(knn_res)
    if not targets:
        return None
    fig, axes = _axes(len(targets), "Fig 2: k-NN on frozen features (test split)")
    for ax, t in zip(axes, targets):
        bars = [(name, by_t[t]) for name, by_t in _in_order(knn_res, order) if t in by_t]
        bars += [(m, by_t[t]["knn"]) for m, by_t in sizes.items() if t in by_t and "knn" in by_t[t]]
        metric = bars[0][1]["metric"]
        ax.bar(range(len(bars)), [r["test"][metric]["mean"] for _, r in bars],
               color=[_colour(n, order, j) for j, (n, _) in enumerate(bars)])
        ax.set_xticks(range(len(bars)), [textwrap.fill(n, 12) for n, _ in bars], fontsize=7)
        ax.set_title(t)
        _metric_axis(ax, metric, classes.get(t))
        ax.legend(fontsize=7)
    return fig


def frozen_end(depth: int, after: Sequence[str]) -> str:
    """What the freezing curve's last point is: every block frozen, and what still trains after them (the modules
    between the last block and the head, e.g. EfficientNet's ``conv_head`` and ``bn2``)."""
    return f"all {depth} blocks frozen" + (f" ({', '.join(after)} + head train)" if after else " (head trains)")


def curve(curves: Mapping[str, Any], ft: ByStart, name: str, order: Sequence[str], classes: Mapping[str, int],
          depth: int, reference: str | None = None, after: Sequence[str] = ()) -> Figure | None:
    """Test metric against k, the number of blocks frozen (Fig 4; k = 0: none, the full unfrozen run) or kept
    (Fig 5), counted the same way (the first k blocks, 1-based), per target: mean ± std over the curve's seeds. Grey:
    the ``reference`` start's full run in the scenario of each curve drawn."""
    if name not in curves:
        return None
    by_start = curves[name]
    targets = list(dict.fromkeys(t for by_t in by_start.values() for t in by_t))
    freezing = name == "freezing"
    title = ("Fig 4: progressive freezing (first k blocks frozen, unfrozen-linear)" if freezing
             else "Fig 5: decapitation (first k blocks kept)")
    fig, axes = _axes(len(targets), title + "; mean ± std over seeds", width=4.6)
    for ax, t in zip(axes, targets):
        metric, drawn = "", []
        for start, by_t in _in_order(by_start, order):
            for sc, points in by_t.get(t, {}).items():
                ks = sorted(points)
                metric = points[ks[0]]["metric"]
                means = [points[p]["test"][metric]["mean"] for p in ks]
                ax.errorbar(ks, means, yerr=[points[p]["test"][metric]["std"] for p in ks], marker="o", capsize=3,
                            color=_colour(start, order), label=f"{start}, {sc}")
                drawn.append(sc)
                if freezing and ks[-1] == depth:
                    ax.annotate(frozen_end(depth, after), (depth, means[-1]), xytext=(-4, 10),
                                textcoords="offset points", ha="right", fontsize=7)
        for i, sc in enumerate(dict.fromkeys(drawn)):
            ref = ft.get(reference or "", {}).get(t, {}).get(sc)
            if ref is not None:
                ax.axhline(ref["test"][metric]["mean"], color="grey", linestyle=("--", "-.")[i % 2],
                           label=f"{reference}, {sc} (full run)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        what = "frozen" if freezing else "kept"
        ax.set(title=t, xlabel=f"k: blocks {what}, the first k of {depth} (1-based)" + ("; 0: none" if freezing
                                                                                         else ""))
        _metric_axis(ax, metric, classes.get(t))
        _legend(ax)
    return fig


def sizes(size_res: ByStart, ft: ByStart, settings: Settings, params: Mapping[str, int],
          classes: Mapping[str, int]) -> Figure | None:
    """Fig 6 analogue: frozen-scenario test metric against the backbone's parameter count (``params``), from the
    chance level to the metric's maximum (1) so that differences are seen at their true scale."""
    if not size_res:
        return None
    main = next((st.name for st in settings.starts if st.kind == "pretrained"), None)
    models = ([settings.model] if main else []) + list(size_res)
    fig, axes = _axes(len(settings.targets), "Fig 6: model size, pretrained and frozen (mean ± std over seeds)")
    for ax, t in zip(axes, settings.targets):
        metric = ""
        own: Mapping[str, dict] = ft.get(main, {}).get(t, {}) if main else {}  # the study's model
        for i, sc in enumerate(settings.size_scenarios):
            rows = [(m, own[sc] if m == settings.model else size_res[m][t][sc]) for m in models
                    if (sc in own if m == settings.model else sc in size_res.get(m, {}).get(t, {}))]
            if not rows:
                continue
            metric = rows[0][1]["metric"]
            xs = [params[m] / 1e6 for m, _ in rows]
            stats = [r["test"][metric] for _, r in rows]
            ax.errorbar(xs, [v["mean"] for v in stats], yerr=[v["std"] for v in stats], marker="o", capsize=3,
                        color=f"C{i}", label=sc)
        ax.secondary_xaxis("top").set_xticks([params[m] / 1e6 for m in models],
                                             [m.replace("efficientnet_", "") for m in models], fontsize=7)
        ax.set(title=t, xlabel="backbone parameters (millions)")
        _metric_axis(ax, metric, classes.get(t))
        ax.set_ylim(top=max(1.0, ax.get_ylim()[1]))
        _legend(ax)
    return fig


_CURVE_STYLE = {"floor": ("grey", "--"), "fig7": ("C0", "-"), "adabn": ("C1", "-."), "spread": ("C2", ":")}


def fig7_diagonal(cka: Mapping[str, Matrices]) -> Figure | None:
    """CKA(block k before, block k after fine-tuning) against k, one panel per target and start (mean over seeds
    with its band), with the references of that block as labelled lines: the floor (two random initialisations),
    the seed spread (two seeds of the start after fine-tuning) and AdaBN-before vs after. Where before vs after
    reaches the seed spread, fine-tuning moved the block as far as another seed lands; where AdaBN-before vs after
    lies above before vs after, part of the change is the BatchNorm statistics, not the weights."""
    by_target = {t: curves for t, m in cka.items() for curves in [diagonal_groups(m)] if any(c.start for c in curves)}
    if not by_target:
        return None
    starts = list(dict.fromkeys(c.start for curves in by_target.values() for c in curves if c.start))
    shown = {c.figure for curves in by_target.values() for c in curves}
    missing = [what for figure, what in (("floor", "no floor (reference_pairs=0)"),
                                         ("spread", "no seed spread (it needs cka_seeds >= 2)"),
                                         ("adabn", "no AdaBN curve (the backbone has no BatchNorm)"))
               if figure not in shown]
    fig = Figure(figsize=(4.4 * len(starts), 3.4 * len(by_target)), layout="constrained")
    fig.suptitle(wrap_to_figure(
        f"Fig 7: same-block CKA on {CKA_FEATURE} (test split), before vs after fine-tuning (unfrozen-linear) with "
        "its references; lines: mean, bands as labelled" + "".join(f"; {m}" for m in missing), fig, fontsize=10),
        fontsize=10)
    for row, (t, curves) in zip(fig.subplots(len(by_target), len(starts), squeeze=False), by_target.items()):
        for ax, start in zip(row, starts):
            ax.set_title(f"{t}: {start}")
            mine = [c for c in curves if c.start in ("", start)]
            if not any(c.start for c in mine):  # no fine-tuned runs of this start on this target
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"no fine-tuned {start} runs on {t}\n(its start collapsed or was skipped:\n"
                        "see tables.md)", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                continue
            for c in mine:
                colour, style = _CURVE_STYLE[c.figure]
                x = np.arange(1, len(c.mean) + 1)  # 1-based, as Fig 4/5 count blocks
                ax.fill_between(x, c.lower, c.upper, color=colour, alpha=0.15 if c.figure == "floor" else 0.2)
                ax.plot(x, c.mean, color=colour, linestyle=style, marker="o" if c.figure == "fig7" else None,
                        label=textwrap.fill(c.label, 48))
            ax.set(xlabel=f"block k of {len(c.mean)} (1-based)", ylabel="CKA (same block)",
                   ylim=(min(0.0, ax.get_ylim()[0]), 1.05))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=6)
    return fig


def _grid(panels: Sequence[tuple[str, xr.Dataset]], title: str, note: str, annotate: str = "none") -> Figure | None:
    from repsim.plot import heatmap_grid

    if not panels:
        return None
    cells = max(ds.sizes.get("layer_a", 1) for _, ds in panels)  # annotated cells need room: ~0.55 in each
    return heatmap_grid([ds for _, ds in panels], titles=[p for p, _ in panels], ncols=min(len(panels), 3),
                        title=f"{title} ({note})", annotate=annotate,
                        panel_size=max(3.2, 0.55 * cells) if annotate != "none" else 3.2)


def _one_based(ds: xr.Dataset) -> xr.Dataset:
    """A block-by-block matrix with its blocks numbered 1..n, as Fig 4/5 and the Fig 7 curves count them."""
    return ds.assign_coords(layer_a=[str(i + 1) for i in range(ds.sizes["layer_a"])],
                            layer_b=[str(i + 1) for i in range(ds.sizes["layer_b"])]).assign_attrs(
        axis_a="block before (1-based)", axis_b="block after (1-based)")


def fig7(cka: Mapping[str, Matrices]) -> Figure | None:
    """Heatmaps of every block before vs after fine-tuning (seed 0), per target and start."""
    panels = [(f"{t}: {c.start}", _one_based(ds)) for t, m in cka.items() for c, ds in m.items()
              if c.figure == "fig7" and c.seeds == (0,)]
    return _grid(panels, "Fig 7: blocks before (rows) vs after (columns) fine-tuning",
                 f"colour: CKA on {CKA_FEATURE}; seed 0")


def figA1(cka: Mapping[str, Matrices]) -> Figure | None:
    """The stacked classifier's blocks at initialisation vs fine-tuned, frozen and unfrozen backbone."""
    panels = [(f"{t}: {c.start}/{c.scenario}", ds) for t, m in cka.items() for c, ds in m.items()
              if c.figure == "figA1"]
    return _grid(panels, "Fig A.1: stacked classifier blocks before vs after", f"colour: CKA on {CKA_FEATURE}")


def fig8(cka: Mapping[str, Matrices]) -> Figure | None:
    """Last-block CKA across backbones, one panel per target."""
    panels = []
    for t, m in cka.items():
        ds = next((d for c, d in m.items() if c.figure == "fig8"), None)
        if ds is None:
            continue
        models = [str(x) for x in ds["model_a"].values]
        ds = ds.assign_coords(layer_a=models, layer_b=models).drop_vars(["model_a", "model_b", "module_a", "module_b"])
        panels.append((t, ds.assign_attrs(axis_a="backbone (last block)", axis_b="backbone (last block)")))
    return _grid(panels, "Fig 8: CKA of the last block across backbones",
                 f"colour and cells: CKA on {CKA_FEATURE}", "cka")
