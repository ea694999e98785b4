"""Recognising gated MLPs ``down(act(gate(x)) * up(x))`` by their structure.

A module is a gated MLP when it holds a gate and an up projection under one of
the names transformers' families use (``gate_proj``/``up_proj``, ``w1``/``w3``,
T5's ``wi_0``/``wi_1``), or one fused ``gate_up_proj`` whose output is chunked
into gate and up, next to a down projection and an activation. On every call,
before any gradient is changed, :func:`verify_product` checks that the down
projection's input is ``act(gate) * up`` as the rule splits it; a module that
computes something else is refused, never given a wrong gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from captum_gim.rules.norms import forward_tolerance

#: (gate, up) projection names of separate-projection gated MLPs.
SEPARATE_NAMES = (("gate_proj", "up_proj"), ("w1", "w3"), ("wi_0", "wi_1"))
#: Fused gate/up projections whose first half is the gate.
FUSED_NAMES = ("gate_up_proj",)
DOWN_NAMES = ("down_proj", "w2", "wo")
ACTIVATION_NAMES = ("act_fn", "act", "activation_fn", "activation")


@dataclass(frozen=True)
class GatedStructure:
    r"""Where the gate, up and down parts of a gated MLP are."""

    gate: str
    up: str | None
    down: str
    activation: str


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
    if down is None or activation is None:
        return None
    for gate, up in SEPARATE_NAMES:
        if isinstance(getattr(module, gate, None), nn.Module) and isinstance(
            getattr(module, up, None), nn.Module
        ):
            return GatedStructure(gate, up, down, activation)
    fused = _first_child(module, FUSED_NAMES)
    if fused is not None:
        return GatedStructure(fused, None, down, activation)
    return None


def _first_child(module: nn.Module, names: tuple[str, ...]) -> str | None:
    return next(
        (name for name in names if isinstance(getattr(module, name, None), nn.Module)), None
    )


def verify_product(
    name: str, activation: nn.Module, gate: Tensor, up: Tensor, down_input: Tensor
) -> str | None:
    r"""
    Returns:
        *str or None*: why ``down_input`` is not ``activation(gate) * up`` (the
        product the gated-MLP rule splits), or None when it is.
    """
    if down_input.shape != up.shape:
        return f"its down projection reads shape {tuple(down_input.shape)}, not the gated product"
    with torch.no_grad():
        product = (activation(gate) * up).to(torch.float32)
        deviation = float((product - down_input.to(torch.float32)).abs().max())
        bound = forward_tolerance(down_input.dtype) * (1.0 + float(product.abs().max()))
    if deviation <= bound:
        return None
    return (
        f"its down projection's input differs from act(gate) * up by {deviation:.3g}, "
        "so the product GIM would split is not the one the module computes"
    )
