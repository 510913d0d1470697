"""repsim.metrics against scikit-learn, and the NaN-with-warning rule for undefined AUCs (never 0.5)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, roc_auc_score

from repsim import metrics as M


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture
def multiclass() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    logits = rng.normal(size=(300, 5)) + 1.5 * np.eye(5)[y]
    return y, _softmax(logits)


def test_multiclass_metrics_match_sklearn(multiclass) -> None:
    y, p = multiclass
    pred = p.argmax(1)
    out = M.compute_metrics("multiclass", y, p)
    assert set(out) == set(M.SELECTABLE["multiclass"])
    assert out["accuracy"] == pytest.approx(np.mean(pred == y))
    assert out["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert out["kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert out["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovo", average="macro"))
    assert out["auc_ovr"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert out["auc"] != out["auc_ovr"]


def test_binary_auc_uses_positive_column() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = _softmax(rng.normal(size=(200, 2)) + np.eye(2)[y])
    out = M.compute_metrics("binary", y, p)
    assert out["auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert M.auc_binary(y, p[:, 1]) == out["auc"]


def test_multilabel_mean14_mean5_and_per_label() -> None:
    from repsim.data.csv_readers import CHEXPERT_LABELS

    rng = np.random.default_rng(2)
    y = (rng.random((400, 14)) < 0.3).astype(float)
    p = 1 / (1 + np.exp(-(rng.normal(size=(400, 14)) + 2 * y - 1)))
    out = M.compute_metrics("multilabel", y, p, CHEXPERT_LABELS)
    per = [roc_auc_score(y[:, j], p[:, j]) for j in range(14)]
    assert out["auc"] == pytest.approx(np.mean(per))
    five = [CHEXPERT_LABELS.index(n) for n in M.CHEXPERT_COMPETITION]
    assert out["auc_mean5"] == pytest.approx(np.mean([per[j] for j in five]))
    assert out["auc/Edema"] == pytest.approx(per[CHEXPERT_LABELS.index("Edema")])
    assert roc_auc_score(y, p, average="macro") == pytest.approx(out["auc"])


def test_missing_class_gives_nan_and_warning_never_half(multiclass) -> None:
    y, p = multiclass
    keep = y != 3
    with pytest.warns(M.MetricWarning, match=r"classes \[3\]"):
        assert math.isnan(M.auc_multiclass(y[keep], p[keep]))
    with pytest.warns(M.MetricWarning):
        assert math.isnan(M.auc_binary(np.ones(10, int), np.random.default_rng(0).random(10)))
    y_ml = np.zeros((20, 3))
    y_ml[::2, 0] = 1
    y_ml[1::3, 2] = 1
    with pytest.warns(M.MetricWarning, match=r"labels \[1\]"):
        out = M.compute_metrics("multilabel", y_ml, np.random.default_rng(0).random((20, 3)))
    assert math.isnan(out["auc"]) and math.isnan(out["auc/1"]) and not math.isnan(out["auc_nanmean"])
    with pytest.warns(M.MetricWarning, match="averaged over 4 classes"):
        got = M.balanced_accuracy(y[keep], p[keep])
    with warnings.catch_warnings():  # sklearn warns that y_pred holds a class absent from y_true
        warnings.simplefilter("ignore")
        assert got == pytest.approx(balanced_accuracy_score(y[keep], p[keep].argmax(1)))


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        M.compute_metrics("regression", np.zeros(3), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="shape"):
        M.accuracy(np.zeros(3), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="ovo"):
        M.auc_multiclass(np.arange(3), np.eye(3), "macro")
