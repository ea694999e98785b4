"""MIB's graph on a TransformerLens ``HookedTransformer``, through its own hook
points, as EAP-IG reads it.

For each call the model's settings ``use_attn_result``,
``use_split_qkv_input`` and ``use_hook_mlp_in`` are switched on (and
``ungroup_grouped_query_attention`` for grouped-query models), then restored:

- node outputs: ``hook_embed`` (the input), ``blocks.{l}.attn.hook_result``
  (each head), ``blocks.{l}.hook_mlp_out``;
- downstream inputs: ``blocks.{l}.hook_q_input`` / ``hook_k_input`` /
  ``hook_v_input`` (one copy of the residual stream per head),
  ``blocks.{l}.hook_mlp_in`` and ``blocks.{L-1}.hook_resid_post`` (the logits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from captum_gim.circuits.graph import QKV, Graph

FLAGS = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in")


def is_lens(model: nn.Module) -> bool:
    r"""True for a TransformerLens ``HookedTransformer``."""
    return type(model).__module__.startswith("transformer_lens") and hasattr(model, "hook_dict")


@contextlib.contextmanager
def lens_flags(model: Any) -> Iterator[None]:
    r"""Switches on the hook points MIB's graph needs; restores the settings."""
    cfg = model.cfg
    names = list(FLAGS)
    if getattr(cfg, "n_key_value_heads", None) is not None:
        names.append("ungroup_grouped_query_attention")
    old = {name: getattr(cfg, name) for name in names}
    try:
        for name in names:
            setattr(cfg, name, True)
        model.setup()  # rebuilds hook_dict for the new hook points
        yield
    finally:
        for name, value in old.items():
            setattr(cfg, name, value)
        model.setup()


def lens_graph(model: Any) -> Graph:
    r"""MIB's graph of a ``HookedTransformer``."""
    cfg = model.cfg
    return Graph(cfg.n_layers, cfg.n_heads, bool(cfg.parallel_attn_mlp))


def call(model: Any, inputs: dict[str, Tensor]) -> Tensor:
    r"""The logits of a ``HookedTransformer`` for a tokenizer-style input dict."""
    return model(inputs["input_ids"], attention_mask=inputs.get("attention_mask"))


def record(model: Any, inputs: dict[str, Tensor], metric: Callable[[Any], Tensor]) -> Any:
    r"""One run's node outputs ``batch x tokens x upstream x hidden`` and metric."""
    from captum_gim.circuits.edges import Recorded
    from captum_gim.circuits.patching import _metric_of

    graph = lens_graph(model)
    saved: dict[str, Tensor] = {}

    def save(tensor: Tensor, hook: Any) -> None:
        saved[hook.name] = tensor.detach()

    names = ["hook_embed"]
    for layer in range(graph.num_layers):
        names += [f"blocks.{layer}.attn.hook_result", f"blocks.{layer}.hook_mlp_out"]
    with lens_flags(model), torch.no_grad():
        with model.hooks(fwd_hooks=[(name, save) for name in names]):
            value = _metric_of(metric, call(model, inputs), inputs["input_ids"].shape[0])
    parts = [saved["hook_embed"][:, :, None]]
    for layer in range(graph.num_layers):
        parts += [
            saved[f"blocks.{layer}.attn.hook_result"],
            saved[f"blocks.{layer}.hook_mlp_out"][:, :, None],
        ]
    return Recorded(torch.cat(parts, dim=2), [], [], [], [], value.detach())


