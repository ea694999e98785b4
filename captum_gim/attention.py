"""Rules 1 and 3 inside attention, routed through transformers' AttentionInterface.

During :func:`captum_gim.gim_rules`, each attention module of the model gets, for
that call only, a shallow copy of its config whose attention implementation is
``"captum_gim"``. The model's own config is untouched, so the masks are built
exactly as the loaded implementation (eager or sdpa) expects, and other models,
also of the same class, keep their exact gradients. The function registered as
``"captum_gim"`` scales the q/k/v gradients and computes the attention:

- for models loaded with ``sdpa``, the forward is transformers' own sdpa call and
  the tempered softmax backward is computed from recomputed scores, one block of
  queries at a time, so no tokens x tokens probability matrix is kept;
- for models loaded with ``eager`` (or with attention dropout active), the scores
  and probabilities are materialised as eager attention does, and the softmax
  gets the tempered backward.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from captum_gim.config import GIMConfig
from captum_gim.functional import (
    rule_dtype,
    scale_gradient,
    tempered_softmax,
)

GIM_ATTENTION = "captum_gim"
SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa")

# Largest number of float32 score entries (batch x heads x query block x keys)
# that the blockwise backward materialises at once.
BACKWARD_BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class _AttentionSite:
    config: GIMConfig
    implementation: str
    eager_function: Callable[..., tuple[Tensor, Tensor | None]] | None


_sites: weakref.WeakKeyDictionary[nn.Module, _AttentionSite] = weakref.WeakKeyDictionary()
_sites_lock = threading.Lock()


def attention_implementation(module: nn.Module) -> str | None:
    r"""
    Returns:
        *str or None*: the attention implementation an attention module was
        loaded with (``"eager"``, ``"sdpa"``, ...), read from its config.
    """
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None)


@contextlib.contextmanager
def route_attention(module: nn.Module, config: GIMConfig) -> Iterator[None]:
    r"""
    Routes one attention module through the GIM attention function for the
    duration of the block, then restores its config object.

    Args:
        module (nn.Module): An attention module that calls
                    ``ALL_ATTENTION_FUNCTIONS.get_interface``.
        config (GIMConfig): The rule settings.
    """
    register_gim_attention()
    implementation = attention_implementation(module) or "eager"
    own_config = module.config
    routed_config = copy.copy(own_config)
    routed_config._attn_implementation_internal = GIM_ATTENTION
    site = _AttentionSite(config, implementation, _eager_function_of(module))
    with _sites_lock:
        _sites[module] = site
    module.config = routed_config
    try:
        yield
    finally:
        module.config = own_config
        with _sites_lock:
            _sites.pop(module, None)


def _eager_function_of(module: nn.Module) -> Callable[..., Any] | None:
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def gim_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    r"""
    The attention function registered as ``"captum_gim"`` in transformers'
    ``AttentionInterface``; it follows that interface's signature and is only
    valid for modules routed by :func:`route_attention`.
    """
    site = _sites.get(module)
    if site is None:
        raise RuntimeError(
            f"{type(module).__name__} uses attention implementation "
            f"'{GIM_ATTENTION}' outside of captum_gim.gim_rules. Set the model's "
            "attn_implementation to 'sdpa' or 'eager'."
        )
    config = site.config
    query = scale_gradient(query, config.q_scale)
    key = scale_gradient(key, config.k_scale)
    value = scale_gradient(value, config.v_scale)
    common = dict(dropout=dropout, scaling=scaling, softcap=softcap, **kwargs)
    if not config.softmax_rule_on:
        original = (
            sdpa_attention_forward
            if site.implementation == "sdpa"
            else site.eager_function or eager_gim_attention
        )
        return original(module, query, key, value, attention_mask, **common)
    temperature = float(config.temperature)  # type: ignore[arg-type]
    fused_ok = dropout == 0.0 and softcap is None and kwargs.get("position_bias") is None
    if site.implementation == "sdpa" and fused_ok:
        is_causal = kwargs.pop("is_causal", None)
        output = _TemperedSdpaAttention.apply(
            query,
            key,
            value,
            attention_mask,
            module,
            scaling,
            is_causal,
            temperature,
            kwargs,
        )
        return output, None
    return eager_gim_attention(
        module, query, key, value, attention_mask, temperature=temperature, **common
    )


def eager_gim_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    r"""
    Attention with materialised probabilities, computed as transformers' eager
    attention computes it, whose softmax has the tempered backward of rule 1.

    Args:
        module (nn.Module): The attention module (for ``training`` and
                    ``is_causal``).
        query (Tensor): ``batch x heads x queries x head_dim``.
        key (Tensor): ``batch x kv_heads x keys x head_dim``.
        value (Tensor): ``batch x kv_heads x keys x head_dim``.
        attention_mask (Tensor or None): Additive float mask or boolean mask
                    (True = attend), broadcastable to the scores.
        dropout (float, optional): Attention dropout probability.
        scaling (float or None, optional): Score scale; ``head_dim ** -0.5``
                    when None.
        softcap (float or None, optional): Gemma-2 style ``c * tanh(s / c)``.
        temperature (float, optional): ``T`` of the softmax backward.

    Returns:
        *tuple[Tensor, Tensor]*: the output ``batch x queries x heads x dim`` and
        the attention probabilities.
    """
    n_rep = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = _boolean_or_additive_mask(module, attention_mask, query, key, kwargs)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    probs = tempered_softmax(scores, temperature).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


def _boolean_or_additive_mask(
    module: nn.Module,
    attention_mask: Tensor | None,
    query: Tensor,
    key: Tensor,
    kwargs: dict[str, Any],
) -> Tensor | None:
    """The mask as given, or the causal mask sdpa would imply when it is None."""
    if attention_mask is not None:
        return attention_mask[..., : key.shape[-2]]
    if _sdpa_is_causal(module, None, query, kwargs.get("is_causal")):
        return _causal_mask(query.shape[-2], key.shape[-2], query.device)
    return None


def _sdpa_is_causal(
    module: nn.Module, mask: Tensor | None, query: Tensor, is_causal: bool | None
) -> bool:
    """Mirrors when transformers' sdpa attention asks sdpa for a causal mask."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    return bool(query.shape[2] > 1 and mask is None and is_causal)


