"""Progress bars: tqdm's notebook widget where ipywidgets is installed, plain text bars elsewhere (``tqdm.auto``
warns "IProgress not found" in Jupyter without ipywidgets)."""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm.std import tqdm

__all__ = ["tqdm"]
