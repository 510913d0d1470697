"""The ``repsim`` command line: one argparse parser, sub-commands registered by the modules that own them."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Each module defines ``register(subparsers)`` adding its sub-commands with ``set_defaults(func=...)``.
# Keeping the list here (and the code in the owning module) gives one obvious home per concern.
_COMMAND_MODULES = (
    "repsim.commands",  # cka, heatmap, demo
    "repsim.models.cli",  # models
    "repsim.train.cli",  # train, table, knn
    "repsim.report",  # report
)


def build_parser() -> argparse.ArgumentParser:
    """Return the full ``repsim`` parser with every available sub-command."""
    parser = argparse.ArgumentParser(prog="repsim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a sub-package not built yet must not break the others
            if err.name is not None and err.name.startswith("repsim"):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``repsim`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
