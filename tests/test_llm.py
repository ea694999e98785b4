"""LLMGIMAttribution: every target token from one batched pass equals the
token-by-token attributions."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
import torch
from captum.attr import LLMAttributionResult, LLMGradientAttribution, TextTokenInput
from transformers import LlamaConfig, LlamaForCausalLM

from captum_gim import LayerGIM, LLMGIMAttribution
from captum_gim.models import load_model

PROMPT = "the movie was good but the ending was bad ?"
TARGET = "positive negative neutral great"


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float((a - b).norm())


@pytest.fixture(scope="module")
def bundled():
    return load_model()


@pytest.fixture(scope="module")
def tiny_gqa(bundled):
    _, tokenizer = bundled
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval(), tokenizer


def _captum_token_by_token(model, tokenizer, inp, target) -> LLMAttributionResult:
    """Captum's own loop: one forward and backward pass per target token."""
    layer_gim = LayerGIM(model, model.get_input_embeddings(), model)
    return LLMGradientAttribution(layer_gim, tokenizer).attribute(inp, target=target)


@pytest.mark.parametrize("which", ["bundled", "tiny_gqa"])
def test_one_pass_equals_captum_token_by_token(which, request):
    model, tokenizer = request.getfixturevalue(which)
    inp = TextTokenInput(PROMPT, tokenizer)
    result = LLMGIMAttribution(model, tokenizer, score="log-prob").attribute(inp, target=TARGET)
    reference = _captum_token_by_token(model, tokenizer, inp, TARGET)
    assert isinstance(result, LLMAttributionResult)
    assert result.token_attr.shape == reference.token_attr.shape == (4, len(inp.values))
    assert _relative(result.token_attr, reference.token_attr) <= 1e-5
    assert _relative(result.seq_attr, reference.seq_attr) <= 1e-5
    assert result.input_tokens == reference.input_tokens
    assert result.output_tokens == reference.output_tokens


def test_logit_score_equals_layer_gim_per_token(tiny_gqa):
    model, tokenizer = tiny_gqa
    inp = TextTokenInput(PROMPT, tokenizer)
    target = torch.tensor(tokenizer.encode(TARGET, add_special_tokens=False))
    result = LLMGIMAttribution(model, tokenizer).attribute(inp, target=target)  # logit: default
    prompt = inp.inp_tensor  # the token ids (to_tensor() is the binary mask)
    rows = []
    for k, token in enumerate(target.tolist()):
        ids = torch.cat([prompt, target[:k].unsqueeze(0)], dim=1)

        def last_logit(input_ids, token=token):
            return model(input_ids).logits[:, -1, token]

        attr = LayerGIM(last_logit, model.get_input_embeddings(), model).attribute(ids)
        rows.append(attr[0, : prompt.shape[1]].sum(-1).detach())
    assert _relative(result.token_attr, torch.stack(rows)) <= 1e-5


def test_settings_reach_the_rules(tiny_gqa):
    model, tokenizer = tiny_gqa
    inp = TextTokenInput(PROMPT, tokenizer)
    default = LLMGIMAttribution(model, tokenizer, score="log-prob").attribute(inp, target=TARGET)
    hot = LLMGIMAttribution(model, tokenizer, score="log-prob", freeze_norm=False).attribute(
        inp, target=TARGET
    )
    layer_gim = LayerGIM(model, model.get_input_embeddings(), model, freeze_norm=False)
    reference = LLMGradientAttribution(layer_gim, tokenizer).attribute(inp, target=TARGET)
    assert _relative(hot.token_attr, reference.token_attr) <= 1e-5
    assert _relative(hot.token_attr, default.token_attr) > 1e-3


def test_skip_tokens_drop_their_columns(bundled):
    model, tokenizer = bundled
    gim = LLMGIMAttribution(model, tokenizer)
    full = gim.attribute(TextTokenInput(PROMPT, tokenizer), target=TARGET)
    skipped = gim.attribute(TextTokenInput(PROMPT, tokenizer, skip_tokens=["<bos>"]), target=TARGET)
    assert skipped.input_tokens == full.input_tokens[1:]
    torch.testing.assert_close(skipped.token_attr, full.token_attr[:, 1:])


