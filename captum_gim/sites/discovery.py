"""Where the GIM rules go in a model: norms, attention modules, gated MLPs.

The rule mathematics lives in :mod:`captum_gim.rules`; this module only
recognises the places, by what they compute and how they are built rather than
by class name: norms are probed (:mod:`~captum_gim.sites.norms.recognition`), gated MLPs
are recognised by their parts (:mod:`~captum_gim.sites.gated_mlp.recognition`), every
attention module that calls transformers' AttentionInterface is routed
generically, and the innermost other modules named attention are traced op by
op during the call (:mod:`~captum_gim.sites.attention.traced`). Anything
that looks like one of these places but is not recognised is reported by :func:`find_rule_sites`.
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

from captum_gim.config import GIMConfig
from captum_gim.sites.adapters.lens import bridge_problem, lens_gated_structure, lens_norm_form
from captum_gim.sites.attention.routed import SUPPORTED_IMPLEMENTATIONS, attention_implementation
from captum_gim.sites.errors import UnsupportedModuleError
from captum_gim.sites.gated_mlp.recognition import (
    GatedStructure,
    gated_structure,
    has_own_gate_function,
    looks_like_gated_mlp,
    parameter_projections_reason,
)
from captum_gim.sites.norms.recognition import NormForm, is_norm_candidate, norm_form
from captum_gim.sites.registry import registered_gated_mlp, registered_norm


class GatedLayout(Enum):
    r"""How a gated MLP ``act(gate(x)) * up(x)`` exposes its two branches."""

    #: Two projections, ``gate_proj``/``up_proj``, ``w1``/``w3`` or T5's
    #: ``wi_0``/``wi_1`` (named in the site's ``structure``).
    SEPARATE = "separate"
    #: One projection ``gate_up_proj`` whose first half is the gate (Phi-3).
    FUSED = "fused"
    #: Mixture-of-experts weights applied by transformers' experts functions,
    #: whose ``act_fn`` receives the gate half of the fused gate/up output
    #: (Mixtral, Qwen2-MoE).
    EXPERTS = "experts"
    #: Mixture-of-experts weights whose class has its own gating function
    #: ``_apply_gate(gate_up)`` (gpt-oss, MiniMax-M3): the gate and up parts of
    #: its input get the scales, and its output is checked to be their product.
    GATE_FUNCTION = "gate_function"


@dataclass(frozen=True)
class NormSite:
    r"""A normalization layer and how its statistic is computed."""

    name: str
    module: nn.Module
    #: What the layer computes (None for group and batch norms).
    form: NormForm | None = None
    #: ``"norm"`` (over trailing dims), ``"group"`` (GroupNorm, InstanceNorm)
    #: or ``"batch"`` (BatchNorm: affine in eval mode, refused with batch statistics).
    kind: str = "norm"


@dataclass(frozen=True)
class GatedMLPSite:
    r"""A gated MLP and the layout of its gate and up branches."""

    name: str
    module: nn.Module
    layout: GatedLayout
    #: The named gate/up/down parts (None for experts).
    structure: GatedStructure | None = None


@dataclass(frozen=True)
class Problem:
    r"""A part of a model that one rule should reach but cannot."""

    #: The rule concerned: ``"norm"`` (rule 2), ``"attention"`` (rules 1 and 3
    #: in attention and other token mixers), ``"mlp"`` (the gated-MLP split) or
    #: ``"any"`` (no rule reaches the model). A part is refused only while its
    #: rule is switched on.
    rule: str
    message: str


def rule_is_on(rule: str, config: GIMConfig | None) -> bool:
    r"""
    Returns:
        *bool*: True when ``config`` switches on the rule named ``rule``
        (``"norm"``, ``"attention"`` or ``"mlp"``; every rule when ``config``
        is None).
    """
    if config is None:
        return True
    if rule == "norm":
        return config.freeze_norm
    if rule == "mlp":
        return config.mlp_rule_on
    if rule == "attention":
        return config.attention_rules_on
    return config.any_rule_on


def report_problems(
    problems: list[Problem], strict: bool, config: GIMConfig | None = None, stacklevel: int = 3
) -> None:
    r"""
    Raises :class:`UnsupportedModuleError` listing the problems whose rule
    ``config`` switches on; with ``strict=False`` warns instead.

    Args:
        problems (list[Problem]): What the rules cannot reach.
        strict (bool): Raise (True) or warn (False).
        config (GIMConfig, optional): The settings; None: every rule is on.
                    Default: None
        stacklevel (int, optional): The warning's stack level.
                    Default: 3
    """
    messages = list(dict.fromkeys(p.message for p in problems if rule_is_on(p.rule, config)))
    if messages:
        _report(messages, strict, stacklevel + 1)


@dataclass
class RuleSites:
    r"""Every place of a model where a GIM rule applies."""

    norms: list[NormSite] = field(default_factory=list)
    attentions: list[tuple[str, nn.Module]] = field(default_factory=list)
    gated_mlps: list[GatedMLPSite] = field(default_factory=list)
    #: PyTorch's own nn.MultiheadAttention modules (sites/attention/multihead.py).
    torch_attentions: list[tuple[str, nn.MultiheadAttention]] = field(default_factory=list)
    #: nn.TransformerEncoder modules, whose nested-tensor fast path is switched off.
    torch_encoders: list[nn.TransformerEncoder] = field(default_factory=list)
    #: Attention modules that compute attention with torch ops, outside
    #: transformers' AttentionInterface (sites/attention/traced.py).
    traced_attentions: list[tuple[str, nn.Module]] = field(default_factory=list)
    #: Whether a traced attention that is not recognised raises (or warns).
    strict: bool = True
    #: The parts the rules cannot reach, each with the rule it concerns.
    problems: list[Problem] = field(default_factory=list)
    #: Modules recognised as gated MLPs by the audit's data flow
    #: (sites/gated_mlp/traced.py).
    traced_gated_mlps: list[tuple[str, nn.Module]] = field(default_factory=list)


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
    sites = discover_sites(model, strict)
    report_problems(sites.problems, strict)
    return sites


def discover_sites(model: nn.Module, strict: bool = True) -> RuleSites:
    r"""
    :func:`find_rule_sites` without raising or warning: what the rules cannot
    reach is listed in the result's ``problems``, each with its rule (see
    :func:`report_problems`).

    Args:
        model (nn.Module): Any PyTorch module.
        strict (bool, optional): Stored in the result, for the call-time checks.
                    Default: True

    Returns:
        *RuleSites*: the places where the rules apply, and the problems.
    """
    sites = RuleSites(strict=strict)

    def add(rule: str, message: str) -> None:
        sites.problems.append(Problem(rule, message))

    modules = list(model.named_modules())
    bridged = bridge_problem(modules)
    if bridged is not None:  # TransformerLens 4: no rule at all (sites/adapters/lens.py)
        add("any", bridged)  # refused whenever any rule is on
        return sites
    routed = {name for name, module in modules if _routes_attention(module)}
    covered = routed | {n for n, m in modules if isinstance(m, nn.MultiheadAttention)}
    attention_like = {n for n, m in modules if _looks_like_attention(m)}
    for name, module in modules:
        label = name or "<model>"
        norm = _norm_site(label, module)
        if isinstance(norm, NormSite):
            sites.norms.append(norm)
        elif norm is not None:
            add("norm", norm)
        elif is_norm_candidate(module):
            add(
                "norm",
                f"'{label}' ({type(module).__name__}) looks like a normalization "
                "layer of unknown form: no form rule 2 can freeze (centred or not, mean or sum "
                "of squares, scale w, 1 + w or none, bias, eps) reproduces its output; "
                "if it is one, describe it with captum_gim.register_norm",
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
                add(
                    "attention",
                    f"'{label}' ({type(module).__name__}) runs attention "
                    f"implementation {implementation!r}; load the model with "
                    "attn_implementation='sdpa' or 'eager', or call "
                    "model.set_attn_implementation('sdpa')",
                )
        elif name in attention_like and not _contains_any(name, covered | attention_like):
            sites.traced_attentions.append((label, module))
        if _is_convolutional_mixer(module) and name not in attention_like:
            add(
                "attention",
                f"'{label}' ({type(module).__name__}) is a state-space or convolutional token "
                "mixer (a depthwise Conv1d whose outputs are multiplied with each other or "
                "with a gate): its multiplicative interactions are outside GIM's three rules",
            )
        mlp = _gated_mlp_site(label, module)
        if isinstance(mlp, GatedMLPSite):
            sites.gated_mlps.append(mlp)
        elif mlp is not None:
            add("mlp", mlp)
        elif looks_like_gated_mlp(module):
            add(
                "mlp",
                f"'{label}' ({type(module).__name__}) looks like a gated MLP, but "
                "its gate, up and down parts are not recognised; name them with "
                "captum_gim.register_gated_mlp",
            )
    return sites


def _report(problems: list[str], strict: bool, stacklevel: int = 3) -> None:
    listing = "\n  - ".join(problems)
    if strict:
        raise UnsupportedModuleError(
            "GIM cannot apply every rule to this model:\n  - "
            f"{listing}\nPass strict=False to skip these parts with a warning "
            "(they then keep their exact gradients)."
        )
    warnings.warn(
        f"GIM rules skip these parts (exact gradients there):\n  - {listing}",
        stacklevel=stacklevel,
    )


def _norm_site(name: str, module: nn.Module) -> NormSite | str | None:
    """The norm site of ``module``, a problem with its registration, or None."""
    registered = registered_norm(name, module)
    if isinstance(registered, NormForm):
        return NormSite(name, module, registered)
    if registered is not None:
        return registered
    lens = lens_norm_form(name, module)
    if lens is not None:
        return lens if isinstance(lens, str) else NormSite(name, module, lens)
    if isinstance(module, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        return NormSite(name, module, kind="group")
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return NormSite(name, module, kind="batch")
    if not is_norm_candidate(module):
        return None
    form = norm_form(module)
    return None if form is None else NormSite(name, module, form)


def _gated_mlp_site(name: str, module: nn.Module) -> GatedMLPSite | str | None:
    """The gated-MLP site of ``module``, a problem to report, or None."""
    structure = registered_gated_mlp(name, module)
    if isinstance(structure, str):
        return structure
    fused_experts = getattr(module, "gate_up_proj", None)
    if structure is None and isinstance(fused_experts, nn.Parameter) and fused_experts.dim() == 3:
        if has_own_gate_function(module):
            return GatedMLPSite(name, module, GatedLayout.GATE_FUNCTION)
        if callable(getattr(module, "act_fn", None)):
            return GatedMLPSite(name, module, GatedLayout.EXPERTS)
        return None
    if structure is None:
        lens = lens_gated_structure(name, module)
        if isinstance(lens, str):
            return lens
        structure = lens
    structure = structure or gated_structure(module)
    if structure is None:
        reason = parameter_projections_reason(module)
        return None if reason is None else f"'{name}' ({type(module).__name__}) {reason}"
    layout = GatedLayout.SEPARATE if structure.up is not None else GatedLayout.FUSED
    return GatedMLPSite(name, module, layout, structure)


def _is_convolutional_mixer(module: nn.Module) -> bool:
    """True for a module holding a depthwise Conv1d: the token mixer of Mamba,
    Jamba, Falcon-H1, LFM2 and other state-space or short-convolution families."""
    return any(
        isinstance(child, nn.Conv1d) and child.groups > 1 and child.groups == child.in_channels
        for child in module.children()
    )


def _looks_like_attention(module: nn.Module) -> bool:
    return "attention" in type(module).__name__.lower()


def _contains_any(name: str, module_names: set[str]) -> bool:
    """True when a module named in ``module_names`` lies inside module ``name``."""
    prefix = f"{name}." if name else ""
    return any(inner != name and inner.startswith(prefix) for inner in module_names)


def _routes_attention(module: nn.Module) -> bool:
    return hasattr(module, "config") and _forward_uses_interface(type(module).forward)


@cache
def _forward_uses_interface(forward: Callable[..., Any]) -> bool:
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source
