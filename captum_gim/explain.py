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
from captum_gim.attr.targets import TargetError, check_text_target
from captum_gim.baselines import baseline_embeddings, resolve_baseline
from captum_gim.config import GIMConfig
from captum_gim.forwards import TASKS, input_device, label_index, task_forward
from captum_gim.scores import SCORES, resolve_score
from captum_gim.text import readable_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["SCORES", "Explanation", "explain", "explain_continuation"]


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
        values (tuple[float, ...]): The explained value of each row at the prompt
                    (the logit, log-probability, class score or cosine).
        baseline_values (tuple[float, ...]): The same value at the baseline prompt.
        baseline (str): The baseline, e.g. ``"zero baseline"`` or ``"mask baseline
                    ('[MASK]')"``.
    """

    task: str
    prompt_tokens: list[str]
    target_tokens: list[str]
    target_ids: list[int]
    target_text: str
    token_scores: Tensor
    score: str
    config: GIMConfig
    values: tuple[float, ...] = ()
    baseline_values: tuple[float, ...] = ()
    baseline: str = "zero baseline"

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
    score: str | None = None,
    baselines: str | int | None = None,
    config: GIMConfig | None = None,
) -> Explanation:
    r"""
    GIM attributions of a model's output for ``prompt_ids`` to the prompt tokens.

    For ``task="generate"`` the target is a continuation: one teacher-forced forward
    pass over prompt + continuation gives every target token's score, and one backward
    pass per target token its attributions (target token ``k`` is explained given the
    prompt and target tokens ``0 .. k-1``; only the prompt tokens are attributed). For
    ``task="classify"`` it is a label (index or name of ``model.config.id2label``). For
    ``task="similarity"`` the explained score is the cosine similarity of the prompt's
    mean-pooled embedding with that of ``query_ids``.

    Attributions are ``(embedding - baseline embedding) x GIM gradient``, summed over
    the embedding dimension: a positive score means the token raises the explained
    value compared with the baseline token in its place, a negative one that it
    lowers it (see :mod:`captum_gim.baselines`).

    Every check that needs no gradient (the task, the score, the baseline, the
    prompt's length against the model's position limit, the target) runs before
    the first forward pass.

    Args:
        model (PreTrainedModel): A causal LM (``"generate"``), a sequence classifier
                    (``"classify"``) or an encoder such as ``BertModel``
                    (``"similarity"``).
        tokenizer (PreTrainedTokenizerBase): Its tokenizer, for the token strings.
        prompt_ids (Sequence[int]): The prompt's token ids.
        target (Sequence[int], int, str or None, optional): The target token ids or
                    text (``"generate"``) or the label (``"classify"``); None explains
                    the greedy next token or the predicted label. Must be None for
                    ``"similarity"``.
                    Default: None
        task (str, optional): ``"generate"``, ``"classify"`` or ``"similarity"``.
                    Default: ``"generate"``
        query_ids (Sequence[int], optional): The query's token ids, for
                    ``"similarity"``.
                    Default: None
        score (str, optional): Explain the ``"logit"`` or the ``"log-prob"`` of each
                    target token or label; not for ``"similarity"`` (a cosine).
                    Default: ``"logit"``
        baselines (str or int, optional): ``"zero"``, ``"mask"``, ``"pad"``, a token
                    of the vocabulary or a token id; None is the task's default,
                    :data:`captum_gim.baselines.DEFAULT_BASELINES` (``"zero"`` for
                    every task).
                    Default: None
        config (GIMConfig, optional): The GIM settings; None means the defaults.
                    Default: None

    Returns:
        *Explanation*:
        - **explanation**: The tokens, a ``targets x prompt`` score matrix, and the
          explained values at the prompt and at the baseline.

    Raises:
        ValueError: With one line naming the fix, for an empty prompt, a prompt longer
                    than the model's position limit, a target word the tokenizer does
                    not know, an unknown label, a score or baseline that does not
                    apply, or a missing query.

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
    if task == "similarity" and score not in (None, "logit"):
        raise ValueError(
            f"score={score!r} does not apply to a similarity: the explained value is the "
            "cosine similarity of the prompt and the query."
        )
    score = resolve_score(score, where="explain")
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise ValueError("the prompt has no tokens; give some text to explain.")
    if task == "similarity" and target is not None:
        raise ValueError(
            "a similarity has no target; pass the query text's ids as query_ids instead."
        )
    if task == "similarity" and query_ids is None:
        raise ValueError(
            "task='similarity' needs query_ids: the token ids of the text whose "
            "similarity with the prompt is explained."
        )
    target_ids: list[int] | None = None
    if task == "generate" and target is not None:
        target_ids = _continuation_ids(tokenizer, target)
    label: int | None = None
    if task == "classify" and target is not None:
        if not isinstance(target, (int, str)):
            raise ValueError(f"a classifier's target is a label name or index, got {target!r}.")
        label = label_index(model, target)
    extra = 0 if target_ids is None else len(target_ids) - 1
    _check_length(model, len(prompt_ids) + extra)
    baseline = resolve_baseline(tokenizer, baselines, task)
    device = input_device(model)
    prompt = torch.tensor([prompt_ids], device=device)
    config = GIMConfig() if config is None else config
    query = None if query_ids is None else torch.tensor([list(query_ids)], device=device)
    forward = task_forward(model, task, score=score, query_ids=query)
    prompt_tokens = readable_tokens(tokenizer, prompt_ids)
    embedding = model.get_input_embeddings()
    base = baseline_embeddings(embedding, tokenizer, prompt, baseline)
    if task in ("similarity", "classify"):
        with torch.no_grad():
            embeds = embedding(prompt)
            output, base_output = forward(embeds), forward(base)
        if task == "similarity":
            index, names, ids = None, ["similarity"], []
            text = str(tokenizer.decode(list(query_ids or []), skip_special_tokens=True))
            score = "cosine similarity"
            value, base_value = float(output[0]), float(base_output[0])
        else:
            index = label_index(model, int(output.argmax(dim=-1))) if label is None else label
            text = str(getattr(model.config, "id2label", {})[index])
            names, ids = [text], [index]
            value, base_value = float(output[0, index]), float(base_output[0, index])
        gim = GIMAttribution(forward, model, config=config)
        rows = gim.attribute(embeds, target=index, baselines=base)
        return Explanation(
            task,
            prompt_tokens,
            names,
            ids,
            text,
            rows.sum(dim=-1).detach().float().cpu(),
            score,
            config,
            (value,),
            (base_value,),
            baseline.describe(),
        )
    if target_ids is None:
        with torch.no_grad():
            target_ids = [int(forward(prompt).argmax(dim=-1))]
    values = _continuation_values(model, prompt, target_ids, score, None)
    base_values = _continuation_values(model, prompt, target_ids, score, base)
    return Explanation(
        task=task,
        prompt_tokens=prompt_tokens,
        target_tokens=readable_tokens(tokenizer, target_ids),
        target_ids=target_ids,
        target_text=str(tokenizer.decode(target_ids)),
        token_scores=explain_continuation(
            model,
            tokenizer,
            prompt,
            target_ids,
            score=score,
            config=config,
            baselines=None if baseline.token_id is None else base,
        ),
        score=score,
        config=config,
        values=values,
        baseline_values=base_values,
        baseline=baseline.describe(),
    )


