"""The metric loops: every method on every prompt, timed, and the summaries."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from captum.attr import (
    DeepLift,
    Saliency,
)
from torch import Tensor

from captum_gim.metrics import comprehensiveness, sufficiency
from faithfulness_study.methods import REFERENCE_METHOD, Method, _summed
from faithfulness_study.tasks import Benchmark, Prompt

# --------------------------------------------------------------------- evaluation


@dataclass
class MethodRecord:
    r"""
    Per-example results of one method on one benchmark.

    Args:
        name (str): The method.
        comprehensiveness (list[float]): AOPC of each example.
        sufficiency (list[float]): AOPC of each example.
        precision (list[float]): Precision at k of each example with evidence.
        curves (list[np.ndarray]): Comprehensiveness curve of each example.
        seconds (list[float]): Attribution wall time of each example.
    """

    name: str
    comprehensiveness: list[float] = field(default_factory=list)
    sufficiency: list[float] = field(default_factory=list)
    precision: list[float] = field(default_factory=list)
    curves: list[np.ndarray] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Summary:
    r"""
    One row of a results table: means and standard errors over examples.

    Args:
        method (str): The method.
        comprehensiveness (tuple[float, float]): Mean and standard error.
        sufficiency (tuple[float, float]): Mean and standard error.
        precision (tuple[float, float] or None): Mean and standard error of
                    precision at k; None without known evidence.
        ms_per_example (float): Mean attribution wall time, milliseconds.
        time_ratio (float): ``ms_per_example`` over InputXGradient's.
    """

    method: str
    comprehensiveness: tuple[float, float]
    sufficiency: tuple[float, float]
    precision: tuple[float, float] | None
    ms_per_example: float
    time_ratio: float


def replaceable_positions(seq: int) -> Tensor:
    r"""Positions the metrics may replace: all but the first and the last."""
    return torch.arange(1, seq - 1)


def precision_at_k(scores: Tensor, evidence: Sequence[int]) -> float:
    r"""
    Fraction of the evidence among the ``k = len(evidence)`` top-ranked
    replaceable tokens (ties broken by position, as in the metrics).

    Args:
        scores (Tensor): Token scores, ``(seq,)``.
        evidence (Sequence[int]): Evidence positions, at least one.

    Returns:
        float: Precision at k.
    """
    positions = replaceable_positions(scores.numel())
    order = torch.sort(scores[positions], descending=True, stable=True)[1]
    top = set(positions[order[: len(evidence)]].tolist())
    return len(top & set(evidence)) / len(evidence)


def ids_forward(bench: Benchmark, prompt: Prompt) -> Callable[[Tensor], Tensor]:
    r"""The explained score as a function of token ids, for the metrics."""

    def forward(input_ids: Tensor) -> Tensor:
        return prompt.scorer(bench.embedding(input_ids))

    return forward


def embeddings_of(bench: Benchmark, prompt: Prompt) -> tuple[Tensor, Tensor]:
    r"""Input embeddings of a prompt and of its all-baseline-token version."""
    with torch.no_grad():
        x = bench.embedding(prompt.input_ids)
        xb = bench.embedding(torch.full_like(prompt.input_ids, bench.baseline_id))
    return x, xb


def timed_scores(bench: Benchmark, prompt: Prompt, method: Method) -> tuple[Tensor, float]:
    r"""Token scores of one method on one prompt, and the seconds it took."""
    x, xb = embeddings_of(bench, prompt)
    start = time.perf_counter()
    scores = method.attribute(prompt.scorer, bench.model, x, xb)
    return scores, time.perf_counter() - start


def score_prompt(bench: Benchmark, prompt: Prompt, method: Method, record: MethodRecord) -> None:
    r"""Attributes one prompt with one method and appends its metrics to ``record``."""
    scores, seconds = timed_scores(bench, prompt, method)
    forward = ids_forward(bench, prompt)
    comp = comprehensiveness(forward, prompt.input_ids, scores[None], bench.baseline_id)
    suff = sufficiency(forward, prompt.input_ids, scores[None], bench.baseline_id)
    record.comprehensiveness.append(float(comp.aopc[0]))
    record.sufficiency.append(float(suff.aopc[0]))
    record.curves.append(comp.curve[0].numpy())
    record.seconds.append(seconds)
    if prompt.evidence:
        record.precision.append(precision_at_k(scores, prompt.evidence))


def run_benchmark(
    bench: Benchmark,
    methods: Sequence[Method],
    log: Callable[[str], None],
    warmup: bool = True,
) -> dict[str, MethodRecord]:
    r"""
    Runs every method on every prompt, interleaved prompt by prompt so that
    the load of the machine affects all methods alike.

    Args:
        bench (Benchmark): The setting.
        methods (Sequence[Method]): The methods.
        log (Callable[[str], None]): Progress messages.
        warmup (bool, optional): Run every method once on the first prompt
                    before timing starts.
                    Default: True

    Returns:
        dict[str, MethodRecord]: Per-example results by method name.
    """
    for method in methods if warmup else ():
        timed_scores(bench, bench.prompts[0], method)
    records = {m.name: MethodRecord(m.name) for m in methods}
    for index, prompt in enumerate(bench.prompts):
        for method in methods:
            score_prompt(bench, prompt, method, records[method.name])
        if (index + 1) % 10 == 0 or index + 1 == len(bench.prompts):
            log(f"[{bench.name}] {index + 1}/{len(bench.prompts)} examples")
    return records


def mean_and_error(values: Sequence[float]) -> tuple[float, float]:
    r"""Mean and standard error of the mean (0 for a single value)."""
    array = np.asarray(values, dtype=float)
    error = array.std(ddof=1) / math.sqrt(array.size) if array.size > 1 else 0.0
    return float(array.mean()), float(error)


def summarize(records: dict[str, MethodRecord]) -> list[Summary]:
    r"""One table row per method, with wall times relative to InputXGradient."""
    reference = float(np.mean(records[REFERENCE_METHOD].seconds))
    rows = []
    for record in records.values():
        seconds = float(np.mean(record.seconds))
        rows.append(
            Summary(
                method=record.name,
                comprehensiveness=mean_and_error(record.comprehensiveness),
                sufficiency=mean_and_error(record.sufficiency),
                precision=mean_and_error(record.precision) if record.precision else None,
                ms_per_example=1000.0 * seconds,
                time_ratio=seconds / reference,
            )
        )
    return rows


@dataclass(frozen=True)
class DeepLiftCheck:
    r"""
    Why DeepLift behaves as it does on a benchmark's model.

    Args:
        max_gap_to_gradient (float): Largest ``|DeepLift - gradient x (input -
                    baseline)|`` over the checked token scores.
        completeness_error (float): Median of ``|sum of attributions - (f(x) -
                    f(x'))| / |f(x) - f(x')|``; 0 for an exact DeepLift.
        n_prompts (int): Prompts checked.
    """

    max_gap_to_gradient: float
    completeness_error: float
    n_prompts: int


def check_deeplift(bench: Benchmark, n_prompts: int = 10) -> DeepLiftCheck:
    r"""
    Compares DeepLift with gradient x (input - baseline) and checks its
    summation-to-delta property on the first prompts.

    Args:
        bench (Benchmark): The setting.
        n_prompts (int): Prompts checked.

    Returns:
        DeepLiftCheck: The two diagnostics.
    """
    gaps, errors = [], []
    prompts = bench.prompts[:n_prompts]
    for prompt in prompts:
        x, xb = embeddings_of(bench, prompt)
        lift = _summed(DeepLift(prompt.scorer).attribute(x, xb))
        gradient = Saliency(prompt.scorer).attribute(x, abs=False)
        gaps.append(float((lift - _summed(gradient * (x - xb))).abs().max()))
        with torch.no_grad():
            delta = float(prompt.scorer(x) - prompt.scorer(xb))
        errors.append(abs(float(lift.sum()) - delta) / max(abs(delta), 1e-12))
    return DeepLiftCheck(max(gaps), float(np.median(errors)), len(prompts))
