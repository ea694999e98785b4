"""Argument checks shared by the attribution classes, with errors that say the fix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from captum._utils.common import _format_baseline
from torch import Tensor, nn


def resolve_model(forward_func: Callable[..., Any], model: nn.Module | None) -> nn.Module:
    r"""
    Returns:
        *nn.Module*: ``model``, or ``forward_func`` itself when it is a module.
    """
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be the nn.Module that gets the GIM rules, got "
                f"{type(model).__name__}."
            )
        return model
    if isinstance(forward_func, nn.Module):
        return forward_func
    bound_to = getattr(forward_func, "__self__", None)
    if isinstance(bound_to, nn.Module):
        return bound_to
    raise TypeError(
        "forward_func is not an nn.Module, so GIM does not know which model to "
        "modify. Pass it as model=, e.g. GIMAttribution(forward_func, model=model)."
    )


def check_float_inputs(inputs: tuple[Tensor, ...], layer_hint: bool = True) -> None:
    r"""Raises a clear error for integer (token id) or empty inputs."""
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"inputs[{index}] must be a torch.Tensor, got {type(tensor).__name__}."
            )
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
                f"baselines[{index}] must be a tensor or a number, got "
                f"{type(baseline).__name__}."
            )
        if not baseline.is_floating_point():
            raise TypeError(
                f"baselines[{index}] has dtype {baseline.dtype}; use a "
                f"floating-point baseline like inputs[{index}] ({tensor.dtype})."
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
