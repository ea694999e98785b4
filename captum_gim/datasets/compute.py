r"""
GIM attributions of a batch of rows, each equal to :func:`captum_gim.explain.explain`
of that row alone.

Rows are encoded as the command line encodes them (the prompt with the tokenizer's
special tokens, a continuation without), checked as :func:`~captum_gim.explain.explain`
checks them, padded on the right with an attention mask (every real token keeps the
position it has alone; a causal model's real tokens never see the padding), and
explained in one pass per batch:

* ``"generate"``: :meth:`LLMGIMAttribution.batch_token_attributions`, one forward
  pass and one backward pass per target position;
* ``"classify"`` and ``"similarity"``: :class:`~captum_gim.LayerGIM` on the token
  embeddings with the attention mask, the token ids passed to the model (so a
  decoder classifier finds each row's last real token).

The baseline is that of :func:`~captum_gim.explain.explain` (zero embeddings by
default, or a token at every position but the special ones; see
:mod:`captum_gim.baselines`), built for each row from its own ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_gim.attr.layer_gim import LayerGIM
from captum_gim.attr.llm import LLMGIMAttribution
from captum_gim.attr.targets import TargetError, check_text_target
from captum_gim.baselines import TokenBaseline, baseline_embeddings
from captum_gim.config import GIMConfig
from captum_gim.datasets.reading import Row
from captum_gim.explain import Explanation, _check_length, _check_target_ids
from captum_gim.forwards import (
    classifier_forward,
    input_device,
    label_index,
    logits_forward,
    mean_pool,
    sentence_embedding,
)
from captum_gim.text import encode_text, readable_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["Encoded", "Explained", "encode", "explain_batch"]


@dataclass(frozen=True)
class Encoded:
    r"""
    A row as token ids, checked.

    Attributes:
        row (Row): The row.
        prompt_ids (list[int]): The prompt's token ids.
        target (list[int], int or None): The continuation's ids (``"generate"``), the
                    label index (``"classify"``), or None for the model's prediction.
        query_ids (list[int] or None): The query's ids (``"similarity"``).
    """

    row: Row
    prompt_ids: list[int]
    target: list[int] | int | None
    query_ids: list[int] | None

    @property
    def length(self) -> int:
        """Tokens in the forward pass (prompt and teacher-forced target)."""
        extra = len(self.target) - 1 if isinstance(self.target, list) else 0
        return len(self.prompt_ids) + extra


@dataclass(frozen=True)
class Explained:
    r"""
    One row's result: the explanation, and the explained score itself.

    Attributes:
        encoded (Encoded): The row.
        explanation (Explanation): As :func:`~captum_gim.explain.explain` returns it.
        value (float): The explained score: the sum of the target tokens' logits or
                    log-probabilities, the label's, or the cosine similarity.
    """

    encoded: Encoded
    explanation: Explanation
    value: float


def encode(
    row: Row, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, task: str
) -> Encoded:
    r"""
    Encodes and checks one row.

    Raises:
        ValueError: With one line, for a row without prompt, a target word the
                    tokenizer does not know, an unknown label, a missing query, or a
                    prompt longer than the model reads.
    """
    if row.prompt is None:
        raise ValueError("the row has no prompt; fill in its prompt column")
    prompt_ids = encode_text(tokenizer, row.prompt, "the prompt")
    target: list[int] | int | None = None
    query_ids = None
    if task == "generate" and row.target is not None:
        if isinstance(row.target, list):
            target = [int(t) for t in row.target]
            _check_target_ids(tokenizer, target)
        else:
            try:
                target = check_text_target(tokenizer, str(row.target))
            except TargetError as error:  # one line, as the command line prints it
                raise ValueError(str(error).rstrip(".")) from error
    elif task == "classify" and row.target is not None:
        target = label_index(model, row.target)
    elif task == "similarity":
        if row.target is not None:
            raise ValueError(
                "a similarity has no target; put the text to compare in the query column"
            )
        if row.query is None:
            raise ValueError("the row has no query; fill in its query column")
        query_ids = encode_text(tokenizer, row.query, "the query")
    encoded = Encoded(row, prompt_ids, target, query_ids)
    # a missing continuation is one predicted token: as long as the prompt
    _check_length(model, encoded.length)
    return encoded


def explain_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: Sequence[Encoded],
    *,
    task: str,
    score: str,
    config: GIMConfig,
    baseline: TokenBaseline | None = None,
) -> list[Explained]:
    r"""
    GIM attributions of every row of a batch, each equal to ``explain()`` of it alone.

    Args:
        model (PreTrainedModel): The model, in eval mode.
        tokenizer (PreTrainedTokenizerBase): Its tokenizer.
        batch (Sequence[Encoded]): Encoded rows.
        task (str): ``"generate"``, ``"classify"`` or ``"similarity"``.
        score (str): ``"logit"`` or ``"log-prob"``.
        config (GIMConfig): The GIM settings.
        baseline (TokenBaseline, optional): The baseline, as
                    :func:`~captum_gim.baselines.resolve_baseline` returns it; None
                    is the zero baseline.
                    Default: None

    Returns:
        *list[Explained]*: One result per row, in order.
    """
    baseline = TokenBaseline("zero", None) if baseline is None else baseline
    if task == "generate":
        return _generate(model, tokenizer, batch, score, config, baseline)
    return _pooled(model, tokenizer, batch, task, score, config, baseline)


def pad_right(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    r"""
    Returns:
        *tuple[Tensor, Tensor or None]*: The ids padded on the right and the attention
        mask (None when no row is padded).
    """
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[b, : len(row)] = 1
    return ids, (mask if bool((mask == 0).any()) else None)


def pad_id(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads: the model's ``pad_token_id``, else the tokenizer's, else 0."""
    for candidate in (getattr(model.config, "pad_token_id", None), tokenizer.pad_token_id):
        if isinstance(candidate, int):
            return candidate
    return 0


