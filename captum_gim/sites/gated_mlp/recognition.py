"""Recognising gated MLPs ``down(act(gate(x)) * up(x))`` by their structure.

A module is a gated MLP when it holds a gate and an up projection under one of
the names transformers' families use (``gate_proj``/``up_proj``, ``w1``/``w3``,
T5's ``wi_0``/``wi_1``), or one fused projection (``gate_up_proj``,
ModernBERT's ``Wi``, Moshi's ``fc1``, JetMoE's experts ``input_linear``) twice
as wide as its down projection reads, whose output is chunked into gate and up,
next to a down projection and an activation. The activation is a child or
attribute, or, for separate projections, a function called inline in the
forward (LFM2's ``F.silu``), which the product check identifies on the call;
:func:`~captum_gim.register_gated_mlp` names the parts of other classes.

On every call, before any gradient is changed, :func:`verify_product` checks
that the first part reading the product (the down projection, or a norm or
dropout before it) reads ``act(gate) * up``; a module that computes something
else is refused, never given a wrong gradient.

Mixture-of-experts modules with a gating function of their own
(``_apply_gate``, e.g. gpt-oss's clamped SwiGLU ``(clamp(up) + 1) * glu(gate)``)
are checked by :func:`verify_gate_function`: its output must be a product of a
function of the gate part and a function of the up part.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_gim.rules.norms import forward_tolerance

#: (gate, up) projection names of separate-projection gated MLPs.
SEPARATE_NAMES = (("gate_proj", "up_proj"), ("w1", "w3"), ("w1", "v1"), ("wi_0", "wi_1"))
#: Fused gate/up projections whose first half is the gate.
FUSED_NAMES = ("gate_up_proj", "Wi")
#: Projections that are a fused gate/up projection when they are twice as wide
#: as their down projection reads (otherwise the first layer of a plain MLP).
FUSED_BY_WIDTH_NAMES = (("fc1", "fc2"), ("input_linear", "output_linear"))
DOWN_NAMES = ("down_proj", "w2", "wo", "Wo")
ACTIVATION_NAMES = ("act_fn", "act", "activation_fn", "activation")


#: The activations an inline-activation gated MLP may apply to its gate, by name.
INLINE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}

#: Attributes holding the alpha and the limit of a clamped SwiGLU.
ALPHA_NAMES = ("swiglu_alpha", "alpha")
LIMIT_NAMES = ("swiglu_limit", "limit")


@dataclass(frozen=True)
class ClampedSwiGLU:
    r"""gpt-oss's gating ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``
    with ``g = clamp(gate, max=limit)``: a product of a function of the gate
    branch and a function of the up branch, written inline in the forward."""

    alpha: float
    limit: float

    def __call__(self, gate: Tensor, up: Tensor) -> Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1.0) * (gate * torch.sigmoid(gate * self.alpha))


@dataclass(frozen=True)
class GatedStructure:
    r"""Where the gate, up and down parts of a gated MLP are."""

    gate: str
    up: str | None
    down: str
    #: The activation applied to the gate (None when ``clamped`` is the gating,
    #: or when the forward calls the activation inline).
    activation: str | None
    #: The gating of a module without an activation attribute.
    clamped: ClampedSwiGLU | None = None

    def products(self, module: nn.Module) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
        r"""
        Returns:
            *dict[str, Callable]*: the products ``(gate, up) -> act(gate) * up``
            that ``module`` may compute, by the activation's name: one for a
            named activation or a clamped SwiGLU, the candidates of
            :data:`INLINE_ACTIVATIONS` for an activation called inline.
        """
        if self.clamped is not None:
            return {"clamped SwiGLU": self.clamped}
        if self.activation is None:
            return {name: _gated(act) for name, act in INLINE_ACTIVATIONS.items()}
        return {self.activation: _gated(getattr(module, self.activation))}


def _gated(activation: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """The product ``(gate, up) -> activation(gate) * up``."""
    return lambda gate, up: activation(gate) * up


def gated_structure(module: nn.Module) -> GatedStructure | None:
    r"""
    Returns:
        *GatedStructure or None*: the named parts of a gated MLP module with
        ``nn.Module`` projections, or None when it has no such structure.
    """
    down = _first_child(module, DOWN_NAMES)
    activation = next(
        (name for name in ACTIVATION_NAMES if callable(getattr(module, name, None))), None
    )
    clamped = None if activation is not None else _clamped_swiglu(module)
    if down is not None:
        for gate, up in SEPARATE_NAMES:
            if isinstance(getattr(module, gate, None), nn.Module) and isinstance(
                getattr(module, up, None), nn.Module
            ):
                return GatedStructure(gate, up, down, activation, clamped)
    if activation is None and clamped is None:
        return None
    fused = _first_child(module, FUSED_NAMES)
    if down is not None and fused is not None:
        return GatedStructure(fused, None, down, activation, clamped)
    for fused, down in FUSED_BY_WIDTH_NAMES:
        if _is_twice_as_wide(module, fused, down):
            return GatedStructure(fused, None, down, activation, clamped)
    return None


def _widths(module: object) -> tuple[int, int] | None:
    """(input, output) widths of a linear layer or a stack of them."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() >= 2:
        return int(weight.shape[-1]), int(weight.shape[-2])
    return None


