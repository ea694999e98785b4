"""Rule 2: normalization with a frozen statistic in the backward pass."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from captum_gim.rules.precision import rule_dtype


class _FrozenNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        y: Tensor,
        weight: Tensor | None,
        eps: float,
        center: bool,
        weight_offset: float,
        n_dims: int,
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.center = eps, center
        ctx.weight_offset, ctx.n_dims = weight_offset, n_dims
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dims = tuple(range(-ctx.n_dims, 0))
        x32 = x.to(rule_dtype(x))
        if ctx.center:
            second_moment = x32.var(dim=dims, unbiased=False, keepdim=True)
        else:
            second_moment = x32.square().mean(dim=dims, keepdim=True)
        inverse_scale = torch.rsqrt(second_moment + ctx.eps)
        grad = grad_y.to(x32.dtype)
        if weight is not None:
            grad = grad * (weight.to(x32.dtype) + ctx.weight_offset)
        if ctx.center:
            grad = grad - grad.mean(dim=dims, keepdim=True)
        grad_x = (grad * inverse_scale).to(x.dtype)
        return grad_x, None, None, None, None, None, None


def frozen_layer_norm(
    x: Tensor, y: Tensor, weight: Tensor | None, eps: float, n_dims: int = 1
) -> Tensor:
    r"""
    Rule 2 for LayerNorm ``y = w * (x - mean) / sigma + b``: returns ``y`` whose
    backward treats ``sigma = sqrt(var(x) + eps)`` as a constant, so that
    ``grad_x = (w * grad_y - mean(w * grad_y)) / sigma``.

    Args:
        x (Tensor): The input of the normalization.
        y (Tensor): Its output, as the layer computed it.
        weight (Tensor or None): The elementwise scale ``w``; ``None`` for 1.
        eps (float): The epsilon added to the variance.
        n_dims (int, optional): How many trailing dimensions are normalized.
                    Default: 1

    Returns:
        *Tensor*: ``y`` unchanged; the gradient flows to ``x`` only.
    """
    return _FrozenNorm.apply(x, y, weight, eps, True, 0.0, n_dims)


def frozen_rms_norm(
    x: Tensor,
    y: Tensor,
    weight: Tensor | None,
    eps: float,
    weight_offset: float = 0.0,
    n_dims: int = 1,
) -> Tensor:
    r"""
    Rule 2 for RMSNorm ``y = (offset + w) * x / rho``: returns ``y`` whose
    backward treats ``rho = sqrt(mean(x^2) + eps)`` as a constant, so that
    ``grad_x = (offset + w) * grad_y / rho``.

    Args:
        x (Tensor): The input of the normalization.
        y (Tensor): Its output, as the layer computed it.
        weight (Tensor or None): The elementwise scale ``w``; ``None`` for 1.
        eps (float): The epsilon added to the mean square.
        weight_offset (float, optional): ``1.0`` for Gemma's ``(1 + w)`` norms.
                    Default: 0.0
        n_dims (int, optional): How many trailing dimensions are normalized.
                    Default: 1

    Returns:
        *Tensor*: ``y`` unchanged; the gradient flows to ``x`` only.
    """
    return _FrozenNorm.apply(x, y, weight, eps, False, weight_offset, n_dims)
