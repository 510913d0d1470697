"""Progress bars: tqdm's notebook widget where ipywidgets is installed, plain text bars elsewhere.

Without ipywidgets, ``tqdm.auto`` warns "IProgress not found" the first time it is imported in Jupyter, and
timm imports it through huggingface_hub. Importing it here once, quietly, caches the module so the reader of a
notebook never sees that warning (``repsim/__init__`` imports this module first inside a Jupyter kernel)."""

from __future__ import annotations

import importlib
import importlib.util
import warnings

if importlib.util.find_spec("ipywidgets") is not None:
    from tqdm.auto import tqdm
else:
    from tqdm.std import TqdmWarning, tqdm

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found", category=TqdmWarning)
        importlib.import_module("tqdm.auto")  # cached: later imports by timm/huggingface_hub stay silent

__all__ = ["tqdm"]
