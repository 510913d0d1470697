"""The datasets repsim knows by name, as trainer ``data`` blocks (no heavy imports: the CLI and the study settings
read it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Data blocks of the datasets known by name (roots are relative to the data root).
NAMED: dict[str, dict[str, Any]] = {
    **{flag: {"dataset": "medmnist", "root": "medmnist", "flag": flag} for flag in
       ("pneumoniamnist", "retinamnist", "breastmnist", "dermamnist", "bloodmnist", "pathmnist", "octmnist",
        "chestmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist")},
    "aptos2019": {"dataset": "aptos2019", "root": "APTOS2019"},
    "cbis_ddsm": {"dataset": "cbis_ddsm", "root": "CBIS-DDSM"},
    "isic2019": {"dataset": "isic2019", "root": "ISIC2019"},
    "chexpert": {"dataset": "chexpert", "root": "CheXpert"},
}


def check_data(data: str, root: str | Path | None) -> None:
    """A one-line error, before anything is read, when ``data`` names nothing that exists: it must be
    ``"synthetic"``, a name of ``NAMED`` whose folder is under ``root``, a ``.npz`` file or an image folder."""
    if data == "synthetic":
        return
    if data in NAMED:
        folder = Path(NAMED[data]["root"]) if root is None else Path(root) / NAMED[data]["root"]
        if not folder.exists():
            raise FileNotFoundError(f"dataset {data!r} is read from {folder}, which does not exist; give "
                                    "--data-root the folder that holds it")
        return
    path = Path(data).expanduser()
    if path.suffix == ".npz" and not path.is_file():
        raise FileNotFoundError(f"no such .npz file: {data}")
    if path.suffix != ".npz" and not path.is_dir():
        raise ValueError(f"data {data!r} is neither 'synthetic', a known dataset ({', '.join(sorted(NAMED))}), a "
                         ".npz file with MedMNIST keys nor an image folder")


def default_root() -> Path | None:
    """The real medical data: ``$REPSIM_DATA``, else ``../shared/data`` beside the repository when present."""
    env = os.environ.get("REPSIM_DATA")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[3] / "shared" / "data"  # repsim/data/named.py -> ../shared/data
    return root if root.is_dir() else None
