"""benchmarks/speed.py in quick mode, in process, so the script cannot rot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
speed = pytest.importorskip("speed")


def test_quick_measurements_and_table(tmp_path) -> None:
    rows = []
    for method in ("InputXGradient", "GIM", "gim-explain"):
        rows += speed.measure(method, "cpu", [16, 32], repeats=1, quick=True)
    gim = [row for row in rows if row["method"] == "GIM"]
    assert [row["length"] for row in gim] == [16, 32]
    assert all(row["seconds"] > 0 for row in gim)
    markdown = speed.table(rows, [16, 32])
    assert "| GIM | 32 |" in markdown and "x |" in markdown
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    speed.write_section("first", "cpu", results)
    speed.write_section("second", "cpu", results)
    text = results.read_text()
    assert "kept" in text and "second" in text and "first" not in text


@pytest.mark.slow
def test_quick_multi_token_table_writes_only_the_given_path(tmp_path) -> None:
    out = tmp_path / "RESULTS.md"
    assert speed.main(["--multi-token", "--quick", "--threads", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| bundled | LLMGIMAttribution | " in text and "x) |" in text


def test_quick_run_refuses_to_write_the_committed_results() -> None:
    with pytest.raises(SystemExit):
        speed.main(["--multi-token", "--quick", "--out", str(speed.RESULTS)])


def test_quick_run_defaults_to_a_temporary_results_file() -> None:
    path = speed.smoke_path()
    assert path.resolve() != speed.RESULTS.resolve() and not path.exists()


@pytest.mark.slow
def test_quick_fixed_cost_table_writes_only_the_given_path(tmp_path) -> None:
    out = tmp_path / "RESULTS.md"
    assert speed.main(["--fixed-cost", "--quick", "--threads", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| bundled | GIM | " in text and "| all-MiniLM-L6-v2 | InputXGradient | " in text
