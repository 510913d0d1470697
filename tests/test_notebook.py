"""analyses/cka_walkthrough.ipynb runs top to bottom (nbclient) on the real BreastMNIST file."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "analyses" / "cka_walkthrough.ipynb"


def test_walkthrough_notebook_executes(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPSIM_DATA", str(data_root))  # the kernel inherits these
    monkeypatch.setenv("REPSIM_WALKTHROUGH_OUT", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "test AUC" in text and "95% CI" in text and "max |compare - cka_matrix|" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the heatmap was drawn
    assert list(tmp_path.rglob("backbone_best.pt"))  # the run went where it was told
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    assert "Warning" not in stderr  # no IProgress/tqdm or deprecation warnings shown to the reader
