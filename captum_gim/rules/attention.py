"""Rule 1 inside attention: gradients of ``softmax(q k^T) v`` with the tempered
softmax backward, without materialising the whole probability matrix."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from captum_gim.rules.precision import rule_dtype

# Largest number of float32 score entries (batch x heads x query block x keys)
# that the blockwise backward materialises at once; measured best on a 2-core
# CPU at 1024-8192 tokens (benchmarks/long_prompts.py).
BACKWARD_BLOCK_ELEMENTS = 1 << 19


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
    each block reads only the keys its queries can see, so blocks above the
    diagonal cost nothing. For ``temperature`` 1 and 2 one softmax per block
    suffices: at ``T = 2`` the probabilities are
    ``p = p_T ** 2 / sum(p_T ** 2)`` (exact: ``p_T`` is proportional to
    ``exp(s / 2)``); other temperatures compute both softmaxes.

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
    # The block's scores are those of the first softmax: s / T when one softmax
    # gives both p and p_T (T = 1 or 2), else s.
    score_t = temperature if temperature in (1.0, 2.0) else 1.0
    # Layout: (batch, kv_heads, n_rep, queries, dim). One block holds some query
    # rows of the n_rep query heads of one kv head, flattened into one matrix.
    # Keys and values are kept transposed (dim x keys), and so are their
    # gradients, so every product of a block is a plain row-major matrix product.
    q = (query.to(dtype) * (scaling / score_t)).view(batch, kv_heads, n_rep, n_queries, -1)
    grad_out = grad_output.to(dtype).reshape(batch, kv_heads, n_rep, n_queries, -1)
    k = key[:, :, :n_keys].to(dtype)
    k_t = k.mT.contiguous()
    v_t = value[:, :, :n_keys].to(dtype).mT.contiguous()
    grouped_mask = None if mask is None else _group_heads(mask[..., :n_keys], kv_heads, n_rep)
    if batch * heads * n_queries * n_keys <= block_elements:
        grad_q, grad_k_t, grad_v_t = _dense_backward(
            q, k, k_t, v_t, grouped_mask, grad_out, scaling, score_t, causal, temperature
        )
        return (
            grad_q.view(query.shape).to(query.dtype),
            _restore_layout(grad_k_t.mT, key),
            _restore_layout(grad_v_t.mT, value),
        )
    grad_q = torch.empty_like(q)
    grad_k_t = torch.zeros_like(k_t)
    grad_v_t = torch.zeros_like(v_t)
    rows_per_block = query_rows_per_block(n_queries, n_keys, n_rep, block_elements)
    future = torch.ones(rows_per_block, rows_per_block, dtype=torch.bool, device=q.device)
    future = future.triu_(1)
    for b, h in itertools.product(range(batch), range(kv_heads)):
        group_mask = None
        if grouped_mask is not None:
            group_mask = grouped_mask[min(b, grouped_mask.shape[0] - 1)]
            group_mask = group_mask[min(h, group_mask.shape[0] - 1)]
        for start in range(0, n_queries, rows_per_block):
            end = min(start + rows_per_block, n_queries)
            visible = min(end, n_keys) if causal else n_keys
            if visible == 0:
                grad_q[b, h, :, start:end] = 0
                continue
            q_block = q[b, h, :, start:end].reshape(-1, head_dim)
            out_block = grad_out[b, h, :, start:end].reshape(q_block.shape[0], -1)
            scores = torch.mm(q_block, k_t[b, h, :, :visible])
            blocked = scores.view(n_rep, end - start, visible)
            if causal and visible > start:
                diagonal = blocked[..., start:visible]
                diagonal.masked_fill_(future[: end - start, : visible - start], float("-inf"))
            if group_mask is not None:
                _add_mask(blocked, _block_rows(group_mask, start, end)[..., :visible], score_t)
            tempered, probs, weight = _block_softmaxes(
                scores, out_block, temperature, group_mask is not None
            )
            grad_v_t[b, h, :, :visible].addmm_(weight.T, probs)
            del probs
            grad_scores = torch.mm(out_block, v_t[b, h, :, :visible])
            inner = torch.linalg.vecdot(grad_scores, tempered).unsqueeze_(-1)
            grad_scores.sub_(inner).mul_(tempered)
            del tempered
            grad_q_block = torch.mm(grad_scores, k[b, h, :visible]).mul_(scaling)
            grad_q[b, h, :, start:end] = grad_q_block.view(n_rep, end - start, -1)
            grad_k_t[b, h, :, :visible].addmm_(q_block.T, grad_scores, alpha=score_t)
    grad_k = _restore_layout(grad_k_t.mT, key)
    grad_v = _restore_layout(grad_v_t.mT, value)
    return grad_q.view(query.shape).to(query.dtype), grad_k, grad_v


def _dense_backward(
    q: Tensor,
    k: Tensor,
    k_t: Tensor,
    v_t: Tensor,
    grouped_mask: Tensor | None,
    grad_out: Tensor,
    scaling: float,
    score_t: float,
    causal: bool,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """The blockwise backward's arithmetic for all batch elements and heads at
    once, for scores that fit in one block (short prompts: no Python loop)."""
    batch, kv_heads, n_rep, n_queries, head_dim = q.shape
    n_keys = k_t.shape[-1]
    q_rows = q.reshape(batch, kv_heads, n_rep * n_queries, head_dim)
    out_rows = grad_out.reshape(batch, kv_heads, n_rep * n_queries, -1)
    scores = torch.matmul(q_rows, k_t)
    blocked = scores.view(batch, kv_heads, n_rep, n_queries, n_keys)
    if causal:
        future = torch.ones(n_queries, n_keys, dtype=torch.bool, device=q.device).triu_(1)
        blocked.masked_fill_(future, float("-inf"))
    if grouped_mask is not None:
        _add_mask(blocked, grouped_mask, score_t)
    tempered, probs, weight = _block_softmaxes(
        scores, out_rows, temperature, grouped_mask is not None
    )
    grad_v_t = torch.matmul(weight.mT, probs)
    del probs
    grad_scores = torch.matmul(out_rows, v_t)
    inner = torch.linalg.vecdot(grad_scores, tempered).unsqueeze_(-1)
    grad_scores.sub_(inner).mul_(tempered)
    del tempered
    grad_q = torch.matmul(grad_scores, k).mul_(scaling)
    grad_k_t = torch.matmul(q_rows.mT, grad_scores).mul_(score_t)
    return grad_q.view(q.shape), grad_k_t, grad_v_t


def _add_mask(scores: Tensor, mask: Tensor, score_t: float) -> None:
    """Masks ``scores`` (``s / score_t``) in place: boolean (True = attend) or additive."""
    if mask.dtype == torch.bool:
        scores.masked_fill_(~mask, float("-inf"))
    else:
        scores.add_(mask, alpha=1.0 / score_t)


def query_rows_per_block(n_queries: int, n_keys: int, n_rep: int, block_elements: int) -> int:
    r"""
    Returns:
        *int*: how many query rows (of each of the ``n_rep`` query heads sharing
        a key head) one block of the blockwise backward holds: as many as keep
        its ``n_rep x rows x n_keys`` scores within ``block_elements``, at
        least 1 and at most ``n_queries`` (the block's causal mask is
        ``rows x rows``, so a short prompt must not get a block sized for a
        long one).
    """
    return min(n_queries, max(1, block_elements // max(1, n_rep * n_keys)))


def _block_rows(mask: Tensor, start: int, end: int) -> Tensor:
    """The rows ``start:end`` of a ``... x queries x keys`` mask whose query
    dimension may be 1 (broadcast)."""
    return mask if mask.shape[-2] == 1 else mask[..., start:end, :]


def _block_softmaxes(
    scores: Tensor, grad_out: Tensor, temperature: float, masked: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``p_T``, and ``p`` with the rows of ``grad_out`` that multiply it, such that
    ``weight^T p`` is the value gradient ``grad_out^T softmax(s)``.

    ``scores`` holds ``s / T`` for ``T`` in (1, 2) and ``s`` otherwise (then it
    is overwritten). Rows whose keys are all masked get zeros.
    """
    first = torch.softmax(scores, dim=-1)
    if masked:
        first.nan_to_num_(0.0)
    if temperature == 1.0:
        return first, first, grad_out
    if temperature == 2.0:
        # p = p_T^2 / sum(p_T^2); the row normaliser moves onto grad_out.
        squared = first * first
        norm = squared.sum(dim=-1, keepdim=True)
        norm.masked_fill_(norm == 0, 1.0)
        return first, squared, grad_out / norm
    tempered = torch.softmax(scores.div_(temperature), dim=-1)
    if masked:
        tempered.nan_to_num_(0.0)
    return tempered, first, grad_out


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


