"""Reading and replacing component activations with forward hooks.

A *site* is one place in the model that holds the activations of a component
type at one layer: ``("heads", l)`` is the input of block ``l``'s attention
output projection, ``("mlps", l)`` the MLP output, ``("neurons", l)`` the input
of the MLP's down projection, and ``("residual", l)`` the residual stream before
block ``l`` (``l = num_layers`` is the output of the last block).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from captum_gim import UnsupportedModuleError
from captum_gim.circuits.components import Components

Site = tuple[str, int]
#: ``fn(site, activation) -> activation`` (the same tensor to leave it as it is).
TapFunction = Callable[[Site, Tensor], Tensor]

KINDS = ("heads", "mlps", "residual", "neurons")


def sites_of(parts: Components, kinds: Sequence[str]) -> list[Site]:
    r"""
    Returns:
        *list[Site]*: every site of the given component types, layer by layer.
    """
    sites: list[Site] = []
    for kind in kinds:
        count = parts.num_layers + 1 if kind == "residual" else parts.num_layers
        sites.extend((kind, layer) for layer in range(count))
    return sites


def _module_of(parts: Components, site: Site) -> tuple[nn.Module, str]:
    kind, layer = site
    if kind == "residual":
        if layer == 0:
            return parts.layers[0].block, "input"
        return parts.layers[layer - 1].block, "output"
    entry = parts.layers[layer]
    if kind == "heads":
        return entry.out_proj, "input"
    if kind == "mlps":
        return entry.mlp, "output"
    if entry.down_proj is None:
        raise UnsupportedModuleError(
            f"The MLP of block {layer} ({type(entry.mlp).__name__}) has no linear down "
            "projection, so it has no per-neuron scores; leave 'neurons' out of components."
        )
    return entry.down_proj, "input"


@contextlib.contextmanager
def tapped(parts: Components, sites: Sequence[Site], fn: TapFunction) -> Iterator[None]:
    r"""
    Passes the activation of every site through ``fn`` during the forward
    passes inside the block; all hooks are removed when it ends.

    Args:
        parts (Components): The model's components.
        sites (sequence of Site): The sites to tap.
        fn (TapFunction): Called with each site and its activation; returns the
                    activation the model goes on with.
    """
    with contextlib.ExitStack() as stack:
        for site in sites:
            module, point = _module_of(parts, site)
            if point == "input":
                handle = module.register_forward_pre_hook(_input_hook(site, fn), with_kwargs=True)
            else:
                handle = module.register_forward_hook(_output_hook(site, fn))
            stack.callback(handle.remove)
        yield


def _input_hook(site: Site, fn: TapFunction) -> Callable[..., Any]:
    def hook(
        _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if args:
            new = fn(site, args[0])
            return None if new is args[0] else ((new, *args[1:]), kwargs)
        new = fn(site, kwargs["hidden_states"])
        return None if new is kwargs["hidden_states"] else (args, {**kwargs, "hidden_states": new})

    return hook


def _output_hook(site: Site, fn: TapFunction) -> Callable[..., Any]:
    def hook(_: nn.Module, __: tuple[Any, ...], output: Any) -> Any:
        if isinstance(output, tuple):
            new = fn(site, output[0])
            return None if new is output[0] else (new, *output[1:])
        new = fn(site, output)
        return None if new is output else new

    return hook
