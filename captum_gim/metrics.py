"""Faithfulness metrics for token attributions: comprehensiveness and sufficiency.

Both metrics work with the attributions of *any* method (GIM, Captum's gradient-based
methods, attention-based scores, ...). They follow the evaluation protocol of the GIM
paper: tokens are replaced by a baseline token in the order given by the attributions,
and the drop of the explained score (for example the logit of the answer token at the
last position) is recorded after each replacement.

* :func:`comprehensiveness` replaces the top-ranked tokens cumulatively; large drops
  mean the attribution found the tokens the model relies on (higher is better).
* :func:`sufficiency` replaces the lowest-ranked tokens, keeping only the top-ranked
  ones; small drops mean the top-ranked tokens alone carry the score (lower is better).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from captum._utils.common import _format_additional_forward_args, _select_targets
from captum._utils.typing import TargetType
from torch import Tensor

from captum_gim.attr.targets import per_example_targets

__all__ = ["FaithfulnessResult", "comprehensiveness", "layer_faithfulness", "sufficiency"]

DEFAULT_FRACTIONS: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)

# The target of one example after splitting a batched target: an index (tuple) into
# the non-batch dimensions of the forward output, or None for a scalar output.


@dataclass(frozen=True)
class FaithfulnessResult:
    r"""
    Perturbation curves and their averages for a batch of examples.

    A *drop* is ``original_score - perturbed_score``: positive when replacing tokens
    lowered the explained score. Normalised values divide the drops by
    ``|original_score|`` of the same example, so that examples whose scores differ in
    magnitude can be averaged; an example whose original score is exactly zero gets
    ``inf`` or ``nan`` normalised values (IEEE division), which the caller can filter.

    Attributes:

        curve (Tensor): Drops of the target score, one per perturbation step, of shape
                    ``(batch, steps)``. For :func:`comprehensiveness`, step ``k``
                    (0-based) has the ``k + 1`` top-ranked tokens replaced; examples
                    with fewer steps than the longest one are padded with ``nan``. For
                    :func:`sufficiency`, step ``k`` has the lowest-ranked
                    ``fractions[k]`` of the replaceable tokens replaced.
        aopc (Tensor): Area over the perturbation curve of each example: the mean of
                    its drops over its valid (non-``nan``) steps, shape ``(batch,)``.
        normalized_curve (Tensor): ``curve / |original_score|``, shape
                    ``(batch, steps)``.
        normalized_aopc (Tensor): ``aopc / |original_score|``, shape ``(batch,)``.
        original_score (Tensor): Target score of the unperturbed inputs, shape
                    ``(batch,)``.
        num_replaced (Tensor): Number of tokens replaced at each step, a long tensor
                    of shape ``(batch, steps)``; ``-1`` marks padded steps.
    """

    curve: Tensor
    aopc: Tensor
    normalized_curve: Tensor
    normalized_aopc: Tensor
    original_score: Tensor
    num_replaced: Tensor


def comprehensiveness(
    forward_func: Callable[..., Tensor],
    inputs: Tensor,
    attributions: Tensor,
    baseline_token_id: int,
    target: TargetType = None,
    additional_forward_args: Any = None,
    attention_mask: Tensor | None = None,
    replaceable_mask: Tensor | None = None,
    protect_ends: bool = True,
    max_steps: int = 50,
    max_batch_size: int | None = None,
) -> FaithfulnessResult:
    r"""
    Comprehensiveness: the drop of the target score when the top-ranked tokens are
    removed.

    For each example the replaceable tokens are ranked by attribution, and the top-1,
    top-1..2, ..., top-1..k tokens are replaced cumulatively by ``baseline_token_id``,
    with ``k = min(max_steps, number of replaceable tokens)``. The drops
    ``original score - perturbed score`` form the perturbation curve and their mean is
    the area over the perturbation curve (AOPC). Higher is better: a faithful
    attribution ranks first the tokens whose removal hurts the score most.

    Tokens are ranked by signed attribution, largest first; ties are broken by
    position, earlier first (stable sort). All perturbed copies of one example, and the
    unperturbed example that gives the original score, are built at once and run in one
    batched forward call (or in chunks of ``max_batch_size`` rows), under
    ``torch.no_grad()``.

    Args:

        forward_func (Callable): The forward function of the model. It is called as
                    ``forward_func(input_ids, *additional_forward_args)``, plus the
                    keyword argument ``attention_mask=mask`` when ``attention_mask``
                    is given. ``input_ids`` holds ``n`` perturbed copies of ONE
                    example (shape ``(n, seq)``) and ``mask`` that example's row of
                    ``attention_mask`` repeated ``n`` times. It must return a tensor
                    with first dimension ``n``, from which ``target`` selects one
                    score per row.
        inputs (Tensor): Token ids of shape ``(batch, seq)``.
        attributions (Tensor): Attribution of each token, of shape
                    ``(batch, seq)``, or ``(batch, seq, dim)`` (for example
                    embedding-level attributions), which is summed over the last
                    dimension. Pass ``attributions.abs()`` to rank by magnitude.
        baseline_token_id (int): Token id that replaces the removed tokens, for
                    example the id of the space token.
        target (int, tuple, Tensor, or list, optional): Selects the explained score
                    in the output of ``forward_func``, with Captum's conventions:

                    - ``None``: the output already holds one scalar per row
                      (shape ``(n,)`` or ``(n, 1)``).
                    - an int or a tuple of ints: the same index into the non-batch
                      dimensions for every example, e.g. ``(-1, answer_id)`` for
                      logits of shape ``(n, seq, vocab)``.
                    - a list (or a 1D tensor) with one int or tuple per example.

                    Default: None
        additional_forward_args (Any, optional): Extra positional arguments of
                    ``forward_func``, a single value or a tuple. A tensor whose first
                    dimension equals ``batch`` is per-example data: the example's row
                    is repeated for its perturbed copies. Any other value is passed
                    unchanged.
                    Default: None
        attention_mask (Tensor, optional): Mask of shape ``(batch, seq)``, 1 for
                    tokens and 0 for padding (left or right). Padded positions are
                    never replaced and do not count as replaceable tokens. When given,
                    it is passed to ``forward_func`` as the keyword argument
                    ``attention_mask``.
                    Default: None
        replaceable_mask (Tensor, optional): Boolean tensor of shape
                    ``(batch, seq)``; positions where it is False are never replaced
                    (for example a fixed instruction template). Combined with
                    ``attention_mask`` and ``protect_ends``.
                    Default: None
        protect_ends (bool, optional): If True, the first and the last non-padding
                    tokens of each example are never replaced.
                    Default: True
        max_steps (int, optional): Largest number of top-ranked tokens replaced.
                    Default: 50
        max_batch_size (int, optional): If given, the rows of one example are run in
                    chunks of at most this many rows; otherwise in one forward call
                    per example.
                    Default: None

    Returns:
        *FaithfulnessResult* of **comprehensiveness**:
            - **comprehensiveness** (*FaithfulnessResult*):
                        Curves of shape ``(batch, steps)``, with ``steps`` the largest
                        ``min(max_steps, replaceable tokens)`` over the batch
                        (``nan``-padded for the other examples), and the AOPC of each
                        example. See :class:`FaithfulnessResult`.

    Raises:
        ValueError: If the shapes of ``inputs``, ``attributions`` or the masks
                    disagree, if ``max_steps < 1``, or if an example has no
                    replaceable token.
        TypeError: If ``baseline_token_id`` is not an int.

    Examples::

        >>> import torch
        >>> from captum_gim.metrics import comprehensiveness
        >>> weights = torch.arange(10.0)  # score = sum of the weights of the tokens
        >>> def forward_func(input_ids):
        ...     return weights[input_ids].sum(dim=1)
        >>> input_ids = torch.tensor([[1, 9, 5, 2]])
        >>> attributions = weights[input_ids]  # oracle attribution
        >>> result = comprehensiveness(forward_func, input_ids, attributions, 0)
        >>> result.curve  # token 9 removed, then 9 and 5 (first and last are kept)
        tensor([[ 9., 14.]])
        >>> result.aopc
        tensor([11.5000])
    """
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(
            f"max_steps must be an integer >= 1, got {max_steps!r}; pass the largest "
            "number of top-ranked tokens to replace."
        )

    def counts(num_replaceable: int) -> list[int]:
        return list(range(1, min(max_steps, num_replaceable) + 1))

    return _perturbation_metric(
        forward_func,
        inputs,
        attributions,
        baseline_token_id,
        target,
        additional_forward_args,
        attention_mask,
        replaceable_mask,
        protect_ends,
        max_batch_size,
        counts,
        replace_top=True,
    )


def sufficiency(
    forward_func: Callable[..., Tensor],
    inputs: Tensor,
    attributions: Tensor,
    baseline_token_id: int,
    target: TargetType = None,
    additional_forward_args: Any = None,
    attention_mask: Tensor | None = None,
    replaceable_mask: Tensor | None = None,
    protect_ends: bool = True,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    max_batch_size: int | None = None,
) -> FaithfulnessResult:
    r"""
    Sufficiency: the drop of the target score when only the top-ranked tokens are
    kept.

    For each fraction ``f`` in ``fractions``, the ``floor(f * n)`` lowest-ranked of the
    ``n`` replaceable tokens of an example are replaced by ``baseline_token_id`` (at
    least one replaceable token is always kept), and the drop
    ``original score - perturbed score`` is recorded. The mean of the drops over the
    fractions is the AOPC. Lower is better: a faithful attribution ranks first the
    tokens that suffice to keep the score.

    Tokens are ranked as in :func:`comprehensiveness`: by signed attribution, largest
    first, ties broken by position, earlier first (stable sort); the lowest-ranked
    tokens are the last ones of that ranking. All perturbed copies of one example, and
    the unperturbed example that gives the original score, are built at once and run
    in one batched forward call (or in chunks of ``max_batch_size`` rows), under
    ``torch.no_grad()``.

    Args:

        forward_func (Callable): The forward function of the model. It is called as
                    ``forward_func(input_ids, *additional_forward_args)``, plus the
                    keyword argument ``attention_mask=mask`` when ``attention_mask``
                    is given. ``input_ids`` holds ``n`` perturbed copies of ONE
                    example (shape ``(n, seq)``) and ``mask`` that example's row of
                    ``attention_mask`` repeated ``n`` times. It must return a tensor
                    with first dimension ``n``, from which ``target`` selects one
                    score per row.
        inputs (Tensor): Token ids of shape ``(batch, seq)``.
        attributions (Tensor): Attribution of each token, of shape
                    ``(batch, seq)``, or ``(batch, seq, dim)`` (for example
                    embedding-level attributions), which is summed over the last
                    dimension. Pass ``attributions.abs()`` to rank by magnitude.
        baseline_token_id (int): Token id that replaces the removed tokens, for
                    example the id of the space token.
        target (int, tuple, Tensor, or list, optional): Selects the explained score
                    in the output of ``forward_func``, with Captum's conventions:

                    - ``None``: the output already holds one scalar per row
                      (shape ``(n,)`` or ``(n, 1)``).
                    - an int or a tuple of ints: the same index into the non-batch
                      dimensions for every example, e.g. ``(-1, answer_id)`` for
                      logits of shape ``(n, seq, vocab)``.
                    - a list (or a 1D tensor) with one int or tuple per example.

                    Default: None
        additional_forward_args (Any, optional): Extra positional arguments of
                    ``forward_func``, a single value or a tuple. A tensor whose first
                    dimension equals ``batch`` is per-example data: the example's row
                    is repeated for its perturbed copies. Any other value is passed
                    unchanged.
                    Default: None
        attention_mask (Tensor, optional): Mask of shape ``(batch, seq)``, 1 for
                    tokens and 0 for padding (left or right). Padded positions are
                    never replaced and do not count as replaceable tokens. When given,
                    it is passed to ``forward_func`` as the keyword argument
                    ``attention_mask``.
                    Default: None
        replaceable_mask (Tensor, optional): Boolean tensor of shape
                    ``(batch, seq)``; positions where it is False are never replaced
                    (for example a fixed instruction template). Combined with
                    ``attention_mask`` and ``protect_ends``.
                    Default: None
        protect_ends (bool, optional): If True, the first and the last non-padding
                    tokens of each example are never replaced.
                    Default: True
        fractions (Sequence[float], optional): Fractions of the replaceable tokens
                    to replace, each strictly between 0 and 1.
                    Default: (0.5, 0.8, 0.9, 0.95, 0.99)
        max_batch_size (int, optional): If given, the rows of one example are run in
                    chunks of at most this many rows; otherwise in one forward call
                    per example.
                    Default: None

    Returns:
        *FaithfulnessResult* of **sufficiency**:
            - **sufficiency** (*FaithfulnessResult*):
                        Curves of shape ``(batch, len(fractions))`` and the AOPC of
                        each example. See :class:`FaithfulnessResult`.

    Raises:
        ValueError: If the shapes of ``inputs``, ``attributions`` or the masks
                    disagree, if a fraction is not strictly between 0 and 1, or if an
                    example has no replaceable token.
        TypeError: If ``baseline_token_id`` is not an int.

    Examples::

        >>> import torch
        >>> from captum_gim.metrics import sufficiency
        >>> weights = torch.arange(10.0)  # score = sum of the weights of the tokens
        >>> def forward_func(input_ids):
        ...     return weights[input_ids].sum(dim=1)
        >>> input_ids = torch.tensor([[1, 9, 5, 2, 7, 3]])
        >>> attributions = weights[input_ids]  # oracle attribution
        >>> result = sufficiency(
        ...     forward_func, input_ids, attributions, 0, fractions=[0.5]
        ... )
        >>> result.curve  # tokens 2 and 5 replaced, tokens 9 and 7 kept
        tensor([[7.]])
    """
    fractions = list(fractions)
    if not fractions or not all(isinstance(f, (int, float)) and 0.0 < f < 1.0 for f in fractions):
        raise ValueError(
            "fractions must be a non-empty sequence of numbers strictly between 0 and "
            f"1, got {fractions!r}; e.g. pass fractions=(0.5, 0.8, 0.9, 0.95, 0.99)."
        )

    def counts(num_replaceable: int) -> list[int]:
        # The epsilon keeps products such as 0.29 * 100 = 28.999... from rounding
        # down; at least one replaceable token is always kept.
        return [min(math.floor(f * num_replaceable + 1e-9), num_replaceable - 1) for f in fractions]

    return _perturbation_metric(
        forward_func,
        inputs,
        attributions,
        baseline_token_id,
        target,
        additional_forward_args,
        attention_mask,
        replaceable_mask,
        protect_ends,
        max_batch_size,
        counts,
        replace_top=False,
    )


def _perturbation_metric(
    forward_func: Callable[..., Tensor],
    inputs: Tensor,
    attributions: Tensor,
    baseline_token_id: int,
    target: TargetType,
    additional_forward_args: Any,
    attention_mask: Tensor | None,
    replaceable_mask: Tensor | None,
    protect_ends: bool,
    max_batch_size: int | None,
    counts_for: Callable[[int], list[int]],
    replace_top: bool,
) -> FaithfulnessResult:
    """Shared driver: one batched forward per example, then drops and averages."""
    token_scores = _validate(
        inputs,
        attributions,
        baseline_token_id,
        attention_mask,
        replaceable_mask,
        max_batch_size,
    )
    replaceable = _replaceable_positions(inputs, attention_mask, replaceable_mask, protect_ends)
    empty = (~replaceable.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"Example {empty[0]} has no replaceable token: all its positions are "
            "padding, protected ends or excluded by replaceable_mask. Use longer "
            "prompts, protect_ends=False, or a less restrictive replaceable_mask."
        )
    extra_args = _format_additional_forward_args(additional_forward_args)
    batch = inputs.shape[0]

    originals: list[Tensor] = []
    perturbed: list[Tensor] = []
    all_counts: list[list[int]] = []
    with torch.no_grad():
        for i in range(batch):
            positions = replaceable[i].nonzero().squeeze(1)
            order = torch.sort(token_scores[i, positions], descending=True, stable=True)[1]
            # rank[p]: place of token p in the ranking (0 = top), -1 if not replaceable.
            rank = torch.full_like(inputs[i], -1)
            rank[positions[order]] = torch.arange(positions.numel(), device=inputs.device)

            counts = counts_for(positions.numel())
            count_tensor = torch.tensor(counts, device=inputs.device).unsqueeze(1)
            if replace_top:
                replace = (rank >= 0) & (rank.unsqueeze(0) < count_tensor)
            else:
                replace = rank.unsqueeze(0) >= positions.numel() - count_tensor
            rows = inputs[i].repeat(len(counts) + 1, 1)
            rows[1:][replace] = baseline_token_id

            scores = _run_rows(
                forward_func,
                rows,
                i,
                batch,
                target,
                extra_args,
                attention_mask,
                max_batch_size,
            )
            originals.append(scores[0])
            perturbed.append(scores[1:])
            all_counts.append(counts)

    return _collect(originals, perturbed, all_counts)


def _validate(
    inputs: Tensor,
    attributions: Tensor,
    baseline_token_id: int,
    attention_mask: Tensor | None,
    replaceable_mask: Tensor | None,
    max_batch_size: int | None,
) -> Tensor:
    """Check the arguments and return per-token attributions of shape (batch, seq)."""
    if not isinstance(inputs, Tensor) or inputs.dim() != 2 or inputs.is_floating_point():
        raise ValueError(
            "inputs must be a 2D integer tensor of token ids (batch, seq), got "
            f"{_describe(inputs)}; pass the token ids, not embeddings."
        )
    if not isinstance(attributions, Tensor) or attributions.dim() not in (2, 3):
        raise ValueError(
            "attributions must be a tensor of shape (batch, seq) or (batch, seq, dim), "
            f"got {_describe(attributions)}."
        )
    if attributions.shape[:2] != inputs.shape:
        raise ValueError(
            f"attributions has shape {tuple(attributions.shape)} but inputs has shape "
            f"{tuple(inputs.shape)}; pass one attribution per token, of shape "
            f"{tuple(inputs.shape)} or {tuple(inputs.shape)} + (dim,)."
        )
    for name, mask in (
        ("attention_mask", attention_mask),
        ("replaceable_mask", replaceable_mask),
    ):
        if mask is not None and (not isinstance(mask, Tensor) or mask.shape != inputs.shape):
            raise ValueError(
                f"{name} must have the shape of inputs {tuple(inputs.shape)}, got "
                f"{_describe(mask)}."
            )
    if isinstance(baseline_token_id, bool) or not isinstance(baseline_token_id, int):
        raise TypeError(
            f"baseline_token_id must be an int token id, got {baseline_token_id!r}; "
            "e.g. pass tokenizer.convert_tokens_to_ids(' ') or the id of the space token."
        )
    if max_batch_size is not None and (not isinstance(max_batch_size, int) or max_batch_size < 1):
        raise ValueError(f"max_batch_size must be None or an integer >= 1, got {max_batch_size!r}.")
    if attributions.dim() == 3:
        attributions = attributions.sum(dim=-1)
    return attributions.detach().to(inputs.device)


def _describe(value: object) -> str:
    """Shape and dtype of a tensor, or the type of anything else, for messages."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"an object of type {type(value).__name__}"