def _is_twice_as_wide(module: nn.Module, fused: str, down: str) -> bool:
    """True when child ``fused`` outputs twice the width child ``down`` reads."""
    fused_widths = _widths(getattr(module, fused, None))
    down_widths = _widths(getattr(module, down, None))
    return (
        fused_widths is not None
        and down_widths is not None
        and fused_widths[1] == 2 * down_widths[0]
    )


def looks_like_gated_mlp(module: nn.Module) -> bool:
    r"""
    Returns:
        *bool*: True when ``module`` has the parts of a gated MLP by name (a
        gate and an up part, ``w1``/``w3``, ``w_0``/``w_1``) or by shape (a projection twice as
        wide as its down projection reads), so that not recognising it must be
        reported.
    """
    names = {name.lower() for name, _ in module.named_children()}
    names |= {name.lower() for name, _ in module.named_parameters(recurse=False)}
    has_gate = any("gate" in name and "router" not in name for name in names)
    has_up = any("up" in name.split("_") for name in names)
    return (
        (has_gate and has_up)
        or {"w1", "w3"} <= names
        or {"w_0", "w_1"} <= names  # CPM-Ant: act(w_0(x)) * w_1(x), read by the parent's w_out
        or any(_is_twice_as_wide(module, fused, down) for fused, down in FUSED_BY_WIDTH_NAMES)
    )


def _clamped_swiglu(module: nn.Module) -> ClampedSwiGLU | None:
    alpha = next((getattr(module, n) for n in ALPHA_NAMES if _is_number(module, n)), None)
    limit = next((getattr(module, n) for n in LIMIT_NAMES if _is_number(module, n)), None)
    if alpha is None or limit is None:
        return None
    return ClampedSwiGLU(float(alpha), float(limit))


def _is_number(module: nn.Module, name: str) -> bool:
    value = getattr(module, name, None)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _first_child(module: nn.Module, names: tuple[str, ...]) -> str | None:
    return next(
        (name for name in names if isinstance(getattr(module, name, None), nn.Module)), None
    )


def verify_product(
    reader: str,
    products: dict[str, Callable[[Tensor, Tensor], Tensor]],
    gate: Tensor,
    up: Tensor,
    down_input: Tensor,
) -> str | None:
    r"""
    Returns:
        *str or None*: why ``down_input``, the input of the child module
        ``reader``, is none of ``products`` of ``(gate, up)`` (the product the
        gated-MLP rule splits, ``act(gate) * up``), or None when it is one.
    """
    if down_input.shape != up.shape:
        return f"its '{reader}' reads shape {tuple(down_input.shape)}, not the gated product"
    if down_input.numel() == 0:  # an expert no token was routed to
        return None
    deviations = []
    with torch.no_grad():
        actual = down_input.to(torch.float32)
        for product in products.values():
            expected = product(gate, up).to(torch.float32)
            deviation = float((expected - actual).abs().max())
            bound = forward_tolerance(down_input.dtype) * (1.0 + float(expected.abs().max()))
            if deviation <= bound:
                return None
            deviations.append(deviation)
    names = ", ".join(products)
    return (
        f"the input of its '{reader}' differs from act(gate) * up (act: {names}) by "
        f"{min(deviations):.3g}, so the product GIM would split is not the one the "
        "module computes"
    )


