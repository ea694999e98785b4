"""Every notebook in tutorials/ runs from top to bottom, offline, so the tutorials never rot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT_S = 180
# Notebooks committed with their outputs (small figures), so they read well on GitHub.
STORED_WITH_OUTPUTS = {"Circuits_with_GIM.ipynb"}
MAX_STORED_PNG_BYTES = 100_000

_missing = [m for m in ("nbclient", "nbformat", "ipykernel") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(_missing),
    reason=f"running the tutorials needs {', '.join(_missing)}: pip install -e '.[test]'",
)


def _read(path: Path):
    import nbformat

    return nbformat.read(path, as_version=4)


def test_the_tutorials_are_there() -> None:
    assert [p.name for p in NOTEBOOKS] == [
        "Circuits_with_GIM.ipynb",
        "GIM_vs_Captum_gradients.ipynb",
        "IntegratedGradients_under_gim_rules.ipynb",
        "LLMGradientAttribution_with_LayerGIM.ipynb",
        "Vision_transformers_with_GIM.ipynb",
    ]


@pytest.mark.parametrize(
    "path",
    [p for p in NOTEBOOKS if p.name not in STORED_WITH_OUTPUTS],
    ids=lambda p: p.stem,
)
def test_tutorial_is_saved_without_outputs(path: Path) -> None:
    for cell in _read(path).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.mark.parametrize("name", sorted(STORED_WITH_OUTPUTS))
def test_tutorial_is_stored_with_small_outputs_and_no_errors(name: str) -> None:
    import base64

    outputs = [o for c in _read(TUTORIALS / name).cells if c.cell_type == "code" for o in c.outputs]
    pngs = [
        base64.b64decode(o["data"]["image/png"])
        for o in outputs
        if "image/png" in o.get("data", {})
    ]
    assert pngs and all(len(png) < MAX_STORED_PNG_BYTES for png in pngs)
    assert not any(o.output_type == "error" for o in outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_runs_offline(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    notebook = _read(path)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    client.execute()  # raises CellExecutionError, with the failing cell, on any error
    errors = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.output_type == "error"
    ]
    assert errors == []