def _continuation_ids(
    tokenizer: PreTrainedTokenizerBase, target: Sequence[int] | int | str
) -> list[int]:
    if isinstance(target, str):
        return check_text_target(tokenizer, target)
    if isinstance(target, int):
        raise ValueError(
            f"a continuation's target is a sequence of token ids or a text, got {target!r}; "
            "pass [token_id] for one token."
        )
    target_ids = [int(t) for t in target]
    _check_target_ids(tokenizer, target_ids)
    return target_ids


def _continuation_values(
    model: PreTrainedModel,
    prompt: Tensor,
    target_ids: list[int],
    score: str,
    baselines: Tensor | None,
) -> tuple[float, ...]:
    """The teacher-forced score of each target token, after the prompt or after the
    baseline prompt (its embeddings; zeros for the zero baseline)."""
    n_prompt, n_target = prompt.shape[1], len(target_ids)
    targets = torch.tensor(target_ids, device=prompt.device)
    ids = torch.cat([prompt, targets[:-1].unsqueeze(0)], dim=1)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        if baselines is not None:
            embeds[:, :n_prompt] = baselines
        logits = model(inputs_embeds=embeds).logits[0, n_prompt - 1 :].float()
        if score == "log-prob":
            logits = torch.log_softmax(logits, dim=-1)
    return tuple(float(v) for v in logits[torch.arange(n_target), targets])


def explain_continuation(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: Tensor,
    target_ids: Sequence[int],
    *,
    score: str = "logit",
    config: GIMConfig | None = None,
    baselines: Tensor | None = None,
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
        baselines (Tensor, optional): The embeddings of the baseline prompt,
                    ``1 x prompt x hidden``; None is the zero baseline.
                    Default: None

    Returns:
        *Tensor*: ``len(target_ids) x prompt`` token scores, float32 on the CPU.
    """
    gim = LLMGIMAttribution(model, tokenizer, config=config, score=score)
    targets = torch.tensor(list(target_ids), dtype=prompt.dtype, device=prompt.device)
    scores = gim.token_attributions(prompt, targets, progress=_progress, baselines=baselines)
    return scores.detach().float().cpu()


def _progress(items: range) -> Iterable[int]:
    """A progress bar on stderr for more than one target token, only when stderr is a
    terminal (never in redirected output, logs or notebooks' captured streams)."""
    if len(items) < 2 or not _is_terminal(sys.stderr):
        return items
    from tqdm import tqdm

    return tqdm(items, desc="target tokens", file=sys.stderr, leave=False)


def _is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


def _check_target_ids(tokenizer: PreTrainedTokenizerBase, target_ids: list[int]) -> None:
    if not target_ids:
        raise TargetError("the target has no tokens; give some text to explain.")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in target_ids:
        position = target_ids.index(unk)
        raise TargetError(
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
