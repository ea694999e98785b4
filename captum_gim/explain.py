r"""
:func:`explain`: GIM token attributions of one text for one of three tasks, as the
command line shows them.

* ``"generate"``: a causal LM's continuation, every target token from one
  teacher-forced forward pass, in :func:`explain_continuation`;
* ``"classify"``: a sequence classifier's label (a name or an index);
* ``"similarity"``: a sentence encoder's cosine similarity with a query text.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from captum_gim.attr.gim import GIMAttribution
from captum_gim.attr.llm import LLMGIMAttribution
from captum_gim.config import GIMConfig
from captum_gim.forwards import TASKS, label_index, task_forward
from captum_gim.text import readable_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["SCORES", "Explanation", "explain", "explain_continuation"]

#: What a generated or classified target's score is.
SCORES = ("logit", "log-prob")


@dataclass(frozen=True)
class Explanation:
    r"""
    GIM attributions of each target to the prompt tokens.

    Attributes:
        task (str): ``"generate"``, ``"classify"`` or ``"similarity"``.
        prompt_tokens (list[str]): The prompt's tokens, as text.
        target_tokens (list[str]): What each row explains: the target tokens, the
                    label name, or ``"similarity"``.
        target_ids (list[int]): The target token ids, or the label index (empty for
                    similarity).
        target_text (str): The target decoded to text, the label name, or the query.
        token_scores (Tensor): ``len(target_tokens) x len(prompt_tokens)``: the
                    attribution of each target's score to each prompt token.
        score (str): What was explained: ``"logit"``, ``"log-prob"`` or
                    ``"cosine similarity"``.
        config (GIMConfig): The GIM settings used.
    """

    task: str
    prompt_tokens: list[str]
    target_tokens: list[str]
    target_ids: list[int]
    target_text: str
    token_scores: Tensor
    score: str
    config: GIMConfig

    @property
    def scores(self) -> Tensor:
        r"""
        Returns:
            *Tensor*: The attribution of the whole target (the sum over target
            tokens) to each prompt token.
        """
        return self.token_scores.sum(dim=0)


def explain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[int],
    target: Sequence[int] | int | str | None = None,
    *,
    task: str = "generate",
    query_ids: Sequence[int] | None = None,
    score: str = "logit",
    config: GIMConfig | None = None,
) -> Explanation:
    r"""
    GIM attributions of a model's output for ``prompt_ids`` to the prompt tokens.

    For ``task="generate"`` the target is a continuation, explained one token at a time
    with teacher forcing: target token ``k`` is explained given the prompt and target
    tokens ``0 .. k-1``, and only the prompt tokens are attributed. For
    ``task="classify"`` it is a label (index or name of ``model.config.id2label``). For
    ``task="similarity"`` the explained score is the cosine similarity of the prompt's
    mean-pooled embedding with that of ``query_ids``.

    Args:
        model (PreTrainedModel): A causal LM (``"generate"``), a sequence classifier
                    (``"classify"``) or an encoder such as ``BertModel``
                    (``"similarity"``).
        tokenizer (PreTrainedTokenizerBase): Its tokenizer, for the token strings.
        prompt_ids (Sequence[int]): The prompt's token ids.
        target (Sequence[int], int, str or None, optional): The target token ids
                    (``"generate"``) or the label (``"classify"``); None explains the
                    greedy next token or the predicted label. Must be None for
                    ``"similarity"``.
                    Default: None
        task (str, optional): ``"generate"``, ``"classify"`` or ``"similarity"``.
                    Default: ``"generate"``
        query_ids (Sequence[int], optional): The query's token ids, for
                    ``"similarity"``.
                    Default: None
        score (str, optional): Explain the ``"logit"`` or the ``"log-prob"`` of each
                    target token or label (not used for ``"similarity"``).
                    Default: ``"logit"``
        config (GIMConfig, optional): The GIM settings; None means the defaults.
                    Default: None

    Returns:
        *Explanation*:
        - **explanation**: The tokens and a ``targets x prompt`` score matrix.

    Raises:
        ValueError: With one line naming the fix, for an empty prompt, a prompt longer
                    than the model's position limit, a target token the tokenizer does
                    not know, an unknown label, or a missing query.

    Examples::

        >>> from captum_gim.explain import explain
        >>> from captum_gim.models import load_model
        >>> model, tokenizer = load_model()
        >>> ids = tokenizer("the good movie ?").input_ids
        >>> explain(model, tokenizer, ids).scores.shape
        torch.Size([5])
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}.")
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise ValueError("the prompt has no tokens; give some text to explain.")
    device = next(model.parameters()).device
    prompt = torch.tensor([prompt_ids], device=device)
    config = GIMConfig() if config is None else config
    query = None if query_ids is None else torch.tensor([list(query_ids)], device=device)
    if task == "similarity" and target is not None:
        raise ValueError(
            "a similarity has no target; pass the query text's ids as query_ids instead."
        )
    forward = task_forward(model, task, log_probs=score == "log-prob", query_ids=query)
    gim = GIMAttribution(forward, model, config=config)
    prompt_tokens = readable_tokens(tokenizer, prompt_ids)
    if task == "similarity":
        _check_length(model, len(prompt_ids))
        rows = _prompt_scores(gim, model, prompt, None, prompt.shape[1])
        text = str(tokenizer.decode(list(query_ids or []), skip_special_tokens=True))
        score = "cosine similarity"
        return Explanation(task, prompt_tokens, ["similarity"], [], text, rows, score, config)
    if task == "classify":
        _check_length(model, len(prompt_ids))
        if target is None:
            with torch.no_grad():
                target = int(forward(prompt).argmax(dim=-1))
        if not isinstance(target, (int, str)):
            raise ValueError(f"a classifier's target is a label name or index, got {target!r}.")
        index = label_index(model, target)
        name = str(getattr(model.config, "id2label", {})[index])
        rows = _prompt_scores(gim, model, prompt, index, prompt.shape[1])
        return Explanation(task, prompt_tokens, [name], [index], name, rows, score, config)
    if target is None:
        with torch.no_grad():
            target = [int(forward(prompt).argmax(dim=-1))]
    if isinstance(target, (int, str)):
        raise ValueError(
            f"a continuation's target is a sequence of token ids, got {target!r}; "
            "encode it with tokenizer(text, add_special_tokens=False).input_ids."
        )
    target_ids = [int(t) for t in target]
    _check_target_ids(tokenizer, target_ids)
    _check_length(model, len(prompt_ids) + len(target_ids) - 1)
    return Explanation(
        task=task,
        prompt_tokens=prompt_tokens,
        target_tokens=readable_tokens(tokenizer, target_ids),
        target_ids=target_ids,
        target_text=str(tokenizer.decode(target_ids)),
        token_scores=explain_continuation(
            model, tokenizer, prompt, target_ids, score=score, config=config
        ),
        score=score,
        config=config,
    )


