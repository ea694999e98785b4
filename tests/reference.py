"""An independent, slow implementation of the GIM rules, for the tests only.

It shares no code with captum_gim. Every rule is written as a forward value that
is unchanged plus a surrogate whose autograd derivative is the rule:

- gradient scale s:        x * s + x.detach() * (1 - s)
- frozen statistic:        (x - mean) / sigma.detach()
- tempered softmax:        p.detach() + T * (softmax(s / T) - softmax(s / T).detach())
  (the derivative of softmax(s / T) carries 1 / T, which the factor T removes)

Attention is re-implemented in plain tensor code, routed through a test-only
attention implementation name whose masks are transformers' eager masks, and the
mixture-of-experts layers are recomputed token by token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from captum_gim import GIMConfig

REFERENCE = "gim_test_reference"
_GEMMA_NORMS = {"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"}
_active: list[GIMConfig] = []


def scaled(x: Tensor, scale: float) -> Tensor:
    return x * scale + x.detach() * (1.0 - scale)


def reference_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: object,
) -> tuple[Tensor, Tensor]:
    config = _active[-1]
    query = scaled(query, config.q_scale)
    key = scaled(key, config.k_scale)
    value = scaled(value, config.v_scale)
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query @ key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores + attention_mask
    wide = scores.to(torch.promote_types(scores.dtype, torch.float32))
    probs = torch.softmax(wide, dim=-1)
    temperature = config.temperature or 1.0
    if temperature != 1.0 and not isinstance(getattr(module, "sinks", None), Tensor):
        tempered = torch.softmax(wide / temperature, dim=-1)
        probs = probs.detach() + temperature * (tempered - tempered.detach())
    sinks = getattr(module, "sinks", None)
    if isinstance(sinks, Tensor):  # gpt-oss: one extra logit per head, dropped after softmax
        column = sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        wide = torch.cat([scores, column], dim=-1).to(wide.dtype)
        probs = torch.softmax(wide, dim=-1)
        if temperature != 1.0:
            tempered = torch.softmax(wide / temperature, dim=-1)
            probs = probs.detach() + temperature * (tempered - tempered.detach())
        probs = probs[..., :-1]
    output = probs.to(value.dtype) @ value
    return output.transpose(1, 2).contiguous(), probs


ALL_ATTENTION_FUNCTIONS.register(REFERENCE, reference_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(REFERENCE, eager_mask)


def _norm_surrogate(module: nn.Module, x: Tensor) -> Tensor | None:
    name = type(module).__name__
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    if isinstance(module, nn.LayerNorm):
        centered = x32 - x32.mean(-1, keepdim=True)
        sigma = torch.sqrt(x32.var(-1, unbiased=False, keepdim=True) + module.eps)
        y = centered / sigma.detach()
        if module.weight is not None:  # Nemotron's LayerNorm1P scales by (1 + w)
            offset = 1.0 if name == "NemotronLayerNorm1P" else 0.0
            y = y * (module.weight + offset) + module.bias
        return y.to(x.dtype)
    if isinstance(module, nn.RMSNorm) or name.endswith("RMSNorm"):
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None)) or 1e-6
        rho = torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        weight = module.weight.float() + (1.0 if name in _GEMMA_NORMS else 0.0)
        return (weight * x32 / rho.detach()).to(x.dtype)
    return None


def _experts_surrogate(
    module: nn.Module, config: GIMConfig, hidden: Tensor, index: Tensor, weights: Tensor
) -> Tensor:
    output = torch.zeros_like(hidden)
    for token in range(hidden.shape[0]):
        for slot in range(index.shape[1]):
            expert = int(index[token, slot])
            gate, up = (module.gate_up_proj[expert] @ hidden[token]).chunk(2)
            inner = module.act_fn(scaled(gate, config.gate_scale)) * scaled(up, config.up_scale)
            contribution = (module.down_proj[expert] @ inner) * weights[token, slot]
            output = output.index_add(0, torch.tensor([token]), contribution[None])
    return output


@contextlib.contextmanager
def reference_rules(model: nn.Module, config: GIMConfig) -> Iterator[None]:
    """Applies the reference rules to every forward pass through model."""
    handles = []

    def add(module: nn.Module, hook: Callable) -> None:
        handles.append(module.register_forward_hook(hook))

    for module in model.modules():
        name = type(module).__name__
        is_norm = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or name.endswith("RMSNorm")
        if config.freeze_norm and is_norm:
            add(module, lambda m, args, out: _norm_surrogate(m, args[0]))
        if hasattr(module, "gate_proj") and hasattr(module, "up_proj"):
            add(module.gate_proj, lambda m, a, out: scaled(out, config.gate_scale))
            add(module.up_proj, lambda m, a, out: scaled(out, config.up_scale))
        if name == "Phi3MLP":

            def fused(m: nn.Module, a: tuple, out: Tensor) -> Tensor:
                gate, up = out.chunk(2, dim=-1)
                return torch.cat([scaled(gate, config.gate_scale), scaled(up, config.up_scale)], -1)

            add(module.gate_up_proj, fused)
        if name.endswith("Experts") and (config.gate_scale, config.up_scale) != (1.0, 1.0):
            add(module, lambda m, args, out: _experts_surrogate(m, config, *args))
    model_config = getattr(model, "config", None)
    own_implementation = getattr(model_config, "_attn_implementation", None)
    if model_config is not None:
        model_config._attn_implementation_internal = REFERENCE
    _active.append(config)
    try:
        yield
    finally:
        _active.pop()
        if model_config is not None:
            model_config._attn_implementation_internal = own_implementation
        for handle in handles:
            handle.remove()


def reference_gradient(
    model: nn.Module,
    forward: Callable[..., Tensor],
    inputs: Tensor,
    target: int,
    config: GIMConfig,
    *args: object,
) -> Tensor:
    """GIM gradient of forward(inputs)[:, target] by the reference rules."""
    x = inputs.detach().clone().requires_grad_()
    with reference_rules(model, config):
        output = forward(x, *args)[:, target].sum()
    return torch.autograd.grad(output, x)[0]
