"""Checks of inputs, baselines and targets, with errors that say the fix."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from captum._utils.common import _format_baseline
from captum._utils.typing import TargetType
from torch import Tensor


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
        return output

    try:  # Captum inspects the signature (a forward without arguments is special)
        forward.__signature__ = inspect.signature(forward_func)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        pass
    if hasattr(forward_func, "device_ids"):  # DataParallel, read by Captum
        forward.device_ids = forward_func.device_ids  # type: ignore[attr-defined]
    return forward


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
    if not shape:
        raise ValueError(
            "forward_func returned a single scalar (shape ()); Captum needs one "
            "output per example: return shape (batch,) for one scalar per "
            "example, or (batch, n_outputs) and pass target=."
        )
    if target is None:
        if output[0].numel() != 1:
            raise ValueError(
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
            raise ValueError(
                f"target has shape {tuple(target.shape)}; a tensor target is one "
                f"index for every example (one element) or one index per example "
                f"(shape ({shape[0]},))."
            )
    if isinstance(target, (int, tuple)):
        _check_index(target, shape, "target")
    elif isinstance(target, list):
        if len(target) != shape[0]:
            raise ValueError(
                f"target has {len(target)} entries but the batch has {shape[0]} "
                f"examples (output shape {shape}); pass one target per example, or "
                "one int for all."
            )
        if target and all(isinstance(t, int) for t in target) and len(shape) != 2:
            raise ValueError(
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
        raise ValueError(
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
            raise IndexError(
                f"{name} = {index!r} is out of range for the output of forward_func "
                f"of shape {shape}: the index of dimension {dim} must be in {allowed}."
            )


@contextlib.contextmanager
def clear_gradient_errors() -> Iterator[None]:
    r"""
    Turns errors of the gradient computation that have a known cause into
    errors that say the fix (reentrant gradient checkpointing).
    """
    try:
        yield
    except RuntimeError as error:
        if "use_reentrant=True" not in str(error):
            raise
        raise RuntimeError(
            "The model uses reentrant gradient checkpointing (use_reentrant=True), "
            "which cannot compute gradients with torch.autograd.grad as Captum "
            "does. Enable it with model.gradient_checkpointing_enable("
            "gradient_checkpointing_kwargs={'use_reentrant': False}) (the "
            "transformers default; GIM gives the same attributions as without "
            "checkpointing), or call model.eval(), which turns checkpointing off."
        ) from error


def check_nonempty_inputs(inputs: tuple[Any, ...]) -> None:
    r"""Raises a clear error for empty input tensors (no example or no token)."""
    for index, tensor in enumerate(inputs):
        if isinstance(tensor, Tensor) and tensor.numel() == 0:
            raise ValueError(
                f"inputs[{index}] is empty (shape {tuple(tensor.shape)}); pass at "
                "least one example with at least one token."
            )


def check_float_inputs(inputs: tuple[Tensor, ...], layer_hint: bool = True) -> None:
    r"""Raises a clear error for integer (token id) or empty inputs."""
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"inputs[{index}] must be a torch.Tensor, got {type(tensor).__name__}.")
        if not tensor.is_floating_point():
            hint = (
                " Token ids cannot carry gradients: attribute to the embeddings "
                "with captum_gim.LayerGIM(model, model.get_input_embeddings()), "
                "or pass inputs_embeds."
                if layer_hint
                else ""
            )
            raise TypeError(
                f"inputs[{index}] has dtype {tensor.dtype}; GIMAttribution needs "
                f"floating-point inputs.{hint}"
            )
        if tensor.numel() == 0:
            raise ValueError(
                f"inputs[{index}] is empty (shape {tuple(tensor.shape)}); pass at "
                "least one example with at least one token."
            )


def format_baselines(
    baselines: object, inputs: tuple[Tensor, ...]
) -> tuple[Tensor | int | float, ...]:
    r"""
    Captum's baseline formatting (None means zeros, one value per input), with
    errors that name the bad baseline and the fix.

    Returns:
        *tuple*: one tensor or number per input tensor.
    """
    if baselines is not None:
        items = baselines if isinstance(baselines, tuple) else (baselines,)
        for index, baseline in enumerate(items):
            if isinstance(baseline, bool) or not isinstance(baseline, (Tensor, int, float)):
                raise TypeError(
                    f"baselines[{index}] must be a tensor or a number, got "
                    f"{type(baseline).__name__}."
                )
    formatted = _format_baseline(baselines, inputs)  # type: ignore[arg-type]
    check_baselines(inputs, formatted)
    return formatted


def check_baselines(
    inputs: tuple[Tensor, ...], baselines: tuple[Tensor | int | float, ...]
) -> None:
    r"""Raises a clear error for baselines that do not match their inputs."""
    if len(baselines) != len(inputs):
        raise ValueError(
            f"Got {len(baselines)} baselines for {len(inputs)} inputs; pass one "
            "baseline (a tensor or a number) per input tensor."
        )
    for index, (tensor, baseline) in enumerate(zip(inputs, baselines)):
        if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
            continue
        if not isinstance(baseline, Tensor):
            raise TypeError(
                f"baselines[{index}] must be a tensor or a number, got {type(baseline).__name__}."
            )
        if not baseline.is_floating_point():
            raise TypeError(
                f"baselines[{index}] has dtype {baseline.dtype}; use a "
                f"floating-point baseline like inputs[{index}] ({tensor.dtype})."
            )
        if tensor.is_floating_point() and baseline.dtype != tensor.dtype:
            raise TypeError(
                f"baselines[{index}] has dtype {baseline.dtype} but inputs[{index}] "
                f"has {tensor.dtype}; pass baselines[{index}].to({tensor.dtype}) so "
                "the attributions keep the inputs' dtype."
            )
        if baseline.device != tensor.device:
            raise ValueError(
                f"baselines[{index}] is on {baseline.device} but inputs[{index}] is "
                f"on {tensor.device}; move it with .to(inputs.device)."
            )
        try:
            shape = torch.broadcast_shapes(baseline.shape, tensor.shape)
        except RuntimeError:
            shape = None
        if shape != tensor.shape:
            raise ValueError(
                f"baselines[{index}] has shape {tuple(baseline.shape)}, which does "
                f"not broadcast to inputs[{index}]'s shape {tuple(tensor.shape)}; "
                "pass the same shape, a batch of one, or a number."
            )
