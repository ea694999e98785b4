"""Rule 2: normalization with a frozen statistic in the backward pass.

Every rule here can check, before it changes a gradient, that its own
recomputation of the forward ``scale * (x - mean) / sigma + bias`` equals the
output the layer actually computed; a layer whose form was misread then fails
loudly instead of receiving a wrong gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from captum_gim.rules.precision import rule_dtype

#: Called with the largest deviation when a recomputed forward does not match.
#: Called with the deviation of a misread norm: raises, or returns True to give
#: that call the exact gradient (through the module's own graph).
Verify = Callable[[float], bool | None]

_TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


def forward_tolerance(dtype: torch.dtype) -> float:
    r"""
    Returns:
        *float*: the relative tolerance (of ``1 + max |y|``) within which a
        recomputed normalization output of ``dtype`` counts as equal.
    """
    return _TOLERANCE.get(dtype, 1e-4)


class _FrozenNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        y: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        center: bool,
        weight_offset: float,
        n_dims: int,
        sum_square: bool,
        verify: Verify | None,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, bias, y if verify is not None else None)
        ctx.eps, ctx.center, ctx.sum_square = eps, center, sum_square
        ctx.weight_offset, ctx.n_dims, ctx.verify = weight_offset, n_dims, verify
        return y.clone()  # not a view: models may modify the output in place (XLM)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, y = ctx.saved_tensors
        dims = tuple(range(-ctx.n_dims, 0))
        x32 = x.to(rule_dtype(x))
        if ctx.center:
            x32 = x32 - x32.mean(dim=dims, keepdim=True)
        second_moment = x32.square()
        if ctx.sum_square:
            second_moment = second_moment.sum(dim=dims, keepdim=True)
        else:
            second_moment = second_moment.mean(dim=dims, keepdim=True)
        inverse_scale = torch.rsqrt(second_moment + ctx.eps)
        scale = None if weight is None else weight.to(x32.dtype) + ctx.weight_offset
        if ctx.verify is not None and _verify(ctx.verify, x32 * inverse_scale, scale, bias, y):
            return None, grad_y, None, None, None, None, None, None, None, None
        grad = grad_y.to(x32.dtype)
        if scale is not None:
            grad = grad * scale
        if ctx.center:
            grad = grad - grad.mean(dim=dims, keepdim=True)
        grad_x = (grad * inverse_scale).to(x.dtype)
        return grad_x, None, None, None, None, None, None, None, None, None


def _verify(
    verify: Verify, normalized: Tensor, scale: Tensor | None, bias: Tensor | None, y: Tensor
) -> bool:
    """True when ``y`` is misread and ``verify`` asks for the exact gradient."""
    recomputed = normalized if scale is None else normalized * scale
    if bias is not None:
        recomputed = recomputed + bias.to(recomputed.dtype)
    y32 = y.to(recomputed.dtype)
    deviation = float((recomputed - y32).abs().max()) if y.numel() else 0.0
    bound = forward_tolerance(y.dtype) * (1.0 + float(y32.abs().max() if y.numel() else 0.0))
    if not deviation <= bound:
        return bool(verify(deviation))
    return False


def frozen_layer_norm(
    x: Tensor,
    y: Tensor,
    weight: Tensor | None,
    eps: float,
    n_dims: int = 1,
    *,
    bias: Tensor | None = None,
    weight_offset: float = 0.0,
    verify: Verify | None = None,
) -> Tensor:
    r"""
    Rule 2 for LayerNorm ``y = (offset + w) * (x - mean) / sigma + b``: returns
    ``y`` whose backward treats ``sigma = sqrt(var(x) + eps)`` as a constant, so
    that ``grad_x = (g - mean(g)) / sigma`` with ``g = (offset + w) * grad_y``.

    Args:
        x (Tensor): The input of the normalization.
        y (Tensor): Its output, as the layer computed it.
        weight (Tensor or None): The elementwise scale ``w``; ``None`` for 1.
        eps (float): The epsilon added to the variance.
        n_dims (int, optional): How many trailing dimensions are normalized.
                    Default: 1
        bias (Tensor or None, optional): The bias ``b``, only for ``verify``.
                    Default: None
        weight_offset (float, optional): ``1.0`` for ``(1 + w)`` norms
                    (Nemotron's ``LayerNorm1P``).
                    Default: 0.0
        verify (callable, optional): Called with the largest deviation, before
                    any gradient is computed, when the formula above does not
                    reproduce ``y`` from ``x``; it should raise, or return True
                    to give ``x`` the exact gradient through ``y``'s own graph.
                    Default: None (no check)

    Returns:
        *Tensor*: ``y`` unchanged; the gradient flows to ``x`` only.
    """
    return _FrozenNorm.apply(x, y, weight, bias, eps, True, weight_offset, n_dims, False, verify)


def frozen_rms_norm(
    x: Tensor,
    y: Tensor,
    weight: Tensor | None,
    eps: float,
    weight_offset: float = 0.0,
    n_dims: int = 1,
    *,
    bias: Tensor | None = None,
    sum_square: bool = False,
    verify: Verify | None = None,
) -> Tensor:
    r"""
    Rule 2 for RMSNorm ``y = (offset + w) * x / rho``: returns ``y`` whose
    backward treats ``rho = sqrt(mean(x^2) + eps)`` (or ``sqrt(sum(x^2) + eps)``
    for an L2 norm) as a constant, so that ``grad_x = (offset + w) * grad_y / rho``.

    Args:
        x (Tensor): The input of the normalization.
        y (Tensor): Its output, as the layer computed it.
        weight (Tensor or None): The elementwise scale ``w``; ``None`` for 1.
        eps (float): The epsilon added to the mean square.
        weight_offset (float, optional): ``1.0`` for Gemma's ``(1 + w)`` norms.
                    Default: 0.0
        n_dims (int, optional): How many trailing dimensions are normalized.
                    Default: 1
        bias (Tensor or None, optional): A bias added after scaling, only for
                    ``verify``.
                    Default: None
        sum_square (bool, optional): ``True`` for an L2 norm (sum of squares).
                    Default: False
        verify (callable, optional): As for :func:`frozen_layer_norm`.
                    Default: None

    Returns:
        *Tensor*: ``y`` unchanged; the gradient flows to ``x`` only.
    """
    return _FrozenNorm.apply(
        x, y, weight, bias, eps, False, weight_offset, n_dims, sum_square, verify
    )


class _FrozenGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        y: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        groups: int,
        eps: float,
        verify: Verify | None,
    ) -> Tensor:
        ctx.save_for_backward(x, weight, bias, y if verify is not None else None)
        ctx.groups, ctx.eps, ctx.verify = groups, eps, verify
        return y.clone()  # not a view: models may modify the output in place (XLM)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, y = ctx.saved_tensors
        shape = x.shape
        channel_shape = (1, shape[1]) + (1,) * (x.dim() - 2)
        grouped = x.to(rule_dtype(x)).reshape(shape[0], ctx.groups, -1)
        centered = grouped - grouped.mean(dim=-1, keepdim=True)
        inverse_scale = torch.rsqrt(centered.square().mean(dim=-1, keepdim=True) + ctx.eps)
        scale = None if weight is None else weight.to(centered.dtype).reshape(channel_shape)
        if ctx.verify is not None:
            normalized = (centered * inverse_scale).reshape(shape)
            shift = None if bias is None else bias.reshape(channel_shape)
            if _verify(ctx.verify, normalized, scale, shift, y):
                return None, grad_y, None, None, None, None, None
        grad = grad_y.to(centered.dtype)
        if scale is not None:
            grad = grad * scale
        grad = grad.reshape(shape[0], ctx.groups, -1)
        grad = (grad - grad.mean(dim=-1, keepdim=True)) * inverse_scale
        return grad.reshape(shape).to(x.dtype), None, None, None, None, None, None


def frozen_group_norm(
    x: Tensor,
    y: Tensor,
    weight: Tensor | None,
    groups: int,
    eps: float,
    *,
    bias: Tensor | None = None,
    verify: Verify | None = None,
) -> Tensor:
    r"""
    Rule 2 for GroupNorm (and InstanceNorm, one group per channel) on
    ``batch x channels x ...``: returns ``y`` whose backward treats each group's
    ``sigma = sqrt(var + eps)`` as a constant, so that
    ``grad_x = (g - mean_group(g)) / sigma`` with ``g = w * grad_y`` (``w`` per
    channel).

    Args:
        x (Tensor): The input, ``batch x channels x ...``.
        y (Tensor): Its output, as the layer computed it.
        weight (Tensor or None): The per-channel scale; ``None`` for 1.
        groups (int): The number of channel groups.
        eps (float): The epsilon added to the variance.
        bias (Tensor or None, optional): The per-channel bias, only for ``verify``.
                    Default: None
        verify (callable, optional): As for :func:`frozen_layer_norm`.
                    Default: None

    Returns:
        *Tensor*: ``y`` unchanged; the gradient flows to ``x`` only.
    """
    return _FrozenGroupNorm.apply(x, y, weight, bias, groups, eps, verify)
