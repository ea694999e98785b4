"""inseq's "gim" attribution method (captum_gim.integrations.inseq) equals
GIMAttribution exactly, and with every rule off inseq's input_x_gradient.

inseq 0.7 pins typeguard<=2.13.3 and TransformerLens needs typeguard>=4.2, so
they cannot share an environment: CI runs this file in a second virtual
environment (.ci/run).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from captum_gim import GIMAttribution, GIMConfig

inseq = pytest.importorskip(
    "inseq",
    reason="inseq is not installed (it pins typeguard<=2.13.3, which TransformerLens cannot "
    "use, so .ci/run tests it in a second virtual environment)",
)
import captum_gim.integrations.inseq  # noqa: E402, F401  (registers "gim")

TEXT = "the movie was great"


@pytest.fixture(scope="module")
def setup():
    from captum_gim.models import load_model

    _, tokenizer = load_model()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def attribute(setup, method: str, **settings) -> torch.Tensor:
    model, tokenizer = setup
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = inseq.load_model(model, method, tokenizer=tokenizer, **settings)
        out = wrapped.attribute(
            TEXT, generated_texts=f"{TEXT} positive", attributed_fn="logit", show_progress=False
        )
    prompt_length = len(tokenizer(TEXT).input_ids)
    return out.sequence_attributions[0].target_attributions[:prompt_length, 0]


def test_gim_is_an_inseq_method() -> None:
    assert "gim" in inseq.list_feature_attribution_methods()


def test_inseq_gim_equals_gim_attribution(setup) -> None:
    model, tokenizer = setup
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    x = model.get_input_embeddings()(ids).detach()
    answer = tokenizer.convert_tokens_to_ids("positive")
    forward = lambda e: model(inputs_embeds=e).logits[:, -1]  # noqa: E731
    for settings in ({}, {"temperature": 3.0, "v_scale": 0.2, "gate_scale": 0.3}):
        want = GIMAttribution(forward, model, **settings).attribute(x, target=answer)[0]
        assert torch.equal(attribute(setup, "gim", **settings), want)


def test_inseq_gim_with_every_rule_off_is_input_x_gradient(setup) -> None:
    off = attribute(setup, "gim", config=GIMConfig.all_rules_off())
    assert torch.equal(off, attribute(setup, "input_x_gradient"))


def test_readme_inseq_example_runs() -> None:
    from test_readme import README, compile_block

    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    namespace: dict = {}
    exec(compile_block(blocks[0], 0), namespace)  # the quick start: model, tokenizer
    number = next(i for i, block in enumerate(blocks) if block.startswith("# needs: inseq"))
    exec(compile_block(blocks[number], number), namespace)
    assert namespace["explained"].sequence_attributions[0].target_attributions.isfinite().any()


@pytest.mark.slow
def test_importing_captum_gim_after_inseq_registers_gim() -> None:
    import subprocess
    import sys

    code = "import inseq, captum_gim; assert 'gim' in inseq.list_feature_attribution_methods()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
