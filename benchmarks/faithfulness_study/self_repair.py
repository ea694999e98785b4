"""The self-repair study: ablation and attribution of redundant evidence tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from captum_gim import GIMConfig
from captum_gim.models import load_task, make_examples
from faithfulness_study.evaluation import mean_and_error, precision_at_k, replaceable_positions
from faithfulness_study.methods import RULES_ALONE, gim_method, input_x_gradient
from faithfulness_study.tasks import AnswerLogit, Prompt

SELF_REPAIR_SEED = 2_000_000
EVIDENCE_COUNTS = (1, 2, 3)


# -------------------------------------------------------------------- self-repair


def evidence_concentration(scores: Tensor, evidence: Sequence[int]) -> float:
    r"""
    Share of the evidence in the attribution mass of the replaceable tokens:
    ``sum(scores[evidence]) / sum(|scores[inner tokens]|)``, between -1 and 1,
    independent of the scale of the scores.

    Args:
        scores (Tensor): Token scores, ``(seq,)``.
        evidence (Sequence[int]): Evidence positions.

    Returns:
        float: The share; 0 when every inner score is 0.
    """
    mass = float(scores[replaceable_positions(scores.numel())].abs().sum())
    return float(scores[list(evidence)].sum()) / mass if mass > 0 else 0.0


@dataclass
class SelfRepairRecord:
    r"""
    Per-prompt results of the self-repair study for one evidence count.

    Args:
        count (int): Evidence tokens per prompt.
        joint_drop (list[float]): Drop of the answer logit when all evidence
                    tokens are replaced at once.
        precision (dict[str, list[float]]): Precision at k per score type.
        evidence_sum (dict[str, list[float]]): Sum of the evidence tokens'
                    scores per score type.
        concentration (dict[str, list[float]]): :func:`evidence_concentration`
                    per score type.
    """

    count: int
    joint_drop: list[float] = field(default_factory=list)
    precision: dict[str, list[float]] = field(default_factory=dict)
    evidence_sum: dict[str, list[float]] = field(default_factory=dict)
    concentration: dict[str, list[float]] = field(default_factory=dict)

    def add(self, kind: str, scores: Tensor, evidence: Sequence[int]) -> None:
        r"""Records the three measures of one score type on one prompt."""
        self.precision.setdefault(kind, []).append(precision_at_k(scores, evidence))
        self.evidence_sum.setdefault(kind, []).append(float(scores[list(evidence)].sum()))
        self.concentration.setdefault(kind, []).append(evidence_concentration(scores, evidence))


ABLATION = "ablation, each token alone"
GRADIENT = "gradient x input"
SELF_REPAIR_GIM: dict[str, GIMConfig] = {"GIM": GIMConfig(), **RULES_ALONE}
SELF_REPAIR_SCORES = (ABLATION, GRADIENT, *SELF_REPAIR_GIM)


def ablation_drops(scorer: nn.Module, x: Tensor, xb: Tensor, replaced: Tensor) -> Tensor:
    r"""
    Drop of the score when the tokens marked in each row of ``replaced`` are
    replaced by the baseline token.

    Args:
        scorer (nn.Module): Embeddings to score.
        x (Tensor): Embeddings, ``(1, seq, dim)``.
        xb (Tensor): Baseline-token embeddings, ``(1, seq, dim)``.
        replaced (Tensor): Boolean ``(rows, seq)``.

    Returns:
        Tensor: ``score(x) - score(row)`` for each row, ``(rows,)``.
    """
    rows = torch.where(replaced.unsqueeze(-1), xb, x)
    with torch.no_grad():
        return scorer(x) - scorer(rows)


def add_self_repair_prompt(
    lm: nn.Module, prompt: Prompt, baseline_id: int, record: SelfRepairRecord
) -> None:
    r"""Scores one prompt with every score type of the study into ``record``."""
    embedding = lm.get_input_embeddings()
    with torch.no_grad():
        x = embedding(prompt.input_ids)
        xb = embedding(torch.full_like(prompt.input_ids, baseline_id))
    seq = x.shape[1]
    evidence = list(prompt.evidence or ())
    alone = ablation_drops(prompt.scorer, x, xb, torch.eye(seq, dtype=torch.bool))
    together = torch.zeros(1, seq, dtype=torch.bool)
    together[0, evidence] = True
    record.joint_drop.append(float(ablation_drops(prompt.scorer, x, xb, together)[0]))
    record.add(ABLATION, alone, evidence)
    record.add(GRADIENT, input_x_gradient(prompt.scorer, lm, x, xb), evidence)
    for kind, config in SELF_REPAIR_GIM.items():
        record.add(kind, gim_method(config)(prompt.scorer, lm, x, xb), evidence)


def self_repair_study(
    lm: nn.Module, n_per_count: int, log: Callable[[str], None]
) -> list[SelfRepairRecord]:
    r"""
    On held-out prompts with exactly 1, 2 and 3 evidence tokens: the logit
    drop of ablating each token alone and all evidence at once, and the
    gradient x input and GIM token scores.

    Args:
        lm (nn.Module): The bundled model.
        n_per_count (int): Prompts per evidence count.
        log (Callable[[str], None]): Progress messages.

    Returns:
        list[SelfRepairRecord]: One record per evidence count.
    """
    baseline_id = load_task().blank_id
    records = []
    for count in EVIDENCE_COUNTS:
        record = SelfRepairRecord(count)
        examples = make_examples(n_per_count, seed=SELF_REPAIR_SEED + count, num_evidence=count)
        for ex in examples:
            prompt = Prompt(
                torch.tensor([ex.input_ids]),
                AnswerLogit(lm, ex.answer_id),
                ex.evidence_positions,
            )
            add_self_repair_prompt(lm, prompt, baseline_id, record)
        records.append(record)
        log(f"[self-repair] {count} evidence token(s): {len(examples)} prompts done")
    return records


@dataclass(frozen=True)
class SelfRepairRow:
    r"""
    One row of the self-repair table.

    Args:
        count (int): Evidence tokens per prompt.
        score (str): Score type.
        precision (tuple[float, float]): Precision at k, mean and standard error.
        share (tuple[float, float]): Sum of the evidence tokens' scores over the
                    joint ablation drop, mean and standard error over prompts.
        concentration (tuple[float, float]): :func:`evidence_concentration`,
                    mean and standard error over prompts.
    """

    count: int
    score: str
    precision: tuple[float, float]
    share: tuple[float, float]
    concentration: tuple[float, float]


def summarize_self_repair(records: Sequence[SelfRepairRecord]) -> list[SelfRepairRow]:
    r"""One row per evidence count and score type."""
    rows = []
    for record in records:
        joint = np.asarray(record.joint_drop)
        for score in SELF_REPAIR_SCORES:
            share = np.asarray(record.evidence_sum[score]) / joint
            rows.append(
                SelfRepairRow(
                    record.count,
                    score,
                    mean_and_error(record.precision[score]),
                    mean_and_error(share.tolist()),
                    mean_and_error(record.concentration[score]),
                )
            )
    return rows


@dataclass(frozen=True)
class PairedComparison:
    r"""
    GIM against gradient x input, prompt by prompt, on one measure.

    Args:
        difference (tuple[float, float]): Mean and standard error of the
                    per-prompt ``measure(GIM) - measure(gradient x input)``.
        better (int): Prompts where GIM's value is higher.
        worse (int): Prompts where it is lower.
        equal (int): Prompts where both are equal.
    """

    difference: tuple[float, float]
    better: int
    worse: int
    equal: int

    def verdict(self, words: tuple[str, str, str]) -> str:
        r"""
        Picks ``words[0]`` when GIM is higher by more than two standard errors,
        ``words[1]`` when it is lower by more than two, else ``words[2]``.
        """
        mean, error = self.difference
        if mean > 0 and mean > 2 * error:
            return words[0]
        if mean < 0 and -mean > 2 * error:
            return words[1]
        return words[2]


def compare_gim_to_gradient(gim: Sequence[float], gradient: Sequence[float]) -> PairedComparison:
    r"""
    Paired comparison of GIM and gradient x input over the same prompts.

    Args:
        gim (Sequence[float]): GIM's value on each prompt.
        gradient (Sequence[float]): Gradient x input's value on each prompt.

    Returns:
        PairedComparison: The comparison.
    """
    diff = np.asarray(gim) - np.asarray(gradient)
    return PairedComparison(
        mean_and_error(diff.tolist()),
        int((diff > 0).sum()),
        int((diff < 0).sum()),
        int((diff == 0).sum()),
    )
