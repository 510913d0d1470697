"""The datasets repsim knows by name, as trainer ``data`` blocks (no heavy imports: the CLI and the study settings
read it)."""

from __future__ import annotations

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
