"""repsim: CKA between vision models, layer surgery and the transfer study of Pales Huix et al. (WACV 2024).

Run `repsim COMMAND --help` for each command. Errors print one line and exit with status 2; --debug (anywhere on
the line) shows the traceback. Also `python -m repsim`.
"""

# Each sub-command is an ``add_<name>`` parser function and a handler of a few lines over one library call (DINOv2's
# get_args_parser -> main). Library modules are imported inside the handlers, so ``repsim --help`` stays fast.

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from repsim.types import ESTIMATORS, POOLS


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every help line that has one and does not already say it, descriptions kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def _parser(sub: argparse._SubParsersAction, name: str, help: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description, formatter_class=_Formatter)


# ------------------------------------------------------------------------------------------------------- models
def add_models(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "models", "list the model zoo", "The model zoo: name, source library, parameters, native "
                "resolution, pooled feature and where its pretrained weights come from (offline from a pip package "
                "or a hub download). Any timm model name is accepted as well.")
    p.set_defaults(func=models)


def models(args: argparse.Namespace) -> int:
    from repsim.models.catalogue import table

    print(table())
    return 0


# ---------------------------------------------------------------------------------------------------------- cka
def add_cka(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "cka", "layerwise CKA between two models on a dataset (writes cka.nc and cka.png)",
                "Minibatch CKA between the blocks of two models (or of one model with itself) on a dataset.\n"
                "A model is a zoo/timm name (--model-a) or a run folder written by `repsim train` (--run-a; "
                "its best weights, or --which-a init). Under torchrun each process takes whole batches and rank 0 "
                "writes the files.")
    for side in ("a", "b"):
        g = p.add_mutually_exclusive_group(required=side == "a")
        g.add_argument(f"--model-{side}", help=f"zoo or timm name of model {side.upper()}")
        g.add_argument(f"--run-{side}", help=f"trainer run folder whose backbone is model {side.upper()}")
        p.add_argument(f"--which-{side}", choices=("init", "best"), default="best",
                       help=f"weights of --run-{side}: before (init) or after (best) fine-tuning")
        p.add_argument(f"--checkpoint-{side}", help=f"local weights for --model-{side} (default: random init)")
    p.add_argument("--pretrained", action="store_true", help="load the library's pretrained weights for --model-*")
    p.add_argument("--labels", nargs=2, metavar=("A", "B"), help="names of the two models in the result")
    p.add_argument("--layers", nargs="+", help="names or glob patterns, e.g. 'blocks.*' (default: the model's blocks)")
    p.add_argument("--layers-b", nargs="+", help="layers of model B (default: --layers expanded on model B)")
    p.add_argument("--pool", default="flatten", choices=POOLS, help="how a layer output becomes one row per sample")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic', a dataset name (retinamnist, ...), a .npz with MedMNIST keys or an image folder")
    p.add_argument("--data-root", help="folder holding the named datasets (default: $REPSIM_DATA or ../shared/data)")
    p.add_argument("--split", default="test", help="split of data that has one")
    p.add_argument("--img-size", type=int, help="input size (default: a run's own, else 224)")
    p.add_argument("--batch-size", type=int, default=64, help="smallest CKA batch: the N images are cut into "
                   "N // BATCH_SIZE near-equal contiguous batches, each of at least BATCH_SIZE (and fewer than twice "
                   "as many) images (repsim.batches, the rule of every CKA in repsim)")
    p.add_argument("--n-samples", type=int, help="use the first N samples (default: all)")
    p.add_argument("--estimator", default="unbiased", choices=ESTIMATORS, help="HSIC estimator")
    p.add_argument("--boot", type=int, default=0, help="bootstrap resamples for confidence intervals (0: none)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: this process's GPU when there is one)")
    p.add_argument("--num-workers", type=int, default=0, help="data loading processes")
    p.add_argument("--seed", type=int, default=0, help="seed of random initialisations")
    p.add_argument("--out", default="cka-out", help="output folder for cka.nc and cka.png")
    p.set_defaults(func=cka)


