"""Rule 1 inside attention: gradients of ``softmax(q k^T) v`` with the tempered
softmax backward, without materialising the whole probability matrix."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from captum_gim.rules.precision import rule_dtype

# Largest number of float32 score entries (batch x heads x query block x keys)
# that the blockwise backward materialises at once.
BACKWARD_BLOCK_ELEMENTS = 1 << 20


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
        k_all = k[:, :, :n_keys].repeat_interleave(n_rep, dim=1)
        v_all = v[:, :, :n_keys].repeat_interleave(n_rep, dim=1)
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
