"""Recognising normalization layers by what they compute, not by their class name.

A candidate (a leaf module whose class name mentions "norm", or any subclass of
PyTorch's norm layers) is run once per module type and configuration on a copy
with random weights, and its output is matched against the forms rule 2 can
freeze: centred or not, mean or sum of squares (an L2 norm), scale ``w``,
``1 + w`` or none, with or without bias, and the epsilon. The result is cached,
so later calls cost a dictionary lookup. The class name only selects candidates;
it never decides the form.
"""

from __future__ import annotations

import copy
import itertools
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

_PYTORCH_NORMS = (nn.LayerNorm, nn.RMSNorm)
_EPS_NAMES = ("variance_epsilon", "eps", "epsilon", "layer_norm_eps", "norm_eps")
#: Also ``torch.finfo(torch.float32).eps``: ``nn.RMSNorm(eps=None)``'s epsilon
#: in the float32 probe (it uses the input dtype's, see :func:`call_eps`).
_FALLBACK_EPS = (1e-5, 1e-6, 1e-12, 1e-8, 0.0, torch.finfo(torch.float32).eps)
_PROBE_WIDTH = 8


@dataclass(frozen=True)
class NormForm:
    r"""What a normalization layer computes: ``scale * (x - c * mean) / rho + b``."""

    #: Subtracts the mean (LayerNorm) or not (RMSNorm, L2 norm).
    centered: bool
    #: ``rho`` from the sum of squares (L2 norm) instead of their mean.
    sum_square: bool
    #: ``"w"``, ``"1+w"`` or ``"none"``.
    scale: str
    #: Adds the module's ``bias``.
    bias: bool
    #: The epsilon added under the square root.
    eps: float
    #: How many trailing dimensions are normalized.
    n_dims: int = 1
    #: The attributes holding the weight and the bias.
    weight_name: str = "weight"
    bias_name: str = "bias"

    @property
    def weight_offset(self) -> float:
        return 1.0 if self.scale == "1+w" else 0.0


_cache: dict[tuple[Any, ...], NormForm | None] = {}
_cache_lock = threading.Lock()


def is_norm_candidate(module: nn.Module) -> bool:
    r"""True for modules that may be normalization layers and must be recognised."""
    if isinstance(module, _PYTORCH_NORMS):
        return True
    if isinstance(module, nn.Identity) or "norm" not in type(module).__name__.lower():
        return False
    return not any(True for _ in module.children())


def norm_form(module: nn.Module) -> NormForm | None:
    r"""
    Returns:
        *NormForm or None*: the form ``module`` computes, probed once per type
        and configuration; ``None`` when no form that rule 2 can freeze
        reproduces its output.
    """
    key = _cache_key(module)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    form = _probe(module)
    with _cache_lock:
        _cache[key] = form
    return form


def _cache_key(module: nn.Module) -> tuple[Any, ...]:
    settings = tuple(
        sorted(
            (name, value)
            for name, value in vars(module).items()
            if not name.startswith("_") and isinstance(value, (bool, int, float, str, tuple))
        )
    )
    shapes = tuple((name, tuple(p.shape)) for name, p in module.named_parameters(recurse=False))
    buffers = tuple(name for name, _ in module.named_buffers(recurse=False))
    return (type(module), settings, shapes, buffers)


def _width(module: nn.Module) -> tuple[int, ...] | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() >= 1:
        return tuple(weight.shape)
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and shape:
        return tuple(int(size) for size in shape)
    if not any(True for _ in module.parameters(recurse=False)):
        return (_PROBE_WIDTH,)
    return None


def _probe_copy(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """A float32 CPU copy with random parameters and none of the original's hooks."""
    probe = copy.copy(module)
    probe._parameters = {
        name: None
        if p is None
        else nn.Parameter(
            0.2 * torch.randn(p.shape, generator=generator) + 0.7, requires_grad=False
        )
        for name, p in module._parameters.items()
    }
    probe._buffers = {
        name: None if b is None else torch.zeros(b.shape, dtype=torch.float32)
        for name, b in module._buffers.items()
    }
    return probe


def _probe(module: nn.Module) -> NormForm | None:
    if len(module._buffers) or any(name not in ("weight", "bias") for name in module._parameters):
        return None
    width = _width(module)
    if width is None:
        return None
    generator = torch.Generator().manual_seed(0)
    probe = _probe_copy(module, generator)
    inputs = [
        torch.randn((2, 3, *width), generator=generator) + 0.5,
        1e-3 * (torch.randn((2, 3, *width), generator=generator) + 0.5),
    ]
    try:
        with torch.no_grad():
            outputs = [type(module).forward(probe, x) for x in inputs]
    except Exception:
        return None
    if not all(isinstance(y, Tensor) and y.shape == x.shape for x, y in zip(inputs, outputs)):
        return None
    weight = probe._parameters.get("weight")
    bias = probe._parameters.get("bias")
    n_dims = len(width) if isinstance(module, _PYTORCH_NORMS) or weight is None else weight.dim()
    for form in _forms(module, weight is not None, bias is not None, n_dims):
        if all(_close(_apply(form, x, weight, bias), y) for x, y in zip(inputs, outputs)):
            return form
    return None


def _forms(module: nn.Module, has_weight: bool, has_bias: bool, n_dims: int) -> list[NormForm]:
    named = [getattr(module, name, None) for name in _EPS_NAMES]
    epsilons = [float(eps) for eps in named if isinstance(eps, (int, float))]
    epsilons += [eps for eps in _FALLBACK_EPS if eps not in epsilons]
    scales = ("w", "1+w", "none") if has_weight else ("none",)
    biases = (True, False) if has_bias else (False,)
    return [
        NormForm(centered, sum_square, scale, bias, eps, n_dims)
        for centered, sum_square, scale, bias, eps in itertools.product(
            (False, True), (False, True), scales, biases, epsilons
        )
    ]


def _apply(form: NormForm, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    dims = tuple(range(-form.n_dims, 0))
    if form.centered:
        x = x - x.mean(dim=dims, keepdim=True)
    square = x.square()
    moment = square.sum(dim=dims, keepdim=True) if form.sum_square else square.mean(dims, True)
    y = x * torch.rsqrt(moment + form.eps)
    if form.scale != "none" and weight is not None:
        y = y * (weight + form.weight_offset)
    if form.bias and bias is not None:
        y = y + bias
    return y


def call_eps(module: nn.Module, form: NormForm, dtype: torch.dtype) -> float:
    r"""
    Returns:
        *float*: the epsilon ``module`` adds for an input of ``dtype``: the
        form's, or, for ``nn.RMSNorm(eps=None)``, ``torch.finfo(dtype).eps``.
    """
    if isinstance(module, nn.RMSNorm) and module.eps is None:
        return torch.finfo(dtype).eps
    return form.eps


def _close(got: Tensor, want: Tensor) -> bool:
    return bool((got - want).abs().max() <= 1e-4 * (1.0 + want.abs().max()))
