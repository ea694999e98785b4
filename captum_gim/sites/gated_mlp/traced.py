"""The gated-MLP split on modules recognised as gated MLPs by their data flow.

The audit (:mod:`~captum_gim.sites.audit.forward`) recognises a gated MLP from what
it computes, ``down(act(a(x)) * b(x))``, whatever its parts are called and also
when its projections are parameters used directly (``x @ W_gate``). For one
attribution, each such module gets a thread-local
:class:`~torch.overrides.TorchFunctionMode`, entered by a forward pre-hook and
left by a forward hook that always runs (as in
:mod:`~captum_gim.sites.attention.traced`). Inside, every elementwise product
of two activations is checked again, on every call, to read as
``act(a(x)) * b(x)``: two different projections of one input, one through an
activation. Its factors then get the gate and up scales, which equals scaling
the projections' outputs (the activation's derivative is applied after).
Every op runs as the model called it, so the forward is bitwise unchanged. A
call that computes no such product raises :class:`UnsupportedModuleError`
naming the module (``strict=False``: a warning, and that call keeps its exact
gradients).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from captum_gim.config import GIMConfig
from captum_gim.rules import scale_gradient
from captum_gim.sites.audit.forward import (
    _MULTIPLY,
    _NONLINEAR,
    depends_on_input,
    gated_factors,
    projection_input,
)
from captum_gim.sites.errors import UnsupportedModuleError
from captum_gim.sites.tracing import trace_each_call

_IN_PLACE = {Tensor.mul_, Tensor.__imul__}


class _GatedTrace(TorchFunctionMode):
    """Splits ``act(a(x)) * b(x)`` in one forward call of one module."""

    def __init__(self, config: GIMConfig) -> None:
        super().__init__()
        self.config = config
        self.memo: dict[int, tuple[Any, bool]] = {}
        self.projections: dict[int, tuple[int, Any]] = {}
        self.nonlinear: set[int] = set()
        self.split = 0
        #: How many calls of a nested gated-MLP site are open (split by their own rule).
        self.nested = 0
        #: Keeps the recorded nodes alive, so that their ids stay theirs.
        self.keep: list[Any] = []

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _MULTIPLY and len(args) >= 2 and func not in _IN_PLACE and not self.nested:
            first, second = args[0], args[1]
            if depends_on_input(first, self.memo) and depends_on_input(second, self.memo):
                factors = gated_factors(first, second, self.projections, self.nonlinear)
                if factors is not None:
                    scales = [1.0, 1.0]
                    scales[factors[0]] = self.config.gate_scale
                    scales[factors[1]] = self.config.up_scale
                    self.split += 1
                    args = (
                        scale_gradient(first, scales[0]),
                        scale_gradient(second, scales[1]),
                        *args[2:],
                    )
            return func(*args, **kwargs)
        output = func(*args, **kwargs)
        if func in _NONLINEAR:
            if isinstance(output, Tensor) and output.grad_fn is not None:
                self.nonlinear.add(id(output.grad_fn))
                self.keep.append(output.grad_fn)
            return output
        x, _ = projection_input(func, args, kwargs, self.memo)
        if x is not None and isinstance(output, Tensor) and output.grad_fn is not None:
            key = id(x.grad_fn) if x.grad_fn is not None else id(x)
            self.projections[id(output.grad_fn)] = (key, output.grad_fn)
            self.keep.append(x)
        return output


def install_traced_gated_mlp(
    stack: contextlib.ExitStack,
    name: str,
    module: nn.Module,
    config: GIMConfig,
    strict: bool,
    nested: Sequence[nn.Module] = (),
) -> None:
    r"""
    Installs, for the block that ``stack`` closes, the gated-MLP split on one
    module recognised as a gated MLP by its data flow.

    Args:
        stack (contextlib.ExitStack): Owns the hooks' removal and leaves a trace
                    that an exception left open.
        name (str): The module's name in the model, for messages.
        module (nn.Module): The gated MLP.
        config (GIMConfig): The settings (``gate_scale``, ``up_scale``).
        strict (bool): Raise for a call that computes no gated product; with
                    ``False`` warn (that call keeps its exact gradients).
        nested (Sequence[nn.Module], optional): Gated-MLP sites inside ``module``,
                    which their own rule splits: products inside them are left alone.
                    Default: ()
    """
    thread = threading.get_ident()

    def settle(trace: _GatedTrace, output: Any) -> None:
        used = isinstance(output, Tensor) and output.requires_grad
        if trace.split == 0 and used:
            _refuse(name, module, strict)

    open_traces = trace_each_call(stack, module, lambda: _GatedTrace(config), settle)

    def nested_enter(*_: Any) -> None:
        if open_traces and threading.get_ident() == thread:
            open_traces[-1].nested += 1

    def nested_leave(*_: Any) -> None:
        if open_traces and threading.get_ident() == thread and open_traces[-1].nested:
            open_traces[-1].nested -= 1

    for inner in nested:
        stack.callback(inner.register_forward_pre_hook(nested_enter).remove)
        stack.callback(inner.register_forward_hook(nested_leave, always_call=True).remove)


def _refuse(name: str, module: nn.Module, strict: bool) -> None:
    label = f"'{name}' ({type(module).__name__})"
    problem = (
        f"{label} was recognised as a gated MLP down(act(a(x)) * b(x)) by its data flow, "
        "but this call computes no such product"
    )
    if strict:
        raise UnsupportedModuleError(
            f"{problem}; GIM refuses rather than return a wrong gradient. Pass "
            "gate_scale=up_scale=1.0, or strict=False to keep this call's exact gradients."
        )
    warnings.warn(f"GIM rules skip this call (exact gradients there): {problem}.", stacklevel=2)
