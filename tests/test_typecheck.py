"""The package type-checks: mypy, with the ``[mypy]`` settings in setup.cfg, reports no error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_package_is_clean_under_mypy():
    # A child process: mypy's in-memory state of torch and transformers is large,
    # and freeing it at the end of the test run would take longer than checking.
    command = [sys.executable, "-m", "mypy", "--config-file", "setup.cfg", "captum_gim"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"mypy found type errors:\n{done.stdout}{done.stderr}"
    assert "Success: no issues found" in done.stdout
