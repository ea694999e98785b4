"""``gim_rules``: the three GIM rules installed on one model for one block."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from captum_gim._model_checks import check_model, eager_calls
from captum_gim.architectures import (
    GatedLayout,
    GatedMLPSite,
    NormSite,
    RuleSites,
    UnsupportedModuleError,
    find_rule_sites,
)
from captum_gim.attention import route_attention
from captum_gim.config import GIMConfig
from captum_gim.functional import frozen_layer_norm, frozen_rms_norm, scale_gradient

# Every module of every model under the rules, with the model it belongs to.
_active_modules: weakref.WeakKeyDictionary[nn.Module, weakref.ref[nn.Module]] = (
    weakref.WeakKeyDictionary()
)
_active_lock = threading.Lock()


@contextlib.contextmanager
def gim_rules(
    model: nn.Module,
    *,
    temperature: float | None = 2.0,
    freeze_norm: bool = True,
    q_scale: float = 0.25,
    k_scale: float = 0.25,
    v_scale: float = 0.5,
    gate_scale: float = 0.5,
    up_scale: float = 0.5,
    config: GIMConfig | None = None,
    strict: bool = True,
) -> Iterator[GIMConfig]:
    r"""
    Applies the GIM backward rules to every forward pass through ``model``
    inside the block, so that any gradient-based Captum method (Saliency,
    IntegratedGradients, GradientShap, LayerIntegratedGradients, ...) computes
    GIM gradients. The rules are module-level hooks on ``model`` only: other
    models, also of the same class and in other threads, keep their exact
    gradients, and ``model`` is left exactly as it was when the block ends,
    also when it ends with an exception.

    The rules act on the autograd graph built by the forward pass: a backward
    pass after the block through a graph built inside it still uses them,
    except for layers recomputed during the backward pass by gradient
    checkpointing, so with checkpointing run the backward inside the block.

    Rules are never applied twice: entering ``gim_rules`` on a model that is
    already under the rules, or on a model that shares a module with one that
    is (e.g. ``model.model`` inside ``gim_rules(model)``), raises
    ``RuntimeError``. Threads may use ``gim_rules`` on different model objects
    at the same time, with different settings; a model object under the rules
    must not be used by another thread until the block ends (a second
    ``gim_rules`` on it raises, but a plain forward pass in another thread would
    silently get the rules).

    Modules compiled in place with ``module.compile()`` run eagerly inside the
    block (and are compiled again after it), so that the rule hooks see every
    forward pass. A ``torch.compile(model)`` wrapper is refused: pass the
    original module (``compiled._orig_mod``) and call it, not the wrapper, in
    the forward function. A model in training mode with active dropout gets a
    warning, as its attributions are then random.

    Args:
        model (nn.Module): The model to modify, usually a transformers model.
        temperature (float or None, optional): Softmax backward temperature.
                    Default: 2.0
        freeze_norm (bool, optional): Freeze normalization statistics.
                    Default: True
        q_scale (float, optional): Gradient scale of attention queries.
                    Default: 0.25
        k_scale (float, optional): Gradient scale of attention keys.
                    Default: 0.25
        v_scale (float, optional): Gradient scale of attention values.
                    Default: 0.5
        gate_scale (float, optional): Gradient scale of gated-MLP gates.
                    Default: 0.5
        up_scale (float, optional): Gradient scale of gated-MLP up branches.
                    Default: 0.5
        config (GIMConfig, optional): All seven settings as one object, instead
                    of the keywords.
        strict (bool, optional): Raise for parts of the model the rules cannot
                    reach (see :func:`captum_gim.architectures.find_rule_sites`);
                    with ``False`` they are skipped with a warning.
                    Default: True

    Yields:
        *GIMConfig*: the settings in force.

    Examples::

        >>> from captum.attr import IntegratedGradients
        >>> from captum_gim import gim_rules
        >>> ig = IntegratedGradients(forward_func)
        >>> with gim_rules(model):
        >>>     attributions = ig.attribute(embeddings, target=token_id)
    """
    settings = GIMConfig.resolve(
        config,
        temperature=temperature,
        freeze_norm=freeze_norm,
        q_scale=q_scale,
        k_scale=k_scale,
        v_scale=v_scale,
        gate_scale=gate_scale,
        up_scale=up_scale,
    )
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"gim_rules needs the nn.Module to modify, got {type(model).__name__}. "
            "Pass the model itself, e.g. gim_rules(model)."
        )
    check_model(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_exclusive(model))
        stack.enter_context(eager_calls(model))
        install_rules(stack, find_rule_sites(model, strict=strict), settings)
        yield settings


def install_rules(stack: contextlib.ExitStack, sites: RuleSites, config: GIMConfig) -> None:
    r"""
    Installs the hooks of every rule that ``config`` switches on; ``stack``
    owns their removal.

    Args:
        stack (contextlib.ExitStack): Receives one removal callback per hook.
        sites (RuleSites): Where the rules go.
        config (GIMConfig): The settings.
    """
    if config.freeze_norm:
        for norm in sites.norms:
            _hook(stack, norm.module.register_forward_hook(_freeze_norm_hook(norm)))
    if config.mlp_rule_on:
        for mlp in sites.gated_mlps:
            _install_gated_mlp_rule(stack, mlp, config)
    if config.attention_rules_on:
        for _, attention in sites.attentions:
            stack.enter_context(route_attention(attention, config))


@contextlib.contextmanager
def _exclusive(model: nn.Module) -> Iterator[None]:
    modules = list(model.modules())
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


def _hook(stack: contextlib.ExitStack, handle: torch.utils.hooks.RemovableHandle) -> None:
    stack.callback(handle.remove)


def _freeze_norm_hook(site: NormSite) -> Callable[..., Tensor | None]:
    module = site.module

    def hook(_: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        x = args[0]
        if not torch.is_grad_enabled() or not x.requires_grad:
            return None
        x = x.to(output.device)  # accelerate moves inputs only inside forward
        eps = site.eps if site.eps is not None else torch.finfo(x.dtype).eps
        weight = _weight_in_use(module, output.device)
        if site.centered:
            return frozen_layer_norm(x, output, weight, eps, site.n_dims)
        return frozen_rms_norm(x, output, weight, eps, site.weight_offset, site.n_dims)

    return hook


def _weight_in_use(module: nn.Module, device: torch.device) -> Tensor | None:
    """The norm's weight as its forward used it.

    accelerate's offloading (``cpu_offload``, disk or CPU ``device_map`` entries)
    loads weights for the forward call only and leaves them on the meta device
    afterwards, when forward hooks run; the weight then comes from the weights
    map of the module's accelerate hook.
    """
    weight = getattr(module, "weight", None)
    if weight is None or not weight.is_meta:
        return weight
    accelerate_hook = getattr(module, "_hf_hook", None)
    for hook in (*getattr(accelerate_hook, "hooks", ()), accelerate_hook):
        weights_map = getattr(hook, "weights_map", None)
        if weights_map is not None and "weight" in weights_map:
            return weights_map["weight"].to(device)
    raise UnsupportedModuleError(
        f"The weight of {type(module).__name__} is on the meta device and no "
        "accelerate weights map holds it; GIM cannot freeze its statistic. Load "
        "the model's weights, or pass freeze_norm=False."
    )


def _install_gated_mlp_rule(
    stack: contextlib.ExitStack, site: GatedMLPSite, config: GIMConfig
) -> None:
    module = site.module
    if site.layout is GatedLayout.SEPARATE:
        for branch, scale in (("gate_proj", config.gate_scale), ("up_proj", config.up_scale)):
            projection = getattr(module, branch)
            _hook(stack, projection.register_forward_hook(_scale_output_hook(scale)))
    elif site.layout is GatedLayout.FUSED:
        hook = _scale_output_hook(config.gate_scale, config.up_scale)
        _hook(stack, module.gate_up_proj.register_forward_hook(hook))
    else:
        hook = _scale_fused_base_hook(site.name, config.gate_scale, config.up_scale)
        _hook(stack, module.act_fn.register_forward_pre_hook(hook))


def _halves_scale(output: Tensor, gate_scale: float, up_scale: float) -> Tensor | float:
    if gate_scale == up_scale:
        return gate_scale
    half = output.shape[-1] // 2
    scale = torch.full((2 * half,), up_scale, dtype=output.dtype, device=output.device)
    scale[:half] = gate_scale
    return scale


def _scale_output_hook(
    scale: float, second_half_scale: float | None = None
) -> Callable[..., Tensor]:
    """Scales a projection's output gradient; per half when two scales are given."""

    def hook(_: nn.Module, __: tuple[Any, ...], output: Tensor) -> Tensor:
        if second_half_scale is None:
            return scale_gradient(output, scale)
        return scale_gradient(output, _halves_scale(output, scale, second_half_scale))

    return hook


def _scale_fused_base_hook(name: str, gate_scale: float, up_scale: float) -> Callable[..., None]:
    """Scales the gradient of the fused gate/up tensor that ``act_fn`` reads from.

    The experts functions of transformers compute one fused projection and pass
    its gate part, a view, to ``act_fn``; the rest of the fused tensor is the up
    part. A gradient hook on the fused tensor scales the gate view's elements by
    ``gate_scale`` and all others by ``up_scale``, whatever the layout.
    """

    def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
        gate = args[0]
        if not torch.is_grad_enabled() or not gate.requires_grad:
            return
        fused = gate._base
        if fused is None or fused.numel() != 2 * gate.numel():
            raise RuntimeError(
                f"The experts of '{name}' apply their activation to a tensor that "
                "is not half of a fused gate/up projection; GIM cannot split this "
                "MLP. Pass strict=False to skip the experts' gated split."
            )
        scale: Tensor | float = gate_scale
        if gate_scale != up_scale:
            scale = torch.full_like(fused, up_scale)
            offset = gate.storage_offset() - fused.storage_offset()
            scale.as_strided(gate.shape, gate.stride(), offset).fill_(gate_scale)
        fused.register_hook(lambda grad: grad * scale)

    return hook
