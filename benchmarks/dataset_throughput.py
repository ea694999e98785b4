"""Throughput of ``captum-gim attribute-dataset`` on the CPU: prompts/s and tokens/s
with 1 and 2 processes (``torchrun --nproc_per_node 2``) and by token budget.

Every configuration is one run of the command line in a fresh output directory.
Throughput counts the attribution loop only (from each process's ``rank-*.json``:
rows and tokens over the slowest process's seconds); the wall time adds starting
Python, loading the model and, for two processes, torchrun.

Usage::

    python benchmarks/dataset_throughput.py            # writes benchmarks/RESULTS.md
    python benchmarks/dataset_throughput.py --quick    # a smoke run (tests use it)
    python benchmarks/dataset_throughput.py --shared   # say that the CPU was shared
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "dataset-throughput-cpu"
BUDGETS = (16, 256, 4096)  # 16 tokens: one prompt per batch
PROCESSES = (1, 2)


def write_rows(path: Path, n: int) -> int:
    """``n`` held-out prompts of the bundled task with their answers; returns the tokens."""
    from captum_gim.models import load_model, make_examples

    _, tokenizer = load_model()
    examples = make_examples(n, seed=1_000_000)
    with path.open("w", encoding="utf-8") as file:
        for i, example in enumerate(examples):
            file.write(json.dumps({"id": i, "prompt": example.prompt, "target": example.answer}))
            file.write("\n")
    return sum(len(tokenizer(e.prompt).input_ids) for e in examples)


def save_wider_model(folder: Path, quick: bool) -> Path:
    """A random Llama of 4 layers x 256 wide with the bundled model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from captum_gim.models import model_path

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=229,
        hidden_size=64 if quick else 256,
        intermediate_size=128 if quick else 688,
        num_hidden_layers=2 if quick else 4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_path() / name, folder / name)
    return folder


def run(model: Path, data: Path, out: Path, processes: int, budget: int) -> dict[str, float]:
    """One run of the command; its throughput and wall time."""
    command = [sys.executable]
    if processes > 1:
        command += ["-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc_per_node", str(processes)]
    command += ["-m", "captum_gim", *run_args(model, data, out, budget)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]
    seconds = max(r["seconds"] for r in ranks)
    rows, tokens = sum(r["rows"] for r in ranks), sum(r["tokens"] for r in ranks)
    errors = sum(r["errors"] for r in ranks)
    if errors:
        raise RuntimeError(f"{errors} rows failed in {out}")
    return {"prompts_per_s": rows / seconds, "tokens_per_s": tokens / seconds, "wall": wall}


def run_args(model: Path, data: Path, out: Path, budget: int) -> list[str]:
    """The arguments of attribute-dataset after ``-m captum_gim``."""
    return [
        "attribute-dataset",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-tokens-per-batch",
        str(budget),
        "--no-progress",
    ]


def measure(n: int, quick: bool) -> tuple[list[dict[str, object]], int]:
    """Every model x processes x budget; rows of the table and the prompt tokens."""
    from captum_gim.models import model_path

    table = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        data = work / "rows.jsonl"
        tokens = write_rows(data, n)
        models = {
            "bundled (2 x 64)": model_path(),
            f"random Llama ({'2 x 64' if quick else '4 x 256'})": save_wider_model(
                work / "wider", quick
            ),
        }
        budgets = BUDGETS[::2] if quick else BUDGETS
        for name, path in models.items():
            for processes in PROCESSES:
                for budget in budgets:
                    out = work / f"out-{len(table)}"
                    figures = run(path, data, out, processes, budget)
                    table.append(
                        {"model": name, "processes": processes, "budget": budget, **figures}
                    )
                    print(_line(table[-1]), flush=True)
    return table, tokens


def _line(row: dict[str, object]) -> str:
    return (
        f"| {row['model']} | {row['processes']} | {row['budget']} | "
        f"{row['prompts_per_s']:.1f} | {row['tokens_per_s']:.0f} | {row['wall']:.1f} |"
    )


def markdown(
    table: list[dict[str, object]], n: int, tokens: int, shared: bool, load: str = ""
) -> str:
    """The section of RESULTS.md."""
    heading = "## Dataset throughput on the CPU (`captum-gim attribute-dataset`)"
    if shared:
        heading += ": CPU shared with other jobs during the run"
    lines = [
        heading,
        "",
        "Written by `benchmarks/dataset_throughput.py`; regenerate with (from the repository "
        "root):",
        "",
        "    python benchmarks/dataset_throughput.py",
        "",
        f"Machine: {results.machine_description(shared=shared)}; one torch thread per process.",
        "",
        f"{n} held-out prompts of the bundled task ({tokens} prompt tokens, "
        f"{tokens / n:.1f} per prompt), each with its one-token answer as target, GIM's "
        "default settings, Parquet output in chunks of 256 rows. Throughput counts the "
        "attribution loop (rows and prompt + target tokens over the slowest process's "
        "time); wall time adds starting Python, loading the model and torchrun. A budget "
        "of 16 tokens puts one prompt in each batch.",
        "",
        "| Model | Processes | Token budget | Prompts/s | Tokens/s | Wall (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(_line(row) for row in table),
        "",
        "The GPU row is added by the GPU benchmark issue when a GPU is lent.",
    ]
    if shared:
        lines += [
            "",
            f"The machine has {os.cpu_count()} cores and other jobs ran during the "
            f"measurement{load}, so two processes compete with them for the cores: the figures "
            "are lower bounds, and the 1 vs 2 process ratio understates what two free cores "
            "give.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400, help="prompts (default: 400)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rows, two budgets")
    parser.add_argument("--shared", action="store_true", help="say the CPU was shared")
    parser.add_argument("--out", type=Path, help="results file (default: RESULTS.md)")
    args = parser.parse_args(argv)
    if args.quick and args.out is None:
        args.out = Path(tempfile.mkdtemp()) / "RESULTS.md"  # smoke runs never overwrite
    n = 24 if args.quick else args.rows
    before = os.getloadavg()[0]
    table, tokens = measure(n, args.quick)
    load = f" (load average {before:.1f} before, {os.getloadavg()[0]:.1f} after)"
    text = markdown(table, n, tokens, args.shared, load)
    print(text)
    out = args.out or RESULTS
    results.write_section(out, results.section(SECTION, text))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
