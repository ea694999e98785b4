"""benchmarks/dataset_throughput.py on a few rows, so the script cannot rot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
throughput = pytest.importorskip("dataset_throughput")


@pytest.mark.slow
def test_one_run_and_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from captum_gim.models import model_path

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    data = tmp_path / "rows.jsonl"
    tokens = throughput.write_rows(data, 6)
    figures = throughput.run(model_path(), data, tmp_path / "out", 1, 256)
    assert figures["prompts_per_s"] > 0 and figures["tokens_per_s"] > figures["prompts_per_s"]
    row = {"model": "bundled", "processes": 1, "budget": 256, **figures}
    text = throughput.markdown([row], 6, tokens, shared=True, load=" (load 1.0)")
    assert "| bundled | 1 | 256 |" in text and "shared" in text and "(load 1.0)" in text
