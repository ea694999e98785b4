"""The rule sites of a model, found once per model object and module tree.

:func:`find_rule_sites` walks every module and probes norms and attention
modules; on a small model that costs about as much as the gradient itself.
:func:`cached_rule_sites` keeps its answer per model object, keyed by a
fingerprint of everything the answer depends on that can change between calls:
which module object (and class) sits at which name, every module's config object and
attention implementation, and the settings and parameter shapes of every norm
site. Anything else that changes a module's behaviour is caught by the
per-call checks, which the cache never skips.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Hashable
from dataclasses import dataclass

from torch import nn

from captum_gim.sites.discovery import RuleSites, discover_sites
from captum_gim.sites.registry import registry_version

Fingerprint = tuple[Hashable, ...]


@dataclass(frozen=True)
class _Entry:
    tree: Fingerprint
    #: The sites, with the parts the rules cannot reach in ``problems`` (each
    #: call reports those whose rule it switches on).
    sites: RuleSites
    #: The same sites with ``strict=False``.
    lenient: RuleSites
    norms: Fingerprint


_cache: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def cached_rule_sites(
    model: nn.Module, modules: list[tuple[str, nn.Module]], strict: bool = True
) -> RuleSites:
    r"""
    :func:`~captum_gim.sites.discovery.discover_sites` of ``model``, walked
    again only when its module tree changed since the last call. The parts the
    rules cannot reach are in the result's ``problems``: the caller reports them
    (:func:`~captum_gim.sites.discovery.report_problems`).

    Args:
        model (nn.Module): The model that gets the rules.
        modules (list[tuple[str, nn.Module]]): ``list(model.named_modules())``,
                    taken once by the caller.
        strict (bool, optional): As for :func:`find_rule_sites`.
                    Default: True

    Returns:
        *RuleSites*: the places where the rules apply (shared between calls:
        do not modify it).
    """
    tree = (registry_version(), _tree(modules))
    with _cache_lock:
        entry = _cache.get(model)
    fresh = entry is not None and entry.tree == tree
    if fresh and entry is not None:
        fresh = _norm_settings(entry.sites) == entry.norms
    if not fresh or entry is None:
        sites = discover_sites(model, strict=True)
        if keeps_model_alive(model, sites):
            return sites if strict else dataclasses.replace(sites, strict=False)
        lenient = dataclasses.replace(sites, strict=False)
        entry = _Entry(tree, sites, lenient, _norm_settings(sites))
        with _cache_lock:
            _cache[model] = entry
    return entry.sites if strict else entry.lenient


def clear_site_cache() -> None:
    r"""Forgets every cached answer (the next call of each model walks it again)."""
    with _cache_lock:
        _cache.clear()


def keeps_model_alive(model: nn.Module, sites: RuleSites) -> bool:
    """A site that is the model itself would keep the weak cache key alive."""
    found = [n.module for n in sites.norms] + [m.module for m in sites.gated_mlps]
    found += [m for _, m in sites.attentions] + [m for _, m in sites.torch_attentions]
    found += [m for _, m in sites.traced_attentions]
    found += [m for _, m in sites.traced_gated_mlps]
    return any(module is model for module in (*found, *sites.torch_encoders))


def _tree(modules: list[tuple[str, nn.Module]]) -> Fingerprint:
    """Which module object sits at which name, with its config and attention implementation."""
    return tuple((name, id(module), type(module), _config_key(module)) for name, module in modules)


def _config_key(module: nn.Module) -> Hashable:
    config = module.__dict__.get("config")
    if config is None:
        return None
    # Read from the instance dict: transformers config attribute access is slow.
    return id(config), config.__dict__.get("_attn_implementation_internal")


def _norm_settings(sites: RuleSites) -> Fingerprint:
    """What the probed form of each norm site depends on."""
    return tuple(
        (
            tuple(
                sorted(
                    (key, value)
                    for key, value in vars(norm.module).items()
                    if not key.startswith("_") and isinstance(value, (bool, int, float, str))
                )
            ),
            tuple(
                (key, None if p is None else tuple(p.shape))
                for key, p in norm.module._parameters.items()
            ),
        )
        for norm in sites.norms
    )
