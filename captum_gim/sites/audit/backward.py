"""Noticing a backward pass through a model whose forward pass ran outside the rules.

The rules act on the autograd graph the forward pass builds. A ``gim_rules``
block opened only around the backward pass of a graph built before it (by hand,
or with nnsight's ``with logit.backward():``) would give the plain gradient
without a word. For each block, a few parameters of the model (those of its
first and last norm, or of its first and last module holding parameters) get a
gradient hook, and their modules a forward pre-hook: a gradient reaching such a
parameter while no forward pass through its module ran in the block raises
``RuntimeError`` (``strict=False``: warns once) naming the fix. A backward that
reaches no parameter (``torch.autograd.grad`` to the inputs only, or frozen
parameters) is not seen.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

from torch import Tensor, nn

from captum_gim.sites.discovery import RuleSites

_MESSAGE = (
    "A backward pass inside gim_rules reached {label}, whose forward pass ran before the "
    "block: the rules act on the graph the forward pass builds, so this gradient is the "
    "plain one. Open gim_rules (or GIMAttribution) around the forward pass as well, e.g. "
    "`with gim_rules(model): loss = f(model(x)); loss.backward()`; with nnsight, open "
    "it before the trace."
)


def watch_backward(
    stack: contextlib.ExitStack, model: nn.Module, sites: RuleSites, strict: bool
) -> set[int]:
    r"""
    Installs, for the block that ``stack`` closes, the check that every backward
    pass through ``model``'s parameters follows a forward pass inside the block.

    Args:
        stack (contextlib.ExitStack): Owns the hooks' removal.
        model (nn.Module): The model under the rules.
        sites (RuleSites): Its rule sites (their norms are watched first).
        strict (bool): Raise (True) or warn once (False).

    Returns:
        *set[int]*: the ids of the forward pre-hooks it registered.
    """
    watched = _watched_modules(model, sites)
    if not watched:
        return set()
    state = {"forward": False, "warned": False}

    def forward_seen(*_: Any) -> None:
        state["forward"] = True

    def gradient_hook(label: str) -> Any:
        def hook(grad: Tensor) -> None:
            if state["forward"] or state["warned"]:
                return None
            message = _MESSAGE.format(label=label)
            if strict:
                raise RuntimeError(f"{message} Pass strict=False to warn instead.")
            state["warned"] = True
            warnings.warn(message, stacklevel=2)
            return None

        return hook

    hooks = set()
    for name, module in watched:
        handle = module.register_forward_pre_hook(forward_seen)
        hooks.add(handle.id)
        stack.callback(handle.remove)
        for parameter in module.parameters(recurse=False):
            if parameter.requires_grad:
                label = f"'{name}' ({type(module).__name__})"
                stack.callback(_restore_hooks, parameter, parameter._backward_hooks)
                stack.callback(parameter.register_hook(gradient_hook(label)).remove)
    return hooks


def _restore_hooks(parameter: Tensor, before: Any) -> None:
    """Leaves a parameter that had no gradient hooks with none (not an empty dict)."""
    if before is None and not parameter._backward_hooks:
        parameter._backward_hooks = None


def _watched_modules(model: nn.Module, sites: RuleSites) -> list[tuple[str, nn.Module]]:
    """The first and last norm sites with trainable parameters, else the first
    and last modules holding trainable parameters themselves."""
    norms = [(n.name, n.module) for n in sites.norms if _trainable(n.module)]
    if norms:
        return _ends(norms)
    owners = [(name or "<model>", m) for name, m in model.named_modules() if _trainable(m)]
    return _ends(owners)


def _ends(found: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    if len(found) <= 2:
        return found
    return [found[0], found[-1]]


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))
