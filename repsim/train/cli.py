"""``repsim train``, ``repsim knn`` and ``repsim table`` sub-commands."""

from __future__ import annotations

import argparse
import json


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", required=True, help="spec YAML file or packaged spec name (e.g. table1, fig4_freezing)")
    p.add_argument("--data-root", default=None, help="folder that relative data.root paths are resolved against")
    p.add_argument("--out", default="runs", help="output folder (default: runs)")
    p.add_argument("--dry-run", action="store_true", help="list the runs of the spec and exit")
    for flag, key, kind in _SHORTCUTS:
        p.add_argument(flag, type=kind, default=None, help=f"same as {key}=VALUE")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides applied to every run, e.g. train.epochs=5 model.name=deit_b")


# Flags for the overrides used most; each is the same as its ``key=value`` override.
_SHORTCUTS = (("--model", "model.name", str), ("--scenario", "model.scenario", str),
              ("--freeze-blocks", "model.freeze_blocks", int), ("--decapitate", "model.decapitate", int),
              ("--seeds", "train.seeds", int), ("--epochs", "train.epochs", int))


def _overrides(args: argparse.Namespace) -> list[str]:
    flags = [f"{key}={getattr(args, flag[2:].replace('-', '_'))}" for flag, key, _ in _SHORTCUTS
             if getattr(args, flag[2:].replace("-", "_")) is not None]
    return flags + list(args.overrides)


def _run(args: argparse.Namespace, kind: str | None) -> int:
    from repsim.train.config import expand, load_spec, parse_overrides
    from repsim.train.runner import run

    if args.dry_run:
        spec = load_spec(args.spec)
        if kind:
            spec["kind"] = kind
        for name, cfg in expand(spec, parse_overrides(_overrides(args))):
            print(f"{name}\t{cfg['kind']}\t{cfg['model']['name']}\t{cfg['model']['scenario']}\t"
                  f"{cfg['data']['dataset']}")
        return 0
    results = run(args.spec, data_root=args.data_root, out=args.out, overrides=_overrides(args),
                  resume=getattr(args, "resume", False), kind=kind)
    for name, r in results.items():
        stat = r["test"][r["metric"]]
        print(f"{name}: test {r['metric']} = {stat['mean']:.4f} ± {stat['std']:.4f}")
    return 0


def _train(args: argparse.Namespace) -> int:
    return _run(args, None)


def _knn(args: argparse.Namespace) -> int:
    return _run(args, "knn")


def _table(args: argparse.Namespace) -> int:
    from repsim.train.table import collect, markdown_table

    results = collect(args.runs)
    print(json.dumps(results, indent=2) if args.json else markdown_table(results, args.digits))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``knn`` and ``table`` to the ``repsim`` parser."""
    p = subparsers.add_parser("train", help="fine-tune models from an experiment spec (LR search, seeds, resume)")
    _add_run_args(p)
    p.add_argument("--resume", action="store_true", help="continue interrupted runs from checkpoints/last.pt")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("knn", help="k-NN evaluation of frozen backbone features from a spec")
    _add_run_args(p)
    p.set_defaults(func=_knn)

    p = subparsers.add_parser("table", help="mean ± std results table (markdown) of experiment folders")
    p.add_argument("runs", nargs="+", help="experiment or run folders (searched for results.json / knn.json)")
    p.add_argument("--digits", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the collected results as JSON")
    p.set_defaults(func=_table)
