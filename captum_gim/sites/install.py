"""Installing the rules on the sites found in a model: one hook per rule and site."""

from __future__ import annotations

import contextlib

import torch

from captum_gim.config import GIMConfig
from captum_gim.sites.attention.multihead import disable_nested_fast_path, install_torch_attention
from captum_gim.sites.attention.routed import route_attention
from captum_gim.sites.attention.traced import install_traced_attention
from captum_gim.sites.discovery import RuleSites
from captum_gim.sites.gated_mlp.hooks import install_gated_mlp_rule
from captum_gim.sites.gated_mlp.traced import install_traced_gated_mlp
from captum_gim.sites.norms.hooks import freeze_norm_hook


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
            hook = freeze_norm_hook(norm, sites.strict)
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
