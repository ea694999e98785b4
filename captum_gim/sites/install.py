"""Installing the rules on the sites found in a model: one hook per rule and site."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from captum_gim.config import GIMConfig
from captum_gim.rules import frozen_group_norm, frozen_layer_norm, frozen_rms_norm
from captum_gim.sites.attention import route_attention
from captum_gim.sites.discovery import (
    NormSite,
    RuleSites,
    UnsupportedModuleError,
)
from captum_gim.sites.gated_mlp_hooks import install_gated_mlp_rule
from captum_gim.sites.norms import call_eps
from captum_gim.sites.torch_attention import disable_nested_fast_path, install_torch_attention
from captum_gim.sites.traced_attention import install_traced_attention
from captum_gim.sites.traced_gated_mlp import install_traced_gated_mlp


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
            hook = _freeze_norm_hook(norm, sites.strict)
            _hook(stack, norm.module.register_forward_hook(hook))
    if config.mlp_rule_on:
        for mlp in sites.gated_mlps:
            install_gated_mlp_rule(stack, mlp, config, sites.strict)
        gated = [(m.name, m.module) for m in sites.gated_mlps] + sites.traced_gated_mlps
        for name, module in sites.traced_gated_mlps:
            inner = [
                m for n, m in gated if n.startswith(f"{name}.") or (name == "<model>" and n != name)
            ]
            install_traced_gated_mlp(stack, name, module, config, sites.strict, inner)
    if config.attention_rules_on:
        for _, attention in sites.attentions:
            stack.enter_context(route_attention(attention, config, sites.strict))
        for name, torch_attention in sites.torch_attentions:
            install_torch_attention(stack, name, torch_attention, config, sites.strict)
        for name, traced in sites.traced_attentions:
            install_traced_attention(stack, name, traced, config, sites.strict)
        disable_nested_fast_path(stack, sites.torch_encoders)


def _hook(stack: contextlib.ExitStack, handle: torch.utils.hooks.RemovableHandle) -> None:
    stack.callback(handle.remove)


def _freeze_norm_hook(site: NormSite, strict: bool = True) -> Callable[..., Tensor | None]:
    module = site.module
    label = f"'{site.name}' ({type(module).__name__})"

    def verify(deviation: float) -> bool:
        problem = (
            f"{label}: the frozen-norm rule's recomputation of the forward differs "
            f"from the module's output by {deviation:.3g}, so its form was misread"
        )
        if not strict:
            warnings.warn(
                f"GIM rules skip this call of a norm (exact gradient there): {problem}.",
                stacklevel=2,
            )
            return True
        raise UnsupportedModuleError(
            f"{problem}; GIM refuses rather than return a wrong gradient. Pass "
            "freeze_norm=False or strict=False."
        )

    def hook(_: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        x = args[0] if args else None
        if not torch.is_grad_enabled() or not isinstance(x, Tensor) or not x.requires_grad:
            return None
        x = x.to(output.device)  # accelerate moves inputs only inside forward
        if site.kind == "batch":
            _check_batch_norm(module, label)
            return None
        form = site.form
        weight_name = "weight" if form is None else form.weight_name
        bias_name = "bias" if form is None else form.bias_name
        weight = _weight_in_use(module, output.device, weight_name)
        bias = _weight_in_use(module, output.device, bias_name)
        if site.kind == "group":
            groups = int(getattr(module, "num_groups", x.shape[1]))
            eps = cast(float, module.eps)
            return frozen_group_norm(x, output, weight, groups, eps, bias=bias, verify=verify)
        assert form is not None
        eps = call_eps(module, form, x.dtype)
        weight = weight if form.scale != "none" else None
        bias = bias if form.bias else None
        if form.centered:
            return frozen_layer_norm(
                x,
                output,
                weight,
                eps,
                form.n_dims,
                bias=bias,
                weight_offset=form.weight_offset,
                verify=verify,
            )
        return frozen_rms_norm(
            x,
            output,
            weight,
            eps,
            form.weight_offset,
            form.n_dims,
            bias=bias,
            sum_square=form.sum_square,
            verify=verify,
        )

    return hook


def _check_batch_norm(module: nn.Module, label: str) -> None:
    """BatchNorm with running statistics is affine: nothing to freeze."""
    if module.training or getattr(module, "running_mean", None) is None:
        raise UnsupportedModuleError(
            f"{label} normalizes with batch statistics, which couple the samples of "
            "a batch; call model.eval() to use its running statistics, or pass "
            "freeze_norm=False."
        )


def _weight_in_use(module: nn.Module, device: torch.device, name: str = "weight") -> Tensor | None:
    """The norm's weight as its forward used it.

    accelerate's offloading (``cpu_offload``, disk or CPU ``device_map`` entries)
    loads weights for the forward call only and leaves them on the meta device
    afterwards, when forward hooks run; the weight then comes from the weights
    map of the module's accelerate hook.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor) or not weight.is_meta:
        return weight if isinstance(weight, Tensor) else None
    accelerate_hook = getattr(module, "_hf_hook", None)
    for hook in (*getattr(accelerate_hook, "hooks", ()), accelerate_hook):
        weights_map = getattr(hook, "weights_map", None)
        if weights_map is not None and name in weights_map:
            return weights_map[name].to(device)
    raise UnsupportedModuleError(
        f"The weight of {type(module).__name__} is on the meta device and no "
        "accelerate weights map holds it; GIM cannot freeze its statistic. Load "
        "the model's weights, or pass freeze_norm=False."
    )
