"""Registering norms and gated MLPs that probing and structure cannot settle.

GIM recognises norms by what they compute and gated MLPs by their parts. For a
module class it cannot resolve (its epsilon is stored under an unusual name,
its projections have names of their own, ...), :func:`register_norm` and
:func:`register_gated_mlp` describe the class once. A registration only says
where the rule goes: every call still checks the rule's recomputation against
the module's real output, so a wrong registration raises
:class:`~captum_gim.UnsupportedModuleError` instead of giving a wrong gradient.

Registrations are per class (exactly that class, not its subclasses), shared by
all threads, and removable: each returns a handle whose ``remove()`` undoes it,
and which works as a context manager.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import TracebackType

from torch import Tensor, nn

from captum_gim.sites.gated_mlp.recognition import GatedStructure
from captum_gim.sites.norms.recognition import NormForm

_SCALES = ("w", "1+w", "none")


@dataclass(frozen=True)
class NormRegistration:
    r"""What a registered normalization class computes:
    ``scale * (x - c * mean) / sqrt(moment + eps) + bias``."""

    centered: bool
    scale: str
    eps: float | str
    weight: str
    bias: str | None
    sum_square: bool


Registration = NormRegistration | GatedStructure

_registry: dict[type, Registration] = {}
_lock = threading.Lock()
#: Counts the changes to the registry, so that cached rule sites see them.
_version = [0]


def registry_version() -> int:
    r"""
    Returns:
        *int*: a number that changes whenever a registration is added or removed.
    """
    return _version[0]


class RegistrationHandle:
    r"""Undoes one registration: ``handle.remove()``, or leave its ``with`` block."""

    def __init__(self, module_class: type, entry: Registration) -> None:
        self.module_class = module_class
        self._entry = entry

    def remove(self) -> None:
        r"""Removes the registration, unless the class was registered again since."""
        with _lock:
            if _registry.get(self.module_class) is self._entry:
                del _registry[self.module_class]
                _version[0] += 1

    def __enter__(self) -> RegistrationHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()


def register_norm(
    module_class: type[nn.Module],
    *,
    centered: bool,
    scale: str = "w",
    eps: float | str = "eps",
    weight: str = "weight",
    bias: str | None = None,
    sum_square: bool = False,
) -> RegistrationHandle:
    r"""
    Describes a normalization class for the frozen-norm rule (rule 2), for a
    class whose form the probe cannot find. The module computes
    ``s * (x - c) / sqrt(m + eps) + b`` over the trailing dimensions of its
    weight, with ``c`` the mean (``centered``) or 0 and ``m`` the mean of the
    squares (or their sum with ``sum_square``). On every call the rule's
    recomputation is compared with the module's output; a mismatch raises
    :class:`~captum_gim.UnsupportedModuleError`.

    Args:
        module_class (type): The ``nn.Module`` subclass (exactly this class).
        centered (bool): True when the mean is subtracted (LayerNorm), False
                    when it is not (RMSNorm, L2 norm).
        scale (str, optional): ``"w"`` (multiplies by the weight), ``"1+w"``
                    (Gemma style) or ``"none"``.
                    Default: ``"w"``
        eps (float or str, optional): The epsilon, or the name of the module
                    attribute that holds it.
                    Default: ``"eps"``
        weight (str, optional): The name of the weight parameter.
                    Default: ``"weight"``
        bias (str or None, optional): The name of the bias parameter, or None
                    when the module adds no bias.
                    Default: None
        sum_square (bool, optional): True when the statistic is the sum of the
                    squares (an L2 norm) instead of their mean.
                    Default: False

    Returns:
        *RegistrationHandle*: ``remove()`` undoes the registration; also a
        context manager.

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> from captum_gim import register_norm
        >>> class ScaleNorm(nn.Module):
        ...     def __init__(self, dim):
        ...         super().__init__()
        ...         self.gain = nn.Parameter(torch.ones(dim))
        ...         self.tiny = 1e-6
        ...     def forward(self, x):
        ...         return self.gain * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.tiny)
        >>> handle = register_norm(ScaleNorm, centered=False, weight="gain", eps="tiny")
        >>> handle.remove()
    """
    _check_class(module_class, "register_norm")
    _check_flag(centered, "centered", "register_norm")
    _check_flag(sum_square, "sum_square", "register_norm")
    if scale not in _SCALES:
        raise ValueError(f"register_norm: scale must be one of {_SCALES}, got {scale!r}.")
    _check_name(weight, "weight", "register_norm")
    if bias is not None:
        _check_name(bias, "bias", "register_norm")
    if isinstance(eps, str):
        _check_name(eps, "eps", "register_norm")
    elif isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(
            f"register_norm: eps must be a number >= 0 or the name of the attribute "
            f"that holds it, got {eps!r}."
        )
    else:
        eps = float(eps)
    entry = NormRegistration(centered, scale, eps, weight, bias, sum_square)
    return _register(module_class, entry)


def register_gated_mlp(
    module_class: type[nn.Module],
    *,
    gate: str,
    up: str | None,
    down: str,
    activation: str,
) -> RegistrationHandle:
    r"""
    Names the parts of a gated MLP ``down(act(gate(x)) * up(x))`` for the
    gated-MLP split (rule 3), for a class whose parts are not recognised. On
    every call GIM checks that the product read after the gate and up
    projections equals ``activation(gate) * up``; a mismatch raises
    :class:`~captum_gim.UnsupportedModuleError`.

    Args:
        module_class (type): The ``nn.Module`` subclass (exactly this class).
        gate (str): The attribute of the gate projection (an ``nn.Module``);
                    with ``up=None``, a fused projection whose output's first
                    half is the gate and second half the up branch.
        up (str or None): The attribute of the up projection, or None for a
                    fused gate/up projection.
        down (str): The attribute of the down projection (an ``nn.Module``).
        activation (str): The attribute of the activation applied to the gate.

    Returns:
        *RegistrationHandle*: ``remove()`` undoes the registration; also a
        context manager.

    Examples::

        >>> from torch import nn
        >>> from captum_gim import register_gated_mlp
        >>> class SwiGLU(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b, self.out, self.silu = (
        ...             nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8), nn.SiLU())
        ...     def forward(self, x):
        ...         return self.out(self.silu(self.a(x)) * self.b(x))
        >>> with register_gated_mlp(SwiGLU, gate="a", up="b", down="out", activation="silu"):
        ...     pass
    """
    _check_class(module_class, "register_gated_mlp")
    for value, what in ((gate, "gate"), (down, "down"), (activation, "activation")):
        _check_name(value, what, "register_gated_mlp")
    if up is not None:
        _check_name(up, "up", "register_gated_mlp")
    return _register(module_class, GatedStructure(gate, up, down, activation))


def unregister(module_class: type[nn.Module]) -> None:
    r"""
    Removes the registration of ``module_class``, if any.

    Args:
        module_class (type): A class given to :func:`register_norm` or
                    :func:`register_gated_mlp`.
    """
    with _lock:
        _registry.pop(module_class, None)
        _version[0] += 1


def registered_norm(name: str, module: nn.Module) -> NormForm | str | None:
    r"""
    Returns:
        *NormForm, str or None*: the registered form of ``module`` resolved on
        the instance, why the registration does not fit it (a problem to
        report), or None when its class is not registered as a norm.
    """
    with _lock:
        entry = _registry.get(type(module))
    if not isinstance(entry, NormRegistration):
        return None
    label = f"'{name}' ({type(module).__name__})"
    fix = f"fix the register_norm({type(module).__name__}, ...) call"
    eps = entry.eps
    if isinstance(eps, str):
        value = getattr(module, eps, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{label} is registered with eps={eps!r}, but it has no such number; {fix}"
        eps = float(value)
    parameter = getattr(module, entry.weight, None)
    if entry.scale != "none" and not isinstance(parameter, Tensor):
        return (
            f"{label} is registered with weight={entry.weight!r}, but it has no such tensor; {fix}"
        )
    if entry.bias is not None and not isinstance(getattr(module, entry.bias, None), Tensor):
        return f"{label} is registered with bias={entry.bias!r}, but it has no such tensor; {fix}"
    n_dims = _normalized_dims(module, parameter)
    return NormForm(
        entry.centered,
        entry.sum_square,
        entry.scale,
        entry.bias is not None,
        eps,
        n_dims,
        weight_name=entry.weight,
        bias_name=entry.bias or "bias",
    )


def registered_gated_mlp(name: str, module: nn.Module) -> GatedStructure | str | None:
    r"""
    Returns:
        *GatedStructure, str or None*: the registered parts of ``module``, why
        the registration does not fit it (a problem to report), or None when
        its class is not registered as a gated MLP.
    """
    with _lock:
        entry = _registry.get(type(module))
    if not isinstance(entry, GatedStructure):
        return None
    label = f"'{name}' ({type(module).__name__})"
    fix = f"fix the register_gated_mlp({type(module).__name__}, ...) call"
    parts = [("gate", entry.gate), ("down", entry.down)]
    if entry.up is not None:
        parts.append(("up", entry.up))
    for what, attribute in parts:
        if not isinstance(getattr(module, attribute, None), nn.Module):
            return (
                f"{label} is registered with {what}={attribute!r}, which is not a submodule; {fix}"
            )
    if not callable(getattr(module, str(entry.activation), None)):
        return (
            f"{label} is registered with activation={entry.activation!r}, which is not "
            f"callable; {fix}"
        )
    return entry


def _register(module_class: type, entry: Registration) -> RegistrationHandle:
    with _lock:
        _registry[module_class] = entry
        _version[0] += 1
    return RegistrationHandle(module_class, entry)


def _normalized_dims(module: nn.Module, weight: object) -> int:
    if isinstance(weight, Tensor) and weight.dim() >= 1:
        return weight.dim()
    shape = getattr(module, "normalized_shape", None)
    return len(shape) if isinstance(shape, (tuple, list)) and shape else 1


def _check_class(module_class: object, function: str) -> None:
    if not isinstance(module_class, type) or not issubclass(module_class, nn.Module):
        raise TypeError(
            f"{function}: module_class must be an nn.Module subclass (the class, not an "
            f"instance), got {module_class!r}; pass type(module)."
        )


def _check_flag(value: object, what: str, function: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{function}: {what} must be True or False, got {value!r}.")


def _check_name(value: object, what: str, function: str) -> None:
    if not isinstance(value, str) or not value.isidentifier():
        raise TypeError(
            f"{function}: {what} must be the name of a module attribute (a string such "
            f"as 'gate_proj'), got {value!r}."
        )
