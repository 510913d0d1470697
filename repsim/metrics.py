"""Classification metrics of the paper: quadratic κ, ROC-AUC (binary, one-vs-one, one-vs-rest, multilabel mean-14 and
CheXpert mean-5), balanced accuracy (= macro recall) and accuracy.

Every function takes *probabilities* (softmax for single-label, sigmoid for multilabel), never logits: the caller owns
the link function, so k-NN vote fractions are scored as they are instead of being squashed a second time.
An AUC that is undefined (a class or label without positives or negatives in ``y_true``) is NaN with a
``MetricWarning`` — never 0.5, which would silently look like a chance-level model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import cohen_kappa_score, roc_auc_score

TASKS = ("binary", "multiclass", "multilabel")

# The five CheXpert competition observations (Irvin et al. 2019), scored as ``auc_mean5`` when present.
CHEXPERT_COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


# Metrics that ``compute_metrics`` returns for every task (a model-selection metric must be one of them).
SELECTABLE = {
    "binary": ("accuracy", "balanced_accuracy", "kappa", "auc"),
    "multiclass": ("accuracy", "balanced_accuracy", "kappa", "auc", "auc_ovr"),
    "multilabel": ("auc", "auc_nanmean", "auc_mean5"),
}


class MetricWarning(UserWarning):
    """A metric is undefined on this data (for example a class without positives) and was returned as NaN."""


def _labels(y_true: np.ndarray) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D class indices, got shape {y.shape}")
    return y.astype(np.int64)


def _probs(probs: np.ndarray, n: int) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != n:
        raise ValueError(f"probs must have shape (N={n}, C), got {p.shape}")
    return p


def accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Fraction of samples whose arg-max class equals the label."""
    y = _labels(y_true)
    return float(np.mean(_probs(probs, len(y)).argmax(1) == y))


def balanced_accuracy(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (sklearn ``balanced_accuracy_score``).

    For single-label data this equals the macro recall the paper reports for ISIC 2019; classes absent from
    ``y_true`` have no recall and are left out of the mean with a ``MetricWarning``.
    """
    y = _labels(y_true)
    p = _probs(probs, len(y))
    pred = p.argmax(1)
    present = np.unique(y)
    if len(present) < p.shape[1]:
        missing = sorted(set(range(p.shape[1])) - set(present.tolist()))
        warnings.warn(f"balanced_accuracy: classes {missing} have no samples; averaged over {len(present)} classes",
                      MetricWarning, stacklevel=2)
    return float(np.mean([np.mean(pred[y == c] == c) for c in present]))


def quadratic_kappa(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Cohen's κ with quadratic weights over all ``C`` classes (the APTOS 2019 / RetinaMNIST grading metric)."""
    y = _labels(y_true)
    p = _probs(probs, len(y))
    pred = p.argmax(1)
    if len(np.unique(np.concatenate([y, pred]))) < 2:
        warnings.warn("quadratic_kappa: labels and predictions hold a single class; κ is undefined",
                      MetricWarning, stacklevel=2)
        return math.nan
    return float(cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(p.shape[1]))))


def auc_binary(y_true: np.ndarray, probs: np.ndarray) -> float:
    """ROC-AUC of the positive class (column 1 of ``(N, 2)`` probabilities, or a 1-D score)."""
    y = _labels(y_true)
    p = np.asarray(probs, dtype=np.float64)
    score = p[:, -1] if p.ndim == 2 else p
    if len(np.unique(y)) < 2:
        warnings.warn("auc_binary: y_true holds a single class; AUC is undefined", MetricWarning, stacklevel=2)
        return math.nan
    return float(roc_auc_score(y, score))


