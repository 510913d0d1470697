"""The small vocabularies shared across repsim (scenarios, pooling, estimators) and the slug rule of folder names, in
a module that imports nothing heavy, so that validating a config or parsing a command line does not import torch."""

from __future__ import annotations

import re
from typing import Any, Literal, get_args

from repsim.lazy import lazy_exports

Scenario = Literal["frozen-linear", "frozen-stacked", "unfrozen-linear", "unfrozen-stacked"]
SCENARIOS: tuple[str, ...] = get_args(Scenario)
STACKED: tuple[str, ...] = tuple(s for s in SCENARIOS if s.endswith("-stacked"))

Pooling = Literal["flatten", "cls", "mean", "tokens", "gap"]  # how a layer output becomes one row per sample
POOLS: tuple[str, ...] = get_args(Pooling)

Estimator = Literal["unbiased", "biased"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)

# a name that becomes a folder under an output folder: no separators, no "..", not absolute, not hidden
SLUG = re.compile(r"[A-Za-z0-9_+=][A-Za-z0-9._+=-]*")
SLUG_RULE = "letters, digits and . _ - + = only, not starting with . or -"


def check_slug(name: Any, what: str) -> str:
    """``name`` if it can name a folder under an output folder (see ``SLUG_RULE``), else a one-line ValueError.
    The one slug rule: trainer spec and run names, study start names."""
    if not isinstance(name, str) or not SLUG.fullmatch(name):
        raise ValueError(f"{what} {name!r} cannot name an output folder: use {SLUG_RULE}")
    return name


__getattr__, __dir__, _ = lazy_exports(__name__, {}, deprecated={"Pool": "repsim.types:Pooling"})
