"""Edge attribution patching (EAP, GIM, EAP-IG) on MIB's graph of a model.

How it is computed, for every method but ``"exact"``:

- the *activation difference* ``delta_u`` of every upstream node (corrupted
  minus clean output, or mean minus clean, or minus clean), from one forward
  pass on each prompt set;
- the gradient ``g_d`` of the metric at every downstream input, in the
  residual stream the input reads, on the clean run: a zero tensor is added
  to the output of each q/k/v projection, to each MLP's input and to the last
  block's output, so that their gradients come from one backward pass; the
  gradient of a head's query, key or value input is then the backward of the
  attention norm, at the residual stream the block read, applied to that head's
  slice of the projection's gradient (the projection and the norm are the only
  functions between the residual stream and the head, so this is the gradient a
  separate copy of the residual stream per head and per q/k/v would get);
- ``score(u -> d) = sum over examples' positions of delta_u . g_d``, for all
  edges at once as one matrix product per group of downstream inputs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from captum_gim import GIMConfig, gim_rules
from captum_gim.circuits.edge_result import EdgeResult
from captum_gim.circuits.graph import (
    QKV,
    EdgeSites,
    Graph,
    check_additive,
    find_edge_sites,
    head_outputs,
    ungrouped,
)
from captum_gim.circuits.patching import _check_inputs, _metric_of

Metric = Callable[[Any], Tensor]
METHODS = ("gim", "eap", "eap-ig-inputs", "eap-ig-activations", "exact")
INTERVENTIONS = ("patching", "mean", "zero")
LEVELS = ("edge", "node", "neuron")


def edge_attribution_patching(
    model: nn.Module,
    clean_inputs: Tensor | Mapping[str, Tensor],
    corrupted_inputs: Tensor | Mapping[str, Tensor],
    metric: Metric,
    *,
    method: str = "gim",
    intervention: str = "patching",
    steps: int = 5,
    level: str = "edge",
    config: GIMConfig | None = None,
    per_example: bool = False,
    mean_inputs: Tensor | Mapping[str, Tensor] | None = None,
    max_batch_size: int = 64,
) -> EdgeResult:
    r"""
    Scores every edge of MIB's circuit graph (see :mod:`captum_gim.circuits.graph`):
    ``input``, each head ``a{l}.h{h}``, each MLP ``m{l}`` -> each later head's
    query, key and value input (``a{l}.h{h}<q>``, ``<k>``, ``<v>``), each later
    MLP and ``logits``.

    Conventions (those of EAP, EAP-IG and MIB):

    - the gradient is taken on the **clean** run;
    - ``score(u -> d) = (corrupted - clean output of u) . d metric / d (input of d)``,
      summed over positions and the hidden dimension, averaged over the
      batch: a first-order estimate of ``metric(clean run with that one edge
      corrupted) - metric(clean run)``; a large negative score means the edge
      carries the clean behaviour (for a metric that is high on clean prompts);
    - ``intervention="mean"`` puts the node's mean output (over the examples
      and real positions of ``mean_inputs``, default the clean prompts) in place
      of the corrupted one, ``"zero"`` puts zero;
    - padding positions (``attention_mask == 0``) contribute nothing.

    Methods:

    - ``"eap"``: the plain gradient (edge attribution patching);
    - ``"gim"``: the gradient under :func:`captum_gim.gim_rules` (the GIM
      paper's circuit experiment: EAP "as usual" with the rules in the backward);
    - ``"eap-ig-inputs"``: the gradient averaged over ``steps`` runs whose input
      embeddings are ``corrupted + k / steps * (clean - corrupted)``,
      ``k = 0 .. steps - 1`` (EAP-IG; ``intervention="patching"`` only);
    - ``"eap-ig-activations"``: the gradient averaged over runs where the
      output of one node group (the input, a layer's attention, a layer's MLP)
      is replaced by ``a * clean + (1 - a) * corrupted``, ``a = k / steps``,
      ``k = 1 .. steps``, for every group in turn (as EAP-IG defines it);
    - ``"exact"``: ``metric(clean run with that edge corrupted) - metric(clean)``,
      one patched run per edge (batched); for validation on small models.

    Levels (MIB's): ``"edge"`` (the default), ``"node"`` (adds ``node_scores``,
    each upstream node's score: the sum of its outgoing edge scores, which for
    the gradient methods is ``delta_u . d metric / d output of u``, and for
    ``"exact"`` the sum of the single-edge effects) and ``"neuron"`` (adds
    ``neuron_scores``, the same per hidden dimension of the node's output).
    :func:`evaluate_circuits` evaluates edge circuits only.

    Args:
        model (nn.Module): A pre-norm transformers model (Llama, Qwen, Mistral,
                    Gemma 1, GPT-2, GPT-NeoX, ...) in eval mode; with
                    grouped-query attention it is scored on an ungrouped copy
                    (see :func:`captum_gim.circuits.graph.ungrouped`).
        clean_inputs (Tensor or dict): Token ids (``batch x tokens``) or a
                    tokenizer output with ``input_ids`` and ``attention_mask``.
        corrupted_inputs (Tensor or dict): The same form, shape and mask.
        metric (Callable): ``metric(logits) -> Tensor[batch]``, e.g. a logit
                    difference at the last position.
        method (str, optional): One of ``"gim"``, ``"eap"``,
                    ``"eap-ig-inputs"``, ``"eap-ig-activations"``, ``"exact"``.
                    Default: ``"gim"``
        intervention (str, optional): ``"patching"``, ``"mean"`` or ``"zero"``.
                    Default: ``"patching"``
        steps (int, optional): Integration steps of the EAP-IG methods. Default: 5
        level (str, optional): ``"edge"``, ``"node"`` or ``"neuron"``. Default: ``"edge"``
        config (GIMConfig, optional): The GIM settings (``method="gim"`` only).
        per_example (bool, optional): Keep each example's scores. Default: False
        mean_inputs (Tensor or dict, optional): Prompts for the mean intervention.
        max_batch_size (int, optional): Rows per patched forward pass of
                    ``"exact"``. Default: 64

    Returns:
        *EdgeResult*: ``.scores`` (``[len(upstream), len(downstream)]``), ``.mask``,
        ``.upstream``, ``.downstream``, ``.top(k)``, ``.to_mib()``, ``.plot()``.

    Examples::

        >>> from captum_gim.circuits import edge_attribution_patching, evaluate_circuits
        >>> def logit_diff(logits):
        ...     return logits[:, -1, good] - logits[:, -1, bad]
        >>> edges = edge_attribution_patching(model, clean_ids, corrupted_ids, logit_diff)
        >>> edges.top(5)
        >>> evaluate_circuits(model, edges, clean_ids, corrupted_ids, logit_diff).cpr
    """
    start = time.perf_counter()
    _check_options(method, intervention, steps, level, config)
    clean, corrupted = _check_inputs(model, clean_inputs, corrupted_inputs)
    backend = backend_of(model, clean["input_ids"])
    model, graph = backend.model, backend.graph
    batch = clean["input_ids"].shape[0]
    real = graph.real_edges()

    with torch.no_grad():
        clean_out = backend.record(clean, metric)
        corrupted_out = backend.record(corrupted, metric)
        source = intervention_source(backend, intervention, corrupted_out.nodes, clean, mean_inputs)
    keep = _real_positions(clean, clean_out.nodes)
    delta = (source - clean_out.nodes) * keep  # batch x tokens x upstream x hidden

    if method == "exact":
        per = _exact_scores(backend, clean, metric, source, real, max_batch_size)
        per = per - clean_out.metric.cpu().float()[:, None, None]
        neurons = None
    else:
        rules = (
            gim_rules(
                model, config=config or GIMConfig(), example_inputs=_audit_inputs(model, clean)
            )
            if method == "gim"
            else contextlib.nullcontext()
        )
        accumulate = _Accumulator(
            graph.n_upstream, graph.n_downstream, batch, level == "neuron", delta.device
        )
        with rules:
            for weight, replace in _runs(method, steps, graph, clean_out.nodes, source):
                backend.gradient_pass(clean, metric, delta, accumulate, weight, replace)
        per = accumulate.scores.cpu()
        neurons = None if accumulate.neurons is None else accumulate.neurons.cpu()
    per = per * real
    return EdgeResult(
        method=method,
        upstream=graph.upstream,
        downstream=graph.downstream,
        scores=per.mean(0),
        mask=real,
        per_example=per if per_example else None,
        node_scores=per.mean(0).sum(1) if level in ("node", "neuron") else None,
        neuron_scores=None if neurons is None else neurons.mean(0),
        level=level,
        config=graph.to_config(backend.hidden_size),
        clean_metric=clean_out.metric,
        corrupted_metric=corrupted_out.metric,
        seconds=time.perf_counter() - start,
    )


def _check_options(
    method: str, intervention: str, steps: int, level: str, config: GIMConfig | None
) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if intervention not in INTERVENTIONS:
        raise ValueError(f"intervention must be one of {INTERVENTIONS}, got {intervention!r}.")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}.")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    if config is not None and method != "gim":
        raise ValueError(f"config= applies to method='gim' only, got method={method!r}.")
    if method == "eap-ig-inputs" and intervention != "patching":
        raise ValueError(
            "method='eap-ig-inputs' interpolates between the corrupted and clean inputs, so it "
            f"needs intervention='patching', got {intervention!r}; use 'eap-ig-activations'."
        )
    if method == "exact" and level == "neuron":
        raise ValueError("method='exact' scores edges and nodes, not neurons; use level='node'.")


# -------------------------------------------------------------------- backends


@dataclass
class Backend:
    r"""Where MIB's graph is in one model: a transformers model (found by
    structure) or a TransformerLens ``HookedTransformer`` (its hook points)."""

    model: nn.Module
    graph: Graph
    hidden_size: int
    sites: EdgeSites | None = None

    def record(self, inputs: dict[str, Tensor], metric: Metric) -> Recorded:
        r"""One run's node outputs and metric (no gradient)."""
        if self.sites is None:
            from captum_gim.circuits import lens

            return lens.record(self.model, inputs, metric)
        return run_recorded(self.model, self.sites, inputs, metric)

    def gradient_pass(
        self,
        inputs: dict[str, Tensor],
        metric: Metric,
        delta: Tensor,
        accumulate: _Accumulator,
        weight: float,
        replace: Replace,
    ) -> None:
        r"""One forward and backward pass adding ``weight * delta . g`` to ``accumulate``."""
        if self.sites is None:
            from captum_gim.circuits import lens

            lens.gradient_pass(self.model, inputs, metric, delta, accumulate, weight, replace)
            return
        gradient_pass(self.model, self.sites, inputs, metric, delta, accumulate, weight, replace)

    def patched_chunk(
        self, inputs: dict[str, Tensor], metric: Metric, source: Tensor, cut: Tensor
    ) -> Tensor:
        r"""The metric per circuit of ``cut`` (``circuits x upstream x downstream``) and example."""
        if self.sites is None:
            from captum_gim.circuits import lens

            return lens.patched_chunk(self.model, inputs, metric, source, cut)
        from captum_gim.circuits.evaluation import _patched_chunk

        return _patched_chunk(self.model, self.sites, inputs, metric, source, cut)


def _audit_inputs(model: nn.Module, clean: dict[str, Tensor]) -> Any:
    r"""The clean prompts as the model's own call takes them, for the rules' one-time audit."""
    from captum_gim.circuits.lens import is_lens

    return (clean["input_ids"],) if is_lens(model) else dict(clean)


def backend_of(model: nn.Module, input_ids: Tensor) -> Backend:
    r"""The :class:`Backend` of a model (a grouped-query model is ungrouped first)."""
    from captum_gim.circuits.lens import is_lens, lens_graph

    if is_lens(model):
        cfg: Any = getattr(model, "cfg")  # noqa: B009
        return Backend(model, lens_graph(model), int(cfg.d_model))
    model = ungrouped(model)
    sites = find_edge_sites(model, input_ids)
    return Backend(model, sites.graph, sites.parts.hidden_size, sites)


# ------------------------------------------------------------------ recording


@dataclass
class Recorded:
    r"""One run's node outputs and the residual streams the nodes read."""

    #: batch x tokens x upstream x hidden: MIB's upstream node outputs.
    nodes: Tensor
    #: The residual stream each layer's attention reads (the block input).
    attention_reads: list[Tensor]
    #: The residual stream each layer's MLP reads.
    mlp_reads: list[Tensor]
    #: Each layer's attention output (with bias) and MLP output.
    attention_out: list[Tensor]
    mlp_out: list[Tensor]
    metric: Tensor


@contextlib.contextmanager
def hooks(handles: list[Any]) -> Iterator[None]:
    r"""Removes every handle of ``handles`` (filled inside the block) when it ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def block_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    r"""The hidden states a block was called with."""
    return args[0] if args else kwargs["hidden_states"]


def with_block_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], new: Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    r"""A block's call arguments with other hidden states."""
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def first(output: Any) -> Tensor:
    r"""A module's first output tensor."""
    return output[0] if isinstance(output, (tuple, list)) else output


def run_recorded(
    model: nn.Module, sites: EdgeSites, inputs: dict[str, Tensor], metric: Metric
) -> Recorded:
    r"""Runs ``model`` once, recording the node outputs; checks that the residual
    stream is their sum."""
    layers = sites.layers
    n = len(layers)
    store: dict[str, list[Any]] = {k: [None] * n for k in ("x", "mid", "z", "attn", "mlp", "after")}
    handles: list[Any] = []

    def save(key: str, i: int, value: Tensor) -> None:
        store[key][i] = value.detach()

    with hooks(handles):
        for i, layer in enumerate(layers):
            handles.append(
                layer.block.register_forward_pre_hook(
                    lambda _, a, k, i=i: save("x", i, block_input(a, k)), with_kwargs=True
                )
            )
            handles.append(
                layer.block.register_forward_hook(
                    lambda _, __, out, i=i: save("after", i, first(out))
                )
            )
            handles.append(
                layer.mlp_norm.register_forward_pre_hook(
                    lambda _, a, i=i: save("mid", i, a[0]) if store["mid"][i] is None else None
                )
            )
            handles.append(
                layer.out_proj.register_forward_pre_hook(lambda _, a, i=i: save("z", i, a[0]))
            )
            handles.append(
                layer.out_proj.register_forward_hook(lambda _, __, o, i=i: save("attn", i, o))
            )
            handles.append(
                layer.mlp.register_forward_hook(lambda _, __, o, i=i: save("mlp", i, first(o)))
            )
        value = _metric_of(metric, model(**inputs), inputs["input_ids"].shape[0])
    parts = [store["x"][0][:, :, None]]
    for i, layer in enumerate(layers):
        label = f"Block {i} ({type(layer.block).__name__})"
        attn, mlp = store["attn"][i], store["mlp"][i]
        read = store["x"][i] if sites.graph.parallel else store["x"][i] + attn
        check_additive(label, read, [], store["mid"][i])
        check_additive(label, store["x"][i], [attn, mlp], store["after"][i])
        if i + 1 < n:
            check_additive(label, store["after"][i], [], store["x"][i + 1])
        parts.append(head_outputs(layer.out_proj, store["z"][i], sites.graph.num_heads))
        parts.append(mlp[:, :, None])
    return Recorded(
        nodes=torch.cat(parts, dim=2),
        attention_reads=store["x"],
        mlp_reads=store["mid"],
        attention_out=store["attn"],
        mlp_out=store["mlp"],
        metric=value.detach(),
    )


def _real_positions(inputs: dict[str, Tensor], nodes: Tensor) -> Tensor:
    mask = inputs.get("attention_mask")
    if mask is None:
        return torch.ones_like(nodes[:, :, :1, :1])
    return mask[:, :, None, None].to(nodes.dtype)


def intervention_source(
    backend: Backend,
    intervention: str,
    corrupted_nodes: Tensor,
    clean: dict[str, Tensor],
    mean_inputs: Tensor | Mapping[str, Tensor] | None,
) -> Tensor:
    r"""What replaces a node's output when an edge from it is cut:
    ``batch x tokens x upstream x hidden``."""
    if intervention == "patching":
        return corrupted_nodes
    if intervention == "zero":
        return torch.zeros_like(corrupted_nodes)
    inputs = clean
    if mean_inputs is not None:
        inputs, _ = _check_inputs(backend.model, mean_inputs, mean_inputs)
    recorded = backend.record(inputs, lambda out: _zeros_metric(inputs))
    weights = _real_positions(inputs, recorded.nodes)
    mean = (recorded.nodes * weights).sum((0, 1)) / weights.sum((0, 1))
    return mean.expand_as(corrupted_nodes).clone()


def _zeros_metric(inputs: dict[str, Tensor]) -> Tensor:
    return torch.zeros(inputs["input_ids"].shape[0], device=inputs["input_ids"].device)


# ------------------------------------------------------------------ gradients


@dataclass
class _Accumulator:
    n_upstream: int
    n_downstream: int
    batch: int
    with_neurons: bool
    device: torch.device
    scores: Tensor = field(init=False)
    neurons: Tensor | None = field(init=False)

    def __post_init__(self) -> None:
        self.scores = torch.zeros(
            self.batch, self.n_upstream, self.n_downstream, device=self.device
        )
        self.neurons = None

    def add(self, delta: Tensor, gradient: Tensor, downstream: slice, reads: int, w: float) -> None:
        r"""``gradient``: batch x tokens x k x hidden for the inputs ``downstream``."""
        # float32 sums (over tokens and the hidden size) also for half-precision models
        d = delta[:, :, :reads].to(torch.float32)
        gradient = gradient.to(torch.float32)
        s = torch.einsum("btfh,btkh->bfk", d, gradient)
        self.scores[:, :reads, downstream] += w * s.to(self.scores.device)
        if self.with_neurons:
            n = d * gradient.sum(2, keepdim=True)
            n = n.sum(1)
            if self.neurons is None:
                self.neurons = torch.zeros(
                    self.batch, self.n_upstream, d.shape[-1], device=self.device
                )
            self.neurons[:, :reads] += w * n


Replace = tuple[str, int, Tensor] | None


def _runs(
    method: str, steps: int, graph: Graph, clean: Tensor, source: Tensor
) -> Iterator[tuple[float, Replace]]:
    """(weight, replacement) of each gradient pass of a method; a replacement is
    (``"input"``/``"attention"``/``"mlp"``, layer, the node outputs to use:
    ``batch x tokens x hidden``, or ``batch x tokens x heads x hidden`` for a
    layer's attention)."""
    if method in ("eap", "gim"):
        yield 1.0, None
        return
    if method == "eap-ig-inputs":
        clean_in, corrupted_in = clean[:, :, 0], source[:, :, 0]
        for k in range(steps):
            yield 1.0 / steps, ("input", 0, corrupted_in + (k / steps) * (clean_in - corrupted_in))
        return
    groups: list[tuple[str, int, slice | int]] = [("input", 0, 0)]
    for layer in range(graph.num_layers):
        heads = slice(graph.head_index(layer, 0), graph.head_index(layer, graph.num_heads))
        groups += [("attention", layer, heads), ("mlp", layer, graph.mlp_index(layer))]
    total = len(groups) * steps
    for kind, layer, index in groups:
        for k in range(1, steps + 1):
            alpha = k / steps
            value = alpha * clean[:, :, index] + (1 - alpha) * source[:, :, index]
            yield 1.0 / total, (kind, layer, value)


def gradient_pass(
    model: nn.Module,
    sites: EdgeSites,
    inputs: dict[str, Tensor],
    metric: Metric,
    delta: Tensor,
    accumulate: _Accumulator,
    weight: float,
    replace: Replace,
) -> None:
    r"""One forward and backward pass on ``inputs``; adds ``weight * delta . g``
    for every downstream input to ``accumulate``."""
    layers = sites.layers
    n = len(layers)
    reads_x: list[Any] = [None] * n
    reads_mid: list[Any] = [None] * n
    projection_leaves: list[list[Tensor]] = [[] for _ in range(n)]
    mlp_leaves: list[Any] = [None] * n
    final: list[Tensor] = []
    handles: list[Any] = []

    def zero_leaf(value: Tensor) -> Tensor:
        return torch.zeros_like(value, requires_grad=True)

    def block_pre(i: int) -> Callable[..., Any]:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            x = block_input(args, kwargs)
            if i == 0:
                if replace is not None and replace[0] == "input":
                    x = replace[2].to(x.dtype)
                x = x.detach().requires_grad_(True)
                reads_x[i] = x.detach()
                return with_block_input(args, kwargs, x)
            reads_x[i] = x.detach()
            return None

        return hook

    def projection_hook(i: int) -> Callable[..., Any]:
        def hook(_: nn.Module, __: Any, output: Tensor) -> Tensor:
            leaf = zero_leaf(output)
            projection_leaves[i].append(leaf)
            return output + leaf

        return hook

    def mlp_pre(i: int) -> Callable[..., Any]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> Any:
            leaf = zero_leaf(args[0])
            mlp_leaves[i] = leaf
            return (args[0] + leaf, *args[1:])

        return hook

    def mid_pre(i: int) -> Callable[..., Any]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            if reads_mid[i] is None:
                reads_mid[i] = args[0].detach()

        return hook

    def replacement(kind: str, i: int) -> Callable[..., Any]:
        def hook(module: nn.Module, __: Any, output: Any) -> Any:
            assert replace is not None
            value = replace[2].to(first(output).dtype)
            if kind == "attention":  # per-head outputs -> the output projection's output
                bias = getattr(module, "bias", None)
                value = value.sum(2) if bias is None else value.sum(2) + bias
            return (value, *output[1:]) if isinstance(output, tuple) else value

        return hook

    def last_hook(_: nn.Module, __: Any, output: Any) -> Any:
        leaf = zero_leaf(first(output))
        final.append(leaf)
        new = first(output) + leaf
        return (new, *output[1:]) if isinstance(output, tuple) else new

    with hooks(handles):
        for i, layer in enumerate(layers):
            handles.append(layer.block.register_forward_pre_hook(block_pre(i), with_kwargs=True))
            for projection in layer.projections:
                handles.append(projection.module.register_forward_hook(projection_hook(i)))
            handles.append(layer.mlp_norm.register_forward_pre_hook(mid_pre(i)))
            handles.append(layer.mlp.register_forward_pre_hook(mlp_pre(i)))
            if replace is not None and replace[1] == i and replace[0] == "attention":
                handles.append(layer.out_proj.register_forward_hook(replacement("attention", i)))
            if replace is not None and replace[1] == i and replace[0] == "mlp":
                handles.append(layer.mlp.register_forward_hook(replacement("mlp", i)))
        handles.append(layers[-1].block.register_forward_hook(last_hook))
        with torch.enable_grad():
            value = _metric_of(metric, model(**inputs), inputs["input_ids"].shape[0])
            leaves = [leaf for group in projection_leaves for leaf in group]
            leaves += [*mlp_leaves, *final]
            grads = torch.autograd.grad(value.sum(), leaves, allow_unused=True)
    grad_of = {id(leaf): g for leaf, g in zip(leaves, grads)}

    def grad(leaf: Tensor) -> Tensor:
        g = grad_of[id(leaf)]
        return torch.zeros_like(leaf) if g is None else g

    with torch.no_grad():
        _accumulate_layers(
            sites,
            delta,
            accumulate,
            weight,
            projection_leaves,
            grad,
            reads_x,
            reads_mid,
            mlp_leaves,
            final,
        )


def _accumulate_layers(
    sites: EdgeSites,
    delta: Tensor,
    accumulate: _Accumulator,
    weight: float,
    projection_leaves: list[list[Tensor]],
    grad: Callable[[Tensor], Tensor],
    reads_x: list[Any],
    reads_mid: list[Any],
    mlp_leaves: list[Any],
    final: list[Tensor],
) -> None:
    graph = sites.graph
    for i, layer in enumerate(sites.layers):
        per_input = []  # (letter, head) order: q heads, k heads, v heads
        for letter in QKV:
            for head in range(graph.num_heads):
                for projection, leaf in zip(layer.projections, projection_leaves[i]):
                    if (letter, head) in projection.columns:
                        cols = projection.columns[(letter, head)]
                        rows = projection.weight_rows(letter, head)
                        per_input.append(grad(leaf)[..., cols] @ rows.to(leaf.dtype))
                        break
        g_norm_out = torch.stack(per_input)  # 3H x batch x tokens x hidden
        g_attention = norm_backward(layer.attention_norm, reads_x[i], g_norm_out)
        first_q = graph.qkv_index(i, "q", 0)
        accumulate.add(
            delta,
            g_attention.permute(1, 2, 0, 3),
            slice(first_q, first_q + 3 * graph.num_heads),
            graph.reads(first_q),
            weight,
        )
        g_mlp = norm_backward(layer.mlp_norm, reads_mid[i], grad(mlp_leaves[i])[None])
        m = graph.mlp_input_index(i)
        accumulate.add(delta, g_mlp.permute(1, 2, 0, 3), slice(m, m + 1), graph.reads(m), weight)
    logits = graph.n_downstream - 1
    accumulate.add(
        delta, grad(final[0])[:, :, None], slice(logits, logits + 1), graph.n_upstream, weight
    )


def norm_backward(norm: nn.Module, x: Tensor, g_out: Tensor) -> Tensor:
    r"""
    The backward of ``norm`` at ``x`` for each of several output gradients
    ``g_out`` (``k x ...``), as the model's own backward computes it (under the
    rules when called inside :func:`captum_gim.gim_rules`).
    """
    copies = x.detach()[None].expand(g_out.shape[0], *x.shape).clone().requires_grad_(True)
    with torch.enable_grad():
        y = first(norm(copies))
        (g,) = torch.autograd.grad(y, copies, g_out.to(y.dtype))
    return g


def _exact_scores(
    backend: Backend,
    clean: dict[str, Tensor],
    metric: Metric,
    source: Tensor,
    real: Tensor,
    max_batch_size: int,
) -> Tensor:
    from captum_gim.circuits.evaluation import patched_metrics

    edges = real.nonzero().tolist()
    masks = torch.zeros(len(edges), *real.shape, dtype=torch.bool)
    for j, (u, d) in enumerate(edges):
        masks[j, u, d] = True
    values = patched_metrics(backend, clean, metric, source, masks, max_batch_size)
    per = torch.zeros(clean["input_ids"].shape[0], *real.shape)
    for j, (u, d) in enumerate(edges):
        per[:, u, d] = values[j]
    return per
