"""Fast mode of benchmarks/baselines.py: it writes its section, one row per baseline, and
never the committed benchmarks/ files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "baselines.py"
sys.path.insert(0, str(SCRIPT.parent))  # its modules, as when run as a script
KEPT = "<!-- speed:start -->\n## Speed\n\nkept as is\n<!-- speed:end -->\n"


@pytest.mark.slow
def test_fast_run_writes_one_row_per_baseline_and_keeps_other_sections(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("baselines_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    (tmp_path / "RESULTS.md").write_text("# Benchmarks\n\n" + KEPT)
    threads = torch.get_num_threads()
    try:
        written = module.main(["--fast", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    text = written.read_text()
    assert KEPT in text and "<!-- baselines:start -->" in text
    for row in ("GIM, zero baseline", "GIM, mask baseline ('[MASK]')", "GIM, pad baseline"):
        assert f"| {row}" in text
    assert text.count("standard error") >= 2  # one finding per setting
    with pytest.raises(SystemExit):
        module.main(["--fast", "--out-dir", str(SCRIPT.parent)])
