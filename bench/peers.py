"""The peer CKA libraries the benches measure, called the same way from each bench (PyPI: pytorch-cka, torch-cka)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn


def pytorch_cka(ma: nn.Module, mb: nn.Module, loader: Iterable, layers: Sequence[str], device: str = "cpu"
                ) -> np.ndarray:
    """pytorch-cka 1.x: batched raw-Gram Song HSIC in the model dtype, clamped to [0, 1]."""
    import cka

    return cka.compute_cka(ma, mb, loader, layers=list(layers), model2_layers=list(layers), device=device,
                           progress=False)[0].cpu().numpy()


def torch_cka(ma: nn.Module, mb: nn.Module, loader: Iterable, layers: Sequence[str]) -> np.ndarray:
    """torch-cka 0.21: raw-Gram Song HSIC in fp32 in a Python double loop (warns on identical model names)."""
    from torch_cka import CKA

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = CKA(ma, mb, model1_name="a", model2_name="b", model1_layers=list(layers), model2_layers=list(layers),
                device="cpu")
        with torch.no_grad():
            c.compare(loader)
        return c.export()["CKA"].numpy()
