"""Weighted k-NN evaluation of frozen features (the paper's Fig 2).

Features are L2-normalised, neighbours ranked by cosine similarity, and each of the top ``k`` neighbours votes with
weight ``exp(sim / T)`` (InstDisc / DINO). Defaults k=200, T=0.1 follow the paper's code; DINO uses k=20, T=0.07.
Single-label: the weighted one-hot votes normalised to sum to one are the class probabilities. Multilabel: the
L1-normalised weights average the neighbours' label vectors, giving a per-label score in [0, 1]. The scores go to
``repsim.metrics`` as they are (the paper's code passed them through a second softmax/sigmoid).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from repsim.metrics import compute_metrics
from repsim.progress import tqdm


def knn_predict(bank: torch.Tensor, bank_targets: torch.Tensor, queries: torch.Tensor, *, k: int = 200,
                temperature: float = 0.1, num_classes: int | None = None, multilabel: bool = False,
                chunk: int = 1024) -> torch.Tensor:
    """Scores ``(Q, C)`` of ``queries (Q, D)`` against a feature ``bank (N, D)`` with targets ``(N,)`` or ``(N, C)``.

    ``k`` is capped at the bank size. ``num_classes`` is required for single-label targets.
    """
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank and queries must be (N, D) and (Q, D), got {tuple(bank.shape)}, {tuple(queries.shape)}")
    if len(bank_targets) != len(bank):
        raise ValueError(f"{len(bank_targets)} targets for a bank of {len(bank)} features")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if multilabel:
        votes = bank_targets.float()
    else:
        if num_classes is None:
            raise ValueError("num_classes is required for single-label k-NN")
        votes = F.one_hot(bank_targets.long(), num_classes).float()
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    out = []
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weight = (sim / temperature).exp()
        weight = weight / weight.sum(1, keepdim=True)
        out.append(torch.einsum("qk,qkc->qc", weight, votes[idx]))
    return torch.cat(out)


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader: Iterable, device: torch.device | str = "cpu",
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model.forward_features`` (a Backbone's pooled feature, else ``model``) over ``(x, y)`` batches."""
    model.eval().to(device)
    forward = getattr(model, "forward_features", model)
    feats, targets = [], []
    for x, y in tqdm(loader, desc=desc, leave=False):
        feats.append(forward(x.to(device)).float().cpu())
        targets.append(y)
    return torch.cat(feats), torch.cat(targets)


def knn_evaluate(model: torch.nn.Module, train_loader: Iterable, eval_loader: Iterable, *, task: str,
                 num_classes: int, k: int = 200, temperature: float = 0.1, label_names: Sequence[str] | None = None,
                 device: torch.device | str = "cpu") -> dict[str, float]:
    """k-NN metrics of ``eval_loader`` using ``train_loader`` features as the bank (both without augmentation)."""
    bank, bank_targets = extract_features(model, train_loader, device, "k-NN bank")
    queries, targets = extract_features(model, eval_loader, device, "k-NN queries")
    scores = knn_predict(bank, bank_targets, queries, k=k, temperature=temperature, num_classes=num_classes,
                         multilabel=task == "multilabel")
    return compute_metrics(task, targets.numpy(), scores.numpy().astype(np.float64), label_names)
