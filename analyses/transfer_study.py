"""The transfer study from the command line (the logic is ``repsim.study``; see its docstring for the stages).

Offline, on the real MedMNIST files (about 30 min on 2 CPU cores; ``--preset demo``: a few minutes)::

    python analyses/transfer_study.py --data-root ../shared/data --out runs/study --jobs 2

The paper's study on a GPU, with real foundation weights and the real datasets (APTOS2019/, CBIS-DDSM/, ISIC2019/,
CheXpert/ under the data root, as in the packaged table specs)::

    python analyses/transfer_study.py --preset paper --model dinov2_vitb14 --data-root /data --out runs/dinov2
    python analyses/transfer_study.py --preset paper --model sam_vitb --checkpoint sam_vit_b_01ec64.pth ...

Re-running the same command resumes: finished runs and CKA files are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def default_data_root() -> str | None:
    """``../shared/data`` next to the repository when it holds the MedMNIST files, else None."""
    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    return str(root) if (root / "medmnist").is_dir() else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from repsim.study import DATASETS, PRESETS, SYNTHETIC

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="full", choices=sorted(PRESETS), help="settings to start from (default: full)")
    p.add_argument("--data-root", default=default_data_root(),
                   help="folder holding medmnist/ (and APTOS2019/, ... for the paper preset); default ../shared/data")
    p.add_argument("--out", default="runs/transfer-study", help="output folder (resumable)")
    p.add_argument("--model", help="zoo or timm backbone name (default: the preset's)")
    p.add_argument("--model-kwargs", type=json.loads, help="JSON kwargs for the backbone, e.g. '{\"depth\": 6}'")
    p.add_argument("--img-size", type=int, help="input size (default: the preset's)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    start.add_argument("--checkpoint", help="start from a local checkpoint of the backbone")
    p.add_argument("--source", help="dataset to pretrain on when neither --pretrained nor --checkpoint is given")
    p.add_argument("--targets", nargs="+", choices=sorted([*DATASETS, *SYNTHETIC]), help="datasets to fine-tune on")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default: the preset's)")
    p.add_argument("--seeds", type=int, help="repeats at the chosen LR (default: the preset's)")
    p.add_argument("--jobs", type=int, default=1, help="experiments run in parallel processes (CPU: 2 on 2 cores)")
    p.add_argument("--threads", type=int, help="torch threads per process (default: cores // jobs)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace):  # -> repsim.study.Settings
    """The preset's settings with the command-line changes applied."""
    from repsim.study import PRESETS

    s = PRESETS[args.preset]
    changes: dict = {}
    if args.model:
        changes.update(model=args.model, model_kwargs={})
    if args.model_kwargs is not None:
        changes["model_kwargs"] = args.model_kwargs
    if args.img_size:
        changes["img_size"] = args.img_size
    if args.pretrained:
        changes.update(pretrained=True, checkpoint=None)
    if args.checkpoint:
        changes.update(checkpoint=args.checkpoint, pretrained=False)
    if args.source:
        changes["source"] = args.source
    if args.targets:
        changes["targets"] = tuple(args.targets)
    train = dict(s.train)
    if args.epochs:
        train["epochs"] = args.epochs
    if args.seeds:
        train["seeds"] = args.seeds
        changes["curve_seeds"] = min(s.curve_seeds, args.seeds)
    return replace(s, train=train, **changes)


def main(argv: list[str] | None = None) -> int:
    from repsim.study import Study

    args = parse_args(argv)
    started = time.perf_counter()
    summary = Study(settings_from_args(args), args.out, data_root=args.data_root, jobs=args.jobs,
                    threads=args.threads, device=args.device).run()
    out = Path(args.out)
    print((out / "tables.md").read_text())
    print(f"stage seconds: {json.dumps(summary['timings_s'])}; total {time.perf_counter() - started:.0f} s")
    print(f"wrote {out / 'study.json'}, {out / 'tables.md'} and " + ", ".join(summary["figures"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