def cka(args: argparse.Namespace) -> int:
    from repsim.workflows import write_cka

    nc, png = write_cka(
        args.model_a or Path(args.run_a), args.model_b or (args.run_b and Path(args.run_b)), args.data,
        Path(args.out), which=(args.which_a,
        args.which_b), checkpoints=(args.checkpoint_a, args.checkpoint_b), pretrained=args.pretrained,
        labels=args.labels, layers_a=args.layers, layers_b=args.layers_b, pool=args.pool, data_root=args.data_root,
        split=args.split, img_size=args.img_size, batch_size=args.batch_size, n_samples=args.n_samples,
        estimator=args.estimator, bootstrap=args.boot or None, device=args.device, num_workers=args.num_workers,
        seed=args.seed)
    if nc is not None:
        print(f"wrote {nc} and {png}")
    return 0


# ------------------------------------------------------------------------------------------------------ heatmap
def add_heatmap(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "heatmap", "re-render a saved CKA result (.nc)", "Draw a CKA result written by repsim (cka.nc).")
    p.add_argument("file", help="a .nc file written by repsim cka, demo or study")
    p.add_argument("--out", help="figure file; its extension (.png, .pdf, .svg) is the format (default: FILE as .png)")
    p.add_argument("--title", help="title, kept as given (default: the models, their weights and the data)")
    p.add_argument("--labels", nargs=2, metavar=("A", "B"), help="names of the two models on the axes and title")
    p.add_argument("--layer-names", choices=("names", "indices"), default="names",
                   help="tick labels: the layers' module names or block indices 0..L-1")
    p.add_argument("--dpi", type=int, default=300, help="resolution of a PNG")
    p.add_argument("--vmin", type=float, default=None,
                   help="colour scale minimum (default: 0, or the lowest value when one is below 0)")
    p.add_argument("--vmax", type=float, default=None,
                   help="colour scale maximum (default: 1, or the highest value when one is above 1)")
    p.add_argument("--cmap", default="magma", help="matplotlib colour map")
    p.add_argument("--annotate", default="auto", choices=("auto", "cka", "ci", "none"),
                   help="cell text: CKA, CKA ± half CI, none (auto: CKA up to 12x12)")
    p.set_defaults(func=heatmap)


def heatmap(args: argparse.Namespace) -> int:
    from repsim.files import figure_format, load, save_figure
    from repsim.plot import heatmap as draw

    out = Path(args.out or Path(args.file).with_suffix(".png"))
    figure_format(out)  # a wrong extension fails before the file is read or drawn
    fig = draw(load(args.file), vmin=args.vmin, vmax=args.vmax, cmap=args.cmap, annotate=args.annotate,
               title=args.title, labels=args.labels, layer_names=args.layer_names)
    print(f"wrote {save_figure(fig, out, dpi=args.dpi)}")
    return 0


# --------------------------------------------------------------------------------------------------------- demo
def add_demo(sub: argparse._SubParsersAction) -> None:
    from repsim.study.demo import DEMO_HELP

    p = _parser(sub, "demo", "the reduced transfer study with CKA heatmaps, no network", DEMO_HELP)
    p.add_argument("--out", default="repsim-demo", help="output folder (re-running resumes)")
    p.add_argument("--data-root", help="folder holding medmnist/*.npz, to use real images instead of synthetic ones")
    p.add_argument("--epochs", type=int, help="fine-tuning (and pretraining) epochs (default: the demo preset's)")
    p.add_argument("--n-samples", type=int, help="images per synthetic task (default: the preset's)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel training processes")
    p.set_defaults(func=demo)


def demo(args: argparse.Namespace) -> int:
    from repsim.study.demo import run_demo

    start = time.perf_counter()
    print(run_demo(args.out, data_root=args.data_root, epochs=args.epochs, n_samples=args.n_samples, jobs=args.jobs))
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


