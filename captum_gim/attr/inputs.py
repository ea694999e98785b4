"""Checks of inputs and baselines, with errors that say the fix."""

from __future__ import annotations

from typing import Any

import torch
from captum._utils.common import _format_baseline
from torch import Tensor


def check_nonempty_inputs(inputs: tuple[Any, ...]) -> None:
    r"""Raises a clear error for empty input tensors (no example or no token)."""
    for index, tensor in enumerate(inputs):
        if isinstance(tensor, Tensor) and tensor.numel() == 0:
            raise ValueError(
                f"inputs[{index}] is empty (shape {tuple(tensor.shape)}); pass at "
                "least one example with at least one token."
            )


def check_float_inputs(inputs: tuple[Tensor, ...]) -> None:
    r"""Raises a clear error for integer (token id) or empty inputs."""
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"inputs[{index}] must be a torch.Tensor, got {type(tensor).__name__}.")
        if not tensor.is_floating_point():
            raise TypeError(
                f"inputs[{index}] has dtype {tensor.dtype}; GIMAttribution needs "
                "floating-point inputs. Token ids cannot carry gradients: attribute "
                "to the embeddings with captum_gim.LayerGIM(model, "
                "model.get_input_embeddings()), or pass inputs_embeds."
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
