"""GIMAttribution: Captum conventions, baselines, errors."""

from __future__ import annotations

import pytest
import torch
from captum.attr import GradientAttribution, InputXGradient
from tiny_models import logits_of, sample_ids

from captum_gim import GIMAttribution, GIMConfig


def test_is_a_captum_gradient_attribution(llama) -> None:
    gim = GIMAttribution(logits_of(llama), llama)
    assert isinstance(gim, GradientAttribution) and gim.multiplies_by_inputs


def test_model_defaults_to_the_forward_module(llama, embeds) -> None:
    assert GIMAttribution(llama).model is llama
    assert GIMAttribution(llama.forward).model is llama
    with pytest.raises(TypeError, match="model="):
        GIMAttribution(lambda x: x)


def test_attribution_is_difference_times_gim_gradient(llama, embeds) -> None:
    baseline = torch.randn_like(embeds[:1])
    gradient = GIMAttribution(logits_of(llama), llama, multiply_by_inputs=False).attribute(
        embeds, target=3
    )
    got = GIMAttribution(logits_of(llama), llama).attribute(embeds, baselines=baseline, target=3)
    torch.testing.assert_close(got, (embeds - baseline) * gradient)
    zero = GIMAttribution(logits_of(llama), llama).attribute(embeds, baselines=0.0, target=3)
    torch.testing.assert_close(zero, embeds * gradient)


def test_rules_off_with_baseline_equals_input_x_gradient_of_the_difference(llama, embeds) -> None:
    baseline = torch.randn_like(embeds)
    off = GIMAttribution(logits_of(llama), llama, config=GIMConfig.all_rules_off())
    got = off.attribute(embeds, baselines=baseline, target=3)
    gradient = InputXGradient(logits_of(llama)).attribute(embeds.clone(), target=3) / embeds
    torch.testing.assert_close(got, (embeds - baseline) * gradient, rtol=1e-5, atol=1e-7)


def test_tuple_inputs_give_tuple_outputs(llama, embeds) -> None:
    def forward(first, second):
        return logits_of(llama)(torch.cat([first, second], dim=1))

    first, second = embeds[:, :3], embeds[:, 3:]
    got = GIMAttribution(forward, llama).attribute((first, second), target=(3))
    assert isinstance(got, tuple) and got[0].shape == first.shape and got[1].shape == second.shape
    whole = GIMAttribution(logits_of(llama), llama).attribute(embeds, target=3)
    torch.testing.assert_close(torch.cat(got, dim=1), whole)


def test_per_example_targets(llama, embeds) -> None:
    gim = GIMAttribution(logits_of(llama), llama)
    both = gim.attribute(embeds, target=[3, 7])
    torch.testing.assert_close(both[1:], gim.attribute(embeds[1:], target=7), rtol=1e-5, atol=1e-7)


def test_inputs_keep_their_requires_grad_and_values(llama, embeds) -> None:
    original = embeds.clone()
    GIMAttribution(logits_of(llama), llama).attribute(embeds, target=3)
    assert not embeds.requires_grad and torch.equal(embeds, original)


def test_determinism(llama, embeds) -> None:
    gim = GIMAttribution(logits_of(llama), llama)
    assert torch.equal(gim.attribute(embeds, target=3), gim.attribute(embeds, target=3))


def test_token_ids_point_to_layer_gim(llama) -> None:
    with pytest.raises(TypeError, match="LayerGIM"):
        GIMAttribution(llama, llama).attribute(sample_ids())


@pytest.mark.parametrize(
    ("baseline", "error", "message"),
    [
        (torch.zeros(3, 7, 32), ValueError, "does not broadcast"),
        (torch.zeros(2, 7, 32, dtype=torch.long), TypeError, "floating-point baseline"),
        ((torch.zeros(1), torch.zeros(1)), ValueError, "2 baselines for 1 inputs"),
        ("zeros", TypeError, "must be a tensor or a number"),
    ],
)
def test_bad_baselines_are_named(llama, embeds, baseline, error, message) -> None:
    with pytest.raises(error, match=message):
        GIMAttribution(logits_of(llama), llama).attribute(embeds, baselines=baseline, target=3)


def test_empty_input_is_refused(llama) -> None:
    with pytest.raises(ValueError, match="empty"):
        GIMAttribution(logits_of(llama), llama).attribute(torch.zeros(0, 4, 32), target=3)


def _one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_forward_returning_logits_of_every_token_names_the_fix(llama, embeds) -> None:
    gim = GIMAttribution(lambda e: llama(inputs_embeds=e).logits, llama)
    with pytest.raises(ValueError, match=r"logits for every token") as error:
        gim.attribute(embeds, target=3)
    assert "logits[:, -1]" in _one_line(error)
    with pytest.raises(AssertionError, match=r"logits for every token"):  # as Captum raises
        gim.attribute(embeds, target=3)


def test_forward_returning_a_model_output_names_the_fix(llama, embeds) -> None:
    gim = GIMAttribution(lambda e: llama(inputs_embeds=e), llama)
    with pytest.raises(
        TypeError, match=r"returned a CausalLMOutputWithPast, not a tensor"
    ) as error:
        gim.attribute(embeds, target=3)
    assert "logits[:, -1]" in _one_line(error)


def test_string_target_names_the_fix(llama, embeds) -> None:
    with pytest.raises(TypeError, match=r"target is the string 'Paris'") as error:
        GIMAttribution(logits_of(llama), llama).attribute(embeds, target="Paris")
    assert "convert_tokens_to_ids" in _one_line(error)
