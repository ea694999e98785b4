r"""
Per-call traces: a torch function mode opened around each call of one module, in
the thread that installed it, for the rule sites recognised by their data flow
(traced attention, traced gated MLPs).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

Trace = TypeVar("Trace", bound=TorchFunctionMode)


def trace_each_call(
    stack: contextlib.ExitStack,
    module: nn.Module,
    new_trace: Callable[[], Trace],
    settle: Callable[[Trace, Any], None],
) -> list[Trace]:
    r"""
    Opens ``new_trace()`` when ``module`` is called in this thread with gradients
    enabled, and closes it when the call returns or raises; ``settle(trace,
    output)`` then judges what the trace saw (``output`` is None when the forward
    raised). The hooks are removed, and a trace an exception left open is closed,
    when ``stack`` closes.

    Args:
        stack (contextlib.ExitStack): Owns the hooks' removal.
        module (nn.Module): The module whose calls are traced.
        new_trace (Callable): Makes the torch function mode for one call.
        settle (Callable): Called with the closed trace and the call's output.

    Returns:
        *list*: the traces open now, innermost last (for hooks on nested modules).
    """
    thread = threading.get_ident()
    open_traces: list[Trace] = []

    def enter(_: nn.Module, __: tuple[Any, ...]) -> None:
        if threading.get_ident() != thread or not torch.is_grad_enabled():
            return
        trace = new_trace()
        trace.__enter__()
        open_traces.append(trace)

    def leave(_: nn.Module, __: tuple[Any, ...], output: Any) -> None:
        if threading.get_ident() != thread or not open_traces:
            return
        trace = open_traces.pop()
        trace.__exit__(None, None, None)
        settle(trace, output)

    stack.callback(_close, open_traces)
    stack.callback(module.register_forward_pre_hook(enter).remove)
    stack.callback(module.register_forward_hook(leave, always_call=True).remove)
    return open_traces


def _close(open_traces: list[Any]) -> None:
    while open_traces:
        open_traces.pop().__exit__(None, None, None)
