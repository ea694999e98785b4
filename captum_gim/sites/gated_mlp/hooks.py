"""Installing the gated-MLP split (rule 3) on one gated MLP.

The gradients of the gate and up branches are scaled where the branches are
computed, and on every call, before any gradient is changed, the product the
split is meant for is checked against what the module computes:

- projections (separate or one fused, chunked, projection): the first child
  module called after the gate and up projections (the down projection, or a
  norm or dropout in between, as in BitNet and ModernBERT) must read
  ``act(gate) * up``; a module that reads its product some other way is refused;
- experts with transformers' default gating (``act_fn(gate) * up``): the fused
  gate/up tensor that ``act_fn`` reads half of gets the scales;
- experts with a gating function of their own (``_apply_gate``, gpt-oss's
  clamped SwiGLU): the function's input gets the scales, and its output is
  checked to be a product of a function of the gate part and one of the up part.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn

from captum_gim.config import GIMConfig
from captum_gim.rules import Lazy, lazy_scale_gradient, scale_gradient
from captum_gim.sites.discovery import GatedLayout, GatedMLPSite, UnsupportedModuleError
from captum_gim.sites.gated_mlp.recognition import verify_gate_function, verify_product

_FIX = "Pass gate_scale=up_scale=1.0 to keep the exact gradients of gated MLPs."


def install_gated_mlp_rule(
    stack: contextlib.ExitStack, site: GatedMLPSite, config: GIMConfig, strict: bool = True
) -> None:
    r"""
    Installs the gated-MLP split on one site; ``stack`` owns its removal.

    Args:
        stack (contextlib.ExitStack): Receives one removal callback per hook.
        site (GatedMLPSite): The gated MLP.
        config (GIMConfig): The settings (``gate_scale``, ``up_scale``).
        strict (bool, optional): A projections-layout call whose product check
                    fails raises :class:`UnsupportedModuleError`; with False it
                    warns and that call keeps its exact gradients.
                    Default: True
    """
    if site.layout is GatedLayout.EXPERTS:
        hook = _scale_fused_base_hook(site.name, config.gate_scale, config.up_scale)
        _hook(stack, site.module.get_submodule("act_fn").register_forward_pre_hook(hook))
    elif site.layout is GatedLayout.GATE_FUNCTION:
        _install_gate_function(stack, site, config, strict)
    else:
        _install_projections(stack, site, config, strict)


def _hook(stack: contextlib.ExitStack, handle: torch.utils.hooks.RemovableHandle) -> None:
    stack.callback(handle.remove)


def _label(site: GatedMLPSite) -> str:
    return f"'{site.name}' ({type(site.module).__name__})"


def _install_projections(
    stack: contextlib.ExitStack, site: GatedMLPSite, config: GIMConfig, strict: bool
) -> None:
    module, structure = site.module, site.structure
    assert structure is not None
    call = _ProjectionCall(site, strict)
    gate: nn.Module = getattr(module, structure.gate)
    scaled: list[tuple[nn.Module, str, float, float | None]]
    if structure.up is None:
        scaled = [(gate, structure.gate, config.gate_scale, config.up_scale)]
    else:
        up: nn.Module = getattr(module, structure.up)
        scaled = [
            (gate, structure.gate, config.gate_scale, None),
            (up, structure.up, config.up_scale, None),
        ]
    for projection, branch, scale, second in scaled:
        _hook(stack, projection.register_forward_hook(call.scale_output(branch, scale, second)))
    activation = getattr(module, structure.activation) if structure.activation else None
    parts = {id(part) for part, *_ in scaled} | {id(activation)}
    for name, child in module.named_children():
        if id(child) not in parts:
            _hook(stack, child.register_forward_pre_hook(call.verify_reader(name)))
    _hook(stack, module.register_forward_pre_hook(call.start))
    _hook(stack, module.register_forward_hook(call.finish))


def _halves_scale(output: Tensor, gate_scale: float, up_scale: float) -> Tensor | float:
    if gate_scale == up_scale:
        return gate_scale
    half = output.shape[-1] // 2
    scale = torch.full((2 * half,), up_scale, dtype=output.dtype, device=output.device)
    scale[:half] = gate_scale
    return scale


class _ProjectionCall:
    """The split of one projections-layout gated MLP, settled call by call.

    The gate and up outputs get scales that are read in the backward pass. They
    are settled when the first child called after both projections (the down
    projection, or a norm or dropout before it) is found to read
    ``act(gate) * up``: then to the configured scales; otherwise the call
    raises, or with ``strict=False`` warns and keeps its exact gradients.
    """

    def __init__(self, site: GatedMLPSite, strict: bool) -> None:
        structure = site.structure
        assert structure is not None
        self.site, self.strict, self.structure = site, strict, structure
        self.products = structure.products(site.module)
        self.up_name = structure.gate if structure.up is None else structure.up
        self.seen: dict[str, Tensor] = {}
        self.pending: list[tuple[Lazy, Tensor | float]] = []

    def start(self, *_: Any) -> None:
        self.seen.clear()
        for lazy, _scale in self.pending:  # left by a call that raised midway
            lazy.value = 1.0
        self.pending = []

    def scale_output(
        self, branch: str, scale: float, second_half_scale: float | None
    ) -> Callable[..., Tensor]:
        """Scales a projection's output gradient (per half when two scales are
        given) and keeps the output for the product check of its reader."""

        def hook(_: nn.Module, __: tuple[Any, ...], output: Tensor) -> Tensor:
            if not (torch.is_grad_enabled() and output.requires_grad):
                return output
            self.seen[branch] = output
            wanted: Tensor | float = scale
            if second_half_scale is not None:
                wanted = _halves_scale(output, scale, second_half_scale)
            lazy = Lazy()
            self.pending.append((lazy, wanted))
            return lazy_scale_gradient(output, lazy)

        return hook

    def verify_reader(self, reader: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            structure = self.structure
            if structure.gate not in self.seen or self.up_name not in self.seen:
                return
            gate = self.seen.pop(structure.gate)
            up = self.seen.pop(self.up_name, gate)
            if structure.up is None:
                gate, up = gate.chunk(2, dim=-1)
            if not args or not isinstance(args[0], Tensor):
                problem: str | None = (
                    f"its '{reader}' reads no tensor positionally after the gate and up"
                )
            else:
                problem = verify_product(reader, self.products, gate, up, args[0])
            self._settle(problem)

        return hook

    def finish(self, *_: Any) -> None:
        if self.seen:
            self.seen.clear()
            self._settle(
                "no child module reads the product of its gate and up projections, so "
                "GIM cannot check the product it would split"
            )

    def _settle(self, problem: str | None) -> None:
        pending, self.pending = self.pending, []
        for lazy, scale in pending:
            lazy.value = 1.0 if problem is not None else scale
        if problem is not None:
            _refuse(self.site, problem, self.strict)


def _refuse(site: GatedMLPSite, problem: str, strict: bool) -> None:
    """Raises for a call whose product the split cannot be applied to; with
    ``strict=False`` warns (the caller then keeps that call's exact gradients)."""
    message = f"{_label(site)}: {problem}."
    if strict:
        raise UnsupportedModuleError(f"{message} {_FIX}")
    warnings.warn(
        f"GIM rules skip this call of a gated MLP (exact gradients there): {message}",
        stacklevel=3,
    )


def _parts_scale(
    gate_up: Tensor, gate_scale: float, up_scale: float, interleaved: bool
) -> Tensor | float:
    if gate_scale == up_scale:
        return gate_scale
    if not interleaved:
        return _halves_scale(gate_up, gate_scale, up_scale)
    scale = torch.full((gate_up.shape[-1],), up_scale, dtype=gate_up.dtype, device=gate_up.device)
    scale[::2] = gate_scale
    return scale


def _install_gate_function(
    stack: contextlib.ExitStack, site: GatedMLPSite, config: GIMConfig, strict: bool
) -> None:
    """Scales the gate and up parts of the experts' gating function's input.

    The function is replaced, on this instance and for the attribution only, by
    one that scales the parts' gradients, calls the original and checks that its
    output is a product of the two parts (transformers' experts functions call
    ``self._apply_gate``). A call of the module that never reaches the function
    is refused.
    """
    module = site.module
    interleaved = getattr(module, "is_concatenated", True) is False
    gate_function = cast(Callable[[Tensor], Tensor], module._apply_gate)
    calls = [0]

    def apply_gate(gate_up: Tensor) -> Tensor:
        if not torch.is_grad_enabled() or not gate_up.requires_grad:
            return gate_function(gate_up)
        calls[0] += 1
        scale = _parts_scale(gate_up, config.gate_scale, config.up_scale, interleaved)
        output = gate_function(scale_gradient(gate_up, scale))
        problem = verify_gate_function(
            gate_function, gate_up.detach(), output.detach(), interleaved
        )
        if problem is not None:
            _refuse(site, problem, strict)
            return gate_function(gate_up)
        return output

    def reset(*_: Any) -> None:
        calls[0] = 0

    def check_called(_: nn.Module, __: tuple[Any, ...], output: Any) -> None:
        used = isinstance(output, Tensor) and output.requires_grad and torch.is_grad_enabled()
        if used and calls[0] == 0:
            _refuse(
                site,
                "its forward does not call its gating function _apply_gate, so GIM "
                "cannot split its gated product",
                strict,
            )

    stack.enter_context(_instance_attribute(module, "_apply_gate", apply_gate))
    _hook(stack, module.register_forward_pre_hook(reset))
    _hook(stack, module.register_forward_hook(check_called))


@contextlib.contextmanager
def _instance_attribute(module: nn.Module, name: str, value: object) -> Iterator[None]:
    """Sets an attribute on one instance for the block, and restores it."""
    missing = object()
    previous = module.__dict__.get(name, missing)
    module.__dict__[name] = value
    try:
        yield
    finally:
        if previous is missing:
            module.__dict__.pop(name, None)
        else:
            module.__dict__[name] = previous


def _scale_fused_base_hook(name: str, gate_scale: float, up_scale: float) -> Callable[..., None]:
    """Scales the gradient of the fused gate/up tensor that ``act_fn`` reads from.

    The experts functions of transformers compute one fused projection and pass
    its gate part, a view, to ``act_fn``; the rest of the fused tensor is the up
    part. A gradient hook on the fused tensor scales the gate view's elements by
    ``gate_scale`` and all others by ``up_scale``, whatever the layout.
    """

    def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
        gate = args[0]
        if not torch.is_grad_enabled() or not gate.requires_grad:
            return
        fused = gate._base
        if fused is None or fused.numel() != 2 * gate.numel():
            raise RuntimeError(
                f"The experts of '{name}' apply their activation to a tensor that "
                "is not half of a fused gate/up projection; GIM cannot split this "
                "MLP. Pass strict=False to skip the experts' gated split."
            )
        scale: Tensor | float = gate_scale
        if gate_scale != up_scale:
            scale = torch.full_like(fused, up_scale)
            offset = gate.storage_offset() - fused.storage_offset()
            scale.as_strided(gate.shape, gate.stride(), offset).fill_(gate_scale)
        fused.register_hook(lambda grad: grad * scale)

    return hook
