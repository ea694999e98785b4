"""Attention under rule 1: the blockwise backward and the eager path, on bare tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_gim.rules import blockwise_attention_backward, sdpa_attention_backward
from captum_gim.sites.attention import eager_gim_attention, gim_attention_forward


def _reference_grads(query, key, value, mask, grad_output, scaling, temperature):
    """Autograd through softmax(q k^T s + mask) v with the tempered-softmax surrogate."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (query, key, value))
    groups = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(groups, 1).transpose(-1, -2) * scaling
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    tempered = torch.softmax(scores / temperature, -1).nan_to_num(0.0)
    probs = probs.detach() + temperature * (tempered - tempered.detach())
    output = probs @ v.repeat_interleave(groups, 1)
    return torch.autograd.grad(output, (q, k, v), grad_output)


def _qkv(batch=2, heads=4, kv_heads=2, queries=9, keys=9, dim=8):
    generator = torch.Generator().manual_seed(0)
    shape = lambda h, n: (batch, h, n, dim)  # noqa: E731
    q = torch.randn(shape(heads, queries), generator=generator, dtype=torch.float64)
    k = torch.randn(shape(kv_heads, keys), generator=generator, dtype=torch.float64)
    v = torch.randn(shape(kv_heads, keys), generator=generator, dtype=torch.float64)
    g = torch.randn(shape(heads, queries), generator=generator, dtype=torch.float64)
    return q, k, v, g


def _causal(queries, keys):
    return torch.arange(queries)[:, None] >= torch.arange(keys)[None, :]


@pytest.mark.parametrize("block_elements", [1, 64, 1 << 20])
@pytest.mark.parametrize("mask_kind", ["causal", "bool_padding", "additive", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_blockwise_backward_matches_reference(block_elements, mask_kind, temperature) -> None:
    q, k, v, g = _qkv()
    causal = mask_kind == "causal"
    mask = None
    if mask_kind == "bool_padding":
        mask = _causal(9, 9).expand(2, 1, 9, 9).clone()
        mask[0, :, :, :3] = False  # left padding of the first example
        mask[0, :, :3, :] = False  # its padded queries attend nowhere
    elif mask_kind == "additive":
        mask = torch.randn(2, 1, 9, 9, dtype=torch.float64)
    reference_mask = _causal(9, 9) if causal else mask
    want = _reference_grads(q, k, v, reference_mask, g, 0.3, temperature)
    got = blockwise_attention_backward(
        q,
        k,
        v,
        mask,
        g,
        scaling=0.3,
        causal=causal,
        temperature=temperature,
        block_elements=block_elements,
    )
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, msg=f"grad of {name}")


@pytest.mark.parametrize("mask_kind", ["causal", "bool_padding", "additive", "none"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sdpa_kernel_backward_equals_blockwise(mask_kind, temperature) -> None:
    q, k, v, g = _qkv()
    causal = mask_kind == "causal"
    mask = None
    if mask_kind == "bool_padding":
        mask = _causal(9, 9).expand(2, 1, 9, 9).clone()
        mask[0, :, :, :3] = False
        mask[0, :, :3, :3] = True  # sdpa kernels need every query to see a key
    elif mask_kind == "additive":
        mask = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    settings = dict(scaling=0.3, causal=causal, temperature=temperature)
    want = blockwise_attention_backward(q, k, v, mask, g, **settings)
    got = sdpa_attention_backward(q, k, v, mask, g, **settings)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, msg=f"grad of {name}")


def test_causal_backward_with_more_keys_than_queries_uses_the_first_keys() -> None:
    q, k, v, g = _qkv(queries=5, keys=8)
    got = blockwise_attention_backward(q, k, v, None, g, scaling=0.3, causal=True, temperature=2.0)
    want = _reference_grads(q, k[:, :, :5], v[:, :, :5], _causal(5, 5), g, 0.3, 2.0)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1][:, :, :5], want[1])
    assert torch.all(got[1][:, :, 5:] == 0) and torch.all(got[2][:, :, 5:] == 0)


class _Attention(nn.Module):
    is_causal = True
    training = False


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_eager_path_forward_is_softmax_attention_and_backward_tempered(softcap) -> None:
    q, k, v, g = _qkv()
    mask = torch.zeros(9, 9, dtype=torch.float64).masked_fill(~_causal(9, 9), -1e30)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    output, probs = eager_gim_attention(
        _Attention(), q, k, v, mask[None, None], scaling=0.3, softcap=softcap, temperature=2.0
    )
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.3
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    expected_probs = torch.softmax((scores + mask).float(), -1).double()
    torch.testing.assert_close(probs, expected_probs)
    got = torch.autograd.grad(output.transpose(1, 2), (q, k, v), g)
    if softcap is None:
        want = _reference_grads(q, k, v, mask, g, 0.3, 2.0)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gim_attention_refuses_modules_outside_gim_rules() -> None:
    q, k, v, _ = _qkv()
    with pytest.raises(RuntimeError, match=r"outside of captum_gim\.gim_rules"):
        gim_attention_forward(_Attention(), q, k, v, None)
