"""Finding a transformer's components by structure: blocks, attention output
projections, MLPs and the residual stream.

Nothing here depends on a family name. One probe forward pass on two tokens
records which modules run in which order; the answer is cached per model.

- The blocks are the largest ``nn.ModuleList`` whose entries share one class and
  contain a linear layer.
- A block's attention output projection is the first ``nn.Linear`` /
  ``Conv1D`` whose input is not the block's first projected tensor (the one that
  feeds q/k/v) and has ``heads x head_dim`` features.
- A block's MLP is the outermost module outside the attention subtree that runs
  after the output projection, returns a residual-shaped tensor, has weights
  and contains no normalization layer (``mlp`` in Llama and GPT-2, ``output.dense`` in BERT).
  Its down projection (for per-neuron scores) is the last linear layer inside it
  that writes the residual width.
- The residual stream is the input of the first block and the output of each.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from captum_gim import UnsupportedModuleError


@dataclass(frozen=True)
class Layer:
    r"""The components of one block."""

    #: The block (decoder or encoder layer).
    block: nn.Module
    #: The attention output projection; its input, split by head, is a head's output.
    out_proj: nn.Module
    #: The module whose output is the MLP's contribution to the residual stream.
    mlp: nn.Module
    #: The MLP's down projection (its input is the neurons), or None (e.g. MoE).
    down_proj: nn.Module | None
    #: The module that calls transformers' AttentionInterface, or None.
    attention: nn.Module | None


@dataclass(frozen=True)
class Components:
    r"""Where the heads, MLPs and residual stream of a model are."""

    #: Qualified name of the ``nn.ModuleList`` of blocks.
    blocks_name: str
    layers: tuple[Layer, ...]
    num_heads: int
    head_dim: int
    hidden_size: int

    @property
    def num_layers(self) -> int:
        r"""The number of blocks."""
        return len(self.layers)


_cache: weakref.WeakKeyDictionary[nn.Module, Components] = weakref.WeakKeyDictionary()


def find_components(model: nn.Module, input_ids: Tensor | None = None) -> Components:
    r"""
    Finds the blocks, attention output projections, MLPs and residual stream of
    a transformer by what its modules compute, with one probe forward pass
    (cached per model).

    Args:
        model (nn.Module): A transformers model (decoder or encoder).
        input_ids (Tensor, optional): Token ids for the probe; two tokens of
                    them are used. Default: ``[[0, 1]]``.

    Returns:
        *Components*: the components, one :class:`Layer` per block.

    Raises:
        UnsupportedModuleError: naming the part that could not be found.

    Examples::

        >>> from captum_gim.circuits import find_components
        >>> parts = find_components(model)
        >>> parts.num_layers, parts.num_heads
    """
    found = _cache.get(model)
    if found is not None:
        return found
    blocks_name, blocks = _find_blocks(model)
    num_heads = _num_heads(model)
    probe = torch.tensor([[0, 1]]) if input_ids is None else input_ids.reshape(-1)[:2][None]
    calls = _probe(model, blocks, probe.to(_device_of(model)))
    layers = tuple(
        _layer_of(f"{blocks_name}.{i}", block, calls, num_heads) for i, block in enumerate(blocks)
    )
    in_features = _in_features(layers[0].out_proj)
    found = Components(
        blocks_name=blocks_name,
        layers=layers,
        num_heads=num_heads,
        head_dim=in_features // num_heads,
        hidden_size=_out_features(layers[0].out_proj),
    )
    _cache[model] = found
    return found


def is_linear(module: nn.Module) -> bool:
    r"""True for ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2)."""
    return isinstance(module, (nn.Linear, Conv1D))


def _in_features(module: nn.Module) -> int:
    if isinstance(module, Conv1D):
        return int(module.weight.shape[0])
    return int(module.in_features)  # type: ignore[arg-type]


def _out_features(module: nn.Module) -> int:
    if isinstance(module, Conv1D):
        return int(module.nf)
    return int(module.out_features)  # type: ignore[arg-type]


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise UnsupportedModuleError(
            f"{type(model).__name__} has no nn.ModuleList of repeated blocks with linear "
            "layers; captum_gim.circuits needs a transformer made of blocks."
        )
    return best[1], best[2]


def _num_heads(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise UnsupportedModuleError(
            f"{type(model).__name__} has no config.num_attention_heads; "
            "captum_gim.circuits needs it to split the attention output by head."
        )
    return heads


@dataclass
class _Call:
    name: str
    module: nn.Module
    order: int
    first_input: Tensor | None
    output: Any


def _probe(model: nn.Module, blocks: nn.ModuleList, input_ids: Tensor) -> list[_Call]:
    """Runs the model once, recording every module of every block as it finishes."""
    calls: list[_Call] = []
    inputs: dict[nn.Module, Tensor | None] = {}
    handles = []

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        inputs[module] = args[0] if args and isinstance(args[0], Tensor) else None

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, _: tuple[Any, ...], output: Any) -> None:
            calls.append(_Call(name, module, len(calls), inputs.get(module), output))

        return hook

    try:
        for i, block in enumerate(blocks):
            for name, module in block.named_modules():
                handles.append(module.register_forward_pre_hook(pre_hook))
                handles.append(module.register_forward_hook(hook_for(f"{i}.{name}")))
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _layer_of(label: str, block: nn.Module, calls: list[_Call], num_heads: int) -> Layer:
    mine = [c for c in calls if any(c.module is m for m in block.modules())]
    linears = [c for c in mine if is_linear(c.module)]
    if not linears:
        raise UnsupportedModuleError(f"Block '{label}' ran no linear layer in the probe pass.")
    block_call = next(c for c in mine if c.module is block)
    hidden = _first_tensor(block_call.output)
    out_proj = next(
        (
            c
            for c in linears
            if c.first_input is not linears[0].first_input
            and _in_features(c.module) % num_heads == 0
            and _out_features(c.module) == hidden.shape[-1]
        ),
        None,
    )
    if out_proj is None:
        raise UnsupportedModuleError(
            f"Block '{label}' has no attention output projection (a Linear/Conv1D with "
            f"heads x head_dim = k x {num_heads} inputs after the q/k/v projections)."
        )
    attention_root = _child_containing(block, out_proj.module)
    mlp = _find_mlp(block, mine, out_proj.order, attention_root, hidden.shape)
    if mlp is None:
        raise UnsupportedModuleError(
            f"Block '{label}' has no MLP (a module after the attention that writes a "
            "residual-shaped tensor, has weights and contains no normalization layer)."
        )
    down = [
        c
        for c in linears
        if any(c.module is m for m in mlp.modules()) and _out_features(c.module) == hidden.shape[-1]
    ]
    attention = next((m for m in attention_root.modules() if _routes_attention(m)), None)
    return Layer(
        block=block,
        out_proj=out_proj.module,
        mlp=mlp,
        down_proj=down[-1].module if down else None,
        attention=attention,
    )


def _first_tensor(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _child_containing(block: nn.Module, target: nn.Module) -> nn.Module:
    for child in block.children():
        if any(m is target for m in child.modules()):
            return child
    return target


def _find_mlp(
    block: nn.Module,
    calls: list[_Call],
    after: int,
    attention_root: nn.Module,
    shape: torch.Size,
) -> nn.Module | None:
    excluded = {id(m) for m in attention_root.modules()} | {id(block)}
    depth = {id(m): name.count(".") for name, m in block.named_modules()}
    candidates = [
        c
        for c in calls
        if c.order > after
        and id(c.module) not in excluded
        and isinstance(_first_tensor(c.output), Tensor)
        and _first_tensor(c.output).shape == shape
        and next(c.module.parameters(), None) is not None
        and not any(_is_norm(m) for m in c.module.modules())
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda c: (depth[id(c.module)], c.order)).module


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
        return True
    return type(module).__name__.lower().endswith("norm")


def _routes_attention(module: nn.Module) -> bool:
    cls: Any = type(module)
    return hasattr(module, "config") and _calls_attention_interface(cls)


@cache
def _calls_attention_interface(cls: Any) -> bool:
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
