"""Splitting a loader over ``torchrun`` processes in whole batches, so that a sharded run sees exactly the batches of
one process (batch ``i`` on rank ``i % world``) and its minibatch estimates equal the single-process ones."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` group, else (0, 1)."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def shard_batches(loader: Iterable[Any], rank: int, world_size: int) -> Iterator[tuple[int, Any]]:
    """``(global batch index, batch)`` for the batches of ``rank``: batch ``i`` goes to rank ``i % world_size``. A
    sequential ``DataLoader`` is rebuilt over this rank's batches only (no other batch is loaded); any other
    iterable is walked and the other ranks' batches are skipped."""
    if world_size == 1:
        yield from enumerate(loader)
        return
    from torch.utils.data import DataLoader, SequentialSampler

    if isinstance(loader, DataLoader) and loader.batch_sampler is not None:
        if not isinstance(loader.sampler, SequentialSampler):
            raise ValueError("under torchrun every process must see the same batches: use a DataLoader without "
                             "shuffle (a SequentialSampler)")
        mine = [b for i, b in enumerate(loader.batch_sampler) if i % world_size == rank]
        own = DataLoader(loader.dataset, batch_sampler=mine, num_workers=loader.num_workers,
                         collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)
        yield from zip(range(rank, world_size * len(mine), world_size), own)
        return
    for i, batch in enumerate(loader):
        if i % world_size == rank:
            yield i, batch
