"""Edge scores on MIB's graph, and MIB's JSON graph format."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from captum_gim.circuits.graph import Graph


@dataclass
class EdgeResult:
    r"""
    Scores of the edges of MIB's circuit graph.

    Attributes:
        method (str): The scoring method (``"gim"``, ``"eap"``, ...).
        upstream (list[str]): Upstream node names in MIB's order (``input``,
                    ``a{l}.h{h}``, ``m{l}``).
        downstream (list[str]): Downstream input names in MIB's order
                    (``a{l}.h{h}<q>``/``<k>``/``<v>``, ``m{l}``, ``logits``).
        scores (Tensor): ``[len(upstream), len(downstream)]``, the batch-mean
                    score of each edge; 0 where there is no edge.
        mask (Tensor): The same shape, True where an edge exists.
        per_example (Tensor or None): ``batch x ...`` scores, on request.
        node_scores (Tensor or None): One score per upstream node (``level="node"``).
        neuron_scores (Tensor or None): ``[len(upstream), hidden]`` (``level="neuron"``).
        level (str): ``"edge"``, ``"node"`` or ``"neuron"``.
        config (dict): MIB's ``cfg``: ``n_layers``, ``n_heads``,
                    ``parallel_attn_mlp``, ``d_model``.
        clean_metric (Tensor or None): The metric of the clean run, per example.
        corrupted_metric (Tensor or None): The metric of the corrupted run.
        seconds (float): Wall time of the call.
    """

    method: str
    upstream: list[str]
    downstream: list[str]
    scores: Tensor
    mask: Tensor
    per_example: Tensor | None = None
    node_scores: Tensor | None = None
    neuron_scores: Tensor | None = None
    level: str = "edge"
    config: dict[str, Any] = field(default_factory=dict)
    clean_metric: Tensor | None = None
    corrupted_metric: Tensor | None = None
    seconds: float = 0.0

    @property
    def graph(self) -> Graph:
        r"""*Graph*: the graph the scores belong to."""
        from captum_gim.circuits.graph import Graph

        return Graph(
            int(self.config["n_layers"]),
            int(self.config["n_heads"]),
            bool(self.config.get("parallel_attn_mlp", False)),
        )

    def edge_name(self, upstream: int, downstream: int) -> str:
        r"""MIB's name of an edge, e.g. ``"a0.h1->a1.h0<q>"``."""
        return f"{self.upstream[upstream]}->{self.downstream[downstream]}"

    def edge_names(self) -> list[str]:
        r"""*list[str]*: MIB's names of the real edges, row by row."""
        return [self.edge_name(u, d) for u, d in self.mask.nonzero().tolist()]

    def mask_of(self, names: Any) -> Tensor:
        r"""
        Args:
            names (iterable of str): MIB edge names.

        Returns:
            *Tensor*: a boolean mask of those edges.
        """
        index = {self.edge_name(u, d): (u, d) for u, d in self.mask.nonzero().tolist()}
        mask = torch.zeros_like(self.mask)
        for name in names:
            if name not in index:
                raise ValueError(
                    f"{name!r} is not an edge of this graph (e.g. {next(iter(index))!r})."
                )
            mask[index[name]] = True
        return mask

    def top(self, k: int = 10, absolute: bool = True) -> list[tuple[str, float]]:
        r"""
        Args:
            k (int, optional): How many edges. Default: 10
            absolute (bool, optional): Rank by absolute score. Default: True

        Returns:
            *list[tuple[str, float]]*: the ``k`` top edges with their scores.

        Examples::

            >>> edges.top(3)
            [('a1.h0->logits', -2.1), ...]
        """
        ranked = self.scores.abs() if absolute else self.scores
        ranked = ranked.to(torch.float64).masked_fill(~self.mask, -torch.inf)
        order = torch.argsort(ranked.reshape(-1), descending=True, stable=True)[:k]
        width = self.scores.shape[1]
        return [
            (self.edge_name(int(i) // width, int(i) % width), float(self.scores.reshape(-1)[i]))
            for i in order
        ]

    def to_mib(self, path: str | Path | None = None, top_n: int | None = None) -> dict[str, Any]:
        r"""
        The scores in MIB's JSON graph format (``eap.graph.Graph.to_json``), so
        that MIB's own code can evaluate them (``Graph.from_json``).

        Args:
            path (str or Path, optional): Also write the JSON there.
            top_n (int, optional): Mark only the top ``top_n`` edges (by absolute
                        score, pruned as MIB prunes) as in the graph; by default
                        every edge and node is in the graph.

        Returns:
            *dict*: ``{"cfg", "nodes", "edges"}``.
        """
        from captum_gim.circuits.evaluation import prune, top_edges

        in_graph = self.mask
        if top_n is not None:
            in_graph = prune(self.graph, top_edges(self.scores, self.mask, top_n))
        outgoing = in_graph.any(1)
        nodes: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(self.upstream):
            nodes[name] = {"in_graph": bool(outgoing[i])}
            if self.node_scores is not None:
                nodes[name]["score"] = float(self.node_scores[i])
            if self.neuron_scores is not None:
                nodes[name]["neurons_scores"] = self.neuron_scores[i].tolist()
        nodes["logits"] = {"in_graph": True}
        edges = {
            self.edge_name(u, d): {
                "score": float(self.scores[u, d]),
                "in_graph": bool(in_graph[u, d]),
            }
            for u, d in self.mask.nonzero().tolist()
        }
        data = {"cfg": dict(self.config), "nodes": nodes, "edges": edges}
        if path is not None:
            Path(path).write_text(json.dumps(data), encoding="utf-8")
        return data

    @classmethod
    def from_mib(cls, data: dict[str, Any] | str | Path, method: str = "mib") -> EdgeResult:
        r"""
        Reads edge scores in MIB's JSON graph format (a dict or a file path).

        Args:
            data (dict, str or Path): The graph, as :meth:`to_mib` or MIB writes it.
            method (str, optional): The name the result carries. Default: ``"mib"``

        Returns:
            *EdgeResult*: the scores (0 for edges the file does not list).
        """
        from captum_gim.circuits.graph import Graph

        if not isinstance(data, dict):
            data = dict(json.loads(Path(data).read_text(encoding="utf-8")))
        assert isinstance(data, dict)
        missing = {"cfg", "edges"} - set(data)
        if missing:
            raise ValueError(f"Not a MIB graph: missing {sorted(missing)}.")
        cfg = data["cfg"]
        graph = Graph(int(cfg["n_layers"]), int(cfg["n_heads"]), bool(cfg.get("parallel_attn_mlp")))
        result = cls(
            method=method,
            upstream=graph.upstream,
            downstream=graph.downstream,
            scores=torch.zeros(graph.n_upstream, graph.n_downstream),
            mask=graph.real_edges(),
            config=dict(cfg),
        )
        index = {result.edge_name(u, d): (u, d) for u, d in result.mask.nonzero().tolist()}
        for name, info in data["edges"].items():
            if name not in index:
                raise ValueError(f"Edge {name!r} is not in a graph with config {cfg}.")
            result.scores[index[name]] = float(info.get("score") or 0.0)
        nodes = data.get("nodes", {})
        if nodes and all("score" in nodes.get(n, {}) for n in result.upstream):
            result.node_scores = torch.tensor([float(nodes[n]["score"]) for n in result.upstream])
        return result

    def plot(self, k: int = 25, *, title: str | None = None, dpi: int = 80) -> Figure:
        r"""
        Draws the ``k`` top edges (by absolute score) on the graph's layout:
        the input at the bottom, the logits at the top, heads and MLPs by layer;
        green for positive scores and red for negative (Captum's colours), line
        width by absolute score; q, k and v inputs as solid, dashed and dotted lines.

        Returns:
            *matplotlib.figure.Figure*: the figure.
        """
        from captum_gim.circuits.drawing import draw_edges

        return draw_edges(self, k, title=title, dpi=dpi)