def _replaceable_positions(
    inputs: Tensor,
    attention_mask: Tensor | None,
    replaceable_mask: Tensor | None,
    protect_ends: bool,
) -> Tensor:
    """Boolean (batch, seq) tensor of the positions that may be replaced."""
    present = (
        torch.ones_like(inputs, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.to(inputs.device).bool()
    )
    replaceable = present.clone()
    if replaceable_mask is not None:
        replaceable &= replaceable_mask.to(inputs.device).bool()
    if protect_ends:
        seq = inputs.shape[1]
        index = torch.arange(seq, device=inputs.device).expand_as(inputs)
        first = torch.where(present, index, seq).min(dim=1).values
        last = torch.where(present, index, -1).max(dim=1).values
        replaceable &= (index != first.unsqueeze(1)) & (index != last.unsqueeze(1))
    return replaceable


def _example_args(
    extra_args: tuple[Any, ...] | None, index: int, batch: int, rows: int
) -> tuple[Any, ...]:
    """Per-example slices of the additional forward args, repeated for ``rows`` copies."""
    if extra_args is None:
        return ()
    return tuple(
        arg[index : index + 1].expand(rows, *arg.shape[1:]).contiguous()
        if isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] == batch
        else arg
        for arg in extra_args
    )


def _run_rows(
    forward_func: Callable[..., Tensor],
    rows: Tensor,
    index: int,
    batch: int,
    target: TargetType,
    extra_args: tuple[Any, ...] | None,
    attention_mask: Tensor | None,
    max_batch_size: int | None,
) -> Tensor:
    """Target scores of all rows (copies of example ``index``), shape ``(rows,)``."""
    example_target = per_example_targets(target, batch)[index]
    chunk = max_batch_size or rows.shape[0]
    scores = []
    for chunk_rows in rows.split(chunk):
        n = chunk_rows.shape[0]
        kwargs: dict[str, Tensor] = {}
        if attention_mask is not None:
            mask = attention_mask[index : index + 1].expand(n, -1)
            kwargs["attention_mask"] = mask.contiguous()
        output = forward_func(chunk_rows, *_example_args(extra_args, index, batch, n), **kwargs)
        if not isinstance(output, Tensor) or output.dim() == 0 or output.shape[0] != n:
            raise ValueError(
                f"forward_func must return a tensor with one row per input row ({n}), got "
                f"{_describe(output)}; wrap the model so that it returns e.g. its logits."
            )
        try:
            selected = _select_targets(output, example_target)
        except (AssertionError, IndexError) as error:
            raise ValueError(
                f"target {example_target!r} cannot index the forward output of shape "
                f"{tuple(output.shape)}: {error}"
            ) from error
        if selected.numel() != n:
            raise ValueError(
                f"After selecting target {example_target!r}, the forward output has shape "
                f"{tuple(selected.shape)} instead of one score per row ({n},); pass a "
                "target that selects a single score, e.g. (-1, answer_id) for logits of "
                "shape (batch, seq, vocab)."
            )
        scores.append(selected.reshape(n))
    result = torch.cat(scores)
    return result.to(torch.promote_types(result.dtype, torch.float32))


