"""GIM against InputXGradient on long prompts on the CPU: time and peak memory.

Model: Llama architecture, 2 layers, hidden 256 (4 heads x 64, MLP 688),
vocabulary 32000, random weights, loaded with sdpa; batch 1, target: one logit
at the last position. Attention dominates at these lengths, so this is the
hardest case for GIM's blockwise tempered attention backward.

Time: both methods in one process, interleaved inside every repeat (so a shared
CPU slows them alike); medians after a warm-up. Memory: every (method, length)
runs once in a fresh subprocess that resets the kernel's peak resident set size
(``/proc/self/clear_refs``) after building the model and the input, and reports
the peak (``VmHWM``) minus the resident size before the call: what one call
needs beyond the model, counted by the kernel, whatever allocates it.

Usage::

    python benchmarks/long_prompts.py                 # writes benchmarks/RESULTS.md
    python benchmarks/long_prompts.py --quick         # smoke run, temporary file
    python benchmarks/long_prompts.py --profile 4096  # where the GIM backward's time goes
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import results
import torch

LENGTHS = (1024, 4096, 8192)
METHODS = ("InputXGradient", "GIM")


def build_model(quick: bool = False):
    """The Llama model of the module docstring (smaller with ``quick``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000 if quick else 32000,
        hidden_size=64 if quick else 256,
        intermediate_size=172 if quick else 688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=8192,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def runner(method: str, model):
    from captum.attr import InputXGradient

    from captum_gim import GIMAttribution

    def forward(embeds: torch.Tensor) -> torch.Tensor:
        return model(inputs_embeds=embeds, logits_to_keep=1).logits[:, -1]

    if method == "GIM":
        return lambda e: GIMAttribution(forward, model).attribute(e, target=7)
    return lambda e: InputXGradient(forward).attribute(e, target=7)


def embeddings(model, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator)
    return model.get_input_embeddings()(ids).detach()


def timings(lengths: list[int], repeats: int, quick: bool) -> dict[tuple[str, int], list[float]]:
    model = build_model(quick)
    runs = {m: runner(m, model) for m in METHODS}
    times: dict[tuple[str, int], list[float]] = {}
    for length in lengths:
        embeds = embeddings(model, length)
        for repeat in range(repeats + 1):  # the first round is a warm-up
            for method, run in runs.items():
                start = time.perf_counter()
                run(embeds)
                if repeat:
                    times.setdefault((method, length), []).append(time.perf_counter() - start)
    return times


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_worker(method: str, length: int, quick: bool) -> float:
    """MB one call needs beyond the model and its input, in this process."""
    model = build_model(quick)
    run = runner(method, model)
    run(embeddings(model, 16))  # imports and one-time set-up are not the call's memory
    embeds = embeddings(model, length)
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    run(embeds)
    return (_status_kb("VmHWM") - before) / 1024


def peaks(lengths: list[int], quick: bool, threads: int) -> dict[tuple[str, int], float]:
    found = {}
    for length in lengths:
        for method in METHODS:
            command = [sys.executable, __file__, "--peak-worker", method, "--threads", str(threads)]
            command += ["--lengths", str(length)] + (["--quick"] if quick else [])
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            found[(method, length)] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def table(times: dict, memory: dict, lengths: list[int]) -> str:
    lines = [
        "| tokens | InputXGradient s | GIM s | time GIM / IxG | IxG peak MB | GIM peak MB "
        "| memory GIM / IxG |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in lengths:
        ixg, gim = (statistics.median(times[(m, n)]) for m in METHODS)
        ixg_mb, gim_mb = memory[("InputXGradient", n)], memory[("GIM", n)]
        lines.append(
            f"| {n} | {ixg:.3f} | {gim:.3f} | {gim / ixg:.2f}x | {ixg_mb:.0f} | {gim_mb:.0f} "
            f"| {gim_mb / ixg_mb:.2f}x |"
        )
    return "\n".join(lines)


def profile(length: int, quick: bool) -> None:
    """Prints the operators of one GIM call at ``length`` tokens by self CPU time."""
    from torch.profiler import profile as torch_profile

    model = build_model(quick)
    run = runner("GIM", model)
    embeds = embeddings(model, length)
    run(embeds)
    with torch_profile() as prof:
        run(embeds)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="tiny model and lengths")
    parser.add_argument("--out", type=Path, help="results file (default: RESULTS.md)")
    parser.add_argument("--profile", type=int, metavar="TOKENS", help="profile one GIM call")
    parser.add_argument("--peak-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.peak_worker:
        print(json.dumps(peak_worker(args.peak_worker, lengths[0], args.quick)))
        return 0
    if args.profile:
        profile(args.profile, args.quick)
        return 0
    if args.quick:
        lengths, args.repeats = [64, 128], 1
        if args.out is None:
            args.out = Path(tempfile.mkdtemp(prefix="captum_gim_long_")) / "RESULTS.md"
    elif args.out is None:
        args.out = results.RESULTS_FILE
    if args.quick and args.out.resolve() == results.RESULTS_FILE.resolve():
        parser.error("--quick is a smoke run and never writes benchmarks/RESULTS.md")
    times = timings(lengths, args.repeats, args.quick)
    memory = peaks(lengths, args.quick, args.threads)
    markdown = (
        "## Long prompts (CPU)\n\n"
        f"{results.machine_description()}. Regenerate with `python benchmarks/long_prompts.py`. "
        "Llama 2 layers x 256 wide (4 heads x 64), random weights, sdpa, batch 1, one logit "
        f"at the last position. Time: median of {args.repeats} runs, the two methods "
        "interleaved in one process after a warm-up; ratios are noisy on a shared CPU. "
        "Peak memory: kernel peak RSS of one call beyond the model, a fresh process per "
        "cell (see the script's docstring).\n\n" + table(times, memory, lengths)
    )
    print(markdown)
    results.write_section(args.out, results.section("long-prompts", markdown))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
