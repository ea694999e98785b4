"""gim_rules: scope, restoration of the model, nesting, unsupported parts, threads."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from captum.attr import IntegratedGradients, Saliency
from tiny_models import (
    FAMILY_BY_NAME,
    PlainMLPModel,
    assert_same,
    logits_of,
    sample_ids,
    snapshot,
)
from torch import nn

from captum_gim import GIMAttribution, GIMConfig, UnsupportedModuleError, gim_rules
from captum_gim.sites.discovery import find_rule_sites


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_model_left_exactly_as_it_was(implementation) -> None:
    model = FAMILY_BY_NAME["llama"].build(implementation)
    model.lm_head.weight.grad = torch.ones_like(model.lm_head.weight)
    before = snapshot(model)
    embeds = model.get_input_embeddings()(sample_ids()).detach()
    GIMAttribution(logits_of(model), model).attribute(embeds, target=3)
    assert_same(before, snapshot(model))


def test_model_restored_when_forward_raises_midway() -> None:
    model = FAMILY_BY_NAME["qwen2_moe"].build("sdpa")
    before = snapshot(model)

    def explode(module, args, output):
        raise KeyboardInterrupt

    handle = model.model.layers[1].mlp.register_forward_hook(explode)
    before["hooks"] = snapshot(model)["hooks"]
    embeds = model.get_input_embeddings()(sample_ids()).detach()
    with pytest.raises(KeyboardInterrupt):
        GIMAttribution(logits_of(model), model).attribute(embeds, target=3)
    assert_same(before, snapshot(model))
    handle.remove()
    GIMAttribution(logits_of(model), model).attribute(embeds, target=3)  # usable again


def test_rules_act_only_inside_the_block() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa")
    embeds = model.get_input_embeddings()(sample_ids()).detach()
    saliency = Saliency(logits_of(model))
    plain = saliency.attribute(embeds, target=3, abs=False)
    with gim_rules(model):
        ruled = saliency.attribute(embeds, target=3, abs=False)
    after = saliency.attribute(embeds, target=3, abs=False)
    gim = GIMAttribution(logits_of(model), model, multiply_by_inputs=False).attribute(
        embeds, target=3
    )
    torch.testing.assert_close(ruled, gim, rtol=0, atol=0)
    torch.testing.assert_close(after, plain, rtol=0, atol=0)
    assert not torch.allclose(ruled, plain)


def test_integrated_gradients_under_gim_rules() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa")
    embeds = model.get_input_embeddings()(sample_ids()).detach()
    ig = IntegratedGradients(logits_of(model))
    plain = ig.attribute(embeds, target=3, n_steps=8)
    with gim_rules(model, config=GIMConfig.all_rules_off()):
        off = ig.attribute(embeds, target=3, n_steps=8)
    with gim_rules(model):
        gim = ig.attribute(embeds, target=3, n_steps=8)
    torch.testing.assert_close(off, plain, rtol=0, atol=0)
    assert (gim - plain).norm() > 1e-3 * plain.norm()


def test_nested_rules_on_the_same_model_raise() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa")
    embeds = model.get_input_embeddings()(sample_ids()).detach()
    with gim_rules(model):
        with pytest.raises(RuntimeError, match="already active"):
            with gim_rules(model):
                pass
        with pytest.raises(RuntimeError, match="already active"):
            GIMAttribution(logits_of(model), model).attribute(embeds, target=3)
    with gim_rules(model):  # the failed attempts left nothing behind
        pass


class _CustomNorm(nn.Module):
    """A max-norm: no form of rule 2 (centred or not, mean or sum of squares) matches it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.abs().amax(dim=-1, keepdim=True)


class _GatedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w_gate = nn.Linear(4, 4)
        self.w_up = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.w_gate(x)) * self.w_up(x)


class _ShortConvMixer(nn.Module):
    """LFM2/Mamba-style: a depthwise causal convolution between two gates."""

    def __init__(self) -> None:
        super().__init__()
        self.in_proj = nn.Linear(4, 12)
        self.conv = nn.Conv1d(4, 4, kernel_size=3, groups=4, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h = self.in_proj(x).chunk(3, dim=-1)
        mixed = self.conv((b * h).unsqueeze(-1).transpose(0, 1))[..., : x.shape[0]]
        return c * mixed.transpose(0, 1).squeeze(-1)


@pytest.mark.parametrize(
    ("part", "message"),
    [
        (_CustomNorm(), "normalization layer of unknown form"),
        (_GatedMLP(), "looks like a gated MLP, but its gate, up and down parts"),
        (_ShortConvMixer(), "convolutional token mixer"),
    ],
)
def test_unsupported_parts_raise_or_warn(part, message) -> None:
    model = nn.Sequential(nn.Linear(4, 4), part)
    with pytest.raises(UnsupportedModuleError, match=message) as error:
        with gim_rules(model):
            pass
    assert "strict=False" in str(error.value)
    with pytest.warns(UserWarning, match=message):
        with gim_rules(model, strict=False):
            pass


def test_unsupported_attention_implementation_is_named() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(UnsupportedModuleError, match="attn_implementation='sdpa'"):
        find_rule_sites(model)


def test_plain_model_without_attention_is_supported() -> None:
    sites = find_rule_sites(PlainMLPModel())
    assert len(sites.norms) == 2 and not sites.attentions and not sites.gated_mlps


def _gradient(model: nn.Module, embeds: torch.Tensor, **settings) -> torch.Tensor:
    if settings.pop("gim"):
        return GIMAttribution(
            logits_of(model), model, multiply_by_inputs=False, **settings
        ).attribute(embeds, target=3)
    return Saliency(logits_of(model)).attribute(embeds, target=3, abs=False)


def test_threads_with_different_settings_get_their_single_threaded_results() -> None:
    family = FAMILY_BY_NAME["llama"]
    models = [family.build("sdpa"), family.build("sdpa"), family.build("sdpa")]
    embeds = models[0].get_input_embeddings()(sample_ids(length=24)).detach()
    jobs = [
        dict(gim=True, temperature=2.0),
        dict(gim=True, temperature=5.0, q_scale=1.0),
        dict(gim=False),
    ]
    expected = [_gradient(model, embeds, **dict(job)) for model, job in zip(models, jobs)]
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(3)}

    def work(index: int) -> None:
        for _ in range(5):
            results[index].append(_gradient(models[index], embeds, **dict(jobs[index])))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(3):
        assert len(results[index]) == 5
        for got in results[index]:
            torch.testing.assert_close(got, expected[index], rtol=0, atol=0)


def test_no_warning_for_supported_models() -> None:
    model = FAMILY_BY_NAME["gemma3"].build("sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gim_rules(model):
            pass
