"""PyTorch's own ``nn.MultiheadAttention``: the three rules, per instance.

A forward hook recomputes the attention of one ``nn.MultiheadAttention`` from
its inputs and weights, with the tempered softmax (rule 1) and the q/k/v
gradient split (rule 3), checks that the recomputed output equals the module's
own output, and returns the recomputed one: the forward value is unchanged and
the backward pass has the rules. A mismatch raises
:class:`UnsupportedModuleError` naming the module (with ``strict=False``: a
warning, and the module keeps its own output and exact gradients). Nothing is
patched globally.

In training mode with attention dropout the recomputation draws the same
dropout mask as the module's own forward (the random state before the module's
forward is kept by a pre-hook and replayed, then the state after it restored),
so the rules apply exactly to that one stochastic forward, as they do for
transformers' attention; the model gets the training-mode warning of
:func:`captum_gim.sites.checks.check_model`. Where the module's kernel draws its
mask differently (fused CUDA kernels may), the check fails and the module is
refused by name (``strict=False``: kept exact with a warning).

``nn.TransformerEncoderLayer`` and ``DecoderLayer`` take their fused C++ fast
path only when no forward hook is attached to any of their submodules, so the
hook on their ``self_attn`` already sends them through the Python path.
``nn.TransformerEncoder`` may turn its input into a nested tensor first: its
``use_nested_tensor`` is switched off for the call and restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_gim.config import GIMConfig
from captum_gim.rules import scale_gradient, tempered_softmax
from captum_gim.sites.discovery import UnsupportedModuleError

_FORWARD_PARAMETERS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)


def install_torch_attention(
    stack: contextlib.ExitStack,
    name: str,
    module: nn.MultiheadAttention,
    config: GIMConfig,
    strict: bool = True,
) -> None:
    r"""
    Gives one ``nn.MultiheadAttention`` the attention rules of ``config`` for
    the duration of ``stack``.

    Args:
        stack (contextlib.ExitStack): Owns the removal of the hooks.
        name (str): The module's name in the model, for error messages.
        module (nn.MultiheadAttention): The attention module.
        config (GIMConfig): The settings.
        strict (bool, optional): Raise for a call the rules cannot reach
                    exactly; with False warn and keep the module's own output.
                    Default: True
    """
    states: list[_RandomState] = []

    def keep_state(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training and module.dropout > 0 and torch.is_grad_enabled():
            query = args[0] if args else kwargs.get("query")
            states.append(_RandomState(query.device if isinstance(query, Tensor) else None))

    pre = module.register_forward_pre_hook(keep_state, with_kwargs=True)
    hook = module.register_forward_hook(
        _recompute_hook(name, config, strict, states), with_kwargs=True
    )
    stack.callback(pre.remove)
    stack.callback(hook.remove)


class _RandomState:
    """The CPU (and CUDA device's) random state before a module's forward, to draw
    the same dropout mask again."""

    def __init__(self, device: torch.device | None) -> None:
        self.devices = [device] if device is not None and device.type == "cuda" else []
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextlib.contextmanager
    def replayed(self) -> Any:
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda, strict=True):
                torch.cuda.set_rng_state(state, device)
            yield


def disable_nested_fast_path(
    stack: contextlib.ExitStack, encoders: list[nn.TransformerEncoder]
) -> None:
    r"""
    Switches off the nested-tensor fast path of ``nn.TransformerEncoder``
    modules (an attribute of each instance) until ``stack`` closes.

    Args:
        stack (contextlib.ExitStack): Restores the attribute.
        encoders (list[nn.TransformerEncoder]): The encoders of the model.
    """
    for module in encoders:
        if getattr(module, "use_nested_tensor", False):
            module.use_nested_tensor = False
            stack.callback(setattr, module, "use_nested_tensor", True)


def _recompute_hook(
    name: str, config: GIMConfig, strict: bool, states: list[_RandomState]
) -> Callable[..., Any]:
    def hook(
        module: nn.MultiheadAttention,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: tuple[Tensor, Tensor | None],
    ) -> tuple[Tensor, Tensor | None] | None:
        state = states.pop() if states else None
        call = dict(zip(_FORWARD_PARAMETERS, args, strict=False)) | kwargs
        if not torch.is_grad_enabled():
            return None
        problem = _unsupported(call)
        if problem is None:
            dropout = module.dropout if module.training else 0.0
            replay = state.replayed() if state is not None else contextlib.nullcontext()
            with replay:
                recomputed = multi_head_attention(module, config, **call, dropout=dropout)
            problem = _mismatch(recomputed, output, dropout)
        if problem is None:
            return _with_forward_value(recomputed, output)
        message = f"'{name}' (MultiheadAttention) {problem}"
        if strict:
            raise UnsupportedModuleError(f"{message}; or pass strict=False.")
        warnings.warn(f"GIM rules skip {message} (exact gradients there).", stacklevel=2)
        return None

    return hook


def _with_forward_value(
    recomputed: tuple[Tensor, Tensor | None], output: tuple[Tensor, Tensor | None]
) -> tuple[Tensor, Tensor | None]:
    """The module's own output values (bitwise) with the recomputation's backward."""

    def merged(ours: Tensor | None, theirs: Tensor | None) -> Tensor | None:
        if ours is None or theirs is None:
            return ours
        return theirs.detach() + (ours - ours.detach())

    return merged(recomputed[0], output[0]), merged(recomputed[1], output[1])  # type: ignore[return-value]


def _unsupported(call: dict[str, Any]) -> str | None:
    if any(
        isinstance(call.get(k), Tensor) and call[k].is_nested for k in ("query", "key", "value")
    ):
        return (
            "received nested tensors, which GIM does not support; pass padded tensors "
            "with key_padding_mask"
        )
    return None


def multi_head_attention(
    module: nn.MultiheadAttention,
    config: GIMConfig,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    dropout: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    r"""
    The output of ``module(query, key, value, ...)`` recomputed with the GIM
    attention rules of ``config`` in the backward pass.

    Args:
        module (nn.MultiheadAttention): The attention module (its weights).
        config (GIMConfig): The settings (temperature, q/k/v scales).
        query, key, value, key_padding_mask, need_weights, attn_mask,
        average_attn_weights, is_causal: As in ``nn.MultiheadAttention.forward``
                    (``is_causal`` is a hint there: ``attn_mask`` holds the mask).
        dropout (float, optional): Dropout probability of the attention
                    probabilities, drawn as ``F.multi_head_attention_forward``
                    draws it (the caller replays the module's random state).
                    Default: 0.0

    Returns:
        *tuple*: the attention output and the attention weights (or None),
        as the module returns them.
    """
    del is_causal  # a hint only; PyTorch requires attn_mask alongside it
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif module.batch_first:
        query, key, value = (x.transpose(0, 1) for x in (query, key, value))
    # now sequence x batch x features, as in F.multi_head_attention_forward
    q, k, v = _projections(module, query, key, value)
    batch, heads = query.shape[1], module.num_heads
    head_dim = module.embed_dim // heads
    additive = _additive_mask(attn_mask, key_padding_mask, query.dtype)
    if module.bias_k is not None and module.bias_v is not None:
        k = torch.cat([k, module.bias_k.repeat(1, batch, 1)])
        v = torch.cat([v, module.bias_v.repeat(1, batch, 1)])
        additive = _pad_keys(additive)
    # batch x heads x sequence x head_dim
    q, k, v = (x.reshape(x.shape[0], batch, heads, head_dim).permute(1, 2, 0, 3) for x in (q, k, v))
    if module.add_zero_attn:
        k = torch.cat([k, k.new_zeros(batch, heads, 1, head_dim)], dim=2)
        v = torch.cat([v, v.new_zeros(batch, heads, 1, head_dim)], dim=2)
        additive = _pad_keys(additive)
    q = scale_gradient(q, config.q_scale)
    k = scale_gradient(k, config.k_scale)
    v = scale_gradient(v, config.v_scale)
    scores = (q / math.sqrt(head_dim)) @ k.transpose(-2, -1)
    if additive is not None:
        if additive.dim() == 3 and additive.shape[0] == batch * heads:
            additive = additive.view(batch, heads, *additive.shape[1:])
        scores = scores + additive
    temperature = config.temperature if config.softmax_rule_on else 1.0
    probs = tempered_softmax(scores, temperature).to(q.dtype)  # type: ignore[arg-type]
    if not need_weights:  # PyTorch then runs sdpa: rows with every key masked give 0
        probs = probs.nan_to_num(0.0)
    if dropout > 0:
        probs = F.dropout(probs, p=dropout)
    mixed = (probs @ v).permute(2, 0, 1, 3).reshape(query.shape[0], batch, module.embed_dim)
    output = F.linear(mixed, module.out_proj.weight, module.out_proj.bias)
    if unbatched:
        output = output.squeeze(1)
    elif module.batch_first:
        output = output.transpose(0, 1)
    weights = None
    if need_weights:
        weights = probs.mean(dim=1) if average_attn_weights else probs
        if unbatched:
            weights = weights.squeeze(0)
    return output, weights


def _projections(
    module: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    embed = module.embed_dim
    bias = module.in_proj_bias
    biases = (None, None, None) if bias is None else bias.split(embed)
    if module._qkv_same_embed_dim:
        weights = module.in_proj_weight.split(embed)
    else:
        weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
    return tuple(  # type: ignore[return-value]
        F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases, strict=True)
    )


def _additive_mask(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, dtype: torch.dtype
) -> Tensor | None:
    """attn_mask (queries x keys, or batch*heads x queries x keys) plus the key
    padding mask (batch x keys), as additive float masks (True = masked)."""

    def additive(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                mask, float("-inf")
            )
        return mask.to(dtype)

    merged = None if attn_mask is None else additive(attn_mask)
    if key_padding_mask is not None:
        padding = additive(key_padding_mask)[:, None, None, :]  # batch x 1 x 1 x keys
        if merged is not None and merged.dim() == 3:
            batch = padding.shape[0]
            merged = merged.view(batch, -1, *merged.shape[1:])
        merged = padding if merged is None else merged + padding
    return merged


def _pad_keys(mask: Tensor | None) -> Tensor | None:
    return None if mask is None else F.pad(mask, (0, 1))


def _mismatch(
    recomputed: tuple[Tensor, Tensor | None], output: tuple[Tensor, Tensor | None], dropout: float
) -> str | None:
    pairs = [(recomputed[0], output[0])]
    if output[1] is not None and recomputed[1] is not None:
        pairs.append((recomputed[1], output[1]))
    for ours, theirs in pairs:
        tolerance = 1e-4 if theirs.dtype in (torch.float32, torch.float64) else 2e-2
        same = ours.shape == theirs.shape and torch.allclose(
            ours.detach(), theirs.detach(), equal_nan=True, rtol=tolerance, atol=tolerance
        )
        if not same and dropout > 0:
            return (
                f"is in training mode with dropout {dropout}, and GIM's recomputation "
                "does not draw the dropout mask that the module's kernel drew, so its "
                "rules cannot be applied exactly; call model.eval()"
            )
        if not same:
            return (
                "is not reproduced by GIM's recomputation of its attention, so its rules "
                "cannot be applied exactly; please report this configuration of "
                "nn.MultiheadAttention"
            )
    return None
