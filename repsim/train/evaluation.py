"""What the trainer evaluates with: ``predict`` (probabilities and targets in dataset order, gathered over
``torchrun`` processes, with the seconds spent in forward passes) and the cached-output path of a frozen backbone
(``backbone_outputs``, ``HeadOnOutputs``)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from repsim.models.classifier import FoundationClassifier
from repsim.progress import tqdm


class HeadOnOutputs(nn.Module):
    """The trainable part of a frozen-backbone classifier, fed cached backbone outputs (``train.cache_frozen``)."""

    def __init__(self, model: FoundationClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, backbone_output: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(backbone_output)


@torch.no_grad()
def backbone_outputs(model: FoundationClassifier, dataset: torch.utils.data.Dataset, *, batch_size: int,
                     device: torch.device, num_workers: int) -> TensorDataset:
    """``(backbone output, target)`` of every sample (eval mode, the dataset's own transform), on the CPU."""
    model.eval()
    outputs, targets = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        outputs.append(model.backbone_output(x.to(device)).float().cpu())
        targets.append(y)
    return TensorDataset(torch.cat(outputs), torch.cat(targets))


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: torch.utils.data.Dataset, *, batch_size: int, device: torch.device,
            task: str, amp_dtype: torch.dtype | None, num_workers: int, rank: int, world: int,
            desc: str, progress: bool = True, memory_format: torch.memory_format = torch.contiguous_format
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities, targets (dataset order, gathered over processes) and seconds spent in forward passes."""
    model.eval()
    n = len(dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; every dataset here has one
    shard = Subset(dataset, range(rank, n, world))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    prob_parts: list[np.ndarray] = []
    target_parts: list[np.ndarray] = []
    seconds = 0.0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not (rank == 0 and progress)):
        x = x.to(device, non_blocking=True)
        if x.dim() == 4:
            x = x.contiguous(memory_format=memory_format)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()
        p = torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        prob_parts.append(p.cpu().numpy().astype(np.float64))
        target_parts.append(y.numpy())
    probs, targets = np.concatenate(prob_parts), np.concatenate(target_parts)
    if world > 1:  # shard r holds samples r, r+world, ...; interleave them back into dataset order
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, (probs, targets, seconds))
        probs, targets = np.empty((n, probs.shape[1])), np.empty((n, *targets.shape[1:]))
        for r, (p, t, _) in enumerate(parts):
            probs[r::world], targets[r::world] = p, t
        seconds = max(part[2] for part in parts)
    return probs, targets, seconds
