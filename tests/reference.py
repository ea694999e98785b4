"""An independent, slow implementation of the GIM rules, for the tests only.

It shares no code with captum_gim. Every rule is written as a forward value that
is unchanged plus a surrogate whose autograd derivative is the rule:

- gradient scale s:        x * s + x.detach() * (1 - s)
- frozen statistic:        (x - mean) / sigma.detach()
- tempered softmax:        p.detach() + T * (softmax(s / T) - softmax(s / T).detach())
  (the derivative of softmax(s / T) carries 1 / T, which the factor T removes)

Attention is re-implemented in plain tensor code, routed through a test-only
attention implementation name whose masks are transformers' eager masks, and the
mixture-of-experts layers are recomputed token by token (Llama 4's rows, already
sorted by expert, expert by expert; gpt-oss's clamped SwiGLU with its biases).

Each norm's formula comes from the table ``NORM_FORMULAS`` (written from the
transformers sources, by class name) or, for PyTorch's own classes, from its
type. Every surrogate checks that its forward value is the module's output: a
part the reference does not know raises :class:`ReferenceGap` instead of giving
a wrong reference.
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
_active: list[GIMConfig] = []


class ReferenceGap(Exception):
    """The model has a part the reference does not implement."""


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
    position_bias: Tensor | None = None,
    **kwargs: object,
) -> tuple[Tensor, Tensor]:
    config = _active[-1]
    if dropout and module.training:
        raise ReferenceGap("attention dropout in training mode")
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
    if position_bias is not None:  # T5's relative position bias
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    sinks = getattr(module, "sinks", None)
    if isinstance(sinks, Tensor):  # gpt-oss: one extra logit per head, dropped after softmax
        column = sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, column.to(scores.dtype)], dim=-1)
    wide = scores.to(torch.promote_types(scores.dtype, torch.float32))
    probs = torch.softmax(wide, dim=-1)
    temperature = config.temperature or 1.0
    if temperature != 1.0:
        tempered = torch.softmax(wide / temperature, dim=-1)
        probs = probs.detach() + temperature * (tempered - tempered.detach())
    if isinstance(sinks, Tensor):
        probs = probs[..., :-1]
    output = probs.to(value.dtype) @ value
    return output.transpose(1, 2).contiguous(), probs


ALL_ATTENTION_FUNCTIONS.register(REFERENCE, reference_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(REFERENCE, eager_mask)


# Norm formulas, y = scale * (x - c * mean(x)) / rho(x) + b, with the statistic rho frozen.
def layer_norm(x: Tensor, eps: float) -> Tensor:
    """(x - mean) / sqrt(var + eps), var the biased variance."""
    centered = x - x.mean(-1, keepdim=True)
    return centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + eps).detach()


def rms_norm(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x ** 2) + eps)."""
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps).detach()


