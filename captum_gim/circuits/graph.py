"""The computational graph of MIB's circuit track (and EAP-IG), and where its
nodes are in a transformers model.

Nodes, in MIB's order: ``input`` (the embeddings), ``a{l}.h{h}`` (attention
head ``h`` of layer ``l``: its contribution to the residual stream), ``m{l}``
(the MLP of layer ``l``) and ``logits``. Every node but ``logits`` is an
*upstream* node (it writes the residual stream); every node but ``input`` has
*downstream* inputs (it reads the residual stream): ``a{l}.h{h}<q>``, ``<k>``
and ``<v>`` for a head, ``m{l}`` for an MLP and ``logits`` for the unembedding.
An edge runs from each upstream node to each downstream input that reads the
residual stream after the node wrote it (in a parallel block, the MLP of a
layer does not read its heads).

The graph needs the residual stream to be the sum of the node outputs, which
holds for pre-norm blocks (Llama, Qwen, Mistral, Gemma 1, GPT-2, GPT-NeoX); it
is checked on every call (:func:`check_additive`), so post-norm models (BERT)
and sublayer output norms (Gemma 2/3) are refused.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from captum_gim import UnsupportedModuleError
from captum_gim.circuits.components import (
    Components,
    _child_containing,
    _probe,
    find_components,
    is_linear,
)

QKV = "qkv"


@dataclass(frozen=True)
class Graph:
    r"""MIB's graph of a model with ``num_layers`` blocks of ``num_heads`` heads."""

    num_layers: int
    num_heads: int
    #: Attention and MLP read the same residual stream (GPT-J, GPT-NeoX).
    parallel: bool = False

    @property
    def n_upstream(self) -> int:
        r"""The number of upstream nodes (``input``, heads, MLPs)."""
        return 1 + self.num_layers * (self.num_heads + 1)

    @property
    def n_downstream(self) -> int:
        r"""The number of downstream inputs (q/k/v of each head, MLPs, ``logits``)."""
        return self.num_layers * (3 * self.num_heads + 1) + 1

    @property
    def upstream(self) -> list[str]:
        r"""*list[str]*: MIB's names of the upstream nodes, in MIB's order."""
        names = ["input"]
        for layer in range(self.num_layers):
            names += [f"a{layer}.h{h}" for h in range(self.num_heads)] + [f"m{layer}"]
        return names

    @property
    def downstream(self) -> list[str]:
        r"""*list[str]*: MIB's names of the downstream inputs, in MIB's order."""
        names = []
        for layer in range(self.num_layers):
            for letter in QKV:
                names += [f"a{layer}.h{h}<{letter}>" for h in range(self.num_heads)]
            names.append(f"m{layer}")
        return [*names, "logits"]

    def head_index(self, layer: int, head: int) -> int:
        r"""The upstream index of ``a{layer}.h{head}``."""
        return 1 + layer * (self.num_heads + 1) + head

    def mlp_index(self, layer: int) -> int:
        r"""The upstream index of ``m{layer}``."""
        return 1 + layer * (self.num_heads + 1) + self.num_heads

    def qkv_index(self, layer: int, letter: str, head: int) -> int:
        r"""The downstream index of ``a{layer}.h{head}<{letter}>``."""
        return layer * (3 * self.num_heads + 1) + QKV.index(letter) * self.num_heads + head

    def mlp_input_index(self, layer: int) -> int:
        r"""The downstream index of ``m{layer}``."""
        return layer * (3 * self.num_heads + 1) + 3 * self.num_heads

    def reads(self, downstream: int) -> int:
        r"""How many upstream nodes (the first ones) a downstream input reads."""
        if downstream == self.n_downstream - 1:
            return self.n_upstream
        layer, within = divmod(downstream, 3 * self.num_heads + 1)
        if within < 3 * self.num_heads or self.parallel:
            return 1 + layer * (self.num_heads + 1)
        return 1 + layer * (self.num_heads + 1) + self.num_heads

    def real_edges(self) -> Tensor:
        r"""*Tensor*: ``[n_upstream, n_downstream]`` booleans, True where an edge exists."""
        mask = torch.zeros(self.n_upstream, self.n_downstream, dtype=torch.bool)
        for d in range(self.n_downstream):
            mask[: self.reads(d), d] = True
        return mask

    def owner(self) -> Tensor:
        r"""*Tensor*: ``[n_upstream, n_downstream]``, True where the downstream
        input belongs to the upstream node (a head's q/k/v, an MLP's input)."""
        own = torch.zeros(self.n_upstream, self.n_downstream, dtype=torch.bool)
        for layer in range(self.num_layers):
            for head in range(self.num_heads):
                for letter in QKV:
                    own[self.head_index(layer, head), self.qkv_index(layer, letter, head)] = True
            own[self.mlp_index(layer), self.mlp_input_index(layer)] = True
        return own

    def to_config(self, hidden_size: int) -> dict[str, Any]:
        r"""MIB's ``cfg`` entry of a graph file."""
        return {
            "n_layers": self.num_layers,
            "n_heads": self.num_heads,
            "parallel_attn_mlp": self.parallel,
            "d_model": hidden_size,
        }


