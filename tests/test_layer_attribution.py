"""LayerGIM: attributions to the embedding layer, and Captum's LLMGradientAttribution."""

from __future__ import annotations

import pytest
import torch
from captum.attr import LayerGradientXActivation, LLMGradientAttribution, TextTokenInput
from tiny_models import FAMILY_BY_NAME, logits_of, sample_ids

from captum_gim import GIMAttribution, LayerGIM
from captum_gim.models import load_model


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_layer_gim_on_token_ids_equals_gim_on_embeddings(name) -> None:
    model = FAMILY_BY_NAME[name].build("sdpa")
    ids = sample_ids()

    def from_ids(input_ids):
        return model(input_ids).logits[:, -1]

    layer = LayerGIM(from_ids, model.get_input_embeddings(), model).attribute(ids, target=3)
    embeds = model.get_input_embeddings()(ids).detach()
    direct = GIMAttribution(logits_of(model), model).attribute(embeds, target=3)
    torch.testing.assert_close(layer, direct, rtol=1e-5, atol=1e-7)


def test_layer_baselines_are_subtracted() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa")
    layer = model.get_input_embeddings()
    ids = sample_ids()

    def logits(input_ids):
        return model(input_ids).logits

    gradient = LayerGIM(logits, layer, model, multiply_by_inputs=False).attribute(
        ids, target=(-1, 3)
    )
    baseline = torch.randn(1, ids.shape[1], 32)
    got = LayerGIM(logits, layer, model).attribute(ids, target=(-1, 3), layer_baselines=baseline)
    torch.testing.assert_close(got, (layer(ids) - baseline) * gradient)


def test_llm_gradient_attribution_accepts_layer_gim() -> None:
    model, tokenizer = load_model()
    gim = LayerGIM(model, model.get_input_embeddings())
    assert isinstance(gim, LayerGradientXActivation)
    llm = LLMGradientAttribution(gim, tokenizer)
    prompt = "<bos> " + " ".join(tokenizer.convert_ids_to_tokens(sample_ids(1, 6)[0].tolist()))
    result = llm.attribute(TextTokenInput(prompt, tokenizer), target="positive")
    assert result.token_attr is not None and result.token_attr.shape[0] == 1
    assert torch.isfinite(result.seq_attr).all() and result.seq_attr.abs().sum() > 0
    # LLMGradientAttribution swapped the forward function; the rules still reach the model.
    assert llm.attr_method.model is model
