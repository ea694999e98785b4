"""Every notebook in tutorials/ is stored with its outputs and runs from top to bottom,
offline, producing the same kinds of output, so the tutorials never rot."""

from __future__ import annotations

import base64
import importlib.util
import struct
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT_S = 180

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


def _kinds(notebook) -> list[list[str]]:
    """For each code cell, the kinds of its outputs (stream name or MIME types).

    Consecutive stdout chunks count as one: the kernel splits or merges printed
    text by timing, not by what the cell prints.
    """
    kinds = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        cell_kinds: list[str] = []
        for output in cell.outputs:
            if output.output_type == "stream" and output.get("name") != "stdout":
                continue
            kind = (
                "stdout"
                if output.output_type == "stream"
                else ",".join(sorted(output.get("data", {})))
            )
            if not (kind == "stdout" and cell_kinds[-1:] == ["stdout"]):
                cell_kinds.append(kind)
        kinds.append(cell_kinds)
    return kinds


def _images(notebook) -> list[bytes]:
    return [
        base64.b64decode(output["data"]["image/png"])
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_is_saved_with_its_outputs_and_small_figures(path: Path) -> None:
    notebook = _read(path)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code), "run regenerate_outputs.py"
    assert not any(o.output_type == "error" for cell in code for o in cell.outputs)
    images = _images(notebook)
    assert images, "the stored notebook shows no figure"
    for image in images:
        width, height = struct.unpack(">II", image[16:24])
        assert width <= 1200 and height <= 1200 and len(image) < 100_000  # dpi 72
    assert path.stat().st_size < 500_000


@pytest.mark.slow
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
    # The stored outputs are what the notebook produces today (tutorials/regenerate_outputs.py).
    assert _kinds(notebook) == _kinds(_read(path))
