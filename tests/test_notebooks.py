"""The dashboards run top to bottom, headless, against the small study, and draw their figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FinishedStudy

pytestmark = pytest.mark.slow

DASHBOARDS = Path(__file__).resolve().parents[1] / "dashboards"
# Notebook → the figures it draws.
FIGURES = {"study_overview": 3, "feature_maps": 5, "placement": 2}


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_and_draws_its_figures(
    name: str, small_study: FinishedStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(DASHBOARDS / f"{name}.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    assert any("parameters" in cell.metadata.get("tags", []) for cell in notebook.cells)
    # The kernel inherits this environment: it is how the dashboards are pointed at a store and a study.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", small_study.tracking_uri)
    monkeypatch.setenv("SBN_STUDY", small_study.spec.name)
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(DASHBOARDS)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= FIGURES[name]
    assert any(
        f"study '{small_study.spec.name}' in {small_study.tracking_uri}" in o.get("text", "") for o in outputs
    )
