"""AtP* (Kramár et al., 2024) for attention heads: the query/key fix.

AtP estimates the effect of patching a head from the gradient of its output.
When the attention softmax saturates, that linear estimate misses the effect of
the head's queries and keys, whose change moves the attention pattern. AtP*
splits a head into its queries, keys and values (every position) and estimates
each part:

- values: linearly, ``grad_v . (v_clean - v_corrupted)`` at the corrupted pattern;
- queries: the exact attention row with the clean query of that position
  (``softmax(q_clean k^T)``), then linearly from the pattern on:
  ``grad_A . (A_query_patched - A)``;
- keys: for each key position alone, the exact attention with that one score
  replaced by the clean key's score, a closed-form change of every row's softmax,
  then linearly from the pattern on.

The head's AtP* score is the sum over its value, query and key parts. Left out
of AtP* here: GradDrop (the per-layer gradient-dropping check against
cancellation), and the per-position scores (summed per head).

The queries, keys and values are read where the attention module hands them to
transformers' AttentionInterface: each attention module is routed, for one
forward pass, through a recording function that calls the implementation the
model was loaded with, so the forward pass is unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from captum_gim import UnsupportedModuleError
from captum_gim.circuits.components import Components

RECORDING_ATTENTION = "captum_gim_circuits_record"


@dataclass
class Recorded:
    r"""What one attention call received: ``batch x heads x tokens x head_dim``."""

    query: Tensor
    key: Tensor
    value: Tensor
    mask: Tensor | None
    scaling: float
    softcap: float | None
    causal: bool
    output: Tensor


@dataclass(frozen=True)
class _Route:
    implementation: str
    store: dict[int, Recorded]
    layer: int


_routes: weakref.WeakKeyDictionary[nn.Module, _Route] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _recording_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    route = _routes.get(module)
    if route is None:
        raise RuntimeError(
            f"{type(module).__name__} uses attention '{RECORDING_ATTENTION}' outside of "
            "captum_gim.circuits; set the model's attn_implementation to 'sdpa' or 'eager'."
        )
    if route.implementation == "eager":
        modeling = sys.modules.get(type(module).__module__)
        original = getattr(modeling, "eager_attention_forward", None)
        if original is None:
            raise UnsupportedModuleError(
                f"{type(module).__name__} runs eager attention but its modeling file has no "
                "eager_attention_forward; load the model with attn_implementation='sdpa'."
            )
    else:
        original = ALL_ATTENTION_FUNCTIONS[route.implementation]
    output, weights = original(module, query, key, value, attention_mask, **kwargs)
    scaling = kwargs.get("scaling")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:  # as transformers' sdpa attention decides
        is_causal = getattr(module, "is_causal", True)
    is_causal = route.implementation == "sdpa" and bool(is_causal)
    route.store[route.layer] = Recorded(
        query=query.detach(),
        key=key.detach(),
        value=value.detach(),
        mask=None if attention_mask is None else attention_mask.detach(),
        scaling=query.shape[-1] ** -0.5 if scaling is None else float(scaling),
        softcap=kwargs.get("softcap"),
        causal=is_causal and attention_mask is None and query.shape[2] > 1,
        output=output.detach(),
    )
    return output, weights


@contextlib.contextmanager
def recording_attention(parts: Components, store: dict[int, Recorded]) -> Iterator[None]:
    r"""
    Records the query, key and value of every block's attention into ``store``
    (by layer) during the forward passes inside the block.

    Args:
        parts (Components): The model's components.
        store (dict[int, Recorded]): Receives one entry per layer.
    """
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(RECORDING_ATTENTION, _recording_attention)
    modules = []
    for layer, entry in enumerate(parts.layers):
        module = entry.attention
        if module is None:
            raise UnsupportedModuleError(
                f"Block {layer} has no attention module that calls transformers' "
                "AttentionInterface; AtP* needs its queries and keys. Use method='atp'."
            )
        implementation = getattr(module.config, "_attn_implementation", None) or "eager"
        if implementation not in ("eager", "sdpa"):
            raise UnsupportedModuleError(
                f"Block {layer} runs attention {implementation!r}; AtP* supports 'eager' "
                "and 'sdpa': load the model with attn_implementation='sdpa'."
            )
        modules.append((module, module.config, _Route(implementation, store, layer)))
    try:
        for module, own_config, route in modules:
            routed: Any = copy.copy(own_config)
            routed._attn_implementation_internal = RECORDING_ATTENTION
            with _lock:
                _routes[module] = route
            module.config = routed
        yield
    finally:
        for module, own_config, _ in modules:
            module.config = own_config
            with _lock:
                _routes.pop(module, None)


def _scores(record: Recorded, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """Attention scores (float64, masked entries at the dtype minimum) and the keep mask."""
    heads = query.shape[1]
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * record.scaling
    if record.softcap is not None:
        scores = torch.tanh(scores / record.softcap) * record.softcap
    keep = torch.ones_like(scores, dtype=torch.bool)
    mask = record.mask
    if mask is not None:
        mask = mask[..., : key.shape[-2]]
        if mask.dtype == torch.bool:
            keep = keep & mask
        else:
            scores = scores + mask.to(scores.dtype)
            keep = keep & (mask > torch.finfo(mask.dtype).min / 2)
    elif record.causal:
        rows = torch.arange(query.shape[2], device=query.device)[:, None]
        keep = keep & (rows >= torch.arange(key.shape[2], device=query.device)[None, :])
    scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    return scores, keep


def _softmax(record: Recorded, scores: Tensor, keep: Tensor) -> Tensor:
    """The attention pattern; rows without any key are zero with boolean (sdpa)
    masks, as sdpa computes them, and uniform with additive (eager) masks."""
    probs = torch.softmax(scores, dim=-1)
    if record.mask is None or record.mask.dtype == torch.bool:
        probs = probs.masked_fill(~keep.any(-1, keepdim=True), 0.0)
    return probs


def head_scores(clean: Recorded, corrupted: Recorded, grad_output: Tensor, layer: int) -> Tensor:
    r"""
    The AtP* estimate of patching each head's clean output into the corrupted
    run, as the sum of its value, query and key parts (see the module docstring).

    Args:
        clean (Recorded): The attention inputs of the clean run (float64).
        corrupted (Recorded): The attention inputs of the corrupted run.
        grad_output (Tensor): Gradient of the metric with respect to the
                    attention output, ``batch x tokens x heads x head_dim``.
        layer (int): The layer, for error messages.

    Returns:
        *Tensor*: ``batch x heads``.
    """
    q0, k0, v0 = (t.double() for t in (corrupted.query, corrupted.key, corrupted.value))
    q1, k1, v1 = (t.double() for t in (clean.query, clean.key, clean.value))
    heads = q0.shape[1]
    group = heads // k0.shape[1]
    v0r, v1r = (v.repeat_interleave(group, dim=1) for v in (v0, v1))
    scores, keep = _scores(corrupted, q0, k0)
    probs = _softmax(corrupted, scores, keep)
    recomputed = torch.matmul(probs, v0r).transpose(1, 2)
    if not torch.allclose(recomputed, corrupted.output.double(), atol=1e-4, rtol=1e-3):
        raise UnsupportedModuleError(
            f"The attention of block {layer} does not compute softmax(q k^T) v from the "
            "tensors it passes to AttentionInterface; AtP* cannot split it. Use method='atp'."
        )
    grad_z = grad_output.double().transpose(1, 2)  # batch x heads x tokens x head_dim
    grad_probs = torch.matmul(grad_z, v0r.transpose(-1, -2))  # batch x heads x queries x keys
    value_part = (torch.matmul(probs.transpose(-1, -2), grad_z) * (v1r - v0r)).sum((-1, -2))
    query_scores, _ = _scores(corrupted, q1, k0)
    query_probs = _softmax(corrupted, query_scores, keep)
    query_part = (grad_probs * (query_probs - probs)).sum((-1, -2))
    key_scores, _ = _scores(corrupted, q0, k1)
    delta = torch.where(keep, key_scores - scores, torch.zeros_like(scores)).clamp(max=700.0)
    growth = torch.expm1(delta)  # e^delta - 1
    norm = 1.0 + probs * growth
    expected = (grad_probs * probs).sum(-1, keepdim=True)
    key_change = expected * (1.0 / norm - 1.0) + grad_probs * probs * growth / norm
    key_part = key_change.sum((-1, -2))
    return value_part + query_part + key_part


def records_for(store: dict[int, Recorded], layers: Sequence[int]) -> list[Recorded]:
    r"""The recorded attention inputs of the given layers, in order."""
    missing = [layer for layer in layers if layer not in store]
    if missing:
        raise UnsupportedModuleError(
            f"The attention of blocks {missing} was not called through AttentionInterface "
            "in the forward pass; AtP* needs its queries and keys. Use method='atp'."
        )
    return [store[layer] for layer in layers]
