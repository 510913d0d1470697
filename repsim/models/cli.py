"""``repsim models``: print the model zoo table."""

from __future__ import annotations

import argparse


def _millions(n: int) -> str:
    return f"{n / 1e6:,.1f}M"


def _models(args: argparse.Namespace) -> int:
    from repsim.models.zoo import available

    rows = [
        (r.name, r.source, _millions(r.params), str(r.native_img_size), str(r.pooled_dim), r.pooling)
        for r in available()
    ]
    header = ("name", "source", "params", "native px", "pooled dim", "pooled feature")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print("\nAny timm model name is accepted as well, e.g. repsim.models.create('resnet18').")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` sub-command."""
    parser = subparsers.add_parser("models", help="list the model zoo", description=__doc__)
    parser.set_defaults(func=_models)