def _causal_mask(rows: int, keys: int, device: torch.device) -> Tensor:
    """Upper-left aligned causal mask (True = attend), as sdpa's ``is_causal``."""
    row = torch.arange(rows, device=device)[:, None]
    return row >= torch.arange(keys, device=device)[None, :]


class _TemperedSdpaAttention(torch.autograd.Function):
    """transformers' sdpa forward; the rule 1 backward from recomputed scores,
    by :func:`sdpa_attention_backward` on CUDA and
    :func:`blockwise_attention_backward` elsewhere."""

    @staticmethod
    def forward(
        ctx: Any,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        module: nn.Module,
        scaling: float | None,
        is_causal: bool | None,
        temperature: float,
        kwargs: dict[str, Any],
    ) -> Tensor:
        output, _ = sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
        ctx.save_for_backward(query, key, value, attention_mask)
        ctx.causal = _sdpa_is_causal(module, attention_mask, query, is_causal)
        ctx.scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        ctx.temperature = temperature
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        query, key, value, mask = ctx.saved_tensors
        backward = sdpa_attention_backward if query.is_cuda else blockwise_attention_backward
        grads = backward(
            query,
            key,
            value,
            mask,
            grad_output.transpose(1, 2),
            scaling=ctx.scaling,
            causal=ctx.causal,
            temperature=ctx.temperature,
        )
        return (*grads, None, None, None, None, None, None)


