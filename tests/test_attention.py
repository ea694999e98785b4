"""Attention under rule 1: the blockwise backward and the eager path, on bare tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_gim.rules import blockwise_attention_backward, sdpa_attention_backward
from captum_gim.rules.attention import query_rows_per_block
from captum_gim.sites.attention.routed import eager_gim_attention, gim_attention_forward


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


@pytest.mark.parametrize("per_query", [False, True], ids=["per-head", "per-query"])
def test_eager_path_sink_logits_take_mass_and_get_the_tempered_backward(per_query) -> None:
    """Sinks: one extra logit per head (gpt-oss) or per query (Inkling 2, computed
    from the hidden states), softmaxed with the scores and dropped after it."""
    q, k, v, g = _qkv()
    generator = torch.Generator().manual_seed(3)
    shape = (2, 4, 9, 1) if per_query else (4,)
    sinks = torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = torch.zeros(9, 9, dtype=torch.float64).masked_fill(~_causal(9, 9), -1e30)
    output, _ = eager_gim_attention(
        _Attention(), q, k, v, mask[None, None], scaling=0.3, temperature=2.0, sinks=sinks
    )
    got = torch.autograd.grad(output.transpose(1, 2), (q, k, v, sinks), g)
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.3 + mask
    column = sinks if per_query else sinks.reshape(1, -1, 1, 1)
    logits = torch.cat([scores, column.expand(*scores.shape[:-1], 1)], -1)
    probs = torch.softmax(logits, -1)
    tempered = torch.softmax(logits / 2.0, -1)
    probs = (probs.detach() + 2.0 * (tempered - tempered.detach()))[..., :-1]
    expected = probs @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(output.transpose(1, 2), expected.detach())
    want = torch.autograd.grad(expected, (q, k, v, sinks), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gim_attention_refuses_modules_outside_gim_rules() -> None:
    q, k, v, _ = _qkv()
    with pytest.raises(RuntimeError, match=r"outside of captum_gim\.gim_rules"):
        gim_attention_forward(_Attention(), q, k, v, None)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("block_elements", [1, 40, 1 << 19])
def test_blockwise_backward_with_gqa_padding_and_fully_masked_rows(
    temperature, block_elements
) -> None:
    # T = 2 takes p from p_T squared, T = 3 the two-softmax fallback; small blocks
    # cut the causal diagonal and give blocks that see no key at all.
    q, k, v, g = _qkv(batch=2, heads=6, kv_heads=2, queries=11, keys=11)
    mask = _causal(11, 11).expand(2, 1, 11, 11).clone()
    mask[1, :, :, :4] = False  # left padding: rows 0-3 of example 1 see no key
    want = _reference_grads(q, k, v, mask, g, 0.3, temperature)
    got = blockwise_attention_backward(
        q,
        k,
        v,
        mask,
        g,
        scaling=0.3,
        causal=False,
        temperature=temperature,
        block_elements=block_elements,
    )
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, msg=f"grad of {name}")
    assert torch.all(got[0][1, :, :4] == 0)


@pytest.mark.parametrize("block_elements", [30, 1 << 19])
def test_causal_block_skipping_equals_reference_at_float32(block_elements) -> None:
    # float32 and a long enough causal prompt that whole blocks lie above the diagonal.
    q, k, v, g = (t.float() for t in _qkv(batch=1, heads=4, kv_heads=4, queries=64, keys=64))
    want = _reference_grads(
        q.double(), k.double(), v.double(), _causal(64, 64), g.double(), 0.3, 2.0
    )
    got = blockwise_attention_backward(
        q, k, v, None, g, scaling=0.3, causal=True, temperature=2.0, block_elements=block_elements
    )
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == torch.float32
        error = torch.linalg.vector_norm(a.double() - b) / torch.linalg.vector_norm(b)
        assert error <= 1e-5, f"grad of {name}: relative L2 error {error:.2e}"


def test_blockwise_backward_broadcasts_a_one_row_padding_mask() -> None:
    q, k, v, g = _qkv()
    padding = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    padding[0, ..., :2] = False
    want = _reference_grads(q, k, v, padding, g, 0.3, 2.0)
    got = blockwise_attention_backward(
        q, k, v, padding, g, scaling=0.3, causal=False, temperature=2.0, block_elements=64
    )
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, msg=f"grad of {name}")


@pytest.mark.parametrize(
    ("n_queries", "n_keys", "n_rep", "expected"),
    [(6, 6, 1, 6), (1, 1, 1, 1), (4096, 4096, 1, 128), (4096, 4096, 4, 32), (3, 1 << 21, 2, 1)],
)
def test_query_blocks_never_exceed_the_queries(
    n_queries: int, n_keys: int, n_rep: int, expected: int
) -> None:
    """A 6-token prompt once got blocks (and a causal mask) sized for 87,381
    queries: 7.6 GB and seconds per backward."""
    assert query_rows_per_block(n_queries, n_keys, n_rep, 1 << 19) == expected


def test_a_failed_attention_check_raises_by_name_and_warns_with_strict_false(monkeypatch) -> None:
    """A call whose recomputation differs from the model's attention (here: a model whose
    eager attention adds 0.1) is refused; strict=False keeps the model's own attention for
    that call, which is GIM with the softmax rule off there."""
    import sys

    from tiny_models import FAMILY_BY_NAME, sample_ids

    from captum_gim import GIMAttribution, UnsupportedModuleError, logits_forward

    model = FAMILY_BY_NAME["llama"].build("eager")
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    eager = module.eager_attention_forward

    def shifted(*args, **kwargs):  # type: ignore[no-untyped-def]
        output, weights = eager(*args, **kwargs)
        return output + 0.1, weights

    monkeypatch.setattr(module, "eager_attention_forward", shifted)
    embeds = model.get_input_embeddings()(sample_ids()).detach()
    with pytest.raises(UnsupportedModuleError, match="LlamaAttention: the GIM attention"):
        GIMAttribution(logits_forward(model), model).attribute(embeds, target=3)
    with pytest.warns(UserWarning, match="tempered softmax skips this call of LlamaAttention"):
        lenient = GIMAttribution(logits_forward(model), model, strict=False).attribute(
            embeds, target=3
        )
    no_softmax_rule = GIMAttribution(logits_forward(model), model, temperature=1.0)
    torch.testing.assert_close(lenient, no_softmax_rule.attribute(embeds, target=3))
