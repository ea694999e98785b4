"""Property-based tests (hypothesis) over shapes, targets, baselines and settings."""

from __future__ import annotations

import math

import pytest
import torch
from captum.attr import Saliency
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import VOCAB, logits_of, shared_model
from torch import nn

import captum_gim.sites.exclusive as exclusive
from captum_gim import GIMAttribution, GIMConfig, LayerGIM, gim_rules

PROPERTY = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
MODELS = [("llama", "sdpa"), ("gpt2", "eager")]


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


@st.composite
def _case(draw: st.DrawFn) -> dict:
    name, implementation = draw(st.sampled_from(MODELS))
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    per_example = [draw(st.integers(0, VOCAB - 1)) for _ in range(batch)]
    target = draw(
        st.sampled_from(
            [
                per_example[0],  # one class for every example
                per_example,  # a list, one per example
                torch.tensor(per_example),  # a tensor, one per example
                torch.tensor(per_example[0]),  # a scalar tensor
            ]
        )
    )
    kind = draw(st.sampled_from(["none", "scalar", "batch-1", "full"]))
    shape = (batch, length, 32)
    baseline = {
        "none": None,
        "scalar": draw(st.floats(-1.0, 1.0, allow_nan=False)),
        "batch-1": torch.randn((1, *shape[1:]), generator=generator),
        "full": torch.randn(shape, generator=generator),
    }[kind]
    return dict(model=shared_model(name, implementation), ids=ids, target=target, baseline=baseline)


def _difference(inputs: torch.Tensor, baseline: object) -> torch.Tensor:
    return inputs - (0.0 if baseline is None else baseline)


@PROPERTY
@given(case=_case())
def test_attribution_is_difference_times_gradient_and_rules_off_is_plain(case) -> None:
    model, target, baseline = case["model"], case["target"], case["baseline"]
    embeds = model.get_input_embeddings()(case["ids"]).detach()
    forward = logits_of(model)
    gradient = GIMAttribution(forward, model, multiply_by_inputs=False).attribute(
        embeds, target=target
    )
    got = GIMAttribution(forward, model).attribute(embeds, baselines=baseline, target=target)
    assert got.shape == embeds.shape and got.dtype == embeds.dtype
    assert torch.isfinite(got).all()
    assert torch.equal(got, _difference(embeds, baseline) * gradient)
    off = GIMAttribution(forward, model, config=GIMConfig.all_rules_off()).attribute(
        embeds, baselines=baseline, target=target
    )
    plain = Saliency(forward).attribute(embeds, target=target, abs=False)
    assert torch.equal(off, _difference(embeds, baseline) * plain)
    assert _hook_count(model) == 0 and not exclusive._active_modules


@PROPERTY
@given(case=_case())
def test_layer_gim_properties(case) -> None:
    model, ids, target, baseline = case["model"], case["ids"], case["target"], case["baseline"]
    layer = model.get_input_embeddings()

    def forward(input_ids):
        return model(input_ids).logits[:, -1]

    gradient = LayerGIM(forward, layer, model, multiply_by_inputs=False).attribute(
        ids, target=target
    )
    got = LayerGIM(forward, layer, model).attribute(ids, target=target, layer_baselines=baseline)
    assert got.shape == (*ids.shape, 32) and torch.isfinite(got).all()
    assert torch.equal(got, _difference(layer(ids), baseline) * gradient)
    assert _hook_count(model) == 0 and not exclusive._active_modules


@PROPERTY
@given(case=_case())
def test_each_example_is_attributed_as_if_alone(case) -> None:
    model, ids, target = case["model"], case["ids"], case["target"]
    embeds = model.get_input_embeddings()(ids).detach()
    gim = GIMAttribution(logits_of(model), model)
    batch = gim.attribute(embeds, target=target)
    targets = target.tolist() if isinstance(target, torch.Tensor) else target
    for index in range(ids.shape[0]):
        alone_target = targets[index] if isinstance(targets, list) else targets
        alone = gim.attribute(embeds[index : index + 1], target=alone_target)
        scale = float(alone.abs().max()) + 1e-12
        torch.testing.assert_close(batch[index : index + 1], alone, rtol=1e-4, atol=1e-5 * scale)


@PROPERTY
@given(
    batch=st.integers(1, 3),
    bad=st.one_of(st.integers(VOCAB, 10**6), st.integers(-(10**6), -VOCAB - 1)),
    form=st.sampled_from(["int", "list", "tensor"]),
)
def test_targets_out_of_range_name_target_and_the_range(batch, bad, form) -> None:
    model = shared_model("llama", "sdpa")
    embeds = torch.randn(batch, 4, 32)
    targets = [0] * (batch - 1) + [bad]
    target = {"int": bad, "list": targets, "tensor": torch.tensor(targets)}[form]
    # An int, or a tensor of one element, is one index for every example
    # (Python indexing, negatives allowed); a list or tensor is one per example.
    scalar = form == "int" or (form == "tensor" and batch == 1)
    allowed = f"[-{VOCAB}, {VOCAB - 1}]" if scalar else f"[0, {VOCAB - 1}]"
    with pytest.raises(IndexError, match=r"target.*out of range") as error:
        GIMAttribution(logits_of(model), model).attribute(embeds, target=target)
    assert allowed in str(error.value) and f"({batch}, {VOCAB})" in str(error.value)
    assert _hook_count(model) == 0 and not exclusive._active_modules


_SCALE = st.floats(0.0, 2.0, allow_nan=False)  # negative scales are refused


@PROPERTY
@given(
    temperature=st.one_of(st.none(), st.floats(0.05, 20.0)),
    freeze_norm=st.booleans(),
    scales=st.tuples(_SCALE, _SCALE, _SCALE, _SCALE, _SCALE),
    length=st.integers(1, 8),
)
def test_any_valid_settings_give_finite_deterministic_results(
    temperature, freeze_norm, scales, length
) -> None:
    model = shared_model("llama", "sdpa")
    embeds = model.get_input_embeddings()(torch.arange(3, 3 + length)[None]).detach()
    config = GIMConfig(temperature, freeze_norm, *scales)
    gim = GIMAttribution(logits_of(model), model, config=config)
    first = gim.attribute(embeds, target=5)
    assert torch.isfinite(first).all()
    assert torch.equal(first, gim.attribute(embeds, target=5))
    assert _hook_count(model) == 0 and not exclusive._active_modules


@PROPERTY
@given(
    setting=st.sampled_from(
        ["temperature", "q_scale", "k_scale", "v_scale", "gate_scale", "up_scale"]
    ),
    value=st.one_of(
        st.sampled_from([math.nan, math.inf, -math.inf]),
        st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
    ),
)
def test_invalid_settings_are_refused_naming_the_setting(setting, value) -> None:
    if setting != "temperature" and value == 0.0:
        value = -0.5  # a zero scale is valid (it blocks the path); negative ones are not
    model = shared_model("llama", "sdpa")
    with pytest.raises(ValueError, match=setting):
        with gim_rules(model, **{setting: value}):
            pass
    assert _hook_count(model) == 0 and not exclusive._active_modules