# -------------------------------------------------------------------------------------------------------- study
def add_study(sub: argparse._SubParsersAction) -> None:
    from repsim.study.settings import PRESETS

    p = _parser(sub, "study", "the transfer study (starts x targets x scenarios, curves, CKA, figures)",
                "Run a transfer study preset, or resume it: finished runs and CKA files are reused.\n"
                "KEY=VALUE overrides change fields of the preset's repsim.study.Settings (values parsed as YAML; "
                "dotted keys update dict fields), e.g. train.epochs=3 targets=[breastmnist].")
    p.add_argument("--preset", default="natural", choices=sorted(PRESETS), help="settings to start from")
    p.add_argument("--data-root", help="folder holding medmnist/ (default: $REPSIM_DATA or ../shared/data)")
    p.add_argument("--out", default="runs/study", help="output folder (resumable)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs trained in parallel processes")
    p.add_argument("--threads", type=int, help="torch threads per process (default: cores // jobs)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.add_argument("--report", action="store_true",
                   help="train nothing: tables and figures of the experiments finished so far, the others listed as "
                        "not finished (run it beside a study that is still running)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="changes to the preset's settings")
    p.set_defaults(func=study)


def study(args: argparse.Namespace) -> int:
    from repsim.data import default_root
    from repsim.study import run_study

    start = time.perf_counter()
    summary = run_study(args.preset, args.out, data_root=args.data_root or default_root(), jobs=args.jobs,
                        threads=args.threads, device=args.device, overrides=args.overrides, report=args.report)
    print(Path(args.out, "tables.md").read_text())
    print(f"stages (s): {json.dumps(summary['timings_s'])}; total {time.perf_counter() - start:.0f} s; wrote "
          f"{args.out}/study.json, tables.md and {', '.join(summary['figures'].values())}")
    return 0


# ------------------------------------------------------------------------------------------ train / knn / table
_SHORTCUTS = (("--model", "model.name", str), ("--scenario", "model.scenario", str),
              ("--freeze-blocks", "model.freeze_blocks", int), ("--decapitate", "model.decapitate", int),
              ("--seeds", "train.seeds", int), ("--epochs", "train.epochs", int))


def add_train(sub: argparse._SubParsersAction) -> None:
    for name, help in (("train", "fine-tune models from an experiment spec (LR search, seeds, resume)"),
                       ("knn", "k-NN evaluation of frozen backbone features from a spec")):
        p = _parser(sub, name, help, f"{help}. Runs go to OUT/<spec name>/<grid point>/lr<lr>/seed<k>.")
        p.add_argument("--spec", required=True, help="spec YAML file or packaged spec name (e.g. table1)")
        p.add_argument("--data-root", help="folder that relative data.root paths are resolved against")
        p.add_argument("--out", default="runs", help="output folder")
        p.add_argument("--dry-run", action="store_true", help="list the runs of the spec and exit")
        p.add_argument("--resume", action="store_true", help="continue interrupted runs from their last checkpoint")
        for flag, key, kind in _SHORTCUTS:
            p.add_argument(flag, type=kind, help=f"same as {key}=VALUE")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.epochs=5")
        p.set_defaults(func=train, kind=None if name == "train" else "knn")
    p = _parser(sub, "table", "mean ± std results table (markdown) of experiment folders",
                "One row per model/scenario/variant, one column per dataset, from results.json / knn.json files.")
    p.add_argument("runs", nargs="+", help="experiment or run folders (searched for results.json / knn.json)")
    p.add_argument("--digits", type=int, default=3, help="decimals")
    p.add_argument("--json", action="store_true", help="print the collected results as JSON")
    p.set_defaults(func=table)


def train(args: argparse.Namespace) -> int:
    from repsim.train.config import expand, load_spec, parse_overrides
    from repsim.train.runner import check_inputs, run

    overrides = [f"{key}={getattr(args, f[2:].replace('-', '_'))}" for f, key, _ in _SHORTCUTS
                 if getattr(args, f[2:].replace("-", "_")) is not None] + list(args.overrides)
    if args.dry_run:
        spec = {**load_spec(args.spec), **({"kind": args.kind} if args.kind else {})}
        for name, cfg in expand(spec, parse_overrides(overrides)):
            check_inputs(cfg, args.data_root)
            print(f"{name}\t{cfg['kind']}\t{cfg['model']['name']}\t{cfg['model']['scenario']}\t{cfg['data']['dataset']}")
        return 0
    results = run(args.spec, data_root=args.data_root, out=args.out, overrides=overrides, resume=args.resume,
                  kind=args.kind)
    for name, r in results.items():
        stat = r["test"][r["metric"]]
        print(f"{name}: test {r['metric']} = {stat['mean']:.4f} ± {stat['std']:.4f}")
    return 0


def table(args: argparse.Namespace) -> int:
    from repsim.train.table import collect, markdown_table

    results = collect(args.runs)
    print(json.dumps(results, indent=2) if args.json else markdown_table(results, args.digits))
    return 0


# ----------------------------------------------------------------------------------------------------- pretrain
def add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "pretrain", "self-supervised pretraining (DINO) of a backbone on a dataset's train images",
                "DINO (the paper's Appendix B) on the TRAIN split of a dataset, from scratch or from weights. The run\n"
                "folder resumes exactly (--resume) and loads like a trainer run (repsim cka --run-a OUT). A run that\n"
                "collapses stops with the epoch and the signal, and is never usable as a start.")
    p.add_argument("--data", required=True, help="dataset name (breastmnist, ...), MedMNIST .npz or image folder")
    p.add_argument("--data-root", help="folder holding the named datasets (medmnist/*.npz, ...)")
    p.add_argument("--model", required=True, help="zoo or timm name, e.g. efficientnet_lite0")
    p.add_argument("--method", choices=("dino", "simclr"), default="dino",
                   help="DINO (the paper's Appendix B) or SimCLR (steadier at small batch; reported as SimCLR)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pretrained", action="store_true", help="start from the library's pretrained weights")
    g.add_argument("--checkpoint", help="start from local weights (default: random init)")
    p.add_argument("--img-size", type=int, default=48, help="global crop and evaluation size")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="convert the images to this many channels")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, help="peak LR (default: 8e-3 from scratch, 8e-4 from weights, x batch/256)")
    p.add_argument("--out-dim", type=int, default=256, help="DINO prototypes K")
    p.add_argument("--teacher-temp", type=float, default=0.04, help="teacher temperature")
    p.add_argument("--momentum", type=float, default=0.99, help="teacher EMA momentum at the start (cosine to 1)")
    p.add_argument("--local-crops", type=int, default=2, help="local views per image (img-size/2 px)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.set_defaults(func=pretrain)


def pretrain(args: argparse.Namespace) -> int:
    from repsim.train.pretrain import data_block, pretrain

    cfg = {"method": args.method, "data": data_block(args.data, img_size=args.img_size, channels=args.channels),
           "model": {"name": args.model, "pretrained": args.pretrained, "checkpoint": args.checkpoint},
           "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                     "device": args.device, "num_workers": args.num_workers},
           "dino": {"out_dim": args.out_dim, "warmup_teacher_temp": args.teacher_temp,
                    "teacher_temp": args.teacher_temp, "momentum": args.momentum},
           "views": {"local_crops": args.local_crops}}
    s = pretrain(cfg, args.out, data_root=args.data_root, resume=args.resume)
    print(f"{s['method']} {s['epochs_run']} epochs: loss {s['final_loss']:.4f} (chance {s['chance_loss']:.4f}), "
          f"val effective rank {s['val_effective_rank']:.1f}, {s['train_seconds']:.0f} s; backbone in {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------------- report
def add_report(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "report", "self-contained HTML report of a run or study (tables, curves, heatmaps)",
                "One HTML page with every figure embedded: tables, training curves, CKA heatmaps.")
    p.add_argument("run_dir", help="a trainer run folder, a folder of experiments or a transfer study folder")
    p.add_argument("--out", help="HTML file (default: RUN_DIR/report.html)")
    p.add_argument("--data-root", help="folder the run's relative data root is resolved against (for its CKA)")
    p.add_argument("--cka-samples", type=int, default=256, help="test images for a single run's CKA")
    p.set_defaults(func=report)


def report(args: argparse.Namespace) -> int:
    from repsim.report import write_report

    path = write_report(args.run_dir, args.out, data_root=args.data_root, cka_samples=args.cka_samples)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


# ---------------------------------------------------------------------------------------------------------- main
COMMANDS = (add_models, add_cka, add_heatmap, add_demo, add_study, add_train, add_report, add_pretrain)


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object, **__: object) -> str:
    """A warning as one line naming its kind, without the source line Python prints by default."""
    return f"repsim: {category.__name__}: {message}\n"


def build_parser() -> argparse.ArgumentParser:
    """The ``repsim`` parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="repsim", description=__doc__, formatter_class=_Formatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``repsim`` and ``python -m repsim``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    # --debug is accepted anywhere; key=value overrides may come before or after options (argparse alone stops at
    # the first option after a positional list), so what it leaves over joins the overrides
    args, extra = parser.parse_known_args([a for a in argv if a != "--debug"])
    warnings.formatwarning = _one_line_warning
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        hint = {"train": "; rerun it with --resume to continue", "knn": "; rerun it with --resume to continue",
                "study": "; rerun the same command to continue", "demo": "; rerun the same command to continue"}
        print(f"repsim {args.command}: interrupted{hint.get(args.command, '')}", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user; the traceback with --debug
        if debug:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"repsim {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
