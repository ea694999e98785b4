"""Rule 3: the gradient split at multiplicative interactions, as a gradient scale."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor | float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def scale_gradient(x: Tensor, scale: Tensor | float) -> Tensor:
    r"""
    Identity in the forward pass; multiplies the gradient by ``scale`` in the
    backward pass (rule 3, the gradient split at multiplicative interactions).

    Args:
        x (Tensor): Any tensor.
        scale (float or Tensor): A number, or a tensor that broadcasts against
                    ``x`` (e.g. one scale per channel of a fused projection).

    Returns:
        *Tensor*: ``x`` unchanged, whose gradient will be ``scale * grad``.
    """
    if isinstance(scale, (int, float)) and scale == 1.0:
        return x
    return _ScaleGradient.apply(x, scale)


class Lazy:
    r"""A rule parameter settled after the forward pass, before the backward
    (e.g. once a check of the module's output has passed)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: Tensor | float | None = None

    def get(self) -> Tensor | float:
        r"""
        Returns:
            *Tensor or float*: the settled value; raises RuntimeError when unsettled.
        """
        if self.value is None:
            raise RuntimeError("a GIM rule was not settled before the backward pass")
        return self.value


class _LazyScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Lazy) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        scale = ctx.scale.get()
        if isinstance(scale, (int, float)) and scale == 1.0:
            return grad, None
        return grad * scale, None


def lazy_scale_gradient(x: Tensor, scale: Lazy) -> Tensor:
    r"""
    As :func:`scale_gradient`, with a scale that is read in the backward pass.

    Args:
        x (Tensor): Any tensor.
        scale (Lazy): The scale, settled before the backward pass.

    Returns:
        *Tensor*: ``x`` unchanged, whose gradient will be ``scale.get() * grad``.
    """
    return _LazyScaleGradient.apply(x, scale)
