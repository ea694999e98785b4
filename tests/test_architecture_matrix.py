"""Every supported family x attention implementation x rule, against the reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from captum.attr import InputXGradient
from reference import reference_gradient
from tiny_models import FAMILIES, FAMILY_BY_NAME, PlainMLPModel, logits_of, sample_ids

from captum_gim import GIMAttribution, GIMConfig, gim_rules

OFF = GIMConfig.all_rules_off()
RULES = {
    "softmax": dataclasses.replace(OFF, temperature=2.0),
    "norm": dataclasses.replace(OFF, freeze_norm=True),
    "qkv": dataclasses.replace(OFF, q_scale=0.25, k_scale=0.25, v_scale=0.5),
    "gated_mlp": dataclasses.replace(OFF, gate_scale=0.5, up_scale=0.5),
    "all": GIMConfig(),
}
TARGET = 5
CASES = [
    pytest.param(family, implementation, id=f"{family.name}-{implementation}")
    for family in FAMILIES
    for implementation in family.implementations
]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def assert_relative_close(got: torch.Tensor, want: torch.Tensor, tolerance: float = 1e-5) -> None:
    """Float32 rounding differs between the two paths; the rules change results by > 1e-3."""
    assert got.shape == want.shape
    assert relative_error(got, want) < tolerance


def _has_part(model: torch.nn.Module, rule: str) -> bool:
    names = {type(module).__name__ for module in model.modules()}
    if rule == "gated_mlp":
        return any(name.endswith(("MLP", "Experts")) and "GPT" not in name for name in names)
    return True


def _embeddings(model: torch.nn.Module) -> torch.Tensor:
    return model.get_input_embeddings()(sample_ids()).detach()


@pytest.mark.parametrize(("family", "implementation"), CASES)
def test_forward_outputs_unchanged_by_rules(family, implementation) -> None:
    model = family.build(implementation)
    ids = sample_ids()
    with torch.no_grad():
        expected = model(ids).logits
    embeds = _embeddings(model).requires_grad_()
    with gim_rules(model):
        logits = model(inputs_embeds=embeds).logits
        hidden = model(ids, output_hidden_states=True).hidden_states
    with torch.no_grad():
        expected_hidden = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    for got, want in zip(hidden, expected_hidden):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize(("family", "implementation"), CASES)
def test_rule_matches_reference(family, implementation, rule) -> None:
    model = family.build(implementation)
    forward = logits_of(model)
    embeds = _embeddings(model)
    config = RULES[rule]
    gim = GIMAttribution(forward, model, config=config, multiply_by_inputs=False)
    got = gim.attribute(embeds, target=TARGET)
    want = reference_gradient(model, forward, embeds, TARGET, config)
    assert_relative_close(got, want)
    plain = InputXGradient(forward).attribute(embeds.clone(), target=TARGET) / embeds
    if _has_part(model, rule):
        assert relative_error(got, plain) > 1e-3, f"{rule} had no effect"


@pytest.mark.parametrize(("family", "implementation"), CASES)
def test_all_rules_off_equals_input_x_gradient(family, implementation) -> None:
    model = family.build(implementation)
    forward = logits_of(model)
    embeds = _embeddings(model)
    got = GIMAttribution(forward, model, config=OFF).attribute(embeds, target=TARGET)
    want = InputXGradient(forward).attribute(embeds.clone(), target=TARGET)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("experts", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_experts_implementations_get_the_gated_split(name, experts) -> None:
    family = FAMILY_BY_NAME[name]
    model = family.build("sdpa", experts_implementation=experts)
    assert model.config._experts_implementation == experts
    forward = logits_of(model)
    embeds = _embeddings(model)
    config = RULES["gated_mlp"]
    got = GIMAttribution(forward, model, config=config, multiply_by_inputs=False).attribute(
        embeds, target=TARGET
    )
    want = reference_gradient(model, forward, embeds, TARGET, config)
    assert_relative_close(got, want)


@pytest.mark.parametrize("rule", ["norm", "all"])
def test_plain_pytorch_model_gets_norm_rule(rule) -> None:
    model = PlainMLPModel().eval()
    forward = logits_of(model)
    embeds = model.embed(sample_ids()).detach()
    config = RULES[rule]
    got = GIMAttribution(forward, model, config=config, multiply_by_inputs=False).attribute(
        embeds, target=TARGET
    )
    want = reference_gradient(model, forward, embeds, TARGET, config)
    assert_relative_close(got, want)
