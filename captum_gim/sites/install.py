"""Installing the rules on the sites found in a model: one hook per rule and site."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from captum_gim.config import GIMConfig
from captum_gim.rules import frozen_group_norm, frozen_layer_norm, frozen_rms_norm, scale_gradient
from captum_gim.sites.attention import route_attention
from captum_gim.sites.discovery import (
    GatedMLPSite,
    NormSite,
    RuleSites,
    UnsupportedModuleError,
)
from captum_gim.sites.gated_mlp import verify_product
from captum_gim.sites.torch_attention import disable_nested_fast_path, install_torch_attention
from captum_gim.sites.traced_attention import install_traced_attention


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
        for name, torch_attention in sites.torch_attentions:
            install_torch_attention(stack, name, torch_attention, config)
        for name, traced in sites.traced_attentions:
            install_traced_attention(stack, name, traced, config, sites.strict)
        disable_nested_fast_path(stack, sites.torch_encoders)


def _hook(stack: contextlib.ExitStack, handle: torch.utils.hooks.RemovableHandle) -> None:
    stack.callback(handle.remove)


def _freeze_norm_hook(site: NormSite) -> Callable[..., Tensor | None]:
    module = site.module
    label = f"'{site.name}' ({type(module).__name__})"

    def verify(deviation: float) -> None:
        raise UnsupportedModuleError(
            f"{label}: the frozen-norm rule's recomputation of the forward differs "
            f"from the module's output by {deviation:.3g}, so its form was misread; "
            "GIM refuses rather than return a wrong gradient. Pass freeze_norm=False "
            "or strict=False."
        )

    def hook(_: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        x = args[0] if args else None
        if not torch.is_grad_enabled() or not isinstance(x, Tensor) or not x.requires_grad:
            return None
        x = x.to(output.device)  # accelerate moves inputs only inside forward
        if site.kind == "batch":
            _check_batch_norm(module, label)
            return None
        weight = _weight_in_use(module, output.device)
        bias = _weight_in_use(module, output.device, "bias")
        if site.kind == "group":
            groups = int(getattr(module, "num_groups", x.shape[1]))
            eps = cast(float, module.eps)
            return frozen_group_norm(x, output, weight, groups, eps, bias=bias, verify=verify)
        form = site.form
        assert form is not None
        weight = weight if form.scale != "none" else None
        bias = bias if form.bias else None
        if form.centered:
            return frozen_layer_norm(
                x,
                output,
                weight,
                form.eps,
                form.n_dims,
                bias=bias,
                weight_offset=form.weight_offset,
                verify=verify,
            )
        return frozen_rms_norm(
            x,
            output,
            weight,
            form.eps,
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


def _install_gated_mlp_rule(
    stack: contextlib.ExitStack, site: GatedMLPSite, config: GIMConfig
) -> None:
    module = site.module
    structure = site.structure
    if structure is not None:
        seen: dict[str, Tensor] = {}
        branches: list[tuple[str, float, float | None]] = [
            (structure.gate, config.gate_scale, None)
        ]
        if structure.up is None:
            branches = [(structure.gate, config.gate_scale, config.up_scale)]
        else:
            branches.append((structure.up, config.up_scale, None))
        for branch, scale, second in branches:
            projection = getattr(module, branch)
            hook = _scale_output_hook(scale, second, seen, branch)
            _hook(stack, projection.register_forward_hook(hook))
        down: nn.Module = getattr(module, structure.down)
        _hook(stack, down.register_forward_pre_hook(_verify_product_hook(site, seen)))
    else:
        pre_hook = _scale_fused_base_hook(site.name, config.gate_scale, config.up_scale)
        _hook(stack, module.get_submodule("act_fn").register_forward_pre_hook(pre_hook))


def _halves_scale(output: Tensor, gate_scale: float, up_scale: float) -> Tensor | float:
    if gate_scale == up_scale:
        return gate_scale
    half = output.shape[-1] // 2
    scale = torch.full((2 * half,), up_scale, dtype=output.dtype, device=output.device)
    scale[:half] = gate_scale
    return scale


def _scale_output_hook(
    scale: float,
    second_half_scale: float | None = None,
    seen: dict[str, Tensor] | None = None,
    branch: str = "",
) -> Callable[..., Tensor]:
    """Scales a projection's output gradient; per half when two scales are given.
    The output is kept in ``seen`` for the product check of the down projection."""

    def hook(_: nn.Module, __: tuple[Any, ...], output: Tensor) -> Tensor:
        if seen is not None:
            seen[branch] = output
        if second_half_scale is None:
            return scale_gradient(output, scale)
        return scale_gradient(output, _halves_scale(output, scale, second_half_scale))

    return hook


def _verify_product_hook(site: GatedMLPSite, seen: dict[str, Tensor]) -> Callable[..., None]:
    """Checks, before any gradient, that the down projection reads act(gate) * up."""
    structure = site.structure
    assert structure is not None
    activation = getattr(site.module, structure.activation)

    def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
        gate = seen.pop(structure.gate, None)
        up = gate if structure.up is None else seen.pop(structure.up, None)
        if not torch.is_grad_enabled() or gate is None or up is None or not args:
            return
        if structure.up is None:
            gate, up = gate.chunk(2, dim=-1)
        problem = verify_product(site.name, activation, gate, up, args[0])
        if problem is not None:
            raise UnsupportedModuleError(
                f"'{site.name}' ({type(site.module).__name__}): {problem}. Pass "
                "gate_scale=up_scale=1.0 or strict=False."
            )

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
