"""Readers of the paper's csv-described datasets (APTOS 2019, ISIC 2019, CheXpert, CBIS-DDSM, NIH ChestX-ray14,
any csv of image names and labels); the array and folder readers are in :mod:`repsim.data.datasets`, the registry of
all readers by name in :mod:`repsim.data.registry`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from repsim.data.datasets import (
    IMAGE_EXTS,
    DatasetInfo,
    Source,
    _fractions,
    _require_file,
    _single_label_task,
)
from repsim.inputs import IMAGENET_MEAN, IMAGENET_STD

NIH_CXR14_LABELS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                   "Pleural Other", "Fracture", "Support Devices")
ISIC2019_LABELS = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")


def _read_csv(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    df = pd.read_csv(_require_file(path, "label csv"))
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; available: {list(df.columns)}")
    return df


def _resolve_images(names: Sequence[str], image_dir: Path, ext: str | None = None) -> list[Path]:
    """Paths of ``names`` under ``image_dir``: direct (``ext`` appended) or, failing that, found by file stem in
    any sub-folder (class-folder layouts such as the HAM10000 sample). Missing files raise naming the first few."""
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    direct = [image_dir / (str(n) + (ext or "")) for n in names]
    if all(p.is_file() for p in direct):
        return direct
    by_stem = {p.stem: p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTS}
    by_name = {p.name: p for p in by_stem.values()}
    out: list[Path] = []
    missing: list[str] = []
    for n, d in zip(names, direct):
        p = d if d.is_file() else by_name.get(Path(str(n)).name, by_stem.get(Path(str(n)).stem))
        if p is not None:
            out.append(p)
        else:
            missing.append(str(n))
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(names)} images not found under {image_dir}, "
                                f"e.g. {missing[:3]}")
    return out


def _encode_classes(values: pd.Series, classes: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    names = sorted(map(str, values.unique())) if classes is None else [str(c) for c in classes]
    index = {c: i for i, c in enumerate(names)}
    unknown = sorted(set(map(str, values)) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not in classes {names}")
    return np.array([index[str(v)] for v in values], dtype=np.int64), names


def csv_images(root: Path, csv: str, image_col: str, label_col: str | None = None, *,
               label_cols: Sequence[str] | None = None, label_sep: str | None = None,
               classes: Sequence[str] | None = None, none_label: str | None = None,
               group_col: str | None = None, image_dir: str = ".",
               ext: str | None = None, channels: int = 3, name: str | None = None, metric: str | None = None,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> Source:
    """Generic csv of image names and labels.

    Single-label: ``label_col`` of class names (``classes`` fixes their order; default sorted).
    Multilabel: ``label_cols`` of 0/1 columns, or ``label_col`` of ``label_sep``-joined names from ``classes``
    (a cell equal to ``none_label``, such as NIH's "No Finding", is an all-zero row; any other name is an error).
    ``group_col`` (patient, lesion) keeps groups inside one split.
    """
    if (label_col is None) == (label_cols is None):
        raise ValueError("give exactly one of label_col or label_cols")
    path = root / csv
    # exactly one of label_col / label_cols is given (checked above)
    label_columns = [label_col] if label_col is not None else list(label_cols or ())
    df = _read_csv(path, [image_col, *label_columns, *([group_col] if group_col else [])])
    images = _resolve_images(df[image_col].astype(str).tolist(), root / image_dir, ext)
    if label_cols is not None:
        targets, names, task = df[list(label_cols)].to_numpy(np.float32), list(label_cols), "multilabel"
    elif label_sep is not None:
        if classes is None:
            raise ValueError("multilabel label_sep needs the list of classes")
        names, task = [str(c) for c in classes], "multilabel"
        targets = np.zeros((len(df), len(names)), np.float32)
        for r, cell in enumerate(df[label_col].astype(str)):
            if cell == none_label:
                continue
            tokens = cell.split(label_sep)
            unknown = sorted(set(tokens) - set(names))
            if unknown:
                raise ValueError(f"{path} row {r}: labels {unknown} are not in classes {names}")
            targets[r, [names.index(t) for t in tokens]] = 1.0
    else:
        targets, names = _encode_classes(df[label_col], classes)
        task = _single_label_task(len(names))[0]
    default_metric = "auc" if task in ("binary", "multilabel") else "balanced_accuracy"
    mean = tuple(mean) if mean is not None else (IMAGENET_MEAN if channels == 3 else (0.5,))
    std = tuple(std) if std is not None else (IMAGENET_STD if channels == 3 else (0.25,))
    info = DatasetInfo(name or Path(csv).stem, task, names, channels, metric or default_metric, mean, std,
                       _fractions(fractions))
    groups = df[group_col].astype(str).to_numpy() if group_col else None
    return Source(images, targets, [str(p.relative_to(root)) for p in images], info, groups)


def aptos2019(root: Path, csv: str = "train.csv", image_dir: str = "train_images") -> Source:
    """Kaggle APTOS 2019 (``id_code``, ``diagnosis`` 0-4); κ-selected, 70/15/15 split as in the paper."""
    return csv_images(root, csv, "id_code", "diagnosis", classes=[str(c) for c in range(5)], image_dir=image_dir,
                      ext=".png", channels=3, name="aptos2019", metric="kappa", mean=(0.415, 0.221, 0.073),
                      std=(0.275, 0.150, 0.081), fractions=(0.7, 0.15, 0.15))


def isic2019(root: Path, csv: str = "ISIC_2019_Training_GroundTruth.csv",
             image_dir: str = "ISIC_2019_Training_Input",
             metadata: str = "ISIC_2019_Training_Metadata.csv") -> Source:
    """ISIC 2019 ground truth (one-hot columns MEL..SCC[, UNK]); recall-selected; grouped by ``lesion_id`` when the
    metadata csv has it. UNK is kept as a class only if some image carries it."""
    df = _read_csv(root / csv, ["image", *ISIC2019_LABELS[:8]])
    names = [c for c in ISIC2019_LABELS if c in df.columns and (c != "UNK" or df[c].any())]
    onehot = df[names].to_numpy()
    bad = np.flatnonzero(onehot.sum(1) != 1)
    if len(bad):
        raise ValueError(f"{root / csv}: {len(bad)} rows are not one-hot, e.g. {df['image'].iloc[bad[:3]].tolist()}")
    images = _resolve_images(df["image"].tolist(), root / image_dir, ".jpg")
    groups = None
    if (root / metadata).is_file():
        meta = pd.read_csv(root / metadata).set_index("image")
        if "lesion_id" in meta.columns:
            lesion = meta["lesion_id"].reindex(df["image"])
            groups = lesion.fillna(pd.Series(df["image"].to_numpy(), index=lesion.index)).astype(str).to_numpy()
    info = DatasetInfo("isic2019", "multiclass", names, 3, "balanced_accuracy",
                       (0.66776717, 0.52960888, 0.52434725), (0.22381877, 0.20363036, 0.21538623),
                       warmup=("iters", 1000))
    return Source(images, onehot.argmax(1).astype(np.int64), df["image"].tolist(), info, groups)


def chexpert(root: Path, csv: str = "train.csv", uncertain: str = "zeros", frontal_only: bool = False) -> Source:
    """CheXpert ``train.csv``: 14 observations multilabel (blank -> 0; uncertain -1 -> 0 "U-Zeros" or 1 "U-Ones"),
    optionally frontal views only, grouped by patient. ``Path`` entries are resolved against ``root`` with or
    without their leading ``CheXpert-v1.0[-small]/`` folder."""
    if uncertain not in ("zeros", "ones"):
        raise ValueError(f"uncertain must be 'zeros' or 'ones', got {uncertain!r}")
    df = _read_csv(root / csv, ["Path", *CHEXPERT_LABELS, *(["Frontal/Lateral"] if frontal_only else [])])
    if frontal_only:
        df = df[df["Frontal/Lateral"] == "Frontal"].reset_index(drop=True)
    labels = df[list(CHEXPERT_LABELS)].fillna(0).replace(-1, 0 if uncertain == "zeros" else 1)
    rel = df["Path"].astype(str)
    if not (root / rel.iloc[0]).is_file():
        rel = rel.str.split("/", n=1).str[1]
    images = [root / p for p in rel]
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(images)} CheXpert images not found, e.g. {missing[:3]}")
    patients = rel.str.extract(r"(patient\d+)", expand=False)
    info = DatasetInfo("chexpert", "multilabel", list(CHEXPERT_LABELS), 1, "auc", (0.503,), (0.292,),
                       warmup=("iters", 1000))
    return Source(images, labels.to_numpy(np.float32), rel.tolist(), info, patients.fillna(rel).to_numpy())


def cbis_ddsm(root: Path, csv: str | Sequence[str] = "cbis_ddsm.csv", image_col: str = "image_path",
              label_col: str = "pathology", group_col: str = "patient_id") -> Source:
    """CBIS-DDSM case description csv(s) with a column of converted (PNG/JPEG) image paths; MALIGNANT -> 1,
    BENIGN and BENIGN_WITHOUT_CALLBACK -> 0; AUC-selected; grouped by patient."""
    csvs = [csv] if isinstance(csv, str) else list(csv)
    df = pd.concat([_read_csv(root / c, [image_col, label_col, group_col]) for c in csvs], ignore_index=True)
    pathology = df[label_col].astype(str).str.upper()
    unknown = sorted(set(pathology) - {"MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK"})
    if unknown:
        raise ValueError(f"unknown CBIS-DDSM pathology values {unknown}")
    images = _resolve_images(df[image_col].astype(str).tolist(), root)
    info = DatasetInfo("cbis_ddsm", "binary", ["benign", "malignant"], 1, "auc", (0.286,), (0.267,))
    return Source(images, (pathology == "MALIGNANT").to_numpy().astype(np.int64),
                  df[image_col].astype(str).tolist(), info, df[group_col].astype(str).to_numpy())


def nih_cxr14(root: Path, csv: str = "Data_Entry_2017.csv", image_dir: str = "images") -> Source:
    """NIH ChestX-ray14 (``Finding Labels`` joined by ``|``, "No Finding" = all zeros), grouped by patient."""
    return csv_images(root, csv, "Image Index", "Finding Labels", label_sep="|", classes=NIH_CXR14_LABELS,
                      none_label="No Finding", group_col="Patient ID", image_dir=image_dir, channels=1,
                      name="nih_cxr14", metric="auc")


__all__ = ["csv_images", "aptos2019", "isic2019", "chexpert", "cbis_ddsm", "nih_cxr14", "CHEXPERT_LABELS",
           "ISIC2019_LABELS", "NIH_CXR14_LABELS"]
