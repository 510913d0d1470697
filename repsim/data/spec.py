"""Deprecated: ``prepare``, ``Data``, ``GENERAL_KEYS`` and ``check_data_block`` are in
:mod:`repsim.data.preparation` (specs are in :mod:`repsim.train.config`; this module goes in the next release)."""

from __future__ import annotations

from repsim.lazy import lazy_exports

__getattr__, __dir__, _ = lazy_exports(__name__, {}, deprecated={
    n: "repsim.data.preparation" for n in ("Data", "prepare", "GENERAL_KEYS", "check_data_block")})
