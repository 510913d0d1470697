"""Intra-op threads chosen for the work: a small model uses every core only on an idle machine.

Measured on 2 cores (README, "Threads"; ``bench/threads.py``, ``bench/train_throughput.py``): on a quiet machine
EfficientNet-Lite0 at 48 px trains 1.4x faster on 2 threads than on 1 (channels_last), but with other work on the
cores a small model's many short ops wait on OpenMP threads that cannot run, and 2 threads train 3-7x SLOWER than 1
(a 2-block ViT at 28 px: 65 s vs 25 s for the ``breastmnist_tiny`` spec). ``auto_threads`` counts a model's forward
FLOPs per sample: from ``SMALL_GFLOP`` up it keeps the process's count (DeiT-B at 224 px needs every core); below, it
keeps it only while the machine is idle (1-minute load average under ``IDLE_LOAD``), else one thread.
``OMP_NUM_THREADS`` or ``REPSIM_THREADS`` in the environment pin the count instead. A resumed training run reuses
the count it started with (``repsim.train.loop``), so its numbers stay bit-identical.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

SMALL_GFLOP = 1.0  # forward GFLOP per sample below which threads pay only on an idle machine (bench/threads.py)
IDLE_LOAD = 0.5  # 1-minute load average below which the machine counts as idle


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
    ``OMP_NUM_THREADS`` is set, else the current count for a model of ``SMALL_GFLOP`` per sample or more, or for a
    smaller one on an idle machine (``machine_is_idle``), and 1 otherwise."""
    pinned = os.environ.get("REPSIM_THREADS")
    if pinned:
        if not pinned.isdigit() or int(pinned) < 1:
            raise ValueError(f"REPSIM_THREADS must be a positive integer, got {pinned!r}")
        return int(pinned)
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    if torch.get_num_threads() == 1 or forward_gflop(model, sample) >= SMALL_GFLOP or machine_is_idle():
        return torch.get_num_threads()
    return 1


def machine_is_idle() -> bool:
    """Whether the 1-minute load average is under ``IDLE_LOAD`` (no other work competing for the cores)."""
    return os.getloadavg()[0] < IDLE_LOAD


@contextmanager
def kept_threads() -> Iterator[None]:
    """Restore torch's intra-op thread count on exit, whatever the body set."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)
