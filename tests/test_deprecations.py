"""Renamed public names keep working for one release, each with a DeprecationWarning that names its replacement."""

from __future__ import annotations

import importlib

import pytest

RENAMED = [  # (module, old name, module of the new name, new name)
    ("repsim", "compare_models", "repsim.workflows", "write_cka"),
    ("repsim.workflows", "compare_models", "repsim.workflows", "write_cka"),
    ("repsim.types", "Pool", "repsim.types", "Pooling"),
    ("repsim.study.scheduler", "Pool", "repsim.study.scheduler", "Workers"),
    ("repsim.study", "diagonal", "repsim.study.results", "same_block"),
    ("repsim.data.spec", "prepare", "repsim.data.preparation", "prepare"),
    ("repsim.data.readers", "load_source", "repsim.data.registry", "load_source"),
    ("repsim.data.readers", "CHEXPERT_LABELS", "repsim.data.csv_readers", "CHEXPERT_LABELS"),
]


@pytest.mark.parametrize(("module", "old", "new_module", "new"), RENAMED, ids=[f"{m}.{o}" for m, o, *_ in RENAMED])
def test_old_name_warns_and_gives_the_new_object(module: str, old: str, new_module: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated.*use {new}"):
        value = getattr(importlib.import_module(module), old)
    assert value is getattr(importlib.import_module(new_module), new)


def test_backbone_truncate_is_keep_blocks() -> None:
    from repsim.models import create

    backbone = create("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)
    with pytest.warns(DeprecationWarning, match="use keep_blocks"):
        backbone.truncate(2)
    assert backbone.num_blocks == 2
