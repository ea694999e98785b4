"""Rules are never applied twice: one owner per module while the rules are on."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

from torch import nn

# Every module of every model under the rules, with the model it belongs to.
_active_modules: weakref.WeakKeyDictionary[nn.Module, weakref.ref[nn.Module]] = (
    weakref.WeakKeyDictionary()
)
_active_lock = threading.Lock()


@contextlib.contextmanager
def exclusive(model: nn.Module, modules: list[nn.Module] | None = None) -> Iterator[None]:
    r"""
    Marks every module of ``model`` as under the GIM rules for the block, and
    raises ``RuntimeError`` when one already is (nested rules, a submodule of a
    model under the rules, or the same model in two threads).

    Args:
        model (nn.Module): The model that gets the rules.
        modules (list[nn.Module], optional): ``list(model.modules())``, when the
                    caller has it already.
                    Default: None
    """
    modules = list(model.modules()) if modules is None else modules
    with _active_lock:
        for module in modules:
            entry = _active_modules.get(module)
            owner = None if entry is None else entry()
            if owner is None:
                continue
            relation = (
                "this model"
                if owner is model
                else f"a {type(owner).__name__} that shares module "
                f"{type(module).__name__} with this model"
            )
            raise RuntimeError(
                f"GIM rules are already active on {relation} "
                f"({type(model).__name__}): nested gim_rules, GIMAttribution or "
                "LayerGIM inside gim_rules, or the same model in two threads. "
                "Rules are never applied twice: run the inner call outside the "
                "outer gim_rules block, or use one model object per thread."
            )
        owner_ref = weakref.ref(model)
        for module in modules:
            _active_modules[module] = owner_ref
    try:
        yield
    finally:
        with _active_lock:
            for module in modules:
                if _active_modules.get(module) is owner_ref:
                    del _active_modules[module]