def blockwise_attention_backward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    grad_output: Tensor,
    *,
    scaling: float,
    causal: bool,
    temperature: float,
    block_elements: int = BACKWARD_BLOCK_ELEMENTS,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""
    Gradients of ``softmax(q k^T * scaling + mask) v`` with respect to ``q``,
    ``k`` and ``v`` under rule 1, computed one block of queries at a time.

    The query heads that share a key/value head are processed together, so
    grouped-query attention needs no repeated keys and values. With ``causal``,
    each block reads only the keys its queries can see.

    Args:
        query (Tensor): ``batch x heads x queries x head_dim``.
        key (Tensor): ``batch x kv_heads x keys x head_dim`` (grouped-query
                    attention when ``kv_heads < heads``).
        value (Tensor): ``batch x kv_heads x keys x value_dim``.
        mask (Tensor or None): Boolean (True = attend) or additive mask,
                    broadcastable to ``batch x heads x queries x keys``.
        grad_output (Tensor): ``batch x heads x queries x value_dim``.
        scaling (float): The score scale.
        causal (bool): Apply sdpa's upper-left causal mask (only the first
                    ``queries`` keys then take part, as in transformers).
        temperature (float): ``T`` of the softmax backward.
        block_elements (int, optional): Bound on the score entries held at once.

    Returns:
        *tuple[Tensor, Tensor, Tensor]*: gradients of query, key and value, in
        their dtypes.
    """
    batch, heads, n_queries, head_dim = query.shape
    kv_heads, n_rep = key.shape[1], heads // key.shape[1]
    n_keys = min(key.shape[2], n_queries) if causal else key.shape[2]
    dtype = rule_dtype(query)
    # Layout: (batch * kv_heads, n_rep, queries, dim); a block's rows of all the
    # query heads of one kv head are flattened into one matrix.
    q = query.to(dtype).reshape(batch * kv_heads, n_rep, n_queries, head_dim)
    grad_out = grad_output.to(dtype).reshape(batch * kv_heads, n_rep, n_queries, -1)
    k = key[:, :, :n_keys].to(dtype).reshape(batch * kv_heads, n_keys, head_dim)
    v = value[:, :, :n_keys].to(dtype).reshape(batch * kv_heads, n_keys, -1)
    if mask is not None:
        mask = _group_heads(mask[..., :n_keys], kv_heads, n_rep)
    grad_q = torch.empty_like(q)
    grad_k = torch.zeros_like(k)
    grad_v = torch.zeros_like(v)
    rows_per_block = max(1, block_elements // max(1, batch * heads * n_keys))
    for start in range(0, n_queries, rows_per_block):
        end = min(start + rows_per_block, n_queries)
        visible = min(end, n_keys) if causal else n_keys
        if visible == 0:
            grad_q[:, :, start:end] = 0
            continue
        q_block = q[:, :, start:end].reshape(batch * kv_heads, -1, head_dim)
        out_block = grad_out[:, :, start:end].reshape(batch * kv_heads, q_block.shape[1], -1)
        keys, values = k[:, :visible], v[:, :visible]
        scores = torch.bmm(q_block, keys.transpose(1, 2)).mul_(scaling)
        blocked = scores.view(batch, kv_heads, n_rep, end - start, visible)
        if causal and visible > start:
            _mask_future_keys(blocked, start, visible)
        if mask is not None and mask.dtype == torch.bool:
            blocked.masked_fill_(~mask[..., start:end, :visible], float("-inf"))
        elif mask is not None:
            blocked.add_(mask[..., start:end, :visible])
        probs = torch.softmax(scores, dim=-1)
        tempered = probs if temperature == 1.0 else torch.softmax(scores.div_(temperature), -1)
        if mask is not None:  # rows whose keys are all masked
            probs.nan_to_num_(0.0)
            tempered.nan_to_num_(0.0)
        grad_v[:, :visible] += torch.bmm(probs.transpose(1, 2), out_block)
        grad_scores = torch.bmm(out_block, values.transpose(1, 2))
        inner = (grad_scores * tempered).sum(dim=-1, keepdim=True)
        grad_scores.sub_(inner).mul_(tempered)
        grad_q_block = torch.bmm(grad_scores, keys).mul_(scaling)
        grad_q[:, :, start:end] = grad_q_block.view(batch * kv_heads, n_rep, end - start, -1)
        grad_k[:, :visible] += torch.bmm(grad_scores.transpose(1, 2), q_block).mul_(scaling)
    grad_k = _restore_layout(grad_k, batch, key)
    grad_v = _restore_layout(grad_v, batch, value)
    return grad_q.view(query.shape).to(query.dtype), grad_k, grad_v


def sdpa_attention_backward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    grad_output: Tensor,
    *,
    scaling: float,
    causal: bool,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""
    The same gradients as :func:`blockwise_attention_backward`, composed from
    PyTorch's fused attention kernels (used on GPUs, where they are much faster
    than a loop over query blocks and keep memory flat).

    The backward of attention with scores ``s / T`` gives the score gradient
    ``p_T * (grad_p - <grad_p, p_T>)`` of rule 1, so its query and key gradients,
    times ``T``, are GIM's; the value gradient ``p^T grad_out`` comes from the
    backward of the attention itself.

    Args:
        query (Tensor): ``batch x heads x queries x head_dim``.
        key (Tensor): ``batch x kv_heads x keys x head_dim``.
        value (Tensor): ``batch x kv_heads x keys x value_dim``.
        mask (Tensor or None): Boolean (True = attend) or additive mask.
        grad_output (Tensor): ``batch x heads x queries x value_dim``.
        scaling (float): The score scale.
        causal (bool): Apply sdpa's upper-left causal mask.
        temperature (float): ``T`` of the softmax backward.

    Returns:
        *tuple[Tensor, Tensor, Tensor]*: gradients of query, key and value.
    """
    n_rep = query.shape[1] // key.shape[1]
    n_keys = min(key.shape[2], query.shape[2]) if causal else key.shape[2]
    if mask is not None:
        mask = mask[..., :n_keys]
    tempered_mask = mask if mask is None or mask.dtype == torch.bool else mask / temperature
    attend = nn.functional.scaled_dot_product_attention
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (query, key, value))
        k_all = repeat_kv(k[:, :, :n_keys], n_rep)
        v_all = repeat_kv(v[:, :, :n_keys], n_rep)
        tempered = attend(
            q,
            k_all,
            v_all,
            attn_mask=tempered_mask,
            scale=scaling / temperature,
            is_causal=causal,
        )
        grad_q, grad_k = torch.autograd.grad(tempered, (q, k), grad_output)
        exact = attend(
            q.detach(), k_all.detach(), v_all, attn_mask=mask, scale=scaling, is_causal=causal
        )
        (grad_v,) = torch.autograd.grad(exact, (v,), grad_output)
    grads = (grad_q * temperature, grad_k * temperature, grad_v)
    return tuple(grad.nan_to_num_(0.0) for grad in grads)  # type: ignore[return-value]


