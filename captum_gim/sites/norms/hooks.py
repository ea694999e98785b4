"""The frozen-norm rule on one norm site: a forward hook that returns the
module's output recomputed with its statistic detached, checked against the
module's own output on every call."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from captum_gim.rules import frozen_group_norm, frozen_layer_norm, frozen_rms_norm
from captum_gim.sites.discovery import NormSite, UnsupportedModuleError
from captum_gim.sites.norms.recognition import call_eps


def freeze_norm_hook(site: NormSite, strict: bool = True) -> Callable[..., Tensor | None]:
    r"""
    The forward hook of the frozen-norm rule on one norm site.

    Args:
        site (NormSite): The norm and its probed form.
        strict (bool, optional): When the recomputation differs from the
            module's output, raise :class:`UnsupportedModuleError` (True) or
            warn and keep the module's exact gradient for that call (False).
            Default: True

    Returns:
        *Callable*: a hook for ``site.module.register_forward_hook``.
    """
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