def gate_parts(gate_up: Tensor, interleaved: bool) -> tuple[Tensor, Tensor]:
    r"""
    Returns:
        *tuple[Tensor, Tensor]*: the gate and up parts of a fused gate/up
        output: alternating elements (``interleaved``) or its two halves.
    """
    if interleaved:
        return gate_up[..., ::2], gate_up[..., 1::2]
    gate, up = gate_up.chunk(2, dim=-1)
    return gate, up


def _join(gate: Tensor, up: Tensor, interleaved: bool) -> Tensor:
    if interleaved:
        return torch.stack((gate, up), dim=-1).flatten(-2)
    return torch.cat((gate, up), dim=-1)


def verify_gate_function(
    gate_function: Callable[[Tensor], Tensor], gate_up: Tensor, output: Tensor, interleaved: bool
) -> str | None:
    r"""
    Checks that ``output = gate_function(gate_up)`` is a product
    ``F(gate) * G(up)`` of a function of the gate part and a function of the up
    part, with every output element depending on both parts, so that scaling
    the two parts' gradients is exactly the gated-MLP split between the factors
    ``F(gate)`` and ``G(up)``. The function is run three more times, with the
    gate part, the up part or both replaced by a fixed partner ``(g', u')``
    whose values lie in [0.25, 1]: for such a product,
    ``f(g, u) * f(g', u') == f(g, u') * f(g', u)``.

    Returns:
        *str or None*: why the output is not such a product, or None when it is.
    """
    gate, up = gate_parts(gate_up, interleaved)
    if output.shape != gate.shape:
        return f"its gating function returns shape {tuple(output.shape)}, not the gate's"
    with torch.no_grad():
        pattern = torch.arange(gate_up.numel(), device=gate_up.device).mul(0.618034).frac()
        partner = (0.25 + 0.75 * pattern).to(gate_up.dtype).reshape(gate_up.shape)
        partner_gate, partner_up = gate_parts(partner, interleaved)
        both = gate_function(partner)
        real_gate = gate_function(_join(gate, partner_up, interleaved))
        real_up = gate_function(_join(partner_gate, up, interleaved))
        columns = both.reshape(-1, both.shape[-1])
        gate_matters = (real_gate.reshape(columns.shape) != columns).any(dim=0).all()
        up_matters = (real_up.reshape(columns.shape) != columns).any(dim=0).all()
        if not (gate_matters and up_matters):
            return (
                "its gating function has outputs that do not depend on both their gate "
                "and their up element (a gate/up layout it does not use)"
            )
        direct = output.to(torch.float32) * both.to(torch.float32)
        crossed = real_gate.to(torch.float32) * real_up.to(torch.float32)
        deviation = float((direct - crossed).abs().max())
        bound = forward_tolerance(output.dtype) * (1.0 + float(direct.abs().max()))
    if deviation <= bound:
        return None
    return (
        f"its gating function is not a product of a function of the gate part and one "
        f"of the up part (deviation {deviation:.3g}), so GIM cannot split it"
    )


def has_own_gate_function(module: nn.Module) -> bool:
    r"""
    Returns:
        *bool*: True when the class of a transformers experts module defines its
        own gating function ``_apply_gate`` (not transformers' default
        ``act_fn(gate) * up``).
    """
    function = getattr(type(module), "_apply_gate", None)
    if not callable(function):
        return False
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return True
    return function is not _default_apply_gate


def parameter_projections_reason(module: nn.Module) -> str | None:
    r"""
    Returns:
        *str or None*: why a module whose gate and up projections are bare
        parameter tensors (not modules, not one fused experts tensor) cannot get
        the split, or None when it has no such projections.
    """
    for gate, up in SEPARATE_NAMES:
        if isinstance(getattr(module, gate, None), nn.Parameter) and isinstance(
            getattr(module, up, None), nn.Parameter
        ):
            return (
                f"is a gated MLP whose {gate} and {up} are parameter tensors multiplied "
                "inside its forward, so no module hook reaches the up branch to split "
                "the product"
            )
    return None
