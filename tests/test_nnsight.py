"""nnsight's LanguageModel / TransformersModel around a Hugging Face model: a
gradient taken inside an nnsight trace, with gim_rules open around the trace
(so the forward runs under the rules too), equals GIMAttribution exactly."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from captum_gim import GIMAttribution, gim_rules

pytest.importorskip("nnsight", reason="nnsight is not installed (pip install nnsight)")

from nnsight import LanguageModel
from nnsight.modeling.transformers import TransformersModel

TARGET = 3
IDS = torch.tensor([[5, 17, 3, 9, 21, 2, 11, 7]])


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
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


@pytest.mark.parametrize("wrapper", [LanguageModel, TransformersModel])
def test_gradient_in_an_nnsight_trace_under_gim_rules_is_gim(llama, wrapper) -> None:
    from captum_gim.models import load_model

    _, tokenizer = load_model()
    x = llama.get_input_embeddings()(IDS).detach()
    want = GIMAttribution(lambda e: llama(inputs_embeds=e).logits[:, -1], llama).attribute(
        x, target=TARGET
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = wrapper(llama, tokenizer=tokenizer)
    with gim_rules(llama):  # open before the trace: the rules need the forward pass
        with wrapped.trace(IDS):
            embeds = wrapped.model.embed_tokens.output
            embeds.requires_grad_(True)
            logit = wrapped.lm_head.output[0, -1, TARGET]
            with logit.backward():
                gradient = embeds.grad.save()
            embeds = embeds.save()
    assert torch.equal(embeds.detach() * gradient, want)
