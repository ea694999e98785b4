"""Baselines of token attributions (captum_gim.baselines): what each name resolves to, and
the errors for baselines a tokenizer cannot give."""

from __future__ import annotations

import pytest
import torch

from captum_gim.baselines import baseline_embeddings, resolve_baseline
from captum_gim.models import load_model


@pytest.fixture(scope="module")
def bundled():
    return load_model()


def test_names_tokens_and_ids_resolve_to_the_tokenizers_tokens(bundled) -> None:
    _, tokenizer = bundled
    assert resolve_baseline(tokenizer, None).token_id is None  # the default: zero
    assert resolve_baseline(tokenizer, "zero").describe() == "zero baseline"
    pad = resolve_baseline(tokenizer, "pad")
    assert pad.token_id == tokenizer.pad_token_id and pad.describe() == "pad baseline ('<pad>')"
    blank = tokenizer.convert_tokens_to_ids("<blank>")
    assert resolve_baseline(tokenizer, "<blank>").token_id == blank
    assert resolve_baseline(tokenizer, blank).token_id == blank


@pytest.mark.parametrize(
    ("baseline", "message"),
    [
        ("mask", "the tokenizer has no mask token; use 'zero'"),
        ("zebra crossing", "is not one token of the vocabulary"),
        (10**6, "out of range"),
    ],
)
def test_a_baseline_the_tokenizer_cannot_give_is_a_one_line_error(
    bundled, baseline: str | int, message: str
) -> None:
    _, tokenizer = bundled
    with pytest.raises(ValueError, match=message) as error:
        resolve_baseline(tokenizer, baseline)
    assert "\n" not in str(error.value)


def test_token_baselines_keep_the_special_tokens(bundled) -> None:
    model, tokenizer = bundled
    ids = tokenizer("the movie was great ?", return_tensors="pt").input_ids
    embedding = model.get_input_embeddings()
    base = baseline_embeddings(embedding, tokenizer, ids, resolve_baseline(tokenizer, "pad"))
    want = embedding(torch.tensor([[ids[0, 0]] + [tokenizer.pad_token_id] * (ids.shape[1] - 1)]))
    torch.testing.assert_close(base, want)
    zero = baseline_embeddings(embedding, tokenizer, ids, resolve_baseline(tokenizer, "zero"))
    assert not zero.any() and not base.requires_grad
