"""The rule sites are found once per model object and found again whenever the
module tree, a config object or an attention implementation changes."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import FAMILY_BY_NAME, logits_of, sample_ids
from torch import nn

import captum_gim.sites.cache as cache_module
from captum_gim import GIMAttribution, UnsupportedModuleError, gim_rules
from captum_gim.sites.cache import clear_site_cache


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records every walk of the model made through the cache."""
    calls: list[bool] = []
    real = cache_module.discover_sites

    def counted(model: nn.Module, strict: bool = True):
        calls.append(strict)
        return real(model, strict=strict)

    monkeypatch.setattr(cache_module, "discover_sites", counted)
    return calls


def _llama(implementation: str = "sdpa") -> nn.Module:
    return FAMILY_BY_NAME["llama"].build(implementation)


def _attributions(model: nn.Module) -> torch.Tensor:
    embeds = model.get_input_embeddings()(sample_ids()).detach()
    return GIMAttribution(logits_of(model), model).attribute(embeds, target=3)


def test_second_call_does_not_walk_again_and_gives_the_same_result(walks) -> None:
    model = _llama()
    first = _attributions(model)
    second = _attributions(model)
    assert len(walks) == 1
    clear_site_cache()
    uncached = _attributions(model)
    assert len(walks) == 2
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(uncached, first, rtol=0, atol=0)


def test_other_model_objects_are_walked_separately(walks) -> None:
    one, two = _llama(), _llama()
    _attributions(one)
    _attributions(two)
    _attributions(one)
    assert len(walks) == 2


def test_added_module_is_found(walks) -> None:
    model = _llama()
    _attributions(model)
    layer = model.model.layers[0]
    layer.post_attention_layernorm = nn.LayerNorm(layer.post_attention_layernorm.weight.shape)
    with gim_rules(model):
        pass
    assert len(walks) == 2
    with gim_rules(model):
        hooked = model.model.layers[0].post_attention_layernorm._forward_hooks
        assert len(hooked) == 1  # the frozen-norm rule reached the new module
    assert len(walks) == 2


def test_changed_attention_implementation_is_found(walks) -> None:
    model = _llama("sdpa")
    sdpa = _attributions(model)
    model.set_attn_implementation("eager")
    eager = _attributions(model)
    assert len(walks) == 2
    reference = _attributions(_llama("eager"))
    torch.testing.assert_close(eager, reference)
    torch.testing.assert_close(eager, sdpa, rtol=1e-4, atol=1e-5)
    model.set_attn_implementation("sdpa")
    _attributions(model)
    assert len(walks) == 4  # the reference model was walked once too


def test_changed_norm_settings_are_found(walks) -> None:
    model = _llama()
    _attributions(model)
    model.model.norm.variance_epsilon = 1e-2
    changed = _attributions(model)
    assert len(walks) == 2
    clear_site_cache()
    torch.testing.assert_close(changed, _attributions(model), rtol=0, atol=0)


class _UnknownAttention(nn.Module):
    """Computes attention without transformers' AttentionInterface."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = torch.softmax(x @ x.transpose(-1, -2), dim=-1)
        return self.proj(scores @ x)


def _outcome(model: nn.Module, strict: bool) -> str:
    """The error or the warnings of one GIM call."""
    x = torch.randn(1, 3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            GIMAttribution(lambda e: model(e).sum(-1), model, strict=strict).attribute(x, target=0)
        except UnsupportedModuleError as error:
            return f"raised: {error}"
    return "warned: " + " | ".join(str(w.message) for w in caught)


def test_models_with_unreachable_parts_raise_or_warn_on_every_call() -> None:
    model = nn.Sequential(_UnknownAttention())
    first = _outcome(model, strict=True)
    assert first.startswith("raised") and first == _outcome(model, strict=True)
    lenient = _outcome(model, strict=False)
    assert lenient != "warned: " and lenient == _outcome(model, strict=False)


def test_cached_sites_follow_each_calls_strict_flag() -> None:
    """A traced attention refused on a strict call only warns on a lenient one."""
    from test_traced_attention import _LinearAttention, _Model

    model = _Model(_LinearAttention())
    x = torch.randn(1, 4, 8, requires_grad=True)
    for strict in (True, False, True):
        if strict:
            with pytest.raises(UnsupportedModuleError), gim_rules(model):
                model(x)
        else:
            with (
                pytest.warns(UserWarning, match="_LinearAttention"),
                gim_rules(model, strict=False),
            ):
                model(x)


def test_a_registration_after_the_first_call_is_seen() -> None:
    from captum_gim import register_norm

    class MaxLikeNorm(nn.Module):  # an RMSNorm whose weight is named 'scale'
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.rand(8) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scale * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-3)

    model = nn.Sequential(nn.Linear(8, 8), MaxLikeNorm())
    with pytest.warns(UserWarning, match="MaxLikeNorm"), gim_rules(model, strict=False):
        pass
    before = cached_rule_sites_norms(model)
    with register_norm(MaxLikeNorm, centered=False, scale="w", eps=1e-3, weight="scale"):
        assert cached_rule_sites_norms(model) == before + 1
    assert cached_rule_sites_norms(model) == before


def cached_rule_sites_norms(model: nn.Module) -> int:
    from captum_gim.sites.cache import cached_rule_sites

    return len(cached_rule_sites(model, list(model.named_modules()), strict=False).norms)
