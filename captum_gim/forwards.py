r"""
What is explained: forward functions from input embeddings (or token ids) to the score
of a task, shared by :func:`captum_gim.explain.explain`, :func:`captum_gim.compare` and
the command line.

* ``"generate"``: :func:`logits_forward`, the next-token logits of a causal LM
  (``batch x vocabulary``; the target is a token id).
* ``"classify"``: :func:`classifier_forward`, the class logits of a sequence classifier
  (``batch x labels``; the target is a label index, see :func:`label_index`).
* ``"similarity"``: :func:`similarity_forward`, the cosine similarity of a text's
  mean-pooled embedding with a fixed query embedding, as sentence-transformers encoders
  (e.g. all-MiniLM-L6-v2) compute it (``batch``; no target).

:func:`detect_task` reads the task from a model's ``config.architectures``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_gim.scores import resolve_score

__all__ = [
    "TASKS",
    "classifier_forward",
    "detect_task",
    "label_index",
    "logits_forward",
    "mean_pool",
    "similarity_forward",
    "task_forward",
]

#: The tasks captum_gim explains.
TASKS = ("generate", "classify", "similarity")


def _call(model: nn.Module, inputs: Tensor, attention_mask: Tensor | None) -> Any:
    key = "inputs_embeds" if inputs.is_floating_point() else "input_ids"
    return model(**{key: inputs}, attention_mask=attention_mask)


def logits_forward(
    model: nn.Module,
    position: int = -1,
    log_probs: bool | None = None,
    *,
    score: str | None = None,
) -> Callable[..., Tensor]:
    r"""
    A forward function for Captum from input embeddings or token ids to the logits of
    one position of a causal language model.

    The returned function is ``forward(inputs, attention_mask=None)``: floating-point
    ``inputs`` are passed to the model as ``inputs_embeds`` and integer ones as
    ``input_ids``. It returns ``batch x vocabulary`` logits, so Captum's ``target`` is a
    token id. With an ``attention_mask`` and ``position=-1``, each row is read at its
    own last non-padding token, which makes left- and right-padded batches work alike.

    Args:
        model (nn.Module): A causal language model whose output has ``.logits`` (a
                    transformers ``...ForCausalLM``) or is the logits tensor.
        position (int, optional): The position whose next-token logits are returned.
                    Default: -1
        log_probs (bool, optional): Deprecated spelling of ``score="log-prob"``
                    (a ``DeprecationWarning``; removed in the next release).
                    Default: None
        score (str, optional): ``"logit"`` returns the logits, ``"log-prob"`` the
                    log-probabilities (``log_softmax`` of the logits).
                    Default: ``"logit"``

    Returns:
        *Callable*:
        - **forward** (*Callable[[Tensor, Tensor | None], Tensor]*): The forward
          function, ``batch x vocabulary``.

    Examples::

        >>> from captum.attr import Saliency
        >>> from captum_gim import logits_forward
        >>> from captum_gim.models import load_model
        >>> model, tokenizer = load_model()
        >>> saliency = Saliency(logits_forward(model))
        >>> ids = tokenizer("the good movie ?", return_tensors="pt").input_ids
        >>> embeds = model.get_input_embeddings()(ids).detach()
        >>> scores = saliency.attribute(embeds, target=5).sum(-1)
    """

    log_prob = resolve_score(score, log_probs=log_probs, where="logits_forward") == "log-prob"

    def forward(inputs: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        output = _call(model, inputs, attention_mask)
        logits = output.logits if hasattr(output, "logits") else output
        if attention_mask is not None and position == -1:
            rows = torch.arange(logits.shape[0], device=logits.device)
            logits = logits[rows, _last_real_positions(attention_mask)]
        else:
            logits = logits[:, position]
        return torch.log_softmax(logits, dim=-1) if log_prob else logits

    return forward


def _last_real_positions(attention_mask: Tensor) -> Tensor:
    """Index of the last token with mask 1 in each row (left or right padding)."""
    length = attention_mask.shape[1]
    return length - 1 - attention_mask.flip(1).to(torch.long).argmax(dim=1)


def classifier_forward(
    model: nn.Module, log_probs: bool | None = None, *, score: str | None = None
) -> Callable[..., Tensor]:
    r"""
    A forward function for Captum from input embeddings or token ids to the class logits
    of a sequence classifier (``AutoModelForSequenceClassification``).

    Args:
        model (nn.Module): A classifier whose output has ``.logits`` of shape
                    ``batch x labels``.
        log_probs (bool, optional): Deprecated spelling of ``score="log-prob"``.
                    Default: None
        score (str, optional): ``"logit"`` returns the class logits, ``"log-prob"``
                    their log-probabilities.
                    Default: ``"logit"``

    Returns:
        *Callable*:
        - **forward** (*Callable[[Tensor, Tensor | None], Tensor]*): ``batch x labels``;
          the target is a label index.

    Examples::

        >>> forward = classifier_forward(classifier)
        >>> scores = GIMAttribution(forward, classifier).attribute(embeds, target=1)
    """

    log_prob = resolve_score(score, log_probs=log_probs, where="classifier_forward") == "log-prob"

    def forward(inputs: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        logits = _call(model, inputs, attention_mask).logits
        return torch.log_softmax(logits, dim=-1) if log_prob else logits

    return forward


def mean_pool(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    r"""
    Sentence embeddings as sentence-transformers computes them: the mean of the token
    states over the attention mask.

    Args:
        hidden (Tensor): Last hidden states, ``batch x tokens x hidden``.
        attention_mask (Tensor or None): 1 for tokens, 0 for padding; None means no
                    padding.

    Returns:
        *Tensor*: ``batch x hidden``.
    """
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def sentence_embedding(model: nn.Module, input_ids: Tensor) -> Tensor:
    r"""
    Returns:
        *Tensor*: The mean-pooled embedding of ``input_ids`` (``batch x tokens``),
        ``batch x hidden``, without gradient.
    """
    with torch.no_grad():
        hidden = model(input_ids=input_ids).last_hidden_state
    return mean_pool(hidden, None)


def similarity_forward(model: nn.Module, query_ids: Tensor) -> Callable[..., Tensor]:
    r"""
    A forward function for Captum: the cosine similarity between a text's mean-pooled
    embedding and the embedding of a fixed query text, for sentence-transformers-style
    encoders such as all-MiniLM-L6-v2.

    The query's embedding is computed once, without gradient, so only the text is
    explained. The output is one similarity per example (``batch``), so no target is
    needed.

    Args:
        model (nn.Module): An encoder whose output has ``.last_hidden_state`` (a
                    transformers ``AutoModel``, e.g. ``BertModel``).
        query_ids (Tensor): The query's token ids, ``tokens`` or ``1 x tokens``.

    Returns:
        *Callable*:
        - **forward** (*Callable[[Tensor, Tensor | None], Tensor]*): ``batch``
          similarities in ``[-1, 1]``.

    Examples::

        >>> query = tokenizer("a query", return_tensors="pt").input_ids
        >>> forward = similarity_forward(encoder, query)
        >>> scores = GIMAttribution(forward, encoder).attribute(embeds).sum(-1)
    """
    query_ids = query_ids.reshape(1, -1)
    device = input_device(model)
    query = sentence_embedding(model, query_ids.to(device))

    def forward(inputs: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        hidden = _call(model, inputs, attention_mask).last_hidden_state
        sentence = mean_pool(hidden, attention_mask)
        return F.cosine_similarity(sentence, query.to(sentence.dtype).expand_as(sentence), dim=-1)

    return forward


def task_forward(
    model: nn.Module,
    task: str,
    *,
    score: str = "logit",
    query_ids: Tensor | None = None,
) -> Callable[..., Tensor]:
    r"""
    The forward function of a task: :func:`logits_forward` for ``"generate"``,
    :func:`classifier_forward` for ``"classify"`` and :func:`similarity_forward` (which
    needs ``query_ids``) for ``"similarity"``. ``score`` (``"logit"`` or
    ``"log-prob"``) applies to the first two; a similarity is always the cosine.

    Returns:
        *Callable*: ``forward(inputs, attention_mask=None)``.
    """
    if task == "generate":
        return logits_forward(model, score=score)
    if task == "classify":
        return classifier_forward(model, score=score)
    if task == "similarity":
        if query_ids is None:
            raise ValueError(
                "task='similarity' needs query_ids: the token ids of the text whose "
                "similarity with the input is explained."
            )
        return similarity_forward(model, query_ids)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}.")


def detect_task(architectures: list[str] | None) -> str | None:
    r"""
    The task of a model, read from ``config.architectures``: a causal LM generates, a
    sequence classifier classifies, and a bare encoder (``BertModel``, ...) compares
    sentences.

    Returns:
        *str or None*: ``"generate"``, ``"classify"``, ``"similarity"``, or None when the
        architectures are missing or say nothing of the task.
    """
    for name in architectures or []:
        if name.endswith(("ForCausalLM", "LMHeadModel")):
            return "generate"
        if name.endswith("ForSequenceClassification"):
            return "classify"
        if name.endswith("Model"):
            return "similarity"
    return None


def label_index(model: nn.Module, target: int | str) -> int:
    r"""
    The class index of a classifier's target, given as an index or a label name of
    ``model.config.id2label`` (case-insensitive).

    Raises:
        ValueError: For an unknown name or an index out of range; the message lists the
                    labels.

    Returns:
        *int*: The label index.
    """
    id2label = {int(k): str(v) for k, v in getattr(model.config, "id2label", {}).items()}
    labels = ", ".join(f"{i}={name}" for i, name in sorted(id2label.items()))
    if isinstance(target, str) and target.strip().lstrip("-").isdigit():
        target = int(target)
    if isinstance(target, int):
        if target not in id2label:
            raise ValueError(f"label index {target} is out of range; the labels are {labels}.")
        return target
    by_name = {name.lower(): i for i, name in id2label.items()}
    if target.lower() not in by_name:
        raise ValueError(f"unknown label {target!r}; the labels are {labels}.")
    return by_name[target.lower()]


def input_device(model: nn.Module) -> torch.device:
    """Where the inputs go: the device of the input embeddings; for a model dispatched
    with ``device_map``, the device accelerate runs them on (also when their weights
    are offloaded to the CPU or the disk)."""
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    device = getattr(getattr(embedding, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(device)
    return next(embedding.parameters()).device
