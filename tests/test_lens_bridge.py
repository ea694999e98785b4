"""TransformerLens's TransformerBridge (3.x and 4.x) is refused by name, and so is
the Hugging Face model a bridge has booted (the bridge replaces its modules in
place); with strict=False no rule is applied to either, so nothing is scaled twice.

TransformerLens 4 removed HookedTransformer, so it cannot share an environment
with tests/test_lens.py: CI runs this file with TransformerLens 3 in its main
environment and with TransformerLens 4.3 in a second one (.ci/run).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from captum.attr import InputXGradient
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from captum_gim import GIMAttribution, LayerGIM, UnsupportedModuleError, gim_rules

pytest.importorskip(
    "transformer_lens", reason="TransformerLens is not installed (pip install captum_gim[lens])"
)
bridge = pytest.importorskip(
    "transformer_lens.model_bridge", reason="this TransformerLens has no TransformerBridge"
)
TransformerBridge = bridge.TransformerBridge

TARGET = 3


def hf_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


def boot(model: torch.nn.Module, family: str) -> TransformerBridge:
    from captum_gim.models import load_model

    _, tokenizer = load_model()  # any tokenizer: the bridge needs one, the tests pass ids
    name = "gpt2" if family == "gpt2" else "meta-llama/Llama-3.2-1B"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def booted(request):
    model = hf_model(request.param)
    return model, boot(model, request.param)


IDS = torch.tensor([[5, 17, 3, 9, 21, 2, 11, 7]])


def test_bridge_is_refused_by_name(booted) -> None:
    _, bridge = booted
    gim = LayerGIM(lambda ids: bridge(ids)[:, -1], bridge.embed, bridge)
    with pytest.raises(UnsupportedModuleError, match=r"TransformerBridge components"):
        gim.attribute(IDS, target=TARGET)
    with pytest.raises(UnsupportedModuleError, match=r"TransformerBridge"):
        with gim_rules(bridge):
            pass


def test_hugging_face_model_booted_by_a_bridge_is_refused(booted) -> None:
    model, _ = booted
    x = model.get_input_embeddings()(IDS).detach()
    forward = lambda e: model(inputs_embeds=e).logits[:, -1]  # noqa: E731
    with pytest.raises(UnsupportedModuleError, match=r"booting it replaced"):
        GIMAttribution(forward, model).attribute(x, target=TARGET)


def test_strict_false_applies_no_rule_to_a_bridged_model(booted) -> None:
    model, _ = booted
    x = model.get_input_embeddings()(IDS).detach()
    forward = lambda e: model(inputs_embeds=e).logits[:, -1]  # noqa: E731
    with pytest.warns(UserWarning, match=r"TransformerBridge"):
        got = GIMAttribution(forward, model, strict=False).attribute(x, target=TARGET)
    assert torch.equal(got, InputXGradient(forward).attribute(x.clone(), target=TARGET))