def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: Sequence[Encoded],
    score: str,
    config: GIMConfig,
    baseline: TokenBaseline,
) -> list[Explained]:
    device = input_device(model)
    pad = pad_id(model, tokenizer)
    missing = [i for i, e in enumerate(batch) if e.target is None]
    predicted: dict[int, int] = {}
    if missing:
        ids, mask = pad_right([batch[i].prompt_ids for i in missing], pad, device)
        with torch.no_grad():
            best = logits_forward(model)(ids, mask).argmax(dim=-1).tolist()
        predicted = dict(zip(missing, best))
    targets = [
        e.target if isinstance(e.target, list) else [predicted[i]] for i, e in enumerate(batch)
    ]
    prompts = [torch.tensor(e.prompt_ids, device=device) for e in batch]
    bases = None
    if baseline.token_id is not None:  # zero embeddings are the default
        embedding = model.get_input_embeddings()
        bases = [baseline_embeddings(embedding, tokenizer, p[None], baseline)[0] for p in prompts]
    gim = LLMGIMAttribution(model, tokenizer, config=config, score=score)
    attributions, values = gim.batch_token_attributions(
        prompts,
        [torch.tensor(t, device=device) for t in targets],
        pad_token_id=pad,
        baselines=bases,
    )
    results = []
    for e, target_ids, rows, value in zip(batch, targets, attributions, values):
        explanation = Explanation(
            task="generate",
            prompt_tokens=readable_tokens(tokenizer, e.prompt_ids),
            target_tokens=readable_tokens(tokenizer, target_ids),
            target_ids=list(target_ids),
            target_text=str(tokenizer.decode(target_ids)),
            token_scores=rows.detach().float().cpu(),
            score=score,
            config=config,
            baseline=baseline.describe(),
        )
        results.append(Explained(e, explanation, float(value.sum())))
    return results


def pair_similarity_forward(model: PreTrainedModel, queries: Tensor) -> Callable[..., Tensor]:
    r"""
    Like :func:`~captum_gim.forwards.similarity_forward`, with one query embedding
    per row (``batch x hidden``).
    """

    def forward(inputs: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        hidden = model(input_ids=inputs, attention_mask=attention_mask).last_hidden_state
        sentence = mean_pool(hidden, attention_mask)
        return F.cosine_similarity(sentence, queries.to(sentence.dtype), dim=-1)

    return forward


def _pooled(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: Sequence[Encoded],
    task: str,
    score: str,
    config: GIMConfig,
    baseline: TokenBaseline,
) -> list[Explained]:
    device = input_device(model)
    ids, mask = pad_right([e.prompt_ids for e in batch], pad_id(model, tokenizer), device)
    forward: Callable[..., Tensor]
    if task == "classify":
        forward = classifier_forward(model, score=score)
    else:
        queries = torch.cat(
            [sentence_embedding(model, torch.tensor([e.query_ids], device=device)) for e in batch]
        )
        forward = pair_similarity_forward(model, queries)
    with torch.no_grad():
        outputs = forward(ids, mask)
    target: Any = None
    labels: list[int] = []
    if task == "classify":
        labels = [
            e.target if isinstance(e.target, int) else int(outputs[b].argmax())
            for b, e in enumerate(batch)
        ]
        target = labels
        values = outputs[torch.arange(len(batch)), torch.tensor(labels)].tolist()
    else:
        values = outputs.tolist()
    embedding = model.get_input_embeddings()
    base = None  # zero embeddings; a token baseline keeps the special tokens (padding too)
    if baseline.token_id is not None:
        base = baseline_embeddings(embedding, tokenizer, ids, baseline)
    gim = LayerGIM(forward, embedding, model, config=config)
    scores = gim.attribute(
        ids, target=target, additional_forward_args=(mask,), layer_baselines=base
    ).sum(-1)
    results = []
    id2label = getattr(model.config, "id2label", {})
    for b, e in enumerate(batch):
        if task == "classify":
            name = str(id2label[labels[b]])
            what = ([name], [labels[b]], name, score)
        else:
            text = str(tokenizer.decode(e.query_ids or [], skip_special_tokens=True))
            what = (["similarity"], [], text, "cosine similarity")
        n = len(e.prompt_ids)
        explanation = Explanation(
            task=task,
            prompt_tokens=readable_tokens(tokenizer, e.prompt_ids),
            target_tokens=what[0],
            target_ids=what[1],
            target_text=what[2],
            token_scores=scores[b, :n].detach().float().cpu()[None],
            score=what[3],
            config=config,
            baseline=baseline.describe(),
        )
        results.append(Explained(e, explanation, float(values[b])))
    return results
