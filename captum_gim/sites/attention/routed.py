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
- otherwise (``eager``, ``flex_attention``, or keywords the fused path does not
  take, such as soft-capping, dropout, T5's ``position_bias`` or attention
  sinks), the scores and probabilities are materialised as eager attention does,
  and the softmax gets the tempered backward. That recomputation is checked on
  every call against the output of the implementation the model was loaded
  with, which stays the forward value (bitwise); a mismatch, e.g. a keyword
  the recomputation does not implement, raises ``UnsupportedModuleError``
  naming the module instead of changing the forward or the gradient.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

from captum_gim.config import GIMConfig
from captum_gim.rules import (
    scale_gradient,
    tempered_attention_backward,
    tempered_softmax,
)
from captum_gim.sites.errors import UnsupportedModuleError

GIM_ATTENTION = "captum_gim"
SUPPORTED_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")
#: Keywords of the AttentionInterface that the eager recomputation implements;
#: others are ignored by it, which the per-call check against the loaded
#: implementation's output makes safe.
_SINK_KEYWORDS = ("s_aux", "sinks")


@dataclass(frozen=True)
class _AttentionSite:
    config: GIMConfig
    implementation: str
    eager_function: Callable[..., tuple[Tensor, Tensor | None]] | None
    strict: bool = True


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
def route_attention(module: nn.Module, config: GIMConfig, strict: bool = True) -> Iterator[None]:
    r"""
    Routes one attention module through the GIM attention function for the
    duration of the block, then restores its config object.

    Args:
        module (nn.Module): An attention module that calls
                    ``ALL_ATTENTION_FUNCTIONS.get_interface``.
        config (GIMConfig): The rule settings.
        strict (bool, optional): Raise when a call's recomputation differs from
                    the model's attention; with False warn and keep the model's
                    attention (and its exact softmax gradient) for that call.
                    Default: True
    """
    register_gim_attention()
    implementation = attention_implementation(module) or "eager"
    own_config: Any = module.config
    routed_config = copy.copy(own_config)
    routed_config._attn_implementation_internal = GIM_ATTENTION
    site = _AttentionSite(config, implementation, _eager_function_of(module), strict)
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
    original = _original_function(site)
    if not config.softmax_rule_on:
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
    return _checked_eager_attention(
        module,
        original,
        site.implementation,
        query,
        key,
        value,
        attention_mask,
        temperature,
        common,
        site.strict,
    )


def _original_function(site: _AttentionSite) -> Callable[..., Any]:
    if site.implementation == "sdpa":
        return sdpa_attention_forward
    if site.implementation == "eager":
        return site.eager_function or eager_gim_attention
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[site.implementation]


def _checked_eager_attention(
    module: nn.Module,
    original: Callable[..., Any],
    implementation: str,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Any,
    temperature: float,
    common: dict[str, Any],
    strict: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The eager recomputation with the tempered softmax, whose value is checked
    against, and replaced by, the loaded implementation's output."""
    devices = [query.device] if query.device.type == "cuda" else []
    # With gradients on, as the model itself would call it: sdpa picks its CPU kernel by
    # whether the inputs require grad, and the forward value must be that kernel's, bitwise.
    # flex_attention has no backward on the CPU: its value is computed from detached inputs.
    inputs: tuple[Tensor, ...] = (query, key, value)
    if implementation == "flex_attention" and query.device.type == "cpu":
        inputs = tuple(t.detach() for t in inputs)
    with torch.random.fork_rng(devices=devices):
        own, expected_weights = original(module, *inputs, attention_mask, **common)
    expected = own.detach()
    mask = _dense_mask(attention_mask, query, key)
    output, probs = eager_gim_attention(
        module, query, key, value, mask, temperature=temperature, **common
    )
    difference = (output.detach().float() - expected.float()).abs()
    deviation = float(difference.max()) if output.numel() else 0.0
    bound = _tolerance(expected.dtype) * (1.0 + float(expected.float().abs().max()))
    if output.shape != expected.shape or not deviation <= bound:
        if not strict and own.requires_grad:
            warnings.warn(
                f"GIM's tempered softmax skips this call of {type(module).__name__} (exact "
                f"softmax gradient there): its recomputation differs from the model's own "
                f"attention by {deviation:.3g}"
                + (" (dropout in training mode)" if common.get("dropout") else "")
                + "; the q/k/v split still applies.",
                stacklevel=2,
            )
            return own, expected_weights
        raise UnsupportedModuleError(
            f"{type(module).__name__}: the GIM attention recomputation differs from "
            f"the model's own attention by {deviation:.3g} (keywords: "
            f"{sorted(k for k, v in common.items() if v is not None)}); GIM refuses "
            "rather than change the forward or return a wrong gradient. Pass "
            "temperature=1.0, or strict=False to skip this attention."
        )
    routed = expected.detach() + (output - output.detach())
    weights = probs if expected_weights is not None else None
    return routed, weights


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float16: 4e-3, torch.bfloat16: 3e-2}.get(dtype, 1e-4)


def _dense_mask(attention_mask: Any, query: Tensor, key: Tensor) -> Tensor | None:
    """flex_attention's BlockMask as a boolean mask (True = attend)."""
    if attention_mask is None or isinstance(attention_mask, Tensor):
        return attention_mask
    from torch.nn.attention.flex_attention import BlockMask, create_mask

    if not isinstance(attention_mask, BlockMask):
        raise UnsupportedModuleError(
            f"GIM cannot read an attention mask of type {type(attention_mask).__name__}"
        )
    return create_mask(
        attention_mask.mask_mod,
        query.shape[0],
        1,
        query.shape[-2],
        key.shape[-2],
        device=query.device,
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
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:
        scores = scores + position_bias
    mask = _boolean_or_additive_mask(module, attention_mask, query, key, kwargs)
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    elif mask is not None:
        scores = scores + mask
    sinks = _sinks(module, kwargs)
    if sinks is not None:
        if sinks.dim() == scores.dim():  # one logit per query (Inkling 2): b x h x q x 1
            sink_logits = sinks.expand(*scores.shape[:-1], 1)
        else:  # one logit per head (gpt-oss)
            sink_logits = sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink_logits.to(scores.dtype)], dim=-1)
        probs = tempered_softmax(scores, temperature)[..., :-1].to(query.dtype)
    else:
        probs = tempered_softmax(scores, temperature).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


def _sinks(module: nn.Module, kwargs: dict[str, Any]) -> Tensor | None:
    """Attention sinks: one extra logit per head (gpt-oss) or per query (Inkling 2)
    that takes probability mass and is dropped after the softmax."""
    for name in _SINK_KEYWORDS:
        if isinstance(kwargs.get(name), Tensor):
            return kwargs[name]
    sinks = getattr(module, "sinks", None)
    return sinks if isinstance(sinks, Tensor) else None


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
        grads = tempered_attention_backward(
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


@functools.cache
def register_gim_attention() -> None:
    r"""Registers :func:`gim_attention_forward` as ``"captum_gim"`` in transformers'
    AttentionInterface (once; importing transformers' modeling code is slow, so
    this waits for the first model routed)."""
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(GIM_ATTENTION, gim_attention_forward)
