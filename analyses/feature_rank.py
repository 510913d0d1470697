"""How many directions do a study's frozen starts use? Effective rank of each start's pooled features.

Explains frozen results at chance: a start whose pooled features span ~1 direction gives a linear head nothing to
separate. For every start of a study (its ``finetune/<start>/<target>/frozen-linear`` runs hold the frozen
backbone), on every target's test split: the effective rank (Roy & Vetterli 2007: exp of the entropy of the
normalised squared singular values of the centred features), the share of variance in the first direction, and
the total variance, all in float64.

    python analyses/feature_rank.py runs/natural --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from repsim.data import loader
from repsim.metrics import spectrum
from repsim.train.runs import find_runs, load_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", type=Path, help="a study folder (repsim study --out)")
    p.add_argument("--data-root", type=Path, required=True, help="folder holding medmnist/")
    args = p.parse_args()
    settings = json.loads((args.study / "settings.json").read_text())
    img_size, starts = settings["img_size"], [s["name"] for s in settings["starts"]]
    rows = []
    for target in settings["targets"]:
        for start in starts:
            runs = find_runs(args.study / "finetune" / start / target / "frozen-linear")
            if not runs:
                continue
            backbone = load_run(runs[0], "init").eval()
            normalise = backbone if settings["normalise"] == "model" else "dataset"
            data = loader(target, root=args.data_root, img_size=img_size, batch_size=64, normalise=normalise)
            with torch.inference_mode():
                features = torch.cat([backbone(x) for x, _ in data])
            rows.append((target, start, spectrum(features)))
    print("| target | start | dims | effective rank | variance in top direction | total variance |")
    print("|---|---|---|---|---|---|")
    for target, start, s in rows:
        print(f"| {target} | {start} | {s['dims']} | {s['effective_rank']:.1f} | {s['top1_share']:.1%} | "
              f"{s['total_variance']:.3g} |")


if __name__ == "__main__":
    main()