def test_several_prompts_give_one_result_each(bundled):
    model, tokenizer = bundled
    gim = LLMGIMAttribution(model, tokenizer)
    prompts = [TextTokenInput(PROMPT, tokenizer), TextTokenInput("a lovely film ?", tokenizer)]
    targets = [TARGET, "positive"]
    results = gim.attribute(prompts, target=targets)
    assert isinstance(results, list) and len(results) == 2
    for inp, target, result in zip(prompts, targets, results):
        alone = gim.attribute(inp, target=target)
        torch.testing.assert_close(result.token_attr, alone.token_attr)
    with pytest.raises(ValueError, match="one target per prompt"):
        gim.attribute(prompts, target=[TARGET])


def test_chat_template_prompt(bundled):
    model, tokenizer = bundled
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }} ?{% endfor %}"
        "{% if add_generation_prompt %} {% endif %}"
    )
    messages = [{"role": "user", "content": "the ending was bad"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inp = TextTokenInput(text, tokenizer)
    result = LLMGIMAttribution(model, tokenizer, score="log-prob").attribute(
        inp, target="negative neutral"
    )
    reference = _captum_token_by_token(model, tokenizer, inp, "negative neutral")
    assert result.input_tokens[-1] == "?"
    assert _relative(result.token_attr, reference.token_attr) <= 1e-5


def test_generated_target_and_plots(bundled):
    model, tokenizer = bundled
    inp = TextTokenInput(PROMPT, tokenizer)
    gen_args = {"max_new_tokens": 3, "do_sample": False}
    result = LLMGIMAttribution(model, tokenizer).attribute(inp, gen_args=gen_args)
    assert result.token_attr.shape == (3, len(inp.values))
    figure, _ = result.plot_token_attr()
    plt.close(figure)
    figure, _ = result.plot_seq_attr()
    plt.close(figure)


def test_bad_arguments_raise_one_line_errors(bundled):
    model, tokenizer = bundled
    with pytest.raises(ValueError, match="score must be 'logit' or 'log-prob'"):
        LLMGIMAttribution(model, tokenizer, score="prob")
    gim = LLMGIMAttribution(model, tokenizer)
    with pytest.raises(TypeError, match="TextTokenInput"):
        gim.attribute(PROMPT, target=TARGET)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unsupported arguments"):
        gim.attribute(TextTokenInput(PROMPT, tokenizer), target=TARGET, n_steps=5)
    with pytest.raises(ValueError, match="empty"):
        gim.attribute(TextTokenInput(PROMPT, tokenizer), target=torch.tensor([], dtype=torch.long))


def test_long_target_under_eager_attention_equals_token_by_token(tiny_gqa):
    model, tokenizer = tiny_gqa
    eager = type(model)._from_config(model.config, attn_implementation="eager").eval()
    eager.load_state_dict(model.state_dict())
    inp = TextTokenInput(PROMPT, tokenizer)
    target = " ".join([TARGET] * 3)  # 12 target tokens
    result = LLMGIMAttribution(eager, tokenizer, score="log-prob").attribute(inp, target=target)
    reference = _captum_token_by_token(eager, tokenizer, inp, target)
    assert result.token_attr.shape[0] == 12
    assert _relative(result.token_attr, reference.token_attr) <= 1e-5


def test_token_attributions_from_ids_equal_attribute(bundled):
    model, tokenizer = bundled
    gim = LLMGIMAttribution(model, tokenizer)
    inp = TextTokenInput(PROMPT, tokenizer)
    target = torch.tensor(tokenizer.encode(TARGET, add_special_tokens=False))
    result = gim.attribute(inp, target=target)
    seen: list[int] = []

    def progress(steps: range):
        for step in steps:
            seen.append(step)
            yield step

    matrix = gim.token_attributions(inp.inp_tensor, target, progress=progress)
    torch.testing.assert_close(matrix, result.token_attr)
    assert seen == list(range(len(target)))


def test_old_score_spelling_still_works_with_a_deprecation_warning(bundled):
    model, tokenizer = bundled
    inp = TextTokenInput(PROMPT, tokenizer)
    with pytest.warns(DeprecationWarning, match="score='log_prob' is deprecated.*'log-prob'"):
        old = LLMGIMAttribution(model, tokenizer, score="log_prob")
    new = LLMGIMAttribution(model, tokenizer, score="log-prob")
    assert old.score == new.score == "log-prob"
    torch.testing.assert_close(
        old.attribute(inp, target=TARGET).token_attr, new.attribute(inp, target=TARGET).token_attr
    )
    assert LLMGIMAttribution(model, tokenizer).score == "logit"  # the default, as everywhere


def test_unknown_target_word_is_a_one_line_error_naming_it(bundled):
    from captum_gim.attr.targets import TargetError

    model, tokenizer = bundled
    gim = LLMGIMAttribution(model, tokenizer)
    inp = TextTokenInput(PROMPT, tokenizer)
    for call in (
        gim.attribute,
        LLMGIMAttribution(model, tokenizer, score="log-prob").attribute_token_by_token,
    ):
        with pytest.raises(TargetError) as raised:
            call(inp, target="positive Paris")
        message = str(raised.value)
        assert "'Paris' would be <unk>" in message and "\n" not in message
        assert isinstance(raised.value, ValueError) and isinstance(raised.value, AssertionError)


def test_baseline_embeddings_shift_every_row_by_the_baseline_term(bundled):
    model, tokenizer = bundled
    gim = LLMGIMAttribution(model, tokenizer)
    prompt = torch.tensor([tokenizer(PROMPT).input_ids])
    target = torch.tensor(tokenizer.encode(TARGET, add_special_tokens=False))
    base = model.get_input_embeddings()(torch.full_like(prompt, tokenizer.pad_token_id)).detach()
    with_base = gim.token_attributions(prompt, target, baselines=base)
    rows = []
    for k, token in enumerate(target.tolist()):
        ids = torch.cat([prompt, target[:k].unsqueeze(0)], dim=1)
        embeds = model.get_input_embeddings()(ids).detach()
        baselines = embeds.clone()
        baselines[:, : prompt.shape[1]] = base

        def logit(e, token=token):
            return model(inputs_embeds=e).logits[:, -1, token]

        from captum_gim import GIMAttribution

        attr = GIMAttribution(logit, model).attribute(embeds, baselines=baselines)
        rows.append(attr[0, : prompt.shape[1]].sum(-1).detach())
    assert _relative(with_base, torch.stack(rows)) <= 1e-5


def test_a_padded_batch_of_prompts_equals_each_prompt_alone_with_its_baseline(bundled):
    model, tokenizer = bundled
    gim = LLMGIMAttribution(model, tokenizer, score="logit")
    texts = ["the good movie ?", "a bad and awful film that was dull ?", "ok ?"]
    prompts = [torch.tensor(tokenizer(t).input_ids) for t in texts]
    targets = [
        torch.tensor(tokenizer(t, add_special_tokens=False).input_ids)
        for t in ["positive", "negative neutral", "positive negative positive"]
    ]
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        blanks = [embedding(torch.full_like(p, 5)) for p in prompts]
    for baselines in (None, blanks):
        batch, values = gim.batch_token_attributions(prompts, targets, baselines=baselines)
        for k, (prompt, target) in enumerate(zip(prompts, targets)):
            base = None if baselines is None else baselines[k][None]
            alone = gim.token_attributions(prompt[None], target, baselines=base)
            torch.testing.assert_close(batch[k], alone, atol=1e-5, rtol=1e-4)
            with torch.no_grad():
                ids = torch.cat([prompt, target[:-1]])[None]
                logits = model(ids).logits[0, len(prompt) - 1 :]
            torch.testing.assert_close(values[k], logits[torch.arange(len(target)), target])
    with pytest.raises(ValueError, match="baselines has shape"):
        gim.token_attributions(prompts[0][None], targets[0], baselines=blanks[1][None])
