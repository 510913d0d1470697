"""One rule for a package's lazy exports: a public name is imported from its module on first use (so ``import
repsim`` and ``repsim --help`` stay quick), and a renamed public name keeps working for one release with a
``DeprecationWarning`` that names its replacement."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def _resolve(target: str, name: str) -> Any:
    """``"pkg.module"`` (the attribute ``name`` of it) or ``"pkg.module:attr"``."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr or name)


def lazy_exports(package: str, exports: Mapping[str, str], deprecated: Mapping[str, str] | None = None,
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``: ``exports`` maps a public name to ``"module"`` (same
    name there) or ``"module:attr"``; ``deprecated`` maps an old name to ``"module:new_name"`` (warned on use)."""
    old = dict(deprecated or {})

    def __getattr__(name: str) -> Any:
        if name in exports:
            return _resolve(exports[name], name)
        if name in old:
            new = old[name].partition(":")[2] or name
            warnings.warn(f"{package}.{name} is deprecated and will be removed in the next release; use {new}",
                          DeprecationWarning, stacklevel=2)
            return _resolve(old[name], name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        import sys

        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__, sorted(exports)
