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


def test_quick_start_sentence_uses_words_the_bundled_model_knows() -> None:
    from captum_gim.models import load_model

    _, tokenizer = load_model()
    sentence = re.search(r'ids = tokenizer\("([^"]+)"', README).group(1)
    assert tokenizer.unk_token_id not in tokenizer(sentence).input_ids


def test_install_starts_from_git_clone_and_names_transformers_5() -> None:
    first_bash = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    assert first_bash.startswith("git clone ") and "&& cd " in first_bash
    assert "transformers>=5" in README
