"""The mathematics of the three GIM backward rules, on bare tensors.

Nothing here knows about models: each function leaves the forward value exactly
as it was and only changes what the backward pass sends to its input. All rule
arithmetic runs in float32 (float64 for float64 inputs) and the gradients are cast
back to the input dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def rule_dtype(x: Tensor) -> torch.dtype:
    r"""
    Returns:
        *torch.dtype*: the dtype the rule arithmetic runs in for ``x``: float32,
        or float64 when ``x`` is float64.
    """
    return torch.promote_types(x.dtype, torch.float32)


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


def tempered_softmax_backward(scores: Tensor, grad_probs: Tensor, temperature: float) -> Tensor:
    r"""
    Rule 1 on one block of attention rows:
    ``grad_s = p_T * (grad_p - <grad_p, p_T>)`` with ``p_T = softmax(s / T)``.

    Keys whose score is ``-inf`` get ``p_T = 0``; a row whose keys are all
    masked gets a zero gradient.

    Args:
        scores (Tensor): Scores ``s`` as the softmax saw them (after
                    scaling, soft-capping and masking), keys on the last dim.
        grad_probs (Tensor): Upstream gradient ``grad_p``, same dtype.
        temperature (float): ``T``; ``1.0`` gives the exact softmax gradient.

    Returns:
        *Tensor*: the gradient of the scores, in their dtype.
    """
    tempered = torch.softmax(scores / temperature, dim=-1).nan_to_num_(0.0)
    inner = (grad_probs * tempered).sum(dim=-1, keepdim=True)
    return tempered * (grad_probs - inner)


class _TemperedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, scores: Tensor, temperature: float) -> Tensor:
        ctx.save_for_backward(scores)
        ctx.temperature = temperature
        return torch.softmax(scores, dim=-1, dtype=torch.float32)

    @staticmethod
    def backward(ctx: Any, grad_probs: Tensor) -> tuple[Tensor, None]:
        (scores,) = ctx.saved_tensors
        dtype = rule_dtype(scores)
        grad = tempered_softmax_backward(scores.to(dtype), grad_probs.to(dtype), ctx.temperature)
        return grad.to(scores.dtype), None


def tempered_softmax(scores: Tensor, temperature: float) -> Tensor:
    r"""
    Softmax over the last dimension, computed in float32 as the attention of
    transformers computes it, with the rule 1 backward
    (:func:`tempered_softmax_backward`).

    Args:
        scores (Tensor): Attention scores, keys on the last dimension.
        temperature (float): ``T``; ``1.0`` gives the exact softmax gradient.

    Returns:
        *Tensor*: the float32 probabilities ``softmax(scores)``.
    """
    return _TemperedSoftmax.apply(scores, temperature)
