"""The README's Python examples run as written, and CI runs the README's test command."""

from __future__ import annotations

import importlib.util
import linecache
import re
import warnings
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def missing_requirement(block: str) -> str | None:
    r"""Why a block that starts with ``# needs: pkg, pkg<N`` cannot run here, or None."""
    needs = re.match(r"# needs: (.+)\n", block)
    for requirement in needs.group(1).split(",") if needs else ():
        name, _, below = requirement.strip().partition("<")
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed"
        if below and int(version(name.replace("_", "-")).split(".")[0]) >= int(below):
            return f"{name} is not below version {below}"
    return None


def compile_block(block: str, number: int):
    """The block's code, its source readable by tools that parse their caller's
    source (nnsight's traces) under the name ``README.md[number]``."""
    name = f"README.md[{number}]"
    linecache.cache[name] = (len(block), None, block.splitlines(keepends=True), name)
    return compile(block, name, "exec")


def test_readme_python_examples_run(capsys) -> None:
    namespace: dict = {}
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    for number, block in enumerate(blocks):
        missing = missing_requirement(block)
        if missing is not None:
            warnings.warn(
                f"README example skipped: {missing}: {block.splitlines()[1]}", stacklevel=1
            )
            continue
        exec(compile_block(block, number), namespace)
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


def test_readme_names_what_ci_installs_and_exports() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    line = re.search(r"```bash\n(apt-get install -y [^\n]*)\n```", README).group(1)
    assert line in ci  # the same packages, in the same command
    for variable in ("HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "MPLBACKEND=Agg"):
        assert variable in ci and variable in README