@dataclass(frozen=True)
class Projection:
    r"""A linear layer that computes queries, keys and/or values from the attention input."""

    module: nn.Module
    #: ``(letter, head) -> the output features`` of that head's q, k or v.
    columns: dict[tuple[str, int], slice]

    def weight_rows(self, letter: str, head: int) -> Tensor:
        r"""The weight as ``out x in`` restricted to one head's q, k or v."""
        weight = self.module.weight
        assert isinstance(weight, Tensor)
        if isinstance(self.module, Conv1D):
            weight = weight.t()
        return weight[self.columns[(letter, head)]]


@dataclass(frozen=True)
class EdgeLayer:
    r"""Where one block's nodes read and write the residual stream."""

    block: nn.Module
    #: The norm whose output the q/k/v projections read.
    attention_norm: nn.Module
    projections: tuple[Projection, ...]
    #: The attention output projection (its input split by head is a head's output).
    out_proj: nn.Module
    #: The norm whose output the MLP reads (the attention norm in GPT-J).
    mlp_norm: nn.Module
    mlp: nn.Module


@dataclass(frozen=True)
class EdgeSites:
    r"""A model's graph and where its nodes are."""

    graph: Graph
    parts: Components
    layers: tuple[EdgeLayer, ...]


_cache: weakref.WeakKeyDictionary[nn.Module, EdgeSites] = weakref.WeakKeyDictionary()


def find_edge_sites(model: nn.Module, input_ids: Tensor | None = None) -> EdgeSites:
    r"""
    Finds MIB's graph in a transformers model by structure (one probe pass,
    cached per model): the norms and q/k/v projections that read the residual
    stream, the attention output projections and MLPs that write it.

    Args:
        model (nn.Module): A pre-norm transformers model.
        input_ids (Tensor, optional): Token ids for the probe.

    Returns:
        *EdgeSites*: the graph and its sites.

    Raises:
        UnsupportedModuleError: naming the part that does not fit the graph
                    (no norm before the attention, fused q/k/v of an unknown
                    layout, grouped-query attention).
    """
    cached = _cache.get(model)
    if cached is not None:
        return cached
    parts = find_components(model, input_ids)
    blocks = [layer.block for layer in parts.layers]
    probe = torch.tensor([[0, 1]]) if input_ids is None else input_ids.reshape(-1)[:2][None]
    device = next(model.parameters()).device
    calls = _probe(model, nn.ModuleList(blocks), probe.to(device))
    layers = []
    parallel: set[bool] = set()
    for i, layer in enumerate(parts.layers):
        mine = [c for c in calls if any(c.module is m for m in layer.block.modules())]
        edge_layer, is_parallel = _edge_layer(f"{parts.blocks_name}.{i}", layer, mine, parts)
        layers.append(edge_layer)
        parallel.add(is_parallel)
    if len(parallel) != 1:
        raise UnsupportedModuleError(
            "Some blocks are parallel (attention and MLP read the same residual stream) and "
            "others sequential; MIB's graph needs one kind."
        )
    graph = Graph(parts.num_layers, parts.num_heads, parallel.pop())
    found = EdgeSites(graph, parts, tuple(layers))
    _cache[model] = found
    return found


