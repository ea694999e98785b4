"""TransformerLens models: the parts of a ``HookedTransformer`` the generic
recognition cannot see, and the ``TransformerBridge``, which is refused.

TransformerLens 3's ``HookedTransformer`` computes everything with its own
components, each holding ``HookPoint`` children (identity modules that run the
user's hooks):

- its norms (``LayerNorm``, ``LayerNormPre``, ``RMSNorm``, ``RMSNormPre``) keep
  their scale and bias as parameters ``w`` and ``b`` and have ``hook_scale`` /
  ``hook_normalized`` children, so they are not leaf modules. They are probed
  like any norm (:func:`~captum_gim.sites.norms.recognition.norm_form`) on a view that
  names their parameters ``weight`` / ``bias`` and replaces the hook points by
  identities, so the probe runs none of the user's hooks;
- its gated MLPs multiply parameters directly (``x @ W_gate``, ``x @ W_in``)
  and pass the two branches through hook points (``GatedMLP``: ``hook_pre`` is
  the gate, ``hook_pre_linear`` the up branch; the experts of its ``MoE``:
  ``hook_gate`` and ``hook_pre``; gpt-oss's experts gate with a clamped SwiGLU
  whose constants their module defines) before the product reaches ``hook_post``.
  The split scales the two hook points' outputs, and on every call the input of
  ``hook_post`` is checked to be ``act(gate) * up`` (plus ``GatedMLP``'s
  ``b_in``), so a module that computes something else is refused;
- its attention modules compute ``softmax(q k^T) v`` with torch ops and are
  read by :mod:`~captum_gim.sites.attention.traced`, needing nothing here.

TransformerLens's ``TransformerBridge`` (3.x and 4.x) replaces the modules of the Hugging
Face model it boots, in place, by bridge components that compute attention and
normalization themselves and pass attributes of the original modules through.
GIM cannot place every rule on it exactly, so a model holding bridge
components (the bridge, or the Hugging Face model after a bridge has booted
it) is refused; with ``strict=False`` no rule is applied to it at all, so
nothing is ever scaled twice.

TransformerLens stays optional: nothing is imported from it unless the user
has imported it already.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from captum_gim.sites.gated_mlp.recognition import ClampedSwiGLU, GatedStructure
from captum_gim.sites.norms.recognition import NormForm, norm_form

#: (gate, up) hook points of TransformerLens's gated MLPs, in the order tried.
GATED_HOOKS = (("hook_pre", "hook_pre_linear"), ("hook_gate", "hook_pre"))
#: The hook point that receives the gated product.
PRODUCT_HOOK = "hook_post"
#: Where TransformerLens (3.x and 4.x) keeps its bridge components.
BRIDGE_PACKAGE = "transformer_lens.model_bridge"


def hook_point_class() -> type[nn.Module] | None:
    r"""
    Returns:
        *type or None*: TransformerLens's ``HookPoint`` class, or None when
        TransformerLens has not been imported (then no model holds its parts).

    Raises:
        ImportError: TransformerLens is imported but ``HookPoint`` is not in
                    ``transformer_lens.hook_points``, where captum_gim reads it.
    """
    if "transformer_lens" not in sys.modules:
        return None
    try:
        from transformer_lens.hook_points import HookPoint
    except ImportError as error:
        raise ImportError(
            "TransformerLens is imported, but transformer_lens.hook_points.HookPoint, "
            "which captum_gim uses to recognise its norms and gated MLPs, is not there; "
            "this TransformerLens version is not supported: please report it."
        ) from error
    return HookPoint


@dataclass(frozen=True)
class LensGatedStructure(GatedStructure):
    r"""A TransformerLens gated MLP: ``gate`` and ``up`` name its branches' hook
    points, ``down`` the hook point reading ``act(gate) * up (+ added)``."""

    #: A parameter added to the product before ``down`` reads it (``b_in``).
    added: str | None = None

    def products(self, module: nn.Module) -> dict[str, Callable[[Tensor, Tensor], Tensor]]:
        products = super().products(module)
        if self.added is None:
            return products
        bias: Tensor = getattr(module, self.added)
        return {name: _plus(product, bias) for name, product in products.items()}


def _plus(
    product: Callable[[Tensor, Tensor], Tensor], bias: Tensor
) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda gate, up: product(gate, up) + bias


def lens_norm_form(name: str, module: nn.Module) -> NormForm | str | None:
    r"""
    The form of a TransformerLens norm (a module named like a norm whose
    children are all hook points and whose parameters are ``w`` and ``b``).

    Args:
        name (str): The module's name in the model, for messages.
        module (nn.Module): Any module.

    Returns:
        *NormForm, str or None*: its form (with ``weight_name="w"``,
        ``bias_name="b"``); why it is refused when no form rule 2 can freeze
        reproduces it; None when it is not such a norm.
    """
    hook_point = hook_point_class()
    if hook_point is None or not _is_lens_norm(module, hook_point):
        return None
    form = norm_form(_NormView(module))
    if form is None:
        return (
            f"'{name}' ({type(module).__name__}) is a TransformerLens normalization layer of "
            "unknown form: no form rule 2 can freeze (centred or not, scale w or none, bias, "
            "eps) reproduces its output"
        )
    return dataclasses.replace(form, weight_name="w", bias_name="b")


def _is_lens_norm(module: nn.Module, hook_point: type[nn.Module]) -> bool:
    children = list(module.children())
    return (
        "norm" in type(module).__name__.lower()
        and bool(children)
        and all(isinstance(child, hook_point) for child in children)
        and set(module._parameters) <= {"w", "b"}
    )


class _NormView(nn.Module):
    """A TransformerLens norm as :func:`~captum_gim.sites.norms.recognition.norm_form` probes
    norms: parameters ``weight`` / ``bias`` (shapes only), the norm's settings,
    and a forward that runs the norm's own forward with identities for its hook
    points, on whatever parameters the view holds (the probe's random ones), in
    float32 whatever the model's dtype."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.__dict__["_norm"] = norm
        self.lens_class = f"{type(norm).__module__}.{type(norm).__qualname__}"
        for key, value in vars(norm).items():  # its hook name would defeat the probe cache
            if key != "name" and isinstance(value, (bool, int, float, str)) and key[0] != "_":
                setattr(self, key, value)
        for own, theirs in (("weight", "w"), ("bias", "b")):
            parameter = norm._parameters.get(theirs)
            if parameter is not None:
                self.register_parameter(
                    own, nn.Parameter(parameter.new_empty(parameter.shape, device="cpu"), False)
                )

    def forward(self, x: Tensor) -> Tensor:
        norm: nn.Module = self.__dict__["_norm"]
        inner = copy.copy(norm)
        inner._parameters = {
            theirs: self._parameters.get(own)
            for own, theirs in (("weight", "w"), ("bias", "b"))
            if theirs in norm._parameters
        }
        inner._modules = {child: nn.Identity() for child in norm._modules}
        config: Any = norm.__dict__.get("cfg")
        if getattr(config, "dtype", torch.float32) != torch.float32:  # the probe runs in float32
            float_config = copy.copy(config)
            float_config.dtype = torch.float32
            inner.__dict__["cfg"] = float_config
        result: Tensor = type(norm).forward(inner, x)
        return result


def lens_gated_structure(name: str, module: nn.Module) -> LensGatedStructure | str | None:
    r"""
    The parts of a TransformerLens gated MLP: two hook points receiving the
    gate and up branches and ``hook_post`` receiving their product. Which is
    which is checked on every call (the product must be ``act(gate) * up``).

    Args:
        name (str): The module's name in the model, for messages.
        module (nn.Module): Any module.

    Returns:
        *LensGatedStructure, str or None*: the parts; why a module that looks
        like a TransformerLens gated MLP is refused; None for other modules.
    """
    hook_point = hook_point_class()
    if hook_point is None or not isinstance(getattr(module, PRODUCT_HOOK, None), hook_point):
        return None
    if (
        isinstance(getattr(module, "hook_mid", None), hook_point)
        and getattr(module, "ln", None) is not None
    ):
        return None  # an activation followed by a norm (SoLU-LN): no gated product
    for gate, up in GATED_HOOKS:
        if all(isinstance(getattr(module, part, None), hook_point) for part in (gate, up)):
            activation = "act_fn" if callable(getattr(module, "act_fn", None)) else None
            clamped = None if activation is not None else _module_clamped_swiglu(module)
            added = "b_in" if isinstance(module._parameters.get("b_in"), Tensor) else None
            return LensGatedStructure(gate, up, PRODUCT_HOOK, activation, clamped, added=added)
    if hasattr(module, "W_gate") and not _is_router(module):
        return (
            f"'{name}' ({type(module).__name__}) is a TransformerLens gated MLP whose gate "
            "and up branches pass through no hook points captum_gim knows "
            f"({', '.join(' / '.join(pair) for pair in GATED_HOOKS)}), so GIM cannot split it"
        )
    return None


def _module_clamped_swiglu(module: nn.Module) -> ClampedSwiGLU | None:
    """The clamped SwiGLU of an expert whose alpha and limit are constants of its
    class's module (TransformerLens's GptOssExpert: ``GPT_OSS_ALPHA``,
    ``GPT_OSS_LIMIT``); the per-call product check confirms it."""
    constants = vars(sys.modules[type(module).__module__])
    alpha = [v for k, v in constants.items() if k.endswith("_ALPHA") and _is_number(v)]
    limit = [v for k, v in constants.items() if k.endswith("_LIMIT") and _is_number(v)]
    if len(alpha) != 1 or len(limit) != 1:
        return None
    return ClampedSwiGLU(float(alpha[0]), float(limit[0]))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_router(module: nn.Module) -> bool:
    """TransformerLens's MoE layers call their router ``W_gate`` too."""
    return isinstance(getattr(module, "experts", None), nn.ModuleList)


def bridge_problem(modules: list[tuple[str, nn.Module]]) -> str | None:
    r"""
    Args:
        modules (list[tuple[str, nn.Module]]): ``list(model.named_modules())``.

    Returns:
        *str or None*: why a model holding TransformerLens bridge components
        is refused, naming the first, or None when it holds none.
    """
    bridged = [(name or "<model>", m) for name, m in modules if _is_bridge_component(m)]
    if not bridged:
        return None
    name, module = bridged[0]
    return (
        f"'{name}' ({type(module).__name__}) and {len(bridged) - 1} more modules are "
        "TransformerLens TransformerBridge components: the bridge computes attention and "
        "normalization itself and booting it replaced the Hugging Face model's modules in "
        "place, so GIM cannot apply every rule exactly (and, with strict=False, applies "
        "none to it). Attribute a freshly loaded Hugging Face model, or TransformerLens "
        "3's HookedTransformer"
    )


def _is_bridge_component(module: nn.Module) -> bool:
    return type(module).__module__.startswith(BRIDGE_PACKAGE) or isinstance(
        module._modules.get("_original_component"), nn.Module
    )
