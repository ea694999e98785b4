"""Targets: checked against the forward output before any backward pass."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from captum._utils.typing import TargetType
from torch import Tensor


class TargetError(ValueError, AssertionError):
    r"""
    A target of the wrong form or length for the forward output. A
    ``ValueError`` and, because Captum raises ``AssertionError`` for invalid
    targets, an ``AssertionError`` too: code written for either catches it.
    """


def check_text_target(tokenizer: Any, text: str) -> list[int]:
    r"""
    The token ids of a target given as text, tokenized without special tokens (as
    Captum's ``LLMGradientAttribution`` tokenizes it), refusing a text that has no
    tokens or a word the tokenizer does not know: such a word would become the
    tokenizer's ``unk_token`` and its explanation would be that of ``<unk>``.

    The command line, :func:`captum_gim.explain.explain` and
    :class:`~captum_gim.LLMGIMAttribution` all check text targets here.

    Args:
        tokenizer: A transformers tokenizer.
        text (str): The target text, e.g. ``" Paris"``.

    Returns:
        *list[int]*: The target's token ids.

    Raises:
        TargetError: With one line naming the unknown words (a ``ValueError`` and an
                    ``AssertionError``).

    Examples::

        >>> from captum_gim.models import load_model
        >>> _, tokenizer = load_model()
        >>> ids = check_text_target(tokenizer, "positive")
    """
    ids = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise TargetError(f"the target {text!r} tokenizes to no tokens; give some text.")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        unknown = [
            word
            for word in text.split()
            if unk in tokenizer(word, add_special_tokens=False)["input_ids"]
        ]
        words = ", ".join(repr(w) for w in unknown) if unknown else repr(text)
        raise TargetError(
            f"the target {text!r} has words the tokenizer does not know ({words} would be "
            f"{tokenizer.unk_token}); use words of the model's vocabulary."
        )
    return ids


class TargetIndexError(IndexError, AssertionError):
    r"""
    A target index out of range for the forward output: an ``IndexError`` and,
    as Captum's target errors are, an ``AssertionError``.
    """


def checked_forward(forward_func: Callable[..., Any], target: TargetType) -> Callable[..., Any]:
    r"""
    Wraps ``forward_func`` so that ``target`` is checked against its output
    right after the forward pass, before Captum selects the target and before
    any backward pass (:func:`check_target`).

    Args:
        forward_func (Callable): The forward function Captum will call.
        target (TargetType): The target given by the caller.

    Returns:
        *Callable*: a function with the signature of ``forward_func``.
    """

    def forward(*args: Any, **kwargs: Any) -> Any:
        output = forward_func(*args, **kwargs)
        if isinstance(output, Tensor):
            check_target(target, output)
        elif hasattr(output, "logits") or hasattr(output, "last_hidden_state"):
            raise TypeError(
                f"forward_func returned a {type(output).__name__}, not a tensor; return "
                "the scores to explain, e.g. lambda e: model(inputs_embeds=e).logits[:, -1] "
                "(or captum_gim.logits_forward(model))."
            )
        return output

    try:  # Captum inspects the signature (a forward without arguments is special)
        forward.__signature__ = inspect.signature(forward_func)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        pass
    if hasattr(forward_func, "device_ids"):  # DataParallel, read by Captum
        forward.device_ids = forward_func.device_ids  # type: ignore[attr-defined]
    return forward


#: The target of one example: None, an output index, or a tuple of indices.
ExampleTarget = None | int | tuple[Any, ...]


def per_example_targets(target: TargetType, batch: int) -> list[ExampleTarget]:
    r"""
    Splits a batched target with Captum's conventions into one target per
    example: None, an int or a tuple applies to every example; a tensor holds
    one index or one per example; a list has one entry per example.

    Args:
        target (TargetType): The target given by the caller.
        batch (int): The number of examples.

    Returns:
        *list*: ``batch`` targets, each None, an int or a tuple.
    """
    check_target_form(target)
    if target is None or isinstance(target, (int, tuple)):
        return [target] * batch
    if isinstance(target, Tensor):
        if target.numel() == 1:
            return [int(target.item())] * batch
        if target.dim() == 1 and target.numel() == batch:
            return [int(index) for index in target.tolist()]
        raise ValueError(
            f"target has shape {tuple(target.shape)}; a tensor target is one index for "
            f"every example (one element) or one index per example (shape ({batch},))."
        )
    if isinstance(target, list):
        if len(target) != batch:
            raise ValueError(
                f"target has {len(target)} entries but the batch has {batch} examples; "
                "pass one target per example, or one int for all."
            )
        return [entry if isinstance(entry, tuple) else int(entry) for entry in target]
    raise TypeError(
        f"target of type {type(target).__name__} is not supported; pass None, an int, a "
        "tuple, a tensor of indices or a list with one target per example."
    )


def check_target_form(target: TargetType) -> None:
    r"""
    Raises a clear ``TypeError``, before any forward pass, for a target that
    cannot be an output index: a string, a float, or a floating-point tensor
    (often a baseline passed by position, as ``IntegratedGradients.attribute``
    takes it; GIM's ``baselines`` is keyword-only).

    Args:
        target (TargetType): The target given by the caller.
    """
    if isinstance(target, str):
        raise TypeError(
            f"target is the string {target!r}; GIMAttribution and LayerGIM take output "
            "indices. Convert the token first, e.g. target=tokenizer.convert_tokens_to_ids("
            "token), or use captum_gim.LLMGIMAttribution, which accepts string targets."
        )
    is_float = isinstance(target, float) or (
        isinstance(target, Tensor) and (target.is_floating_point() or target.is_complex())
    )
    if is_float:
        kind = f"dtype {target.dtype}" if isinstance(target, Tensor) else f"the float {target}"
        raise TypeError(
            f"target has {kind}; a target is an integer output index (e.g. target.long()). "
            "baselines are keyword-only in GIM: attribute(inputs, baselines=...)."
        )


def check_target(target: TargetType, output: Tensor) -> None:
    r"""
    Raises a clear error when ``target`` cannot select one scalar per example
    of ``output`` with Captum's conventions: an index out of range
    (``IndexError``), or a target of the wrong form or length (``ValueError``).

    Args:
        target (TargetType): None, an int, a tuple of ints, a tensor, or a list
                    of ints or tuples (one per example).
        output (Tensor): The output of the forward function, ``batch x ...``.
    """
    shape = tuple(output.shape)
    if len(shape) == 3 and isinstance(target, int) and not isinstance(target, bool):
        raise TargetError(
            f"forward_func returns logits for every token (shape {shape}), so target "
            f"{target!r} cannot pick one score; select the position to explain, e.g. "
            "lambda e: model(inputs_embeds=e).logits[:, -1] (or "
            "captum_gim.logits_forward(model))."
        )
    if not shape:
        raise TargetError(
            "forward_func returned a single scalar (shape ()); Captum needs one "
            "output per example: return shape (batch,) for one scalar per "
            "example, or (batch, n_outputs) and pass target=."
        )
    if target is None:
        if output[0].numel() != 1:
            raise TargetError(
                f"target is None, but forward_func returns {shape[1:]} outputs per "
                f"example (output shape {shape}). Pass target= (e.g. a class index "
                "in [0, "
                f"{shape[-1] - 1}]), or make forward_func return one scalar per example."
            )
        return
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex():
            raise TypeError(
                f"target has dtype {target.dtype}; pass integer indices, e.g. target.long()."
            )
        if target.numel() == 1:
            target = int(target.item())
        elif target.dim() == 1:
            target = [int(index) for index in target.tolist()]
        else:
            raise TargetError(
                f"target has shape {tuple(target.shape)}; a tensor target is one "
                f"index for every example (one element) or one index per example "
                f"(shape ({shape[0]},))."
            )
    if isinstance(target, (int, tuple)):
        _check_index(target, shape, "target")
    elif isinstance(target, list):
        if len(target) != shape[0]:
            raise TargetError(
                f"target has {len(target)} entries but the batch has {shape[0]} "
                f"examples (output shape {shape}); pass one target per example, or "
                "one int for all."
            )
        if target and all(isinstance(t, int) for t in target) and len(shape) != 2:
            raise TargetError(
                f"target is a list of ints, which needs an output of shape (batch, "
                f"n_outputs), but forward_func returns shape {shape}; pass a list of "
                "tuples, one index per output dimension after the batch."
            )
        for position, entry in enumerate(target):
            if isinstance(entry, (int, tuple)):
                _check_index(entry, shape, f"target[{position}]", per_example=True)


def _check_index(
    index: int | tuple[Any, ...], shape: tuple[int, ...], name: str, per_example: bool = False
) -> None:
    indices = (index,) if isinstance(index, int) else index
    if len(indices) > len(shape) - 1:
        raise TargetError(
            f"{name} = {index!r} has {len(indices)} indices, but the output of "
            f"forward_func has shape {shape}: at most {len(shape) - 1} (one per "
            "dimension after the batch)."
        )
    for dim, value in enumerate(indices, start=1):
        if isinstance(value, bool) or not isinstance(value, int):
            continue  # slices and the like: Captum's conventions apply
        size = shape[dim]
        low = 0 if per_example and isinstance(index, int) else -size
        if not low <= value < size:
            allowed = f"[0, {size - 1}]" if low == 0 else f"[{low}, {size - 1}]"
            raise TargetIndexError(
                f"{name} = {index!r} is out of range for the output of forward_func "
                f"of shape {shape}: the index of dimension {dim} must be in {allowed}."
            )