def l2_norm(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(sum(x ** 2) + eps)."""
    return x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) + eps).detach()


#: (statistic, scale) of a norm class: scale "w", "1+w" or "none"; a bias is
#: added wherever the module has one.
NORM_FORMULAS: dict[str, tuple[Callable[[Tensor, float], Tensor], str]] = {
    "NemotronLayerNorm1P": (layer_norm, "1+w"),  # an nn.LayerNorm subclass
    "T5LayerNorm": (rms_norm, "w"),  # not centred, despite its name
    "CpmAntLayerNorm": (rms_norm, "w"),
    "Llama4TextL2Norm": (rms_norm, "none"),  # the mean, not the sum, of squares
    **{
        f"{family}RMSNorm": (rms_norm, "1+w")
        for family in (
            "Gemma",
            "Gemma2",
            "Gemma3",
            "RecurrentGemma",
            "T5Gemma",
            "T5Gemma2",
            "VaultGemma",
            "Qwen3Next",
            "Qwen3_5",
            "Qwen3_5Moe",
            "Qwen4ExpText",
            "MiniMaxM3VL",
            "Step3p7",
        )
    },
}
_EPS_NAMES = ("eps", "variance_epsilon", "epsilon", "variance_eps")
#: Norms whose eps is a constant in their forward, not an attribute.
_FIXED_EPS = {"OlmoLayerNorm": 1e-5}


def norm_formula(module: nn.Module) -> tuple[Callable[[Tensor, float], Tensor], str] | None:
    """The reference's formula for a norm module, or None when it is not a norm."""
    name = type(module).__name__
    if name in NORM_FORMULAS:
        return NORM_FORMULAS[name]
    has_weight = isinstance(getattr(module, "weight", None), Tensor)
    if isinstance(module, nn.LayerNorm) or name.endswith("LayerNorm"):
        return layer_norm, "w" if has_weight else "none"
    if isinstance(module, nn.RMSNorm) or name.endswith("RMSNorm"):
        return rms_norm, "w" if has_weight else "none"
    if name.endswith("L2Norm"):
        return l2_norm, "w" if has_weight else "none"
    return None


def _eps(module: nn.Module) -> float:
    if type(module).__name__ in _FIXED_EPS:
        return _FIXED_EPS[type(module).__name__]
    for attribute in _EPS_NAMES:
        value = getattr(module, attribute, None)
        if isinstance(value, float):
            return value
    if isinstance(module, nn.RMSNorm):  # eps=None: the dtype's machine epsilon
        return torch.finfo(torch.float32).eps
    raise ReferenceGap(f"{type(module).__name__} has no eps attribute")


def _norm_surrogate(module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
    formula = norm_formula(module)
    assert formula is not None
    statistic, scale = formula
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    y = statistic(x32, _eps(module))
    if scale != "none":
        y = y * (module.weight.float() + (1.0 if scale == "1+w" else 0.0))
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor):
        y = y + bias.float()
    y = y.to(output.dtype)
    _check(module, y, output)
    return y


def _check(module: nn.Module, value: Tensor, output: Tensor) -> None:
    tolerance = 1e-5 if output.dtype == torch.float32 else 1e-2
    deviation = float((value.detach() - output.detach()).abs().max())
    if deviation > tolerance * (1.0 + float(output.detach().abs().max())):
        raise ReferenceGap(f"the reference's {type(module).__name__} is off by {deviation:.3g}")


def _experts_surrogate(module: nn.Module, config: GIMConfig, output: Tensor, args: tuple) -> Tensor:
    """Mixture-of-experts weights [experts, 2 * inner, hidden] and [experts, hidden, inner]."""
    try:
        if len(args) == 1:  # Llama 4: the input rows already sorted by expert
            return _experts_by_expert(module, config, output, args[0])
        if hasattr(module, "gate_up_proj_bias"):  # gpt-oss
            return _clamped_experts_by_token(module, config, output, *args)
        return _experts_by_token(module, config, output, *args)
    except (AttributeError, TypeError, IndexError, RuntimeError) as error:
        raise ReferenceGap(f"{type(module).__name__} has another layout: {error}") from None


def _experts_by_expert(
    module: nn.Module, config: GIMConfig, output: Tensor, hidden: Tensor
) -> Tensor:
    """Llama 4: rows [experts * tokens, hidden], weights [experts, hidden, 2 * inner] with
    the gate the first half, and [experts, inner, hidden]."""
    experts = module.gate_up_proj.shape[0]
    rows = hidden.reshape(experts, -1, hidden.shape[-1])
    results = []
    for expert in range(experts):
        gate, up = (rows[expert] @ module.gate_up_proj[expert]).chunk(2, dim=-1)
        inner = module.act_fn(scaled(gate, config.gate_scale)) * scaled(up, config.up_scale)
        results.append(inner @ module.down_proj[expert])
    result = torch.cat(results).reshape(output.shape)
    _check(module, result, output)
    return result


def _clamped_experts_by_token(
    module: nn.Module,
    config: GIMConfig,
    output: Tensor,
    hidden: Tensor,
    index: Tensor,
    weights: Tensor,
) -> Tensor:
    """gpt-oss: weights [experts, hidden, 2 * inner] with biases, gate and up interleaved
    (even and odd columns), ``(clamp(up) + 1) * g sigmoid(alpha g)`` for ``g = clamp(gate)``."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    result = torch.zeros_like(flat)
    for token in range(flat.shape[0]):
        for slot in range(index.shape[-1]):
            expert = int(index.reshape(flat.shape[0], -1)[token, slot])
            if expert >= module.gate_up_proj.shape[0]:
                continue
            gate_up = flat[token] @ module.gate_up_proj[expert] + module.gate_up_proj_bias[expert]
            gate = scaled(gate_up[0::2], config.gate_scale).clamp(max=module.limit)
            up = scaled(gate_up[1::2], config.up_scale).clamp(-module.limit, module.limit)
            inner = (up + 1) * (gate * torch.sigmoid(module.alpha * gate))
            down = inner @ module.down_proj[expert] + module.down_proj_bias[expert]
            weight = weights.reshape(flat.shape[0], -1)[token, slot]
            result = result.index_add(0, torch.tensor([token]), (down * weight)[None])
    result = result.reshape(output.shape)
    _check(module, result, output)
    return result


def _experts_by_token(
    module: nn.Module,
    config: GIMConfig,
    output: Tensor,
    hidden: Tensor,
    index: Tensor,
    weights: Tensor,
) -> Tensor:
    result = torch.zeros_like(hidden)
    for token in range(hidden.shape[0]):
        for slot in range(index.shape[1]):
            expert = int(index[token, slot])
            if expert >= module.gate_up_proj.shape[0]:  # a slot routed to no expert
                continue
            gate, up = (module.gate_up_proj[expert] @ hidden[token]).chunk(2)
            inner = module.act_fn(scaled(gate, config.gate_scale)) * scaled(up, config.up_scale)
            contribution = (module.down_proj[expert] @ inner) * weights[token, slot]
            result = result.index_add(0, torch.tensor([token]), contribution[None])
    _check(module, result, output)
    return result


def _fused_hook(config: GIMConfig) -> Callable[..., Tensor]:
    """Gate and up as the first and second half of one projection (Phi-3, ModernBERT)."""

    def hook(_: nn.Module, __: tuple, out: Tensor) -> Tensor:
        gate, up = out.chunk(2, dim=-1)
        return torch.cat([scaled(gate, config.gate_scale), scaled(up, config.up_scale)], -1)

    return hook


#: Gated MLPs ``act(gate(x)) * up(x)`` whose gate and up projections are named
#: children: (gate, up).
_SEPARATE = (("gate_proj", "up_proj"), ("wi_0", "wi_1"), ("w1", "w3"))
#: Gated MLPs with one projection whose first half is the gate, by class name
#: (besides any module with an nn.Linear ``gate_up_proj``, as Phi-3 and GLM).
_FUSED = {
    "ModernBertMLP": "Wi",
    "ModernBertDecoderMLP": "Wi",
    "MoshiGatingMLP": "fc1",
    "JetMoeMoE": "input_linear",
}


def _fused_projection(module: nn.Module) -> nn.Module | None:
    name = _FUSED.get(type(module).__name__)
    if name is not None:
        return getattr(module, name)
    fused = getattr(module, "gate_up_proj", None)
    return fused if isinstance(fused, nn.Linear) else None


@contextlib.contextmanager
def reference_rules(model: nn.Module, config: GIMConfig) -> Iterator[None]:
    """Applies the reference rules to every forward pass through model.

    Raises ReferenceGap for a module named like a norm that has no formula here.
    """
    handles = []

    def add(module: nn.Module, hook: Callable) -> None:
        handles.append(module.register_forward_hook(hook))

    for module in model.modules():
        name = type(module).__name__
        if norm_formula(module) is not None:
            if config.freeze_norm:
                add(module, lambda m, args, out: _norm_surrogate(m, args[0], out))
        elif "Norm" in name and not list(module.children()):
            raise ReferenceGap(f"no formula for {name}")
        for gate, up in _SEPARATE:
            if hasattr(module, gate) and hasattr(module, up):
                add(getattr(module, gate), lambda m, a, out: scaled(out, config.gate_scale))
                add(getattr(module, up), lambda m, a, out: scaled(out, config.up_scale))
        fused = _fused_projection(module)
        if fused is not None:
            add(fused, _fused_hook(config))
        fused_experts = getattr(module, "gate_up_proj", None)
        is_experts = isinstance(fused_experts, Tensor) and fused_experts.dim() == 3
        if is_experts and (config.gate_scale, config.up_scale) != (1.0, 1.0):
            add(module, lambda m, args, out: _experts_surrogate(m, config, out, args))
    # every config object that an attention module may read its implementation from
    found = (getattr(m, "config", None) for m in model.modules())
    configs = {id(c): c for c in found if c is not None}
    saved = {key: getattr(c, "_attn_implementation_internal", None) for key, c in configs.items()}
    for model_config in configs.values():
        model_config._attn_implementation_internal = REFERENCE
    _active.append(config)
    try:
        yield
    finally:
        _active.pop()
        for key, model_config in configs.items():
            model_config._attn_implementation_internal = saved[key]
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