def _group_heads(mask: Tensor, kv_heads: int, n_rep: int) -> Tensor:
    """Views a ``batch x heads x queries x keys`` mask (heads may be 1) as
    ``batch x kv_heads x n_rep x queries x keys`` without copying."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[1] == 1:
        return mask.unsqueeze(1)
    return mask.view(mask.shape[0], kv_heads, n_rep, *mask.shape[2:])


def _restore_layout(grad: Tensor, like: Tensor) -> Tensor:
    """A gradient of ``like`` whose keys were cut by causality, padded back."""
    if grad.shape[2] < like.shape[2]:
        grad = nn.functional.pad(grad, (0, 0, 0, like.shape[2] - grad.shape[2]))
    return grad.to(like.dtype, memory_format=torch.contiguous_format)


def tempered_attention_backward(
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
    Rule 1's gradients of ``softmax(q k^T * scaling + mask) v``: by
    :func:`sdpa_attention_backward` on CUDA and by
    :func:`blockwise_attention_backward` elsewhere. Arguments as theirs.

    Returns:
        *tuple[Tensor, Tensor, Tensor]*: gradients of query, key and value.
    """
    backward = sdpa_attention_backward if query.is_cuda else blockwise_attention_backward
    return backward(
        query,
        key,
        value,
        mask,
        grad_output,
        scaling=scaling,
        causal=causal,
        temperature=temperature,
    )
