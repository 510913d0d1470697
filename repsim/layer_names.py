"""Layer selection by name: exact module names and dotted-name globs (``blocks.*``, ``**.attn``), resolved in the
model's module order, with close matches named when nothing matches."""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Sequence

from torch import nn


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Dotted-name glob: ``*`` and ``?`` stay within one name component, ``**`` crosses dots, ``[...]`` as fnmatch."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^.]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            j = pattern.index("]", i + 2 if pattern[i + 1 : i + 2] in ("!", "]") else i + 1)
            out.append(fnmatch.translate(pattern[i : j + 1])[4:-3])
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """Module names selected by exact names and/or glob patterns, in the model's module order.

    Patterns match whole dotted names; ``*`` does not cross a dot, so ``"blocks.*"`` selects ``blocks.0``,
    ``blocks.1``, ... but not ``blocks.0.attn``; ``**`` crosses dots (``"**.attn"``). A name or pattern matching no
    full name is tried as a suffix after a dot, so ``"blocks.*"`` also finds ``model.blocks.0`` in a wrapped model.
    Raises ``ValueError`` listing close matches (difflib) for any name or pattern that matches nothing.
    """
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns:
        raise ValueError("no layers given")
    names = [n for n, _ in model.named_modules() if n]
    selected: set[str] = set()
    for pat in patterns:
        rx, suffix = _glob_regex(pat), _glob_regex("**." + pat)
        hits = [pat] if pat in names else [n for n in names if rx.match(n)] or [n for n in names if suffix.match(n)]
        if not hits:
            close = difflib.get_close_matches(pat, names, n=5, cutoff=0.5)
            if not close:  # a pattern such as 'block.*' is closer to names' prefixes than to whole names
                stem = pat.split("*")[0].split("?")[0].split("[")[0].rstrip(".")
                close = difflib.get_close_matches(stem, names, n=5, cutoff=0.5)
            hint = (
                f"; close matches: {', '.join(close)}"
                if close
                else f"; the model has {len(names)} modules, e.g. {', '.join(names[:5])}"
            )
            raise ValueError(f"layer {pat!r} matches no module of {type(model).__name__}{hint}")
        selected.update(hits)
    return [n for n in names if n in selected]
