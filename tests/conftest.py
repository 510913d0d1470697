"""Shared fixtures: offline hub, small thread count, and the real medical data under ../shared/data."""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

# one intra-op thread per xdist worker: with `-n 2` on 2 cores, 2 threads each oversubscribe the CPU and every small op
# waits on a descheduled OpenMP thread (measured here: a SEEM FocalNet-T forward at 32 px, 0.06 s -> 2.6 s)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    """Root of the real medical data (MedMNIST npz, HAM10000 sample, NIH CXR14); skip when absent."""
    from repsim.data import default_root

    root = default_root()
    if root is None or not (root / "medmnist" / "retinamnist.npz").exists():
        pytest.skip(f"real medical data not found under {root} (set REPSIM_DATA to its folder)")
    return root


@pytest.fixture
def one_thread():
    """Training steps are tiny; one thread per pytest worker avoids oversubscribing the 2 CI cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a torch.distributed (gloo) rendezvous between spawned processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gloo_entry(rank: int, world: int, port: int, worker: Callable[..., None], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


@pytest.fixture
def run_gloo(free_port: int) -> Callable[..., None]:
    """``run_gloo(worker, *args)``: ``worker(rank, *args)`` in 2 spawned processes joined by a gloo group."""

    def run(worker: Callable[..., None], *args: object, nprocs: int = 2) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mp.spawn(_gloo_entry, args=(nprocs, free_port, worker, args), nprocs=nprocs, join=True)

    return run
