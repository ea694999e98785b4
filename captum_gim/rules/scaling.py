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