def _edge_layer(label: str, layer: Any, calls: list[Any], parts: Components) -> tuple[Any, bool]:
    by_output = {id(c.output): c for c in calls if isinstance(c.output, Tensor)}
    attention_root = _child_containing(layer.block, layer.out_proj)
    attention_modules = {id(m) for m in attention_root.modules()}
    linears = [c for c in calls if is_linear(c.module) and id(c.module) in attention_modules]
    if not linears or linears[0].first_input is None:
        raise UnsupportedModuleError(f"Block '{label}': no q/k/v projection found.")
    attention_input = linears[0].first_input
    norm_call = by_output.get(id(attention_input))
    if norm_call is None or norm_call.module is layer.block:
        raise UnsupportedModuleError(
            f"Block '{label}': its attention does not read the output of a norm inside the "
            "block (post-norm blocks such as BERT's do not fit MIB's graph, whose residual "
            "stream is the sum of the node outputs)."
        )
    readers = [c for c in linears if c.first_input is attention_input]
    projections = _projections(label, attention_root, readers, parts)
    mlp_call = next((c for c in calls if c.module is layer.mlp), None)
    mlp_input = None if mlp_call is None else mlp_call.first_input
    mlp_norm_call = None if mlp_input is None else by_output.get(id(mlp_input))
    if mlp_norm_call is None:
        raise UnsupportedModuleError(
            f"Block '{label}': its MLP ({type(layer.mlp).__name__}) does not read the output of "
            "a norm inside the block, so its input is not a residual stream of MIB's graph."
        )
    # Parallel when the MLP's norm reads the block input, as the attention norm does.
    is_parallel = mlp_norm_call.first_input is norm_call.first_input
    return (
        EdgeLayer(
            block=layer.block,
            attention_norm=norm_call.module,
            projections=projections,
            out_proj=layer.out_proj,
            mlp_norm=mlp_norm_call.module,
            mlp=layer.mlp,
        ),
        is_parallel,
    )


def _features(module: nn.Module) -> int:
    if isinstance(module, Conv1D):
        return int(module.nf)
    return int(module.out_features)  # type: ignore[arg-type]


def _projections(
    label: str, attention: nn.Module, readers: list[Any], parts: Components
) -> tuple[Projection, ...]:
    heads, dim = parts.num_heads, parts.head_dim
    width = heads * dim
    if len(readers) == 3:
        sizes = [_features(c.module) for c in readers]
        if sizes != [width] * 3:
            raise UnsupportedModuleError(
                f"Block '{label}': q/k/v projections have {sizes} output features, not "
                f"{width} each (grouped-query attention that captum_gim.circuits.graph."
                "ungrouped could not ungroup: it needs k_proj/v_proj and num_key_value_groups)."
            )
        return tuple(
            Projection(
                c.module,
                {(letter, h): slice(h * dim, (h + 1) * dim) for h in range(heads)},
            )
            for letter, c in zip(QKV, readers)
        )
    if len(readers) == 1 and _features(readers[0].module) == 3 * width:
        kind = type(attention).__name__
        columns: dict[tuple[str, int], slice] = {}
        for i, letter in enumerate(QKV):
            for h in range(heads):
                if "GPTNeoX" in kind:  # [heads, (q, k, v), head_dim]
                    start = h * 3 * dim + i * dim
                elif "GPT2" in kind:  # [(q, k, v), heads, head_dim]
                    start = i * width + h * dim
                else:
                    raise UnsupportedModuleError(
                        f"Block '{label}': {kind} computes q, k and v in one fused projection "
                        "whose layout captum_gim does not know (known: GPT-2, GPT-NeoX)."
                    )
                columns[(letter, h)] = slice(start, start + dim)
        return (Projection(readers[0].module, columns),)
    raise UnsupportedModuleError(
        f"Block '{label}': expected 3 q/k/v projections or one fused one reading the attention "
        f"norm, found {len(readers)} linear layers."
    )


