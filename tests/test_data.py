"""Dataset readers on the real data in ../shared/data (and tiny files in the paper datasets' layouts), grouped
seeded splits, the paper transforms, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from repsim.data import prepare, split_indices
from repsim.data.csv_readers import CHEXPERT_LABELS
from repsim.data.datasets import with_channels
from repsim.data.registry import load_source

HAM = {"dataset": "csv", "root": "ham10000_sample", "csv": "HAM10000_metadata_sample.csv", "image_col": "image_id",
       "label_col": "dx", "group_col": "lesion_id", "ext": ".jpg", "img_size": 32}
NIH = {"dataset": "nih_cxr14", "root": "nih_cxr14_examples", "csv": "labels.csv", "image_dir": ".", "img_size": 64}


def test_medmnist_official_splits_and_info(data_root) -> None:
    breast = prepare({"dataset": "medmnist", "root": "medmnist", "flag": "breastmnist", "img_size": 28}, data_root)
    assert {k: len(v) for k, v in breast.split.items()} == {"train": 546, "val": 78, "test": 156}
    info = breast.info
    assert (info.task, info.metric, info.channels, info.num_classes) == ("binary", "auc", 1, 2)
    x, y = breast.datasets["val"][0]
    assert x.shape == (1, 28, 28) and y.dtype == torch.long
    retina = prepare({"dataset": "medmnist", "root": "medmnist", "flag": "retinamnist", "img_size": 32}, data_root)
    assert (retina.info.task, retina.info.metric, retina.info.channels) == ("multiclass", "kappa", 3)
    assert np.bincount(retina.source.targets[retina.split["test"]]).tolist() == [174, 46, 92, 68, 20]
    assert retina.datasets["train"][0][0].shape == (3, 32, 32)


def test_random_split_is_seeded_grouped_and_near_fractions() -> None:
    groups = np.repeat(np.arange(500), np.random.default_rng(0).integers(1, 5, 500))
    a, b = (split_indices(len(groups), (0.7, 0.15, 0.15), 42, groups) for _ in range(2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], split_indices(len(groups), (0.7, 0.15, 0.15), 1, groups)["test"])
    sets = [set(groups[a[k]]) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sorted(np.concatenate(list(a.values()))) == list(range(len(groups)))
    assert abs(len(a["train"]) / len(groups) - 0.7) < 0.01
    with pytest.raises(ValueError, match="empty"):
        split_indices(2, (0.8, 0.1, 0.1), 0)
    with pytest.raises(ValueError, match="summing to 1"):
        split_indices(10, (0.8, 0.1), 0)


def test_ham10000_csv_loader_splits_by_lesion_and_matches_folders(data_root, tmp_path) -> None:
    before = sorted(p.name for p in (data_root / "ham10000_sample").rglob("*"))
    data = prepare({**HAM, "split": "random"}, data_root)
    assert data.info.classes == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert data.info.task == "multiclass" and data.info.metric == "balanced_accuracy"
    lesions = {k: set(data.source.groups[v]) for k, v in data.split.items()}
    assert not (lesions["train"] & lesions["test"] or lesions["train"] & lesions["val"]
                or lesions["val"] & lesions["test"])
    # every image resolved inside its class folder and labelled as that folder
    assert all(p.parent.name == data.info.classes[t] for p, t in zip(data.source.images, data.source.targets))
    folder = prepare({"dataset": "image_folder", "root": "ham10000_sample", "img_size": 32}, data_root)
    assert sorted(map(str, folder.source.ids)) == sorted(data.source.ids)
    assert data.datasets["test"][0][0].shape == (3, 32, 32)
    data.write_split(tmp_path / "split.json", 42)
    assert (tmp_path / "split.json").exists()
    assert sorted(p.name for p in (data_root / "ham10000_sample").rglob("*")) == before  # nothing written there


def test_nih_cxr14_multilabel(data_root) -> None:
    data = prepare({**NIH, "split": "random", "fractions": [0.4, 0.3, 0.3]}, data_root)
    assert data.info.task == "multilabel" and data.info.num_classes == 14 and data.info.channels == 1
    t = dict(zip(data.source.ids, data.source.targets))
    assert t["00000013_019.png"].sum() == 0  # No Finding
    assert [data.info.classes[j] for j in np.flatnonzero(t["00000003_000.png"])] == ["Hernia"]
    assert t["00000013_004.png"].sum() == 4
    x, y = data.datasets["train"][0]
    assert x.shape == (1, 64, 64) and y.dtype == torch.float32 and y.shape == (14,)
    rgb = prepare({**NIH, "split": "random", "fractions": [0.4, 0.3, 0.3], "channels": 3}, data_root)
    assert rgb.datasets["val"][0][0].shape == (3, 64, 64) and len(rgb.info.mean) == 3


def test_augmentation_is_a_function_of_seed_epoch_and_index(data_root) -> None:
    data = prepare({"dataset": "medmnist", "root": "medmnist", "flag": "retinamnist", "img_size": 28}, data_root,
                   seed=3)
    ds = data.datasets["train"]
    state = torch.get_rng_state()
    first = ds[5][0]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched
    assert torch.equal(ds[5][0], first)
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], first)
    ev = data.datasets["train_eval"][5][0]
    assert abs(float(ev.mean())) < 3  # normalised


def _png(path, mode="RGB", size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)


def test_paper_dataset_layouts(tmp_path) -> None:
    aptos = tmp_path / "APTOS2019"
    aptos.mkdir()
    pd.DataFrame({"id_code": [f"a{i}" for i in range(20)], "diagnosis": [i % 5 for i in range(20)]}).to_csv(
        aptos / "train.csv", index=False)
    for i in range(20):
        _png(aptos / "train_images" / f"a{i}.png")
    s = load_source("aptos2019", aptos)
    assert (s.info.metric, s.info.fractions, s.info.num_classes) == ("kappa", (0.7, 0.15, 0.15), 5)

    isic = tmp_path / "ISIC2019"
    isic.mkdir()
    onehot = np.eye(9, dtype=int)[[i % 8 for i in range(16)]]
    df = pd.DataFrame(onehot, columns=["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"])
    df.insert(0, "image", [f"ISIC_{i}" for i in range(16)])
    df.to_csv(isic / "ISIC_2019_Training_GroundTruth.csv", index=False)
    pd.DataFrame({"image": df["image"], "lesion_id": [f"L{i // 2}" for i in range(16)]}).to_csv(
        isic / "ISIC_2019_Training_Metadata.csv", index=False)
    for name in df["image"]:
        _png(isic / "ISIC_2019_Training_Input" / f"{name}.jpg")
    s = load_source("isic2019", isic)
    assert s.info.num_classes == 8 and s.targets.tolist() == [i % 8 for i in range(16)]
    assert s.groups.tolist()[:3] == ["L0", "L0", "L1"]

    chex = tmp_path / "chexpert"
    chex.mkdir()
    rows = []
    for i in range(6):
        rel = f"CheXpert-v1.0-small/train/patient{i // 2:05d}/study1/view1_{'frontal' if i % 2 else 'lateral'}.jpg"
        _png(chex / rel.split("/", 1)[1], mode="L")
        rows.append({"Path": rel, "Frontal/Lateral": "Frontal" if i % 2 else "Lateral",
                     **{c: [1.0, -1.0, np.nan][(i + j) % 3] for j, c in enumerate(CHEXPERT_LABELS)}})
    pd.DataFrame(rows).to_csv(chex / "train.csv", index=False)
    zeros, ones = load_source("chexpert", chex), load_source("chexpert", chex, uncertain="ones")
    assert zeros.targets.shape == (6, 14) and set(np.unique(zeros.targets)) == {0.0, 1.0}
    assert ones.targets.sum() > zeros.targets.sum()
    assert load_source("chexpert", chex, frontal_only=True).targets.shape == (3, 14)
    assert zeros.groups.tolist() == ["patient00000"] * 2 + ["patient00001"] * 2 + ["patient00002"] * 2

    ddsm = tmp_path / "ddsm"
    ddsm.mkdir()
    pd.DataFrame({"image_path": [f"img/{i}.png" for i in range(4)], "patient_id": ["P1", "P1", "P2", "P3"],
                  "pathology": ["MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK", "MALIGNANT"]}).to_csv(
        ddsm / "cbis_ddsm.csv", index=False)
    for i in range(4):
        _png(ddsm / "img" / f"{i}.png", mode="L")
    s = load_source("cbis_ddsm", ddsm)
    assert s.targets.tolist() == [1, 0, 0, 1] and s.info.channels == 1 and s.info.mean == (0.286,)


def test_bad_input_errors(data_root, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="MedMNIST dermamnist not found"):
        prepare({"dataset": "medmnist", "root": "medmnist", "flag": "dermamnist"}, data_root)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['diagnosis'\]"):
        prepare({**HAM, "label_col": "diagnosis"}, data_root)
    with pytest.raises(FileNotFoundError, match="1 of 70 images not found"):
        csv = tmp_path / "labels.csv"
        df = pd.read_csv(data_root / HAM["root"] / HAM["csv"])
        df.loc[0, "image_id"] = "ISIC_missing"
        df.to_csv(csv, index=False)
        prepare({**HAM, "csv": str(csv)}, data_root)
    bad = tmp_path / "medmnist"
    bad.mkdir()
    arrays = {f"{s}_{k}": v for s in ("train", "val", "test") for k, v in
              (("images", np.zeros((4, 8, 8, 4), np.uint8)), ("labels", np.zeros((4, 1), np.uint8)))}
    np.savez(bad / "breastmnist.npz", **arrays)
    with pytest.raises(ValueError, match=r"neither \(N, H, W\) nor \(N, H, W, 1\|3\)"):
        prepare({"dataset": "medmnist", "root": str(bad), "flag": "breastmnist"})
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        prepare({"dataset": "mnist", "root": "."}, data_root)
    with pytest.raises(ValueError, match=r"data keys \['label'\] are not understood"):
        prepare({**HAM, "label": "dx"}, data_root)
    with pytest.raises(ValueError, match="no official split"):
        prepare({**HAM, "split": "official"}, data_root)
    nih = pd.read_csv(data_root / NIH["root"] / "labels.csv")
    nih.loc[2, "Finding Labels"] = "Effusion|Hernai"
    nih.to_csv(tmp_path / "nih.csv", index=False)
    with pytest.raises(ValueError, match=r"row 2: labels \['Hernai'\] are not in classes"):
        load_source("nih_cxr14", data_root / NIH["root"], csv=str(tmp_path / "nih.csv"), image_dir=".")
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        with_channels(load_source("medmnist", data_root / "medmnist", flag="breastmnist").info, 2)
