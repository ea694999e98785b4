r"""
The one writer of ``benchmarks/RESULTS.md``, shared by every benchmark script.

Each script owns one section of the file, between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->``; writing a section replaces that section only (or
appends it) and keeps the rest of the file as it was.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

RESULTS_FILE = Path(__file__).resolve().with_name("RESULTS.md")
_MARKER = re.compile(r"<!-- (?P<name>[\w-]+):start -->")


def markers(name: str) -> tuple[str, str]:
    r"""
    Args:
        name (str): The section's name, e.g. ``"faithfulness"`` or ``"speed-cpu"``.

    Returns:
        *tuple[str, str]*: the start and end markers of the section.
    """
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def section(name: str, body: str) -> str:
    r"""
    Args:
        name (str): The section's name.
        body (str): The markdown of the section.

    Returns:
        *str*: ``body`` between the section's markers, ending with a newline.
    """
    start, end = markers(name)
    return f"{start}\n{body.strip(chr(10))}\n{end}\n"


def write_section(path: Path, section: str) -> None:
    r"""
    Replaces the section of ``path`` that has the markers of ``section``, or
    appends it; the rest of the file is kept. Creates the file if needed.

    Args:
        path (Path): The ``RESULTS.md`` file.
        section (str): The new section, markers included (see :func:`section`).
    """
    found = _MARKER.match(section)
    if found is None:
        raise ValueError("section must start with a <!-- NAME:start --> marker.")
    start, end = markers(found["name"])
    if not path.is_file():
        path.write_text("# Benchmarks\n\n" + section, encoding="utf-8")
        return
    text = path.read_text(encoding="utf-8")
    first, last = text.find(start), text.find(end)
    if first == -1 or last < first:
        separator = "" if text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
        path.write_text(text + separator + section, encoding="utf-8")
        return
    after = text[last + len(end) :].removeprefix("\n")
    path.write_text(text[:first] + section + after, encoding="utf-8")


def machine_description(shared: bool = False) -> str:
    r"""
    Args:
        shared (bool, optional): Say that other jobs shared the CPU during the run.
                    Default: False

    Returns:
        *str*: the CPU model, core count and library versions of this machine.
    """
    import captum
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return (
        f"{cpu}, {os.cpu_count()} cores (CPU only{', shared' if shared else ''}), "
        f"{torch.get_num_threads()} torch thread(s); Python {platform.python_version()}, "
        f"torch {torch.__version__}, captum {captum.__version__}, "
        f"transformers {transformers.__version__}"
    )
