r"""
The faithfulness metrics of one explained row, with :mod:`captum_gim.metrics`.

The perturbed score is the explained score itself: the teacher-forced sum of the
target tokens' logits (or log-probabilities) for ``"generate"``, the label's for
``"classify"``, the cosine similarity with the query for ``"similarity"``. Prompt
tokens are replaced by the baseline token in the order of the row's summed
attributions; the first and last prompt tokens are never replaced. The values are
the areas over the perturbation curve (raw drops of the score).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from captum_gim import metrics
from captum_gim.datasets.compute import Explained
from captum_gim.forwards import classifier_forward, input_device, similarity_forward

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["METRICS", "baseline_token", "row_metrics"]

#: The metrics a run can add.
METRICS = ("comprehensiveness", "sufficiency")


def baseline_token(tokenizer: PreTrainedTokenizerBase, token: str | None = None) -> int:
    r"""
    The id of the token that replaces removed tokens: ``token`` if given, else the
    tokenizer's mask token, else its pad token, else its unknown token.

    Raises:
        ValueError: When ``token`` is not one token of the vocabulary, or the
                    tokenizer has none of these tokens.
    """
    if token is not None:
        found = tokenizer.convert_tokens_to_ids(token)
        unknown = found == tokenizer.unk_token_id and token != tokenizer.unk_token
        if not isinstance(found, int) or unknown:
            raise ValueError(
                f"the baseline token {token!r} is not in the vocabulary; name one token of it"
            )
        return found
    for name in ("mask_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ValueError("the tokenizer has no mask, pad or unknown token; name a baseline token")


def row_metrics(
    model: PreTrainedModel,
    explained: Explained,
    names: Sequence[str],
    baseline_id: int,
    score: str,
) -> dict[str, float]:
    r"""
    Args:
        model (PreTrainedModel): The model.
        explained (Explained): One explained row.
        names (Sequence[str]): Metrics of :data:`METRICS`.
        baseline_id (int): The replacing token.
        score (str): ``"logit"`` or ``"log-prob"``.

    Returns:
        *dict[str, float]*: The AOPC of each metric; ``nan`` for a prompt of fewer
        than three tokens (nothing to replace).
    """
    encoded, explanation = explained.encoded, explained.explanation
    device = input_device(model)
    prompt = encoded.prompt_ids
    if len(prompt) < 3:
        return {name: math.nan for name in names}
    target_ids = explanation.target_ids
    log_probs = score == "log-prob"
    forward: Callable[..., Tensor]
    if explanation.task == "generate":
        ids = prompt + target_ids[:-1]
        positions = torch.arange(len(target_ids), device=device) + len(prompt) - 1
        wanted = torch.tensor(target_ids, device=device)

        def forward(input_ids: Tensor) -> Tensor:
            logits = model(input_ids).logits
            scores = torch.log_softmax(logits, -1) if log_probs else logits
            return scores[:, positions, wanted].sum(-1)

        target = None
    elif explanation.task == "classify":
        ids, forward, target = prompt, classifier_forward(model, score=score), target_ids[0]
    else:
        query = torch.tensor([encoded.query_ids], device=device)
        ids, forward, target = prompt, similarity_forward(model, query), None
    inputs = torch.tensor([ids], device=device)
    attributions = torch.zeros(1, len(ids))
    attributions[0, : len(prompt)] = explanation.scores
    replaceable = torch.zeros(1, len(ids), dtype=torch.bool, device=device)
    replaceable[0, 1 : len(prompt) - 1] = True
    result = {}
    for name in names:
        metric = metrics.comprehensiveness if name == "comprehensiveness" else metrics.sufficiency
        value = metric(
            forward,
            inputs,
            attributions.to(device),
            baseline_id,
            target=target,
            replaceable_mask=replaceable,
            protect_ends=False,
        )
        result[name] = float(value.aopc[0])
    return result
