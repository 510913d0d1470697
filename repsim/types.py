"""The small vocabularies shared across repsim (scenarios, pooling, estimators), in a module that imports nothing
heavy, so that validating a config or parsing a command line does not import torch models."""

from __future__ import annotations

from typing import Literal, get_args

Scenario = Literal["frozen-linear", "frozen-stacked", "unfrozen-linear", "unfrozen-stacked"]
SCENARIOS: tuple[str, ...] = get_args(Scenario)
STACKED: tuple[str, ...] = tuple(s for s in SCENARIOS if s.endswith("-stacked"))

Pool = Literal["flatten", "cls", "mean", "tokens", "gap"]
POOLS: tuple[str, ...] = get_args(Pool)

Estimator = Literal["unbiased", "biased"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
