"""The word-level tokenizer and two-layer Llama that the circuit models are trained from
(``train_induction_model.py``, ``train_circuit_models.py``)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from tokenizers.processors import TemplateProcessing
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def word_tokenizer(vocab: dict[str, int]) -> PreTrainedTokenizerFast:
    r"""
    Whitespace word-level tokenizer that prepends ``<bos>`` and pads on the left.

    Args:
        vocab (dict[str, int]): Word to id, with ``<bos>``, ``<pad>`` and ``<unk>``.

    Returns:
        PreTrainedTokenizerFast: The tokenizer.
    """
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.post_processor = TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=64,
    )


def two_layer_llama(vocab: dict[str, int], seed: int, heads: int = 4) -> LlamaForCausalLM:
    r"""
    A freshly initialised two-layer Llama (64 wide, ``heads`` heads, no grouping).

    Args:
        vocab (dict[str, int]): The tokenizer's vocabulary.
        seed (int): Seed of the initial weights.
        heads (int, optional): Attention heads. Default: 4

    Returns:
        LlamaForCausalLM: The model.
    """
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=vocab["<bos>"],
        pad_token_id=vocab["<pad>"],
        eos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