def _mask_future_keys(scores: Tensor, start: int, visible: int) -> None:
    """Sets scores of keys after each query (upper-left causal) to -inf, in place.

    ``scores`` holds the rows of queries ``start, start + 1, ...`` and the keys
    ``0 .. visible - 1``; only keys from ``start`` on can lie in the future.
    """
    diagonal = scores[..., start:visible]
    future = torch.ones(diagonal.shape[-2:], dtype=torch.bool, device=scores.device)
    diagonal.masked_fill_(future.triu_(1), float("-inf"))


def _group_heads(mask: Tensor, kv_heads: int, n_rep: int) -> Tensor:
    """Views a ``batch x heads x queries x keys`` mask (heads may be 1) as
    ``batch x kv_heads x n_rep x queries x keys`` without copying."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[1] == 1:
        return mask.unsqueeze(1)
    return mask.view(mask.shape[0], kv_heads, n_rep, *mask.shape[2:])


def _restore_layout(grad: Tensor, batch: int, like: Tensor) -> Tensor:
    """``(batch * kv_heads) x keys x dim`` back to ``like``, padding keys cut by causality."""
    grad = grad.view(batch, like.shape[1], grad.shape[1], grad.shape[2])
    if grad.shape[2] < like.shape[2]:
        grad = nn.functional.pad(grad, (0, 0, 0, like.shape[2] - grad.shape[2]))
    return grad.to(like.dtype)


@functools.cache
def register_gim_attention() -> None:
    r"""Registers :func:`gim_attention_forward` as ``"captum_gim"`` in transformers'
    AttentionInterface (once; importing transformers' modeling code is slow, so
    this waits for the first model routed)."""
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(GIM_ATTENTION, gim_attention_forward)
