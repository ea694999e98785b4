"""Tests of captum_gim.metrics: comprehensiveness and sufficiency."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from captum._utils.typing import TargetType
from torch import Tensor

from captum_gim.metrics import FaithfulnessResult, comprehensiveness, sufficiency

Metric = Callable[..., FaithfulnessResult]

BASELINE = 0
PAD = 7  # a pad token with a non-zero weight, so that padding leaks would show
VOCAB = 12
# score(ids) = sum of WEIGHTS[token] over the non-padding tokens; token 0 weighs 0.
WEIGHTS = torch.arange(VOCAB, dtype=torch.float32)


class LinearModel:
    """A fixed linear function of one-hot token ids that records its calls."""

    def __init__(self, weights: Tensor = WEIGHTS) -> None:
        self.weights = weights
        self.calls: list[Tensor] = []

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        self.calls.append(input_ids.clone())
        values = self.weights[input_ids]
        if attention_mask is not None:
            values = values * attention_mask
        return values.sum(dim=1)


def oracle(input_ids: Tensor) -> Tensor:
    """Perfect attributions for the linear model: the weight of each token."""
    return WEIGHTS[input_ids]


IDS = torch.tensor([[1, 9, 5, 2, 8, 3]])  # replaceable: 9, 5, 2, 8 (ends protected)
ORIGINAL = 28.0


def test_comprehensiveness_curve_matches_hand_computed_drops() -> None:
    result = comprehensiveness(LinearModel(), IDS, oracle(IDS), BASELINE)

    # ranking 9, 8, 5, 2: cumulative drops 9, 17, 22, 24
    expected = torch.tensor([[9.0, 17.0, 22.0, 24.0]])
    assert isinstance(result, FaithfulnessResult)
    torch.testing.assert_close(result.curve, expected)
    torch.testing.assert_close(result.aopc, torch.tensor([18.0]))
    torch.testing.assert_close(result.original_score, torch.tensor([ORIGINAL]))
    assert result.num_replaced.tolist() == [[1, 2, 3, 4]]


def test_sufficiency_curve_matches_hand_computed_drops() -> None:
    result = sufficiency(LinearModel(), IDS, oracle(IDS), BASELINE)

    # n = 4: floor(f * 4) = 2, 3, 3, 3, 3 lowest-ranked tokens replaced (2, 5, then 8)
    assert result.num_replaced.tolist() == [[2, 3, 3, 3, 3]]
    expected = torch.tensor([[7.0, 15.0, 15.0, 15.0, 15.0]])
    torch.testing.assert_close(result.curve, expected)
    torch.testing.assert_close(result.aopc, torch.tensor([13.4]))


def test_sufficiency_fraction_rounds_down_and_keeps_one_token() -> None:
    ids = torch.tensor([[1] + list(range(1, 11)) * 2 + [1]])  # 20 replaceable tokens
    result = sufficiency(LinearModel(), ids, oracle(ids), BASELINE, fractions=(0.29, 0.95, 0.999))
    assert result.num_replaced.tolist() == [[5, 19, 19]]


def test_normalized_values_divide_by_absolute_original_score() -> None:
    weights = -WEIGHTS  # negative original score
    result = comprehensiveness(LinearModel(weights), IDS, weights[IDS], BASELINE)

    torch.testing.assert_close(result.original_score, torch.tensor([-ORIGINAL]))
    torch.testing.assert_close(result.normalized_curve, result.curve / ORIGINAL)
    torch.testing.assert_close(result.normalized_aopc, result.aopc / ORIGINAL)


def test_max_steps_caps_curve_and_pads_shorter_examples_with_nan() -> None:
    ids = torch.tensor([[1, 9, 5, 2, 8, 3], [1, 4, 6, 3, PAD, PAD]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    result = comprehensiveness(
        LinearModel(), ids, oracle(ids), BASELINE, attention_mask=mask, max_steps=3
    )

    assert result.curve.shape == (2, 3)
    torch.testing.assert_close(result.curve[0], torch.tensor([9.0, 17.0, 22.0]))
    torch.testing.assert_close(result.curve[1, :2], torch.tensor([6.0, 10.0]))
    assert math.isnan(result.curve[1, 2].item())
    assert result.num_replaced.tolist() == [[1, 2, 3], [1, 2, -1]]
    torch.testing.assert_close(result.aopc, torch.tensor([16.0, 8.0]))


@pytest.mark.parametrize("metric", [comprehensiveness, sufficiency])
def test_ends_and_padding_are_never_replaced(metric: Metric) -> None:
    ids = torch.tensor([[PAD, PAD, 1, 9, 5, 2, 3], [1, 4, 6, 5, 3, PAD, PAD]])
    mask = (ids != PAD).long()
    model = LinearModel()
    metric(model, ids, torch.rand(ids.shape), BASELINE, attention_mask=mask)

    for example, rows in zip(ids, model.calls):
        present = example != PAD
        positions = present.nonzero().squeeze(1)
        protected = ~present
        protected[positions[0]] = protected[positions[-1]] = True
        assert (rows[:, protected] == example[protected]).all()
        assert (rows[1:, ~protected] == BASELINE).any()  # something was replaced


def test_replaceable_mask_protects_chosen_positions() -> None:
    model = LinearModel()
    keep = torch.tensor([[True, True, False, True, True, True]])
    result = comprehensiveness(model, IDS, oracle(IDS), BASELINE, replaceable_mask=keep)

    assert (model.calls[0][:, 2] == IDS[0, 2]).all()
    torch.testing.assert_close(result.curve, torch.tensor([[9.0, 17.0, 19.0]]))


def test_protect_ends_false_allows_replacing_first_and_last_tokens() -> None:
    result = comprehensiveness(
        LinearModel(), IDS, oracle(IDS), BASELINE, protect_ends=False, max_steps=100
    )
    assert result.curve.shape == (1, 6)
    assert result.curve[0, -1].item() == ORIGINAL  # everything replaced


@pytest.mark.parametrize("metric", [comprehensiveness, sufficiency])
def test_forward_called_once_per_example(metric: Metric) -> None:
    ids = torch.tensor([[1, 9, 5, 2, 8, 3], [2, 4, 6, 1, 3, 5], [3, 3, 3, 3, 3, 3]])
    model = LinearModel()
    metric(model, ids, torch.rand(ids.shape), BASELINE)
    assert len(model.calls) == 3


def test_max_batch_size_chunks_rows_without_changing_results() -> None:
    model = LinearModel()
    chunked = comprehensiveness(model, IDS, oracle(IDS), BASELINE, max_batch_size=2)
    whole = comprehensiveness(LinearModel(), IDS, oracle(IDS), BASELINE)

    assert [len(rows) for rows in model.calls] == [2, 2, 1]  # 1 original + 4 steps
    torch.testing.assert_close(chunked.curve, whole.curve)


@pytest.mark.parametrize("metric", [comprehensiveness, sufficiency])
def test_left_and_right_padding_match_unpadded_examples(metric: Metric) -> None:
    short = [1, 4, 9, 6, 3]
    long = [2, 9, 5, 2, 8, 3, 1, 6]
    attributions = {tuple(s): torch.rand(len(s)) for s in (short, long)}
    alone = [
        metric(LinearModel(), torch.tensor([s]), attributions[tuple(s)][None], BASELINE)
        for s in (short, long)
    ]
    pad = len(long) - len(short)
    for left in (True, False):
        padded = [PAD] * pad + short if left else short + [PAD] * pad
        ids = torch.tensor([padded, long])
        mask = (ids != PAD).long()
        short_attr = torch.full((len(long),), 100.0)  # padding ranks highest
        short_attr[mask[0].bool()] = attributions[tuple(short)]
        attr = torch.stack([short_attr, attributions[tuple(long)]])
        batched = metric(LinearModel(), ids, attr, BASELINE, attention_mask=mask)
        for i, single in enumerate(alone):
            steps = single.curve.shape[1]
            torch.testing.assert_close(batched.curve[i, :steps], single.curve[0])
            torch.testing.assert_close(batched.aopc[i], single.aopc[0])


def test_ties_are_broken_by_earlier_position_first() -> None:
    result = comprehensiveness(LinearModel(), IDS, torch.zeros(IDS.shape), BASELINE)
    # positional order 9, 5, 2, 8: drops 9, 14, 16, 24
    torch.testing.assert_close(result.curve, torch.tensor([[9.0, 14.0, 16.0, 24.0]]))


def test_embedding_level_attributions_are_summed_over_last_dim() -> None:
    per_dim = oracle(IDS)[..., None] * torch.tensor([0.25, 0.75])
    from_3d = comprehensiveness(LinearModel(), IDS, per_dim, BASELINE)
    from_2d = comprehensiveness(LinearModel(), IDS, oracle(IDS), BASELINE)
    torch.testing.assert_close(from_3d.curve, from_2d.curve)


def two_scores(input_ids: Tensor) -> Tensor:
    """Output (n, 2): the linear score and its negative."""
    score = WEIGHTS[input_ids].sum(1)
    return torch.stack([score, -score], dim=1)


@pytest.mark.parametrize(
    "target",
    [[0, 1], torch.tensor([0, 1]), [(0,), (1,)]],
    ids=["list", "tensor", "tuples"],
)
def test_per_example_targets_select_their_scores(target: TargetType) -> None:
    ids = torch.cat([IDS, IDS])
    result = comprehensiveness(two_scores, ids, oracle(ids), BASELINE, target=target)
    # example 1 explains the negated score: same ranking, negated drops
    torch.testing.assert_close(result.curve[0], torch.tensor([9.0, 17.0, 22.0, 24.0]))
    torch.testing.assert_close(result.curve[1], -result.curve[0])


def test_tuple_target_indexes_logits_like_output() -> None:
    def logits(input_ids: Tensor) -> Tensor:  # (n, seq, 2); only the last position
        out = torch.zeros(*input_ids.shape, 2)
        out[:, -1] = two_scores(input_ids)
        return out

    result = comprehensiveness(logits, IDS, oracle(IDS), BASELINE, target=(-1, 0))
    torch.testing.assert_close(result.curve, torch.tensor([[9.0, 17.0, 22.0, 24.0]]))


def test_additional_forward_args_are_sliced_per_example() -> None:
    def scaled(input_ids: Tensor, scale: Tensor, offset: float) -> Tensor:
        return WEIGHTS[input_ids].sum(1) * scale + offset

    ids = torch.cat([IDS, IDS])
    result = comprehensiveness(
        scaled,
        ids,
        oracle(ids),
        BASELINE,
        additional_forward_args=(torch.tensor([1.0, 2.0]), 5.0),
    )
    torch.testing.assert_close(result.original_score, torch.tensor([33.0, 61.0]))
    torch.testing.assert_close(result.curve[1], 2 * result.curve[0])


def test_oracle_attributions_beat_random_ones_on_linear_model() -> None:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (8, 16), generator=generator)
    model = LinearModel()
    best = oracle(ids)
    comp_oracle = comprehensiveness(model, ids, best, BASELINE).aopc
    suff_oracle = sufficiency(model, ids, best, BASELINE).aopc
    for _ in range(3):
        random = torch.rand(ids.shape, generator=generator)
        assert (comprehensiveness(model, ids, random, BASELINE).aopc <= comp_oracle).all()
        assert (sufficiency(model, ids, random, BASELINE).aopc >= suff_oracle).all()
    worst = -best
    assert (comprehensiveness(model, ids, worst, BASELINE).aopc < comp_oracle).all()
    assert (sufficiency(model, ids, worst, BASELINE).aopc > suff_oracle).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"attributions": torch.zeros(1, 5)}, ValueError, "attributions has shape"),
        ({"attributions": torch.zeros(6)}, ValueError, "attributions must be"),
        ({"inputs": IDS.float()}, ValueError, "inputs must be a 2D integer"),
        ({"max_steps": 0}, ValueError, "max_steps must be an integer >= 1"),
        ({"max_batch_size": 0}, ValueError, "max_batch_size must be"),
        ({"attention_mask": torch.ones(1, 5)}, ValueError, "attention_mask must have"),
        ({"baseline_token_id": 0.5}, TypeError, "baseline_token_id must be an int"),
        ({"target": [0, 1]}, ValueError, "target has 2 entries"),
        ({"target": 3}, ValueError, "target 3 cannot index"),
    ],
)
def test_bad_arguments_raise_clear_errors(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    args = {
        "forward_func": LinearModel(),
        "inputs": IDS,
        "attributions": oracle(IDS),
        "baseline_token_id": BASELINE,
    }
    with pytest.raises(error, match=message):
        comprehensiveness(**{**args, **kwargs})


@pytest.mark.parametrize("fractions", [(0.0, 0.5), (0.5, 1.0), (), (1.5,)])
def test_fractions_outside_open_unit_interval_are_rejected(
    fractions: tuple[float, ...],
) -> None:
    with pytest.raises(ValueError, match=r"fractions must be .* strictly between 0 and"):
        sufficiency(LinearModel(), IDS, oracle(IDS), BASELINE, fractions=fractions)


def test_example_without_replaceable_token_is_rejected() -> None:
    ids = torch.tensor([[1, 9, 5, 2], [PAD, PAD, 1, 3]])
    mask = (ids != PAD).long()
    with pytest.raises(ValueError, match="Example 1 has no replaceable token"):
        comprehensiveness(LinearModel(), ids, oracle(ids), BASELINE, attention_mask=mask)


def test_forward_output_with_several_scores_per_row_is_rejected() -> None:
    with pytest.raises(ValueError, match="instead of one score per row"):
        comprehensiveness(two_scores, IDS, oracle(IDS), BASELINE)


def test_tiny_llama_runs_and_first_step_matches_manual_replacement() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()

    def logits(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    ids = torch.randint(1, 50, (2, 10))
    mask = torch.ones_like(ids)
    attributions = torch.randn(2, 10, 32)
    target = (-1, 7)
    comp = comprehensiveness(
        logits,
        ids,
        attributions,
        BASELINE,
        target=target,
        attention_mask=mask,
        max_steps=5,
    )
    suff = sufficiency(logits, ids, attributions, BASELINE, target=target, attention_mask=mask)

    assert comp.curve.shape == (2, 5) and suff.curve.shape == (2, 5)
    assert torch.isfinite(comp.curve).all() and torch.isfinite(suff.curve).all()
    assert not comp.curve.requires_grad
    with torch.no_grad():
        top = attributions[0, 1:-1].sum(-1).argmax().item() + 1
        perturbed = ids[:1].clone()
        perturbed[0, top] = BASELINE
        original = logits(ids[:1])[0, -1, 7]
        expected = original - logits(perturbed)[0, -1, 7]
    torch.testing.assert_close(comp.original_score[0], original)
    torch.testing.assert_close(comp.curve[0, 0], expected, atol=1e-5, rtol=1e-4)
