"""Fast mode of benchmarks/faithfulness.py, so that the benchmark script cannot rot."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "faithfulness.py"
sys.path.insert(0, str(SCRIPT.parent))  # its modules, as when run as a script
SPEED_SECTION = "<!-- speed:start -->\n## Speed\n\nkept as is\n<!-- speed:end -->\n"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("faithfulness_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load_script()


@pytest.fixture(scope="module")
def fast_run(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory):
    out_dir = tmp_path_factory.mktemp("faithfulness")
    (out_dir / "RESULTS.md").write_text("# Benchmarks\n\n" + SPEED_SECTION)
    threads = torch.get_num_threads()
    try:
        report = bench.main(["--fast", "--out-dir", str(out_dir)])
    finally:
        torch.set_num_threads(threads)
    return report


def _method_names(bench: ModuleType) -> list[str]:
    return [m.name for m in bench.build_methods(bench.RunSettings())]


def _table_rows(markdown: str, heading_start: str) -> dict[str, list[str]]:
    """Cells of the table under the first heading that starts with heading_start."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading_start))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("| ") and not line.startswith(("| Method", "| ---")):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def _number(cell: str) -> float:
    """The leading number of a cell such as '1.23 ± 0.04'."""
    return float(cell.split(" ± ")[0])


@pytest.mark.slow
def test_fast_run_has_every_method_with_finite_numbers(fast_run, bench) -> None:
    names = _method_names(bench)
    assert set(fast_run.tables) == {"bundled", "minilm"}
    for name, rows in fast_run.tables.items():
        assert [row.method for row in rows] == names
        for row in rows:
            values = [*row.comprehensiveness, *row.sufficiency, row.ms_per_example]
            values.append(row.time_ratio)
            if name == "bundled":
                assert row.precision is not None
                values += list(row.precision)
            else:
                assert row.precision is None  # no known evidence for MiniLM
            assert all(math.isfinite(v) for v in values), row


@pytest.mark.slow
def test_results_markdown_has_every_method_row_with_finite_numbers(fast_run, bench) -> None:
    markdown = fast_run.results_path.read_text()
    for heading in ("### (a) Bundled model", "### (b) all-MiniLM-L6-v2"):
        rows = _table_rows(markdown, heading)
        assert list(rows) == _method_names(bench)
        for method, cells in rows.items():
            numbers = [_number(c) for c in cells if c != "n/a"]
            assert len(numbers) == (5 if heading.startswith("### (a)") else 4), method
            assert all(math.isfinite(n) for n in numbers), method


@pytest.mark.slow
def test_results_markdown_records_command_and_machine(fast_run) -> None:
    markdown = fast_run.results_path.read_text()
    assert "    python benchmarks/faithfulness.py --fast --out-dir " in markdown
    assert "cores (CPU only)" in markdown


@pytest.mark.slow
def test_only_the_faithfulness_section_is_replaced(fast_run, bench) -> None:
    text = fast_run.results_path.read_text()
    assert SPEED_SECTION in text
    assert text.count(bench.START_MARKER) == text.count(bench.END_MARKER) == 1
    bench.write_section(fast_run.results_path, fast_run.section)
    assert fast_run.results_path.read_text() == text


@pytest.mark.slow
def test_figures_are_png_files(fast_run) -> None:
    for path in fast_run.figures:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_self_repair_covers_every_evidence_count_and_score(fast_run, bench) -> None:
    keys = {(row.count, row.score) for row in fast_run.self_repair}
    assert keys == {
        (count, score) for count in bench.EVIDENCE_COUNTS for score in bench.SELF_REPAIR_SCORES
    }
    for row in fast_run.self_repair:
        assert all(math.isfinite(v) for v in (*row.precision, *row.share, *row.concentration))


def test_precision_at_k_ignores_the_protected_ends(bench) -> None:
    scores = torch.tensor([9.0, 1.0, 5.0, 3.0, 9.0])
    assert bench.precision_at_k(scores, [2]) == 1.0
    assert bench.precision_at_k(scores, [1, 3]) == 0.5


def test_fast_run_never_writes_into_benchmarks_by_default(bench: ModuleType) -> None:
    settings = bench.parse_settings(["--fast"])
    assert settings.out_dir.resolve() != SCRIPT.parent.resolve()
    assert SCRIPT.parent.resolve() not in settings.out_dir.resolve().parents
    assert bench.parse_settings([]).out_dir == SCRIPT.parent
