"""Modules compiled in place run eagerly while the rules are on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eager_calls(model: nn.Module, modules: list[nn.Module] | None = None) -> Iterator[None]:
    r"""
    Runs the modules of ``model`` that were compiled in place
    (``module.compile()``) eagerly for the duration of the block, so that the
    GIM rule hooks see every forward pass, and restores their compiled call when
    the block ends.

    Args:
        model (nn.Module): The model that gets the rules.
        modules (list[nn.Module], optional): ``list(model.modules())``, when the
                    caller has it already.
                    Default: None
    """
    compiled = [
        (module, module.__dict__["_compiled_call_impl"])
        for module in (model.modules() if modules is None else modules)
        if module.__dict__.get("_compiled_call_impl") is not None
    ]
    for module, _ in compiled:
        module._compiled_call_impl = None
    try:
        yield
    finally:
        for module, call in compiled:
            module._compiled_call_impl = call
