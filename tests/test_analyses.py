"""The analysis scripts' own numerics (analyses/feature_rank.py), against numpy written from the definitions."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "analyses" / "feature_rank.py"
spec = importlib.util.spec_from_file_location("feature_rank", SCRIPT)
assert spec is not None and spec.loader is not None
feature_rank = importlib.util.module_from_spec(spec)
spec.loader.exec_module(feature_rank)


def test_effective_rank_matches_numpy_and_its_extremes() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 20)) * np.linspace(0.1, 3, 20)  # anisotropic
    s = feature_rank.spectrum(torch.from_numpy(x).float())
    c = x - x.mean(0)
    ev = np.linalg.eigvalsh(c.T @ c)[::-1]  # squared singular values, from the covariance instead of an SVD
    p = ev / ev.sum()
    assert abs(s["effective_rank"] - np.exp(-(p * np.log(p)).sum())) < 1e-4
    assert abs(s["top1_share"] - p[0]) < 1e-6 and abs(s["total_variance"] - c.var(0, ddof=1).sum()) < 1e-3
    rank_one = torch.from_numpy(rng.normal(size=(50, 1)) @ rng.normal(size=(1, 8)))
    assert abs(feature_rank.spectrum(rank_one)["effective_rank"] - 1) < 1e-6
    q, _ = np.linalg.qr(rng.normal(size=(64, 64)))  # 64 orthogonal directions of equal variance
    assert abs(feature_rank.spectrum(torch.from_numpy(q[:, :16] - q[:, :16].mean(0)))["effective_rank"] - 16) < 0.5
