"""Weighted k-NN: the vote against a brute-force reference, k/T conventions, multilabel, and a real-data check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repsim.knn import knn_evaluate, knn_predict


def _reference(bank, labels, queries, k, t, c):
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    out = torch.zeros(len(queries), c)
    for i, q in enumerate(queries):
        sim = bank @ q
        top = sim.argsort(descending=True)[:k]
        w = (sim[top] / t).exp()
        for j, wj in zip(top, w):
            out[i, labels[j]] += wj
        out[i] /= w.sum()
    return out


@pytest.mark.parametrize(("k", "t"), [(200, 0.1), (20, 0.07), (1, 0.1)])
def test_single_label_matches_reference(k: int, t: float) -> None:
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 4, (300,), generator=g)
    got = knn_predict(bank, labels, queries, k=k, temperature=t, num_classes=4, chunk=7)
    torch.testing.assert_close(got, _reference(bank, labels, queries, k, t, 4), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(40))


def test_multilabel_scores_are_weighted_label_means() -> None:
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(50, 8, generator=g), torch.randn(5, 8, generator=g)
    labels = (torch.rand(50, 3, generator=g) < 0.5).float()
    got = knn_predict(bank, labels, queries, k=10, temperature=0.1, multilabel=True)
    sim, idx = (F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T).topk(10)
    w = torch.softmax(sim / 0.1, dim=1)
    torch.testing.assert_close(got, (w[..., None] * labels[idx]).sum(1))
    assert got.min() >= 0 and got.max() <= 1


def test_errors() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        knn_predict(torch.randn(4, 2), torch.zeros(4), torch.randn(1, 2))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        knn_predict(torch.randn(4, 2), torch.zeros(4), torch.randn(1, 3), num_classes=2)


def test_knn_on_raw_pixels_of_pneumoniamnist_beats_chance(data_root) -> None:
    """Identity 'features' (normalised pixels): the k-NN path end to end on real data."""
    from repsim.data import prepare

    data = prepare({"dataset": "medmnist", "root": "medmnist", "flag": "pneumoniamnist", "img_size": 28}, data_root)
    flat = torch.nn.Flatten()
    loaders = [torch.utils.data.DataLoader(data.datasets[s], batch_size=512) for s in ("train_eval", "test")]
    out = knn_evaluate(flat, *loaders, task="binary", num_classes=2, k=20, temperature=0.07)
    assert out["auc"] > 0.85, out
    assert np.isfinite(out["kappa"])
