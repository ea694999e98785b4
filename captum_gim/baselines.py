r"""
Baselines of token attributions: what a prompt token is compared with.

GIM, like Captum's ``InputXGradient``, multiplies the (GIM) gradient by
``input - baseline``, here at the token embeddings. The baseline decides what a score
means: a token's score is its share of the difference between the explained value at the
prompt and at the baseline prompt, so a positive score says the token raises the value
compared with the baseline token in its place, a negative one that it lowers it.

* ``"zero"``: zero embeddings at every position (``InputXGradient``'s and the GIM
  paper's choice). Zero is not a token the model ever saw, so on encoders a word can
  get a negative score although deleting it lowers the value (all-MiniLM-L6-v2,
  ``"A man plays guitar."`` / ``"Someone makes music."``: "guitar" gets -0.064, and
  -0.059 with ``"mask"``: one gradient is a linear reading of a cosine that is far from
  linear between the baseline and the prompt).
* ``"mask"``: the tokenizer's mask token (``[MASK]``) at every prompt position but the
  special tokens (``[CLS]``, ``[SEP]``, ``<bos>``), which keep their own embeddings.
* ``"pad"``: the tokenizer's pad token, in the same way.
* any other text: that token of the vocabulary (e.g. ``"[UNK]"`` or ``"<blank>"``), in
  the same way; an ``int`` is a token id.

:data:`DEFAULT_BASELINES` gives each task's default: ``"zero"`` for every task.
``benchmarks/RESULTS.md`` (section "Baselines of GIM") measured GIM with each baseline on
the bundled model (answer logit) and on all-MiniLM-L6-v2 (cosine similarity): no token
baseline was more faithful than zero by more than one standard error, so the default is
the GIM paper's and ``InputXGradient``'s, under which GIM with every rule off equals
``InputXGradient``. Choose another one to ask "compared with an unknown word" (``"mask"``)
or with any token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BASELINES",
    "DEFAULT_BASELINES",
    "TokenBaseline",
    "baseline_embeddings",
    "resolve_baseline",
]

#: The named baselines (any other text is a token of the vocabulary).
BASELINES = ("zero", "mask", "pad")

#: The default baseline of each task (see ``benchmarks/RESULTS.md``, "Baselines of GIM").
DEFAULT_BASELINES = {"generate": "zero", "classify": "zero", "similarity": "zero"}


@dataclass(frozen=True)
class TokenBaseline:
    r"""
    A resolved baseline.

    Attributes:
        name (str): ``"zero"``, ``"mask"``, ``"pad"`` or the token given.
        token_id (int or None): The baseline token's id; None for zero embeddings.
        token (str or None): The baseline token as the tokenizer spells it.
        note (str): Why a default was changed (e.g. no mask token), or ``""``.
    """

    name: str
    token_id: int | None
    token: str | None = None
    note: str = ""

    def describe(self) -> str:
        r"""
        Returns:
            *str*: e.g. ``"zero baseline"`` or ``"mask baseline ('[MASK]')"``.
        """
        if self.token_id is None:
            text = "zero baseline"
        elif self.name in BASELINES:
            text = f"{self.name} baseline ({self.token!r})"
        else:
            text = f"baseline token {self.token!r}"
        return f"{text}; {self.note}" if self.note else text


def resolve_baseline(
    tokenizer: Any, baseline: str | int | None, task: str = "generate"
) -> TokenBaseline:
    r"""
    The baseline named by ``baseline`` for ``tokenizer``.

    Args:
        tokenizer: A transformers tokenizer.
        baseline (str, int or None): ``"zero"``, ``"mask"``, ``"pad"``, a token of the
                    vocabulary, a token id, or None for the task's default
                    (:data:`DEFAULT_BASELINES`).
        task (str, optional): The task, for the default.
                    Default: ``"generate"``

    Returns:
        *TokenBaseline*: The resolved baseline.

    Raises:
        ValueError: With one line saying what to pass instead, for a tokenizer without
                    the named special token or a text that is not one token.

    Examples::

        >>> from captum_gim.models import load_model
        >>> _, tokenizer = load_model()
        >>> resolve_baseline(tokenizer, "pad").describe()
        "pad baseline ('<pad>')"
    """
    default = baseline is None
    name = DEFAULT_BASELINES.get(task, "zero") if baseline is None else baseline
    if isinstance(name, bool) or not isinstance(name, (str, int)):
        raise TypeError(
            f"baseline must be 'zero', 'mask', 'pad', a token or a token id, got {name!r}."
        )
    if isinstance(name, int):
        size = len(tokenizer)
        if not 0 <= name < size:
            raise ValueError(f"baseline token id {name} is out of range [0, {size - 1}].")
        return TokenBaseline(str(name), name, str(tokenizer.convert_ids_to_tokens(name)))
    if name == "zero":
        return TokenBaseline("zero", None)
    if name in ("mask", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is None:
            if default:
                return TokenBaseline("zero", None, note=f"the tokenizer has no {name} token")
            raise ValueError(
                f"baseline {name!r}: the tokenizer has no {name} token; use 'zero' or a "
                "token of the vocabulary."
            )
        return TokenBaseline(name, int(token_id), getattr(tokenizer, f"{name}_token"))
    return TokenBaseline(name, _one_token(tokenizer, name), name)


def _one_token(tokenizer: Any, text: str) -> int:
    vocabulary = tokenizer.get_vocab()
    if text in vocabulary:
        return int(vocabulary[text])
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) == 1 and ids[0] != unk:
        return int(ids[0])
    raise ValueError(
        f"baseline {text!r} is not one token of the vocabulary (it tokenizes to "
        f"{len(ids)} token(s)); use zero, mask, pad or a single token such as "
        f"{tokenizer.unk_token or tokenizer.pad_token!r}."
    )


def baseline_ids(tokenizer: Any, ids: Tensor, baseline: TokenBaseline) -> Tensor:
    r"""
    Returns:
        *Tensor*: ``ids`` with every token but the special ones replaced by the
        baseline token (the baseline must have a token).
    """
    if baseline.token_id is None:
        raise ValueError("the zero baseline has no token ids.")
    special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", ()))), dtype=ids.dtype)
    keep = torch.isin(ids, special.to(ids.device))
    return torch.where(keep, ids, torch.full_like(ids, baseline.token_id))


def baseline_embeddings(
    embedding: nn.Module, tokenizer: Any, ids: Tensor, baseline: TokenBaseline
) -> Tensor:
    r"""
    The input embeddings of the baseline prompt.

    Args:
        embedding (nn.Module): The model's input embeddings
                    (``model.get_input_embeddings()``).
        tokenizer: The tokenizer (its special tokens are kept).
        ids (Tensor): The prompt's token ids, ``batch x tokens``.
        baseline (TokenBaseline): The baseline.

    Returns:
        *Tensor*: ``batch x tokens x hidden``, without gradient: zeros for the zero
        baseline, else the embeddings of :func:`baseline_ids`.
    """
    with torch.no_grad():
        if baseline.token_id is None:
            return torch.zeros_like(embedding(ids))
        return embedding(baseline_ids(tokenizer, ids, baseline))