def gradient_pass(
    model: Any,
    inputs: dict[str, Tensor],
    metric: Callable[[Any], Tensor],
    delta: Tensor,
    accumulate: Any,
    weight: float,
    replace: Any,
) -> None:
    r"""One forward and backward pass; adds ``weight * delta . g`` to ``accumulate``."""
    from captum_gim.circuits.patching import _metric_of

    graph = lens_graph(model)
    leaves: dict[str, Tensor] = {}

    def tap(tensor: Tensor, hook: Any) -> Tensor:
        leaves[hook.name] = torch.zeros_like(tensor, requires_grad=True)
        return tensor + leaves[hook.name]

    names = []
    for layer in range(graph.num_layers):
        names += [f"blocks.{layer}.hook_{letter}_input" for letter in QKV]
        names.append(f"blocks.{layer}.hook_mlp_in")
    names.append(f"blocks.{graph.num_layers - 1}.hook_resid_post")
    hooks: list[tuple[str, Callable[..., Any]]] = [(name, tap) for name in names]
    if replace is not None:
        kind, layer, value = replace
        point = {
            "input": "hook_embed",
            "attention": f"blocks.{layer}.attn.hook_result",
            "mlp": f"blocks.{layer}.hook_mlp_out",
        }[kind]

        def constant(tensor: Tensor, hook: Any) -> Tensor:
            new = value.to(tensor.dtype)
            return new.detach().requires_grad_(True) if kind == "input" else new

        hooks.insert(0, (point, constant))
    with lens_flags(model), torch.enable_grad():
        with model.hooks(fwd_hooks=hooks):
            value_ = _metric_of(metric, call(model, inputs), inputs["input_ids"].shape[0])
            keys = list(leaves)
            grads = torch.autograd.grad(value_.sum(), [leaves[k] for k in keys], allow_unused=True)
    grad_of = {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(keys, grads)}
    with torch.no_grad():
        for layer in range(graph.num_layers):
            g = torch.cat([grad_of[f"blocks.{layer}.hook_{c}_input"] for c in QKV], dim=2)
            first = graph.qkv_index(layer, "q", 0)
            span = slice(first, first + 3 * graph.num_heads)
            accumulate.add(delta, g, span, graph.reads(first), weight)
            m = graph.mlp_input_index(layer)
            g_mlp = grad_of[f"blocks.{layer}.hook_mlp_in"][:, :, None]
            accumulate.add(delta, g_mlp, slice(m, m + 1), graph.reads(m), weight)
        last = graph.n_downstream - 1
        g_last = grad_of[f"blocks.{graph.num_layers - 1}.hook_resid_post"][:, :, None]
        accumulate.add(delta, g_last, slice(last, last + 1), graph.n_upstream, weight)


def patched_chunk(
    model: Any,
    inputs: dict[str, Tensor],
    metric: Callable[[Any], Tensor],
    source: Tensor,
    cut: Tensor,
) -> Tensor:
    r"""The metric with the edges ``cut`` (``copies x upstream x downstream``) cut."""
    from captum_gim.circuits.patching import _checked

    graph = lens_graph(model)
    copies, batch = cut.shape[0], inputs["input_ids"].shape[0]
    repeated = {k: v.repeat(copies, *[1] * (v.dim() - 1)) for k, v in inputs.items()}
    weights = cut.to(source.device, source.dtype)
    current = torch.zeros(copies, *source.shape, dtype=source.dtype, device=source.device)

    def shift(downstream: list[int], reads: int) -> Tensor:
        w = weights[:, :reads, downstream]
        diff = source[None, :, :, :reads] - current[:, :, :, :reads]
        return torch.einsum("cbtfh,cfk->cbtkh", diff, w)

    def keep(index: int | slice) -> Callable[..., None]:
        def hook(tensor: Tensor, hook: Any) -> None:
            current[:, :, :, index] = tensor.unflatten(0, (copies, batch))

        return hook

    def add(downstream: list[int], reads: int, per_head: bool) -> Callable[..., Tensor]:
        def hook(tensor: Tensor, hook: Any) -> Tensor:
            change = shift(downstream, reads)
            if not per_head:
                change = change[:, :, :, 0]
            return tensor + change.flatten(0, 1).to(tensor.dtype)

        return hook

    hooks: list[tuple[str, Callable[..., Any]]] = [("hook_embed", keep(0))]
    for layer in range(graph.num_layers):
        for letter in QKV:
            ks = [graph.qkv_index(layer, letter, h) for h in range(graph.num_heads)]
            hooks.append((f"blocks.{layer}.hook_{letter}_input", add(ks, graph.reads(ks[0]), True)))
        heads = slice(graph.head_index(layer, 0), graph.head_index(layer, graph.num_heads))
        hooks.append((f"blocks.{layer}.attn.hook_result", keep(heads)))
        m = graph.mlp_input_index(layer)
        hooks.append((f"blocks.{layer}.hook_mlp_in", add([m], graph.reads(m), False)))
        hooks.append((f"blocks.{layer}.hook_mlp_out", keep(graph.mlp_index(layer))))
    last = graph.n_downstream - 1
    hooks.append(
        (f"blocks.{graph.num_layers - 1}.hook_resid_post", add([last], graph.n_upstream, False))
    )
    with lens_flags(model), torch.no_grad():
        with model.hooks(fwd_hooks=hooks):
            logits = call(model, repeated)
    rows = [_checked(metric(logits[j * batch : (j + 1) * batch]), batch) for j in range(copies)]
    return torch.stack(rows).detach().cpu().float()
