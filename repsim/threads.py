"""Intra-op threads chosen for the work: small models run faster on one thread.

Measured on 2 shared cores (README, "Threads"): a 2-block ViT at 28 px trained 2.6x slower with torch's default
2 threads than with 1 (65 s vs 25 s for the ``breastmnist_tiny`` spec), because every small op then waits on an
OpenMP thread; large models (DeiT-B at 224 px) need every core. ``auto_threads`` measures a model's forward FLOPs
per sample and picks one thread below ``SMALL_GFLOP``, else keeps the process's count. ``OMP_NUM_THREADS`` or
``REPSIM_THREADS`` in the environment pin the count instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

SMALL_GFLOP = 1.0  # forward GFLOP per sample below which one thread is the faster choice here (bench/threads.py)


def forward_gflop(model: nn.Module, sample: torch.Tensor) -> float:
    """Forward GFLOP of ``model`` on one sample (``sample`` of shape ``(1, ...)``), counted by torch's FlopCounter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()  # one sample through BatchNorm in training mode is an error; eval counts the same FLOPs
    try:
        with torch.no_grad(), counter:
            model(sample)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9


def auto_threads(model: nn.Module, sample: torch.Tensor) -> int:
    """Threads for training or evaluating ``model``: ``REPSIM_THREADS`` when set, the current count when
    ``OMP_NUM_THREADS`` is set, else 1 for a model under ``SMALL_GFLOP`` per sample and the current count above."""
    pinned = os.environ.get("REPSIM_THREADS")
    if pinned:
        if not pinned.isdigit() or int(pinned) < 1:
            raise ValueError(f"REPSIM_THREADS must be a positive integer, got {pinned!r}")
        return int(pinned)
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    return 1 if forward_gflop(model, sample) < SMALL_GFLOP else torch.get_num_threads()


@contextmanager
def kept_threads() -> Iterator[None]:
    """Restore torch's intra-op thread count on exit, whatever the body set."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)