def _collect(
    originals: list[Tensor], perturbed: list[Tensor], counts: list[list[int]]
) -> FaithfulnessResult:
    """Stack per-example scores into ``nan``-padded curves and their averages."""
    original = torch.stack(originals)
    shape = (len(counts), max(len(c) for c in counts))
    curve = original.new_full(shape, float("nan"))
    num_replaced = torch.full(shape, -1, dtype=torch.long, device=original.device)
    for i, (scores, example_counts) in enumerate(zip(perturbed, counts)):
        curve[i, : len(example_counts)] = original[i] - scores
        num_replaced[i, : len(example_counts)] = torch.tensor(example_counts)
    aopc = curve.nanmean(dim=1)
    scale = original.abs()
    return FaithfulnessResult(
        curve=curve,
        aopc=aopc,
        normalized_curve=curve / scale.unsqueeze(1),
        normalized_aopc=aopc / scale,
        original_score=original,
        num_replaced=num_replaced,
    )


def layer_faithfulness(*args: Any, **kwargs: Any) -> Any:
    r"""
    The GIM paper's layer experiment: residual-stream positions scored per layer
    (GIM, AtP, IG) and judged by :func:`comprehensiveness` and
    :func:`sufficiency` with the positions replaced by the sequence mean at that
    layer. See :func:`captum_gim.circuits.layers.layer_faithfulness` for the
    arguments.

    Returns:
        *list[LayerFaithfulness]*: per method, the normalised comprehensiveness
        and sufficiency of each layer.
    """
    from captum_gim.circuits.layers import layer_faithfulness as run

    return run(*args, **kwargs)
