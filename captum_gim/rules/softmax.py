"""Rule 1: the temperature-adjusted softmax backward."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from captum_gim.rules.precision import rule_dtype


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
