"""End-to-end workflows: GIM inside Captum's LLM, batching, targets, metrics and visualization."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from captum.attr import (
    LLMAttributionResult,
    LLMGradientAttribution,
    NoiseTunnel,
    TextTokenInput,
)
from captum.attr import visualization as captum_viz
from captum.metrics import infidelity, sensitivity_max
from matplotlib.figure import Figure
from tiny_models import sample_ids, shared_model

from captum_gim import GIMAttribution, LayerGIM
from captum_gim.compare import logits_forward

TARGET = 5
OTHER = 9
PAD = 0


def _embeds(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.get_input_embeddings()(ids).detach()


def _gim(model: torch.nn.Module, forward, ids: torch.Tensor, target=None) -> torch.Tensor:
    """Token scores of GIM on the embeddings of ``ids``."""
    return GIMAttribution(forward, model).attribute(_embeds(model, ids), target=target).sum(-1)


# --------------------------------------------------------------------------- LLM attribution


def _log_prob_scores(model, tokenizer, ids: list[int], target: int) -> torch.Tensor:
    """What LLMGradientAttribution computes for one target token: GIM of its log-prob."""

    def log_prob(input_ids: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model(input_ids).logits[:, -1], dim=-1)

    gim = LayerGIM(log_prob, model.get_input_embeddings(), model)
    return gim.attribute(torch.tensor([ids]), target=target).sum(-1)[0]


def test_llm_gradient_attribution_with_layer_gim_skip_tokens_chat_template_and_plots(
    bundled,
) -> None:
    model, tokenizer = bundled
    llm = LLMGradientAttribution(LayerGIM(model, model.get_input_embeddings()), tokenizer)
    prompt = "the movie was charming ?"
    result = llm.attribute(
        TextTokenInput(prompt, tokenizer, skip_tokens=["<bos>"]), target="positive and happy"
    )
    assert isinstance(result, LLMAttributionResult)
    assert result.input_tokens == prompt.split()
    assert result.output_tokens == ["positive", "and", "happy"]
    assert result.token_attr.shape == (3, 5)
    torch.testing.assert_close(result.seq_attr, result.token_attr.sum(0))
    ids = tokenizer(prompt).input_ids
    first = _log_prob_scores(model, tokenizer, ids, tokenizer.convert_tokens_to_ids("positive"))
    torch.testing.assert_close(result.token_attr[0], first[1:], atol=1e-5, rtol=1e-4)

    token_figure, _ = result.plot_token_attr(show=False)
    seq_figure, _ = result.plot_seq_attr(show=False)
    assert isinstance(token_figure, Figure) and isinstance(seq_figure, Figure)
    token_figure.canvas.draw()
    seq_figure.canvas.draw()

    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)  # leave the fixture's
    tokenizer.chat_template = (
        "{% for message in messages %}<blank> {{ message['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}?{% endif %}"
    )
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the movie was charming"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    llm = LLMGradientAttribution(LayerGIM(model, model.get_input_embeddings()), tokenizer)
    chat_result = llm.attribute(
        TextTokenInput(chat, tokenizer, skip_tokens=["<bos>", "<blank>"]), target="positive"
    )
    assert chat_result.input_tokens == prompt.split()
    chat_ids = tokenizer(chat).input_ids
    want = _log_prob_scores(model, tokenizer, chat_ids, tokenizer.convert_tokens_to_ids("positive"))
    torch.testing.assert_close(chat_result.token_attr[0], want[2:], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- batches


def _padded_batch(side: str) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Two examples of lengths 7 and 4, padded on ``side``, with their attention mask."""
    examples = [sample_ids(1, 7, seed=1)[0], sample_ids(1, 4, seed=2)[0]]
    rows, masks = [], []
    for ids in examples:
        pad = torch.full((7 - len(ids),), PAD)
        real, none = torch.ones_like(ids), torch.zeros_like(pad)
        rows.append(torch.cat([pad, ids] if side == "left" else [ids, pad]))
        masks.append(torch.cat([none, real] if side == "left" else [real, none]))
    return torch.stack(rows), torch.stack(masks), examples


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method", ["GIMAttribution", "LayerGIM"])
def test_padded_batch_equals_each_example_alone_and_padding_gets_zero(
    method: str, side: str, implementation: str
) -> None:
    llama = shared_model("llama", implementation)
    forward = logits_forward(llama)  # reads each row at its last non-padding token

    def token_scores(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if method == "GIMAttribution":
            gim = GIMAttribution(forward, llama)
            inputs = _embeds(llama, ids)
        else:
            gim = LayerGIM(forward, llama.get_input_embeddings(), llama)
            inputs = ids
        return gim.attribute(inputs, target=TARGET, additional_forward_args=(mask,)).sum(-1)

    ids, mask, examples = _padded_batch(side)
    batch = token_scores(ids, mask)
    for row, example in enumerate(examples):
        alone = token_scores(example[None], torch.ones_like(example)[None])[0]
        real = mask[row].bool()
        torch.testing.assert_close(batch[row][real], alone, atol=1e-5, rtol=1e-4)
        assert torch.count_nonzero(batch[row][~real]) == 0


# --------------------------------------------------------------------------- targets


def test_target_token_id_at_the_last_position(llama: torch.nn.Module) -> None:
    ids = sample_ids(2, 6)
    by_index = _gim(llama, logits_forward(llama), ids, target=TARGET)
    by_scalar = _gim(llama, lambda e: llama(inputs_embeds=e).logits[:, -1, TARGET], ids)
    torch.testing.assert_close(by_index, by_scalar)
    assert by_index.shape == (2, 6)


def test_target_token_at_any_position_ignores_later_tokens(llama: torch.nn.Module) -> None:
    ids = sample_ids(1, 8)
    position = 3
    scores = _gim(llama, logits_forward(llama, position=position), ids, target=TARGET)
    assert torch.count_nonzero(scores[0, position + 1 :]) == 0
    assert torch.count_nonzero(scores[0, : position + 1]) == position + 1
    prefix = _gim(llama, logits_forward(llama), ids[:, : position + 1], target=TARGET)
    torch.testing.assert_close(scores[:, : position + 1], prefix, atol=1e-5, rtol=1e-4)


def test_log_probability_target_keeps_the_exact_log_softmax_gradient(
    llama: torch.nn.Module,
) -> None:
    """GIM(log p_t) = GIM(logit_t) - GIM(sum_v p_v logit_v), with p held constant."""
    ids = sample_ids(1, 6)
    log_prob = _gim(llama, logits_forward(llama, score="log-prob"), ids, target=TARGET)
    logit = _gim(llama, logits_forward(llama), ids, target=TARGET)
    with torch.no_grad():
        probs = torch.softmax(llama(ids).logits[:, -1], dim=-1)

    def expected_logit(embeds: torch.Tensor) -> torch.Tensor:
        return (llama(inputs_embeds=embeds).logits[:, -1] * probs).sum(-1)

    torch.testing.assert_close(
        log_prob, logit - _gim(llama, expected_logit, ids), atol=1e-5, rtol=1e-4
    )


def test_contrastive_target_is_the_difference_of_two_logit_attributions(
    llama: torch.nn.Module,
) -> None:
    ids = sample_ids(2, 6)

    def contrast(embeds: torch.Tensor) -> torch.Tensor:
        logits = llama(inputs_embeds=embeds).logits[:, -1]
        return logits[:, TARGET] - logits[:, OTHER]

    difference = _gim(llama, contrast, ids)
    each = [_gim(llama, logits_forward(llama), ids, target=t) for t in (TARGET, OTHER)]
    torch.testing.assert_close(difference, each[0] - each[1], atol=1e-5, rtol=1e-4)


def test_multi_token_continuation_sums_teacher_forced_log_probs(llama: torch.nn.Module) -> None:
    prompt, continuation = sample_ids(1, 5, seed=4), sample_ids(1, 3, seed=5)
    sequence = torch.cat([prompt, continuation], dim=1)
    n = prompt.shape[1]

    def continuation_log_prob(embeds: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(llama(inputs_embeds=embeds).logits, dim=-1)
        predicted = log_probs[:, n - 1 : -1]  # the positions that predict the continuation
        return predicted.gather(-1, continuation[..., None]).sum(dim=(1, 2))

    whole = _gim(llama, continuation_log_prob, sequence)[:, :n]
    by_token = sum(
        _gim(
            llama, logits_forward(llama, score="log-prob"), sequence[:, : n + k], target=int(token)
        )[:, :n]
        for k, token in enumerate(continuation[0])
    )
    torch.testing.assert_close(whole, by_token, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- Captum tools


def test_noise_tunnel_infidelity_and_sensitivity_run_on_gim(llama: torch.nn.Module) -> None:
    torch.manual_seed(0)
    forward = logits_forward(llama)
    gim = GIMAttribution(forward, llama)
    embeds = _embeds(llama, sample_ids(2, 6))

    smooth = NoiseTunnel(gim).attribute(
        embeds, nt_type="smoothgrad", nt_samples=4, stdevs=0.01, target=TARGET
    )
    plain = gim.attribute(embeds, target=TARGET)
    assert smooth.shape == plain.shape
    cosine = torch.nn.functional.cosine_similarity(smooth.flatten(), plain.flatten(), dim=0)
    assert cosine > 0.5  # small noise: smoothed GIM stays close to GIM

    def perturb(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noise = 0.01 * torch.randn_like(inputs)
        return noise, inputs - noise

    score = infidelity(forward, perturb, embeds, plain, target=TARGET, n_perturb_samples=4)
    assert score.shape == (2,)
    assert torch.isfinite(score).all() and (score >= 0).all()

    sensitivity = sensitivity_max(gim.attribute, embeds, target=TARGET, n_perturb_samples=3)
    assert sensitivity.shape == (2,)
    assert torch.isfinite(sensitivity).all() and (sensitivity >= 0).all()


def test_captum_visualize_text_renders_gim_attributions(bundled) -> None:
    pytest.importorskip("IPython")
    model, tokenizer = bundled
    ids = tokenizer("the movie was charming ?", return_tensors="pt").input_ids
    answer = tokenizer.convert_tokens_to_ids("positive")
    gim = LayerGIM(logits_forward(model), model.get_input_embeddings(), model)
    scores = gim.attribute(ids, target=answer).sum(-1)[0].detach()
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, -1], dim=-1)
    record = captum_viz.VisualizationDataRecord(
        word_attributions=scores / scores.abs().max(),
        pred_prob=float(probs.max()),
        pred_class=tokenizer.decode(int(probs.argmax())),
        true_class="positive",
        attr_class="positive",
        attr_score=float(scores.sum()),
        raw_input_ids=tokenizer.convert_ids_to_tokens(ids[0]),
        convergence_score=None,
    )
    html = captum_viz.visualize_text([record]).data
    for token in ("charming", "was", "positive"):
        assert token in html