def head_outputs(out_proj: nn.Module, inputs: Tensor, num_heads: int) -> Tensor:
    r"""
    Each head's contribution to the residual stream (without the bias).

    Args:
        out_proj (nn.Module): The attention output projection.
        inputs (Tensor): Its input, ``batch x tokens x (heads * head_dim)``.
        num_heads (int): The number of heads.

    Returns:
        *Tensor*: ``batch x tokens x heads x hidden``.
    """
    weight = out_proj.weight
    assert isinstance(weight, Tensor)
    if not isinstance(out_proj, Conv1D):
        weight = weight.t()  # (heads * head_dim) x hidden
    per_head = weight.unflatten(0, (num_heads, -1))  # heads x head_dim x hidden
    z = inputs.unflatten(-1, (num_heads, -1))  # batch x tokens x heads x head_dim
    return torch.einsum("bthd,hdo->btho", z.to(weight.dtype), per_head)


def check_additive(label: str, before: Tensor, parts: list[Tensor], after: Tensor) -> None:
    r"""
    Raises UnsupportedModuleError unless ``after == before + sum(parts)``
    (up to rounding): the residual stream must be the sum of the node outputs.
    """
    total = before
    for part in parts:
        total = total + part
    scale = float(after.abs().max()) + 1e-12
    deviation = float((total - after).abs().max())
    if deviation > 1e-4 * scale:
        raise UnsupportedModuleError(
            f"{label}: the residual stream is not the sum of the node outputs (deviation "
            f"{deviation:.3g}), e.g. a norm after the attention or MLP output (Gemma 2/3) or a "
            "post-norm block (BERT); MIB's edge graph does not fit this model."
        )


def ungrouped(model: nn.Module) -> nn.Module:
    r"""
    ``model`` itself, or, for grouped-query attention (fewer key/value heads
    than query heads), a copy in which every query head has its own copy of
    its group's key and value projection rows, as MIB's TransformerLens
    setting ``ungroup_grouped_query_attention`` does. The copy computes the
    same function (up to float rounding of the wider projections) and its
    GIM gradients are the same: the key/value gradient scale is linear, so
    scaling each copy equals scaling the shared head once. ``model`` is not
    changed.

    Args:
        model (nn.Module): A transformers model.

    Returns:
        *nn.Module*: ``model`` or its ungrouped copy (in eval mode).
    """
    grouped = [
        m
        for m in model.modules()
        if int(getattr(m, "num_key_value_groups", 1) or 1) > 1
        and isinstance(getattr(m, "k_proj", None), nn.Linear)
        and isinstance(getattr(m, "v_proj", None), nn.Linear)
    ]
    if not grouped:
        return model
    import copy

    clone = copy.deepcopy(model)
    for module in clone.modules():
        groups = int(getattr(module, "num_key_value_groups", 1) or 1)
        if groups <= 1 or not isinstance(getattr(module, "k_proj", None), nn.Linear):
            continue
        head_dim = int(module.head_dim)  # type: ignore[arg-type]
        for name in ("k_proj", "v_proj"):
            old = getattr(module, name)
            new = nn.Linear(
                old.in_features,
                old.out_features * groups,
                bias=old.bias is not None,
                device=old.weight.device,
                dtype=old.weight.dtype,
            )
            with torch.no_grad():
                rows = old.weight.unflatten(0, (-1, head_dim)).repeat_interleave(groups, dim=0)
                new.weight.copy_(rows.flatten(0, 1))
                if old.bias is not None:
                    bias = old.bias.unflatten(0, (-1, head_dim)).repeat_interleave(groups, dim=0)
                    new.bias.copy_(bias.flatten(0, 1))
            setattr(module, name, new)
        setattr(module, "num_key_value_groups", 1)  # noqa: B010
    config = getattr(clone, "config", None)
    if config is not None and hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = config.num_attention_heads
    return clone.eval()