def explain_continuation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Tensor,
    target_ids: Sequence[int],
    *,
    score: str = "logit",
    config: GIMConfig | None = None,
) -> Tensor:
    r"""
    GIM attributions of each token of a continuation to the prompt tokens, with
    teacher forcing, by :class:`~captum_gim.LLMGIMAttribution`: one forward pass
    over prompt + continuation and one backward pass per target token. They
    equal those of explaining one target token at a time.

    Args:
        model (PreTrainedModel): The causal LM.
        tokenizer (PreTrainedTokenizerBase): Its tokenizer.
        prompt (Tensor): The prompt's token ids, ``1 x prompt``.
        target_ids (Sequence[int]): The continuation's token ids (at least one).
        score (str, optional): ``"logit"`` or ``"log-prob"`` of each target token.
                    Default: ``"logit"``
        config (GIMConfig, optional): The GIM settings; None means the defaults.
                    Default: None

    Returns:
        *Tensor*: ``len(target_ids) x prompt`` token scores, float32 on the CPU.
    """
    gim = LLMGIMAttribution(
        model, tokenizer, config=config, score="log_prob" if score == "log-prob" else "logit"
    )
    targets = torch.tensor(list(target_ids), dtype=prompt.dtype, device=prompt.device)
    scores = gim.token_attributions(prompt, targets, progress=_progress)
    return scores.detach().float().cpu()


def _prompt_scores(
    gim: GIMAttribution, model: PreTrainedModel, ids: Tensor, target: int | None, n_prompt: int
) -> Tensor:
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    attributions = gim.attribute(embeds, target=target)
    return attributions[:, :n_prompt].sum(dim=-1).detach().float().cpu()


def _progress(items: range) -> Iterable[int]:
    """A progress bar on stderr for more than one target token."""
    if len(items) < 2:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="target tokens", file=sys.stderr, leave=False)


def _check_target_ids(tokenizer: PreTrainedTokenizerBase, target_ids: list[int]) -> None:
    if not target_ids:
        raise ValueError("the target has no tokens; give some text to explain.")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in target_ids:
        position = target_ids.index(unk)
        raise ValueError(
            f"target token {position} is {tokenizer.unk_token!r}: the tokenizer does not "
            "know that word; use words of the model's vocabulary."
        )


def _check_length(model: PreTrainedModel, length: int) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and length > limit:
        raise ValueError(
            f"the input has {length} tokens but the model reads at most {limit} "
            f"(max_position_embeddings); shorten it by {length - limit} tokens."
        )