def auc_multiclass(y_true: np.ndarray, probs: np.ndarray, multi_class: str = "ovo") -> float:
    """Macro ROC-AUC over ``C`` classes, one-vs-one (paper) or one-vs-rest; NaN if a class has no samples."""
    if multi_class not in ("ovo", "ovr"):
        raise ValueError(f"multi_class must be 'ovo' or 'ovr', got {multi_class!r}")
    y = _labels(y_true)
    p = _probs(probs, len(y))
    missing = sorted(set(range(p.shape[1])) - set(np.unique(y).tolist()))
    if missing:
        warnings.warn(f"auc_multiclass: classes {missing} have no samples; AUC is undefined", MetricWarning,
                      stacklevel=2)
        return math.nan
    # sklearn requires rows summing to one; renormalising is exact for softmax output and for k-NN vote fractions.
    p = p / p.sum(1, keepdims=True)
    return float(roc_auc_score(y, p, multi_class=multi_class, average="macro", labels=list(range(p.shape[1]))))


def auc_per_label(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-label ROC-AUC of multilabel data ``(N, L)``; NaN (with a warning) where a label is constant."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2:
        raise ValueError(f"multilabel y_true and probs must both be (N, L), got {y.shape} and {p.shape}")
    out = np.full(y.shape[1], math.nan)
    constant = []
    for j in range(y.shape[1]):
        if len(np.unique(y[:, j])) < 2:
            constant.append(j)
        else:
            out[j] = roc_auc_score(y[:, j], p[:, j])
    if constant:
        warnings.warn(f"auc_per_label: labels {constant} have no positives or no negatives; their AUC is NaN",
                      MetricWarning, stacklevel=2)
    return out


def compute_metrics(task: str, y_true: np.ndarray, probs: np.ndarray,
                    label_names: Sequence[str] | None = None) -> dict[str, float]:
    """All metrics of one task as a flat ``{name: float}`` dict (NaN where undefined).

    binary: accuracy, balanced_accuracy, auc, kappa. multiclass: accuracy, balanced_accuracy (= macro recall),
    kappa (quadratic), auc (one-vs-one, paper) and auc_ovr. multilabel: auc (mean over all labels, NaN if any label
    is undefined — the paper's mean-14 on CheXpert), auc_nanmean (over the defined labels), auc_mean5 (the CheXpert
    competition labels, when ``label_names`` holds them) and ``auc/<label>``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if task == "multilabel":
        per = auc_per_label(y_true, probs)
        out = {"auc": float(np.mean(per)),
               "auc_nanmean": float(np.nanmean(per)) if np.isfinite(per).any() else math.nan}
        names = list(label_names) if label_names is not None else [str(j) for j in range(len(per))]
        if len(names) != len(per):
            raise ValueError(f"{len(names)} label_names for {len(per)} labels")
        if set(CHEXPERT_COMPETITION) <= set(names):
            out["auc_mean5"] = float(np.mean([per[names.index(n)] for n in CHEXPERT_COMPETITION]))
        out.update({f"auc/{n}": float(v) for n, v in zip(names, per)})
        return out
    out = {"accuracy": accuracy(y_true, probs), "balanced_accuracy": balanced_accuracy(y_true, probs),
           "kappa": quadratic_kappa(y_true, probs)}
    if task == "binary":
        out["auc"] = auc_binary(y_true, probs)
    else:
        out["auc"] = auc_multiclass(y_true, probs, "ovo")
        out["auc_ovr"] = auc_multiclass(y_true, probs, "ovr")
    return out


def spectrum(features: np.ndarray | Sequence[Sequence[float]]) -> dict[str, float]:
    """Effective rank (Roy & Vetterli 2007: exp of the entropy of the normalised squared singular values of the
    centred features), top-direction variance share and total variance of ``features`` (samples x dims), in float64.
    A rank near 1 means the features span one direction: a linear head or k-NN has nothing to separate."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"features must be (samples >= 2, dims), got shape {x.shape}")
    sq = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2 if np.isfinite(x).all() else np.full(1, math.nan)
    total = float(sq.sum())
    if not total > 0:  # identical samples span no direction (rank 0); non-finite features have no rank (NaN)
        return {"effective_rank": 0.0 if total == 0 else math.nan, "top1_share": math.nan,
                "total_variance": total, "dims": x.shape[1]}
    p = sq / total
    p = p[p > 0]
    return {"effective_rank": float(np.exp(-(p * np.log(p)).sum())), "top1_share": float(p[0]),
            "total_variance": total / (len(x) - 1), "dims": x.shape[1]}
