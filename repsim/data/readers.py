"""Deprecated: the csv readers are in :mod:`repsim.data.csv_readers`, ``READERS`` and ``load_source`` in
:mod:`repsim.data.registry` (this module goes in the next release)."""

from __future__ import annotations

from repsim.lazy import lazy_exports

_NEW = {**{n: "repsim.data.csv_readers" for n in ("csv_images", "aptos2019", "isic2019", "chexpert", "cbis_ddsm",
                                               "nih_cxr14", "CHEXPERT_LABELS", "ISIC2019_LABELS",
                                               "NIH_CXR14_LABELS")},
        "READERS": "repsim.data.registry", "load_source": "repsim.data.registry"}
__getattr__, __dir__, _ = lazy_exports(__name__, {}, deprecated=_NEW)
