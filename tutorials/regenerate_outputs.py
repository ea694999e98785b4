r"""
Runs every tutorial notebook offline, from top to bottom, and stores its outputs in it, so that
a reader sees the tables and figures without running anything.

Figures are drawn at 72 dpi (set in each notebook's first cell), so the stored notebooks stay
small. The test suite executes the notebooks again and checks that they produce the same kinds
of output, cell by cell, as the stored ones (tests/test_tutorials.py).

The stored outputs keep no run-specific noise: no execution metadata, and no warning that
names a local path (tqdm's "IProgress not found" is silenced in the kernel). To run one
notebook without storing its outputs: ``jupyter execute tutorials/NAME.ipynb`` (the
``jupyter execute`` command comes with nbclient, in the test extras).

Usage::

    python tutorials/regenerate_outputs.py            # all notebooks
    python tutorials/regenerate_outputs.py NAME.ipynb  # some of them
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parent
CELL_TIMEOUT_S = 300


def execute(path: Path) -> nbformat.NotebookNode:
    r"""
    Args:
        path (Path): A notebook.

    Returns:
        NotebookNode: The notebook with fresh outputs; the file is not written.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # The kernel inherits this: tqdm.auto, imported by transformers and Captum, warns with
    # a local path when ipywidgets is missing; the stored outputs should not show it.
    os.environ["PYTHONWARNINGS"] = "ignore:IProgress not found"
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    for cell in notebook.cells:  # keep the files free of run-specific metadata
        cell.metadata.pop("execution", None)
    return notebook


def main(argv: list[str]) -> None:
    r"""Regenerates the outputs of the notebooks named in ``argv`` (all if empty)."""
    paths = [TUTORIALS / name for name in argv] or sorted(TUTORIALS.glob("*.ipynb"))
    for path in paths:
        nbformat.write(execute(path), path)
        print(f"wrote {path.relative_to(TUTORIALS.parent)} ({path.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main(sys.argv[1:])
