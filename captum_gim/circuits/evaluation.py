"""Circuits of top-scoring edges and their faithfulness, as MIB's circuit track
measures them (``MIB_circuit_track/evaluation.py``).

A circuit is a set of edges. Running a circuit means running the clean prompt
with every edge *not* in the circuit cut: the downstream input reads, in place
of the upstream node's output in this run, its output in the corrupted run (or
its mean, or zero). With every edge in the circuit this is the clean run; with
none it is the corrupted run (with ``"patching"``).

- :func:`evaluate_circuits`: MIB's faithfulness curve over circuit sizes, its
  area (CPR, higher is better) and its area from 1 (CMD, lower is better).
- :func:`prune`: removes the edges that cannot reach the logits or cannot be
  reached from the input, as MIB does before it runs a circuit.
- :func:`auroc`: how well edge scores rank a known circuit's edges first.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_gim.circuits.edge_result import EdgeResult
from captum_gim.circuits.edges import (
    INTERVENTIONS,
    Backend,
    Metric,
    backend_of,
    block_input,
    first,
    hooks,
    intervention_source,
)
from captum_gim.circuits.graph import (
    EdgeSites,
    Graph,
    head_outputs,
)
from captum_gim.circuits.patching import _check_inputs, _checked, _metric_input, _slice_batch
from captum_gim.circuits.result import rank

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: MIB's circuit sizes, in percent of the edges.
PERCENTAGES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)


@dataclass
class CircuitCurve:
    r"""
    Faithfulness of the top-scoring circuits of one edge scoring.

    Attributes:
        percentages (tuple[float, ...]): Circuit sizes, in percent of the edges.
        edge_counts (list[int]): Edges in each circuit after pruning.
        faithfulness (list[float]): ``(m(circuit) - m(empty)) / (m(full) - m(empty))``,
                    ``m`` the batch-mean metric: 1 with every edge, 0 with none.
        metric (list[float]): ``m(circuit)`` of each circuit.
        full_metric (float): ``m`` with every edge (the clean run).
        empty_metric (float): ``m`` with no edge (the corrupted run with ``"patching"``).
        method (str): The scoring method of the edges.
        seconds (float): Wall time of the evaluation.
    """

    percentages: tuple[float, ...]
    edge_counts: list[int]
    faithfulness: list[float]
    metric: list[float]
    full_metric: float
    empty_metric: float
    method: str = ""
    seconds: float = 0.0

    @property
    def cpr(self) -> float:
        r"""*float*: MIB's CPR, the area under the faithfulness curve over the
        fraction of edges (trapezoids, linear scale; higher is better)."""
        return area_under(self.percentages, self.faithfulness)

    @property
    def cmd(self) -> float:
        r"""*float*: MIB's CMD, the area between the curve and 1,
        ``|1 - faithfulness|`` (lower is better)."""
        return area_under(self.percentages, [abs(1.0 - f) for f in self.faithfulness])

    def plot(self, *others: CircuitCurve, title: str | None = None, dpi: int = 80) -> Figure:
        r"""
        Draws the faithfulness curve (and those of ``others``) over the circuit size.

        Returns:
            *matplotlib.figure.Figure*: the figure.
        """
        from matplotlib.figure import Figure

        figure = Figure(figsize=(5.5, 3.5), dpi=dpi)
        axes = figure.add_subplot()
        for curve in (self, *others):
            label = f"{curve.method or 'edges'} (CPR {curve.cpr:.3f}, CMD {curve.cmd:.3f})"
            axes.plot(curve.percentages, curve.faithfulness, marker="o", label=label)
        axes.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axes.axhline(0.0, color="grey", linewidth=0.8)
        axes.set_xscale("log")
        axes.set_xlabel("edges in the circuit (%)")
        axes.set_ylabel("faithfulness")
        axes.legend(fontsize="small")
        axes.set_title(title or "Circuit faithfulness")
        figure.tight_layout()
        return figure


def area_under(percentages: Sequence[float], values: Sequence[float]) -> float:
    r"""Trapezoidal area of ``values`` over ``percentages / 100`` (MIB's CPR/CMD sums)."""
    x = [p / 100 for p in percentages]
    return sum((x[i + 1] - x[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(x) - 1))


def evaluate_circuits(
    model: nn.Module,
    edges: EdgeResult,
    clean_inputs: Tensor | Mapping[str, Tensor],
    corrupted_inputs: Tensor | Mapping[str, Tensor],
    metric: Metric,
    *,
    percentages: Sequence[float] = PERCENTAGES,
    intervention: str = "patching",
    absolute: bool = True,
    level: str = "edge",
    mean_inputs: Tensor | Mapping[str, Tensor] | None = None,
    max_batch_size: int = 64,
) -> CircuitCurve:
    r"""
    MIB's faithfulness curve: for each size, the circuit of the top-scoring
    ``int(percentage / 100 * number of edges)`` edges (by absolute or signed
    score), pruned as MIB prunes (:func:`prune`), is run on the clean prompts
    with every other edge cut, and
    ``faithfulness = (m(circuit) - m(empty)) / (m(full) - m(empty))``.

    Args:
        model (nn.Module): The model the edges were scored on.
        edges (EdgeResult): Edge scores, e.g. from :func:`edge_attribution_patching`.
        clean_inputs (Tensor or dict): Token ids or a tokenizer output.
        corrupted_inputs (Tensor or dict): The same form, shape and mask.
        metric (Callable): ``metric(logits) -> Tensor[batch]``.
        percentages (sequence of float, optional): Circuit sizes in percent of
                    the edges, increasing. Default: MIB's ``(0.1, 0.2, 0.5, 1,
                    2, 5, 10, 20, 50, 100)``
        intervention (str, optional): What a cut edge carries: ``"patching"``
                    (the corrupted run), ``"mean"`` or ``"zero"``. Default: ``"patching"``
        absolute (bool, optional): Rank edges by absolute score. Default: True
        level (str, optional): ``"edge"``, or ``"node"`` (MIB's node level: the
                    top ``percentage`` of the upstream nodes by ``edges.node_scores``
                    with all their outgoing edges, then pruned). Default: ``"edge"``
        mean_inputs (Tensor or dict, optional): Prompts for the mean intervention.
        max_batch_size (int, optional): Rows per patched forward pass. Default: 64

    Returns:
        *CircuitCurve*: ``.faithfulness``, ``.edge_counts``, ``.cpr``, ``.cmd``, ``.plot()``.

    Examples::

        >>> from captum_gim.circuits import edge_attribution_patching, evaluate_circuits
        >>> edges = edge_attribution_patching(model, clean_ids, corrupted_ids, logit_diff)
        >>> curve = evaluate_circuits(model, edges, clean_ids, corrupted_ids, logit_diff)
        >>> curve.cpr, curve.cmd
    """
    start = time.perf_counter()
    if intervention not in INTERVENTIONS:
        raise ValueError(f"intervention must be one of {INTERVENTIONS}, got {intervention!r}.")
    if list(percentages) != sorted(percentages) or not all(0 <= p <= 100 for p in percentages):
        raise ValueError(f"percentages must increase within [0, 100], got {tuple(percentages)}.")
    clean, corrupted = _check_inputs(model, clean_inputs, corrupted_inputs)
    backend = backend_of(model, clean["input_ids"])
    graph = backend.graph
    real = graph.real_edges()
    if tuple(edges.scores.shape) != tuple(real.shape):
        raise ValueError(
            f"edges has scores of shape {tuple(edges.scores.shape)}, but this model's graph has "
            f"{tuple(real.shape)}; score the edges of this model."
        )
    if level == "edge":
        circuits = [
            prune(graph, top_edges(edges.scores, real, int(p / 100 * int(real.sum())), absolute))
            for p in percentages
        ]
    elif level == "node":
        if edges.node_scores is None:
            raise ValueError("level='node' needs node scores: score the edges with level='node'.")
        nodes = edges.node_scores[:, None]
        circuits = [
            prune(
                graph,
                top_edges(
                    nodes,
                    torch.ones_like(nodes, dtype=torch.bool),
                    int(p / 100 * nodes.shape[0]),
                    absolute,
                ).expand_as(real)
                & real,
            )
            for p in percentages
        ]
    else:
        raise ValueError(f"level must be 'edge' or 'node', got {level!r}.")
    masks = torch.stack([real & ~c for c in [real, torch.zeros_like(real), *circuits]])
    with torch.no_grad():
        recorded = backend.record(corrupted, metric)
        source = intervention_source(backend, intervention, recorded.nodes, clean, mean_inputs)
        values = patched_metrics(backend, clean, metric, source, masks, max_batch_size)
    means = values.double().mean(1).tolist()
    full, empty = means[0], means[1]
    return CircuitCurve(
        percentages=tuple(float(p) for p in percentages),
        edge_counts=[int(c.sum()) for c in circuits],
        faithfulness=[(m - empty) / (full - empty) for m in means[2:]],
        metric=means[2:],
        full_metric=full,
        empty_metric=empty,
        method=edges.method,
        seconds=time.perf_counter() - start,
    )


def top_edges(scores: Tensor, real: Tensor, n: int, absolute: bool = True) -> Tensor:
    r"""*Tensor*: the ``n`` real edges with the highest (absolute) scores, as a mask."""
    ranked = scores.abs() if absolute else scores.clone()
    ranked = ranked.to(torch.float64).masked_fill(~real, -torch.inf)
    order = torch.argsort(ranked.reshape(-1), descending=True, stable=True)
    chosen = torch.zeros(real.numel(), dtype=torch.bool)
    chosen[order[:n]] = True
    return chosen.reshape(real.shape) & real


def prune(graph: Graph, in_graph: Tensor) -> Tensor:
    r"""
    MIB's pruning: repeatedly drops the nodes without outgoing edges or
    without incoming ones (the input always counts as having incoming ones),
    and the edges whose upstream node or downstream node was dropped (the
    logits are never dropped), until nothing changes.

    Args:
        graph (Graph): The model's graph.
        in_graph (Tensor): ``[n_upstream, n_downstream]`` booleans, the circuit.

    Returns:
        *Tensor*: the pruned circuit.
    """
    owner = graph.owner().to(torch.float32)
    edges = in_graph.clone()
    while True:
        outgoing = edges.any(1)
        incoming = (owner @ edges.any(0).to(torch.float32)) > 0
        incoming[0] = True
        nodes = outgoing & incoming
        readers = (nodes.to(torch.float32) @ owner) > 0
        readers[-1] = True
        pruned = edges & nodes[:, None] & readers[None, :]
        if torch.equal(pruned, edges):
            return pruned
        edges = pruned


def auroc(edges: EdgeResult | Tensor, true_circuit: Tensor | Iterable[str]) -> float:
    r"""
    Area under the ROC curve of the edge scores (absolute values) as a
    classifier of the edges of a known circuit, over every real edge (ties
    count half).

    Args:
        edges (EdgeResult or Tensor): Edge scores (an :class:`EdgeResult` or
                    its ``scores``; with a tensor every entry is an edge).
        true_circuit (Tensor or iterable of str): The true circuit: a boolean
                    ``[n_upstream, n_downstream]`` mask or MIB edge names
                    (``"a0.h1->m1"``, ``"input->a1.h0<k>"``).

    Returns:
        *float*: 1 when every true edge outranks every other edge, 0.5 for chance.
    """
    scores = edges.scores if isinstance(edges, EdgeResult) else edges
    real = (
        edges.mask if isinstance(edges, EdgeResult) else torch.ones_like(scores, dtype=torch.bool)
    )
    if isinstance(true_circuit, Tensor):
        truth = true_circuit.to(torch.bool)
    else:
        if not isinstance(edges, EdgeResult):
            raise TypeError("true_circuit as edge names needs an EdgeResult (for the node names).")
        truth = edges.mask_of(true_circuit)
    if truth.shape != scores.shape:
        raise ValueError(
            f"true_circuit has shape {tuple(truth.shape)}, the scores {tuple(scores.shape)}."
        )
    values = scores[real].abs().double()
    labels = truth[real]
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("true_circuit must contain some but not all of the real edges.")
    ranks = rank(values)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


# ------------------------------------------------------------ patched forward


def patched_metrics(
    backend: Backend,
    inputs: dict[str, Tensor],
    metric: Metric,
    source: Tensor,
    cut: Tensor,
    max_batch_size: int = 64,
) -> Tensor:
    r"""
    The metric of the clean run with some edges cut, for several sets of cut
    edges at once (each in its own copy of the batch).

    Args:
        backend (Backend): The model and where its graph is (:func:`backend_of`).
        inputs (dict): The (clean) inputs.
        metric (Callable): ``metric(logits) -> Tensor[batch]``.
        source (Tensor): What a cut edge carries, ``batch x tokens x upstream x hidden``.
        cut (Tensor): ``circuits x n_upstream x n_downstream`` booleans, True
                    for the edges cut in each circuit.
        max_batch_size (int, optional): Rows per forward pass. Default: 64

    Returns:
        *Tensor*: ``circuits x batch``, the metric per circuit and example.
    """
    batch = inputs["input_ids"].shape[0]
    copies = max(1, max_batch_size // batch)
    out = [
        backend.patched_chunk(inputs, metric, source, cut[begin : begin + copies])
        for begin in range(0, cut.shape[0], copies)
    ]
    return torch.cat(out) if out else torch.zeros(0, batch)


def _patched_chunk(
    model: nn.Module,
    sites: EdgeSites,
    inputs: dict[str, Tensor],
    metric: Metric,
    source: Tensor,
    cut: Tensor,
) -> Tensor:
    graph = sites.graph
    copies, batch = cut.shape[0], inputs["input_ids"].shape[0]
    repeated = {k: v.repeat(copies, *[1] * (v.dim() - 1)) for k, v in inputs.items()}
    weights = cut.to(source.device, source.dtype)  # copies x upstream x downstream
    current = torch.zeros(copies, *source.shape, dtype=source.dtype, device=source.device)
    x_reads: dict[int, Tensor] = {}
    mid_reads: dict[int, Tensor] = {}
    busy = [False]
    handles: list[Any] = []

    def shift(downstream: list[int], reads: int) -> tuple[Tensor, Tensor]:
        """The input change of each downstream input, and which copies change."""
        w = weights[:, :reads, downstream]  # copies x reads x k
        diff = source[None, :, :, :reads] - current[:, :, :, :reads]
        return torch.einsum("cbtfh,cfk->cbtkh", diff, w), w.any(1)

    def block_pre(i: int) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = block_input(args, kwargs)
            x_reads[i] = x
            if i == 0:
                current[:, :, :, 0] = x.unflatten(0, (copies, batch))

        return hook

    def projection_hook(i: int, projection: Any) -> Any:
        keys = list(projection.columns)
        downstream = [graph.qkv_index(i, letter, head) for letter, head in keys]

        def hook(_: nn.Module, __: Any, output: Tensor) -> Tensor | None:
            change, changed = shift(downstream, graph.reads(downstream[0]))
            if not bool(changed.any()):
                return None
            norm = sites.layers[i].attention_norm
            x = x_reads[i].unflatten(0, (copies, batch))[:, :, :, None]
            busy[0] = True
            try:
                y = first(norm(x + change))  # copies x batch x tokens x k x hidden
            finally:
                busy[0] = False
            new = output.clone().unflatten(0, (copies, batch))
            bias = getattr(projection.module, "bias", None)
            for j, (letter, head) in enumerate(keys):
                rows = changed[:, j]
                if not bool(rows.any()):
                    continue
                cols = projection.columns[(letter, head)]
                b = None if bias is None else bias[cols]
                values = F.linear(y[rows, :, :, j], projection.weight_rows(letter, head), b)
                new[rows, :, :, cols] = values.to(new.dtype)
            return new.flatten(0, 1)

        return hook

    def heads_pre(i: int) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            out = head_outputs(sites.layers[i].out_proj, args[0], graph.num_heads)
            begin = graph.head_index(i, 0)
            current[:, :, :, begin : begin + graph.num_heads] = out.unflatten(0, (copies, batch))

        return hook

    def mid_pre(i: int) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            if not busy[0] and i not in mid_reads:
                mid_reads[i] = args[0]

        return hook

    def mlp_pre(i: int) -> Any:
        k = graph.mlp_input_index(i)

        def hook(_: nn.Module, args: tuple[Any, ...]) -> Any:
            change, changed = shift([k], graph.reads(k))
            rows = changed[:, 0]
            if not bool(rows.any()):
                return None
            norm = sites.layers[i].mlp_norm
            x = mid_reads[i].unflatten(0, (copies, batch))
            busy[0] = True
            try:
                y = first(norm(x[rows] + change[rows, :, :, 0]))
            finally:
                busy[0] = False
            new = args[0].clone().unflatten(0, (copies, batch))
            new[rows] = y.to(new.dtype)
            return (new.flatten(0, 1), *args[1:])

        return hook

    def mlp_post(i: int) -> Any:
        def hook(_: nn.Module, __: Any, output: Any) -> None:
            m = graph.mlp_index(i)
            current[:, :, :, m] = first(output).unflatten(0, (copies, batch))

        return hook

    def last_hook(_: nn.Module, __: Any, output: Any) -> Any:
        k = graph.n_downstream - 1
        change, changed = shift([k], graph.n_upstream)
        if not bool(changed.any()):
            return None
        hidden = first(output)
        new = (hidden.unflatten(0, (copies, batch)) + change[:, :, :, 0]).flatten(0, 1)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    with hooks(handles):
        for i, layer in enumerate(sites.layers):
            handles.append(layer.block.register_forward_pre_hook(block_pre(i), with_kwargs=True))
            for projection in layer.projections:
                handles.append(
                    projection.module.register_forward_hook(projection_hook(i, projection))
                )
            handles.append(layer.out_proj.register_forward_pre_hook(heads_pre(i)))
            handles.append(layer.mlp_norm.register_forward_pre_hook(mid_pre(i)))
            handles.append(layer.mlp.register_forward_pre_hook(mlp_pre(i)))
            handles.append(layer.mlp.register_forward_hook(mlp_post(i)))
        handles.append(sites.layers[-1].block.register_forward_hook(last_hook))
        output = _metric_input(model(**repeated))
    rows = [
        _checked(metric(_slice_batch(output, slice(j * batch, (j + 1) * batch))), batch)
        for j in range(copies)
    ]
    return torch.stack(rows).detach().cpu().float()


__all__ = [
    "PERCENTAGES",
    "CircuitCurve",
    "area_under",
    "auroc",
    "evaluate_circuits",
    "patched_metrics",
    "prune",
    "top_edges",
]
