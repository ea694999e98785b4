"""Checks of the model before the GIM rules go on it: which module, compiled
wrappers and active dropout."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard

from torch import nn

if TYPE_CHECKING:
    from torch._dynamo.eval_frame import OptimizedModule

_DROPOUT_CLASSES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
# Float attributes through which transformers' attention modules read their
# attention dropout probability (the probability is then passed to the
# attention function, so no nn.Dropout module exists).
_DROPOUT_ATTRIBUTES = ("attention_dropout", "attn_dropout", "dropout", "dropout_prob")


def is_compiled_wrapper(module: object) -> TypeGuard[OptimizedModule]:
    r"""
    Returns:
        *bool*: True when ``module`` is the wrapper returned by
        ``torch.compile(module)`` (``torch._dynamo.eval_frame.OptimizedModule``).
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(eval_frame, "OptimizedModule", None)
    return optimized is not None and isinstance(module, optimized)


def _compiled_model_error(where: str) -> TypeError:
    return TypeError(
        f"{where} is a torch.compile'd module (OptimizedModule). A compiled graph "
        "need not run the hooks that apply the GIM rules, so GIM could silently "
        "return plain gradients. Pass the original module, compiled._orig_mod, "
        "and call it (not the compiled wrapper) in the forward function. "
        "GIMAttribution and LayerGIM do this themselves when forward_func is the "
        "compiled module, and a module compiled in place with module.compile() "
        "runs eagerly under the GIM rules."
    )


def resolve_forward_and_model(
    forward_func: Callable[..., Any], model: nn.Module | None, needed: bool = True
) -> tuple[Callable[..., Any], nn.Module | None]:
    r"""
    The forward function to run and the model that gets the rules, with
    ``torch.compile`` wrappers removed where that is safe.

    A ``torch.compile(model)`` wrapper passed as ``forward_func`` is replaced by
    the original module, so that GIM runs one eager forward and backward through
    the module that carries the rule hooks (the results equal those of the
    uncompiled model). A compiled wrapper passed only as ``model`` is refused:
    ``forward_func`` would then run the compiled graph, which need not see the
    hooks.

    Args:
        forward_func (Callable): The forward function given by the caller.
        model (nn.Module or None): The model given by the caller.
        needed (bool, optional): Whether a rule is on, so that a model must be
                    found; with False a plain function and no model give None.
                    Default: True

    Returns:
        *tuple[Callable, nn.Module or None]*: the forward function and the model.
    """
    if is_compiled_wrapper(forward_func):
        wrapper = forward_func
        original = forward_func._orig_mod
        forward_func = original
        if model is wrapper:
            model = original
    if is_compiled_wrapper(model):
        if model._orig_mod is not forward_func:
            raise _compiled_model_error("model")
        model = model._orig_mod
    if model is None and not needed and _module_of(forward_func) is None:
        return forward_func, None
    return forward_func, resolve_model(forward_func, model)


def resolve_model(forward_func: Callable[..., Any], model: nn.Module | None) -> nn.Module:
    r"""
    Returns:
        *nn.Module*: ``model``, or ``forward_func`` itself when it is a module.
    """
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be the nn.Module that gets the GIM rules, got "
                f"{type(model).__name__}{_positional_hint(model)}."
            )
        return model
    found = _module_of(forward_func)
    if found is not None:
        return found
    raise TypeError(
        "forward_func is not an nn.Module, so GIM does not know which model to "
        "modify. Pass it as model=, e.g. GIMAttribution(forward_func, model=model)."
    )


def _module_of(forward_func: Callable[..., Any]) -> nn.Module | None:
    """``forward_func`` itself when it is a module, or the module it is bound to."""
    if isinstance(forward_func, nn.Module):
        return forward_func
    bound_to = getattr(forward_func, "__self__", None)
    return bound_to if isinstance(bound_to, nn.Module) else None


def _positional_hint(value: object) -> str:
    """Where a Captum argument passed by position landed on ``model``."""
    if isinstance(value, bool):
        return (
            " (Captum's InputXGradient takes multiply_by_inputs second; here the second "
            "argument is model: pass multiply_by_inputs= as a keyword)"
        )
    if isinstance(value, list):
        return (
            " (Captum's LayerGradientXActivation takes device_ids third; here the third "
            "argument is model: pass device_ids= as a keyword)"
        )
    return ""


def check_model(model: nn.Module, modules: list[tuple[str, nn.Module]] | None = None) -> None:
    r"""
    Checks a model before the GIM rules are installed on it.

    Raises a clear error for ``torch.compile`` wrappers in ``model`` (their
    compiled graph need not run the rule hooks) and warns when ``model`` is in
    training mode with active dropout (attributions are then random).

    Args:
        model (nn.Module): The model that gets the rules.
        modules (list[tuple[str, nn.Module]], optional):
                    ``list(model.named_modules())``, when the caller has it.
                    Default: None
    """
    if is_compiled_wrapper(model):
        raise _compiled_model_error("model")
    modules = list(model.named_modules()) if modules is None else modules
    for name, module in modules:
        if module is not model and is_compiled_wrapper(module):
            raise _compiled_model_error(f"Submodule '{name}' of model")
    dropout = active_dropout(model, modules)
    if dropout:
        listing = ", ".join(dropout[:3]) + (", ..." if len(dropout) > 3 else "")
        warnings.warn(
            f"{type(model).__name__} is in training mode with active dropout "
            f"({listing}): every call drops other random units, so attributions "
            "are random and not reproducible (they remain the GIM gradients of "
            "the dropped-out network). Call model.eval() before attributing.",
            UserWarning,
            stacklevel=4,
        )


def active_dropout(
    model: nn.Module, modules: list[tuple[str, nn.Module]] | None = None
) -> list[str]:
    r"""
    Returns:
        *list[str]*: one description per module of ``model`` in training mode
        whose dropout probability is > 0 (``nn.Dropout`` modules, and attention
        modules with a float ``attention_dropout``-like attribute).
    """
    found = []
    for name, module in model.named_modules() if modules is None else modules:
        if not module.training:
            continue
        label = name or "<model>"
        if isinstance(module, _DROPOUT_CLASSES):
            if module.p > 0:
                found.append(f"'{label}' p={module.p}")
            continue
        for attribute in _DROPOUT_ATTRIBUTES:
            value = module.__dict__.get(attribute)
            if isinstance(value, float) and value > 0:
                found.append(f"'{label}' {attribute}={value}")
                break
    return found
