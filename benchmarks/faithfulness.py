r"""
Faithfulness benchmark of GIM against Captum's attribution methods, and the
self-repair study on the bundled model.

Two settings, every method attributing to the input embeddings (the token
embeddings before any position embedding or normalization), one score per
token:

* ``bundled``: the bundled Llama-architecture model ``redundant_evidence_llama``
  (:mod:`captum_gim.models`), explaining the logit of the answer token at the
  last position on held-out prompts whose evidence tokens are known.
* ``minilm``: the pretrained sentence encoder all-MiniLM-L6-v2 (BERT
  architecture, mean pooling), explaining the cosine similarity between the
  embedding of a sentence and the fixed embedding of a query, on the
  sentence/query pairs of ``benchmarks/minilm_pairs.tsv``.

For every method the benchmark records comprehensiveness and sufficiency
(:mod:`captum_gim.metrics`, the GIM paper's protocol), precision at k against
the known evidence (bundled model only) and the wall time per example
relative to InputXGradient, all in one run with the methods interleaved
example by example. The self-repair study compares, on prompts with one, two
and three redundant evidence tokens, the effect of ablating each evidence
token alone with the plain gradient x input score and the GIM score.

The results replace the section between ``<!-- faithfulness:start -->`` and
``<!-- faithfulness:end -->`` of ``RESULTS.md`` in the output folder (other
sections are kept), next to the figures ``faithfulness_curves.png`` and
``self_repair.png``. A ``--fast`` smoke run writes to a new temporary folder
(or ``--out-dir``), never to the committed ``benchmarks/`` files.

Each job lives in its own module of ``benchmarks/faithfulness_study/``: the
explained scores and prompts (``tasks``), the method registry (``methods``), the
metric loops (``evaluation``), the self-repair study (``self_repair``), the
figures (``plots``) and the markdown (``report``); ``benchmarks/results.py``
writes the section, as for ``speed.py``.

Usage::

    python benchmarks/faithfulness.py            # full run, about 20 minutes
    python benchmarks/faithfulness.py --fast     # a few examples, seconds
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from faithfulness_study.evaluation import (
    check_deeplift,
    precision_at_k,
    run_benchmark,
    summarize,
)
from faithfulness_study.methods import FAST, RunSettings, build_methods
from faithfulness_study.plots import plot_curves, plot_self_repair
from faithfulness_study.report import (
    CURVES_PNG,
    END_MARKER,
    SELF_REPAIR_PNG,
    START_MARKER,
    BenchmarkReport,
    render_section,
)
from faithfulness_study.self_repair import (
    EVIDENCE_COUNTS,
    SELF_REPAIR_SCORES,
    self_repair_study,
    summarize_self_repair,
)
from faithfulness_study.tasks import BENCH_DIR, SEED, bundled_benchmark, minilm_benchmark
from results import write_section

__all__ = [
    "END_MARKER",
    "EVIDENCE_COUNTS",
    "SELF_REPAIR_SCORES",
    "START_MARKER",
    "RunSettings",
    "build_methods",
    "main",
    "precision_at_k",
    "write_section",
]


def parse_settings(argv: Sequence[str] | None) -> RunSettings:
    r"""Command-line arguments to run settings; ``--fast`` picks small defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few examples only")
    parser.add_argument(
        "--out-dir", type=Path, default=None,
        help="folder of RESULTS.md and the figures (default: benchmarks/, or a new "
        "temporary folder with --fast)",
    )  # fmt: skip
    for name in ("n_bundled", "n_minilm", "n_self_repair", "n_samples",
                 "gradshap_samples", "threads"):  # fmt: skip
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    parser.add_argument(
        "--no-warmup", dest="warmup", action="store_false", default=None,
        help="skip the untimed warm-up pass",
    )  # fmt: skip
    args = parser.parse_args(argv)
    values = dict(FAST) if args.fast else {}
    values.update({k: v for k, v in vars(args).items() if v is not None})
    values.pop("fast")
    if args.fast:  # a smoke run never overwrites the committed results
        out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="faithfulness-fast-"))
        if out_dir.resolve() == BENCH_DIR:
            parser.error("--fast must not write benchmarks/; pass another --out-dir.")
        values["out_dir"] = out_dir
    return RunSettings(**values)


def _quiet_captum_warnings() -> None:
    """Silence Captum's notices about gradient requirements and DeepLift hooks."""
    for message in ("Input Tensor", "Setting forward, backward hooks"):
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def main(argv: Sequence[str] | None = None) -> BenchmarkReport:
    r"""
    Runs both benchmarks and the self-repair study, writes the figures and the
    faithfulness section of ``RESULTS.md`` in ``--out-dir``.

    Args:
        argv (Sequence[str], optional): Command-line arguments; None reads
                    ``sys.argv``.

    Returns:
        BenchmarkReport: The tables, diagnostics and written files.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = parse_settings(argv)
    torch.set_num_threads(settings.threads)
    torch.manual_seed(SEED)
    _quiet_captum_warnings()
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"{time.perf_counter() - started:7.1f}s {message}", flush=True)

    methods = build_methods(settings)
    benchmarks = [
        bundled_benchmark(settings.n_bundled),
        minilm_benchmark(settings.n_minilm),
    ]
    results = [(bench, run_benchmark(bench, methods, log, settings.warmup)) for bench in benchmarks]
    deeplift = {bench.name: check_deeplift(bench) for bench in benchmarks}
    repair_records = self_repair_study(benchmarks[0].model, settings.n_self_repair, log)
    repair_rows = summarize_self_repair(repair_records)

    out_dir = settings.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = [out_dir / CURVES_PNG, out_dir / SELF_REPAIR_PNG]
    plot_curves(results, figures[0])
    plot_self_repair(repair_rows, figures[1])
    tables = [(bench, summarize(records)) for bench, records in results]
    section = render_section(
        settings,
        shlex.join(["python", "benchmarks/faithfulness.py", *argv]),
        (time.perf_counter() - started) / 60,
        tables,
        deeplift,
        repair_records,
        repair_rows,
    )
    results_path = out_dir / "RESULTS.md"
    write_section(results_path, section)
    log(f"wrote {results_path} and {', '.join(p.name for p in figures)}")
    return BenchmarkReport(
        {bench.name: rows for bench, rows in tables},
        repair_rows,
        deeplift,
        results_path,
        figures,
        section,
    )


if __name__ == "__main__":
    main()
