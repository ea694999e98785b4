"""The README's Python examples run as written, and CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_python_examples_run(capsys) -> None:
    namespace: dict = {}
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "great" in printed


def test_ci_runs_the_readme_test_command() -> None:
    command = re.search(r"```bash\n(pip install torch.*pytest.*)\n```", README).group(1)
    assert command in (ROOT / ".ci" / "run").read_text()
