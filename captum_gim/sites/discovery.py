"""Where the GIM rules go in a model: norms, attention modules, gated MLPs.

The rule mathematics lives in :mod:`captum_gim.functional`; this module only
recognises the places. Support for a model family is a few entries in the
tables below (its RMSNorm class and its gated MLP class); attention needs no
entry, as every model whose attention calls transformers' AttentionInterface is
routed generically. Anything that looks like one of these places but is not
recognised is reported by :func:`find_rule_sites`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from functools import cache
from typing import Any

from torch import nn

from captum_gim.sites.attention import SUPPORTED_IMPLEMENTATIONS, attention_implementation


class GatedLayout(Enum):
    r"""How a gated MLP ``act(gate(x)) * up(x)`` exposes its two branches."""

    #: Two projections, ``gate_proj`` and ``up_proj`` (Llama, Mistral, Qwen, Gemma).
    SEPARATE = "separate"
    #: One projection ``gate_up_proj`` whose first half is the gate (Phi-3).
    FUSED = "fused"
    #: Mixture-of-experts weights applied by transformers' experts functions,
    #: whose ``act_fn`` receives the gate half of the fused gate/up output
    #: (Mixtral, Qwen2-MoE).
    EXPERTS = "experts"


#: RMSNorm classes by name, with the offset added to their weight
#: (1.0 for Gemma's ``(1 + w)`` norms).
RMS_NORM_CLASSES: dict[str, float] = {
    "LlamaRMSNorm": 0.0,
    "MistralRMSNorm": 0.0,
    "MixtralRMSNorm": 0.0,
    "Qwen2RMSNorm": 0.0,
    "Qwen2MoeRMSNorm": 0.0,
    "Qwen3RMSNorm": 0.0,
    "Qwen3MoeRMSNorm": 0.0,
    "Phi3RMSNorm": 0.0,
    "GemmaRMSNorm": 1.0,
    "Gemma2RMSNorm": 1.0,
    "Gemma3RMSNorm": 1.0,
}

#: Gated MLP classes by name.
GATED_MLP_CLASSES: dict[str, GatedLayout] = {
    "LlamaMLP": GatedLayout.SEPARATE,
    "MistralMLP": GatedLayout.SEPARATE,
    "Qwen2MLP": GatedLayout.SEPARATE,
    "Qwen2MoeMLP": GatedLayout.SEPARATE,
    "Qwen3MLP": GatedLayout.SEPARATE,
    "Qwen3MoeMLP": GatedLayout.SEPARATE,
    "GemmaMLP": GatedLayout.SEPARATE,
    "Gemma2MLP": GatedLayout.SEPARATE,
    "Gemma3MLP": GatedLayout.SEPARATE,
    "Phi3MLP": GatedLayout.FUSED,
    "MixtralExperts": GatedLayout.EXPERTS,
    "Qwen2MoeExperts": GatedLayout.EXPERTS,
    "Qwen3MoeExperts": GatedLayout.EXPERTS,
}


@dataclass(frozen=True)
class NormSite:
    r"""A normalization layer and how its statistic is computed."""

    name: str
    module: nn.Module
    centered: bool
    weight_offset: float
    eps: float | None
    n_dims: int


@dataclass(frozen=True)
class GatedMLPSite:
    r"""A gated MLP and the layout of its gate and up branches."""

    name: str
    module: nn.Module
    layout: GatedLayout


@dataclass
class RuleSites:
    r"""Every place of a model where a GIM rule applies."""

    norms: list[NormSite] = field(default_factory=list)
    attentions: list[tuple[str, nn.Module]] = field(default_factory=list)
    gated_mlps: list[GatedMLPSite] = field(default_factory=list)
    #: PyTorch's own nn.MultiheadAttention modules (sites/torch_attention.py).
    torch_attentions: list[tuple[str, nn.MultiheadAttention]] = field(default_factory=list)
    #: nn.TransformerEncoder modules, whose nested-tensor fast path is switched off.
    torch_encoders: list[nn.TransformerEncoder] = field(default_factory=list)


class UnsupportedModuleError(TypeError):
    r"""A part of the model that a GIM rule should reach but cannot."""


def find_rule_sites(model: nn.Module, strict: bool = True) -> RuleSites:
    r"""
    Finds the norms, attention modules and gated MLPs of a model.

    Args:
        model (nn.Module): Any PyTorch module, usually a transformers model.
        strict (bool, optional): Raise :class:`UnsupportedModuleError` for a part
                    the rules do not cover (an unknown normalization class,
                    attention that bypasses transformers' AttentionInterface or
                    runs an unsupported implementation, an unrecognised gated
                    MLP). With ``False`` such parts keep their exact gradients
                    and a warning names them.
                    Default: True

    Returns:
        *RuleSites*: the places where the rules apply.
    """
    sites = RuleSites()
    problems: list[str] = []
    modules = list(model.named_modules())
    routed = {name for name, module in modules if _routes_attention(module)}
    covered = routed | {n for n, m in modules if isinstance(m, nn.MultiheadAttention)}
    for name, module in modules:
        label = name or "<model>"
        norm = _norm_site(label, module)
        if norm is not None:
            sites.norms.append(norm)
        elif _looks_like_norm(module):
            problems.append(
                f"'{label}' ({type(module).__name__}) looks like a normalization "
                "layer of unknown form; add its class to "
                "captum_gim.architectures.RMS_NORM_CLASSES if it is an RMSNorm"
            )
        if isinstance(module, nn.TransformerEncoder):
            sites.torch_encoders.append(module)
        if isinstance(module, nn.MultiheadAttention):
            sites.torch_attentions.append((label, module))
        elif name in routed:
            implementation = attention_implementation(module)
            if implementation in SUPPORTED_IMPLEMENTATIONS:
                sites.attentions.append((label, module))
            else:
                problems.append(
                    f"'{label}' ({type(module).__name__}) runs attention "
                    f"implementation {implementation!r}; load the model with "
                    "attn_implementation='sdpa' or 'eager', or call "
                    "model.set_attn_implementation('sdpa')"
                )
        elif _looks_like_attention(module) and not _contains_any(name, covered):
            problems.append(
                f"'{label}' ({type(module).__name__}) computes attention without "
                "transformers' AttentionInterface, so the softmax and q/k/v rules "
                "cannot reach it"
            )
        layout = GATED_MLP_CLASSES.get(type(module).__name__)
        if layout is not None:
            sites.gated_mlps.append(GatedMLPSite(label, module, layout))
        elif _looks_like_gated_mlp(module):
            problems.append(
                f"'{label}' ({type(module).__name__}) looks like a gated MLP of "
                "unknown form; add its class to "
                "captum_gim.architectures.GATED_MLP_CLASSES"
            )
    if problems:
        _report(problems, strict)
    return sites


def _report(problems: list[str], strict: bool) -> None:
    listing = "\n  - ".join(problems)
    if strict:
        raise UnsupportedModuleError(
            "GIM cannot apply every rule to this model:\n  - "
            f"{listing}\nPass strict=False to skip these parts with a warning "
            "(they then keep their exact gradients)."
        )
    warnings.warn(
        f"GIM rules skip these parts (exact gradients there):\n  - {listing}",
        stacklevel=3,
    )


def _norm_site(name: str, module: nn.Module) -> NormSite | None:
    if isinstance(module, nn.LayerNorm):
        return NormSite(name, module, True, 0.0, module.eps, len(module.normalized_shape))
    if isinstance(module, nn.RMSNorm):
        return NormSite(name, module, False, 0.0, module.eps, len(module.normalized_shape))
    offset = RMS_NORM_CLASSES.get(type(module).__name__)
    if offset is None:
        return None
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return NormSite(name, module, False, offset, eps, 1)


def _looks_like_norm(module: nn.Module) -> bool:
    class_name = type(module).__name__.lower()
    return "norm" in class_name and not isinstance(module, nn.Identity)


def _looks_like_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()


def _contains_any(name: str, module_names: set[str]) -> bool:
    """True when a module named in ``module_names`` lies inside module ``name``."""
    prefix = f"{name}." if name else ""
    return any(inner != name and inner.startswith(prefix) for inner in module_names)


def _looks_like_gated_mlp(module: nn.Module) -> bool:
    names = {name.lower() for name, _ in module.named_children()}
    names |= {name.lower() for name, _ in module.named_parameters(recurse=False)}
    has_gate = any("gate" in name and "router" not in name for name in names)
    has_up = any("up" in name.split("_") or name == "w3" for name in names)
    return has_gate and has_up


def _routes_attention(module: nn.Module) -> bool:
    return hasattr(module, "config") and _forward_uses_interface(type(module).forward)


@cache
def _forward_uses_interface(forward: Callable[..., Any]) -> bool:
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source
