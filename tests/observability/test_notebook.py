"""examples/outage_walkthrough.ipynb runs top to bottom in a real kernel, so it cannot rot.

The kernel is this interpreter (a kernelspec written for the test, found first on
JUPYTER_PATH), so it sees the same installed packages as the test suite.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOTEBOOK = EXAMPLES / "outage_walkthrough.ipynb"
KERNEL = "callpolicy-test-python"

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    spec = tmp_path / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}),
        encoding="utf-8",
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return KERNEL


def _outputs(notebook: nbformat.NotebookNode) -> list[dict[str, object]]:
    return [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    ]


def _texts(notebook: nbformat.NotebookNode) -> str:
    parts = []
    for output in _outputs(notebook):
        if output.get("output_type") == "stream":
            parts.append(str(output.get("text", "")))
        data = output.get("data")
        if isinstance(data, dict):
            parts.append(str(data.get("text/plain", "")))
    return "\n".join(parts)


def _html(notebook: nbformat.NotebookNode) -> list[str]:
    found = []
    for output in _outputs(notebook):
        data = output.get("data")
        if isinstance(data, dict) and "text/html" in data:
            found.append(str(data["text/html"]))
    return found


def test_the_notebook_is_stored_without_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "the notebook has code"
    assert all(not cell.outputs and cell.execution_count is None for cell in code)


def test_the_outage_walkthrough_runs_and_shows_the_circuit_recover(kernel: str) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name=kernel,
        timeout=60,
        resources={"metadata": {"path": str(EXAMPLES)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    text = _texts(notebook)
    assert "final state: closed" in text
    assert "primary calls while open: 0" in text
    assert "closed -> open  (threshold)" in text
    assert "open -> half_open  (cooldown_elapsed)" in text
    assert "half_open -> closed  (probe_succeeded)" in text

    tables = _html(notebook)
    assert len(tables) == 4, "the policy is shown as an HTML table at each of the four stages"
    assert all(table.startswith('<table class="callpolicy">') for table in tables)
    states = [">open</td>" in table for table in tables]
    assert states == [False, True, True, False], "open after the outage, closed after the probe"

    images = [
        output
        for output in _outputs(notebook)
        if isinstance(output.get("data"), dict) and "image/png" in output["data"]  # type: ignore[operator]
    ]
    assert len(images) == 1, "the timeline was drawn"
