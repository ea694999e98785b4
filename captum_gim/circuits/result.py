"""The result of attribution or activation patching, and scoring one against another."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: How each component type indexes its scores after the layer.
INDEX_NAMES = {"heads": "head", "mlps": None, "residual": "position", "neurons": "neuron"}


@dataclass
class CircuitResult:
    r"""
    Scores of a model's components: the estimated (attribution patching) or
    exact (activation patching) change of the metric when one component's clean
    activation is patched into the corrupted run.

    The properties average over the examples of the batch; ``per_example`` holds
    the scores of each example (batch first).

    Attributes:
        method (str): ``"gim"``, ``"atp"``, ``"atp*"`` or ``"activation_patching"``.
        per_example (dict[str, Tensor]): Scores by component type, batch first:
                    ``heads`` batch x layers x heads, ``mlps`` batch x layers,
                    ``residual`` batch x (layers + 1) x positions, ``neurons``
                    batch x layers x MLP width.
        clean_metric (Tensor): The metric of the clean run, per example.
        corrupted_metric (Tensor): The metric of the corrupted run, per example.
        seconds (float): Wall time of the call.
    """

    method: str
    per_example: dict[str, Tensor]
    clean_metric: Tensor
    corrupted_metric: Tensor
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def _mean(self, kind: str) -> Tensor | None:
        scores = self.per_example.get(kind)
        return None if scores is None else scores.mean(0)

    @property
    def heads(self) -> Tensor | None:
        r"""*Tensor or None*: layers x heads (the input of each attention output
        projection, split by head), or None when not computed."""
        return self._mean("heads")

    @property
    def mlps(self) -> Tensor | None:
        r"""*Tensor or None*: one score per layer's MLP output."""
        return self._mean("mlps")

    @property
    def residual(self) -> Tensor | None:
        r"""*Tensor or None*: (layers + 1) x positions; row 0 is the embedding
        output (the input of the first block), row ``l + 1`` the output of block ``l``."""
        return self._mean("residual")

    @property
    def neurons(self) -> Tensor | None:
        r"""*Tensor or None*: layers x MLP width (the input of each MLP's down
        projection), when ``"neurons"`` was among the components."""
        return self._mean("neurons")

    @property
    def components(self) -> tuple[str, ...]:
        r"""*tuple[str, ...]*: the component types that were scored."""
        return tuple(self.per_example)

    def to_records(self) -> list[dict[str, Any]]:
        r"""
        Returns:
            *list[dict]*: one row per component, ``{"method", "component",
            "layer", "index", "score"}`` with the batch-mean score; ``index`` is
            the head, position or neuron (``None`` for MLPs).

        Examples::

            >>> rows = result.to_records()
            >>> max(rows, key=lambda row: abs(row["score"]))
        """
        rows: list[dict[str, Any]] = []
        for kind in self.per_example:
            scores = self._mean(kind)
            assert scores is not None
            if scores.dim() == 1:
                scores = scores[:, None]
            for layer in range(scores.shape[0]):
                for index in range(scores.shape[1]):
                    rows.append(
                        {
                            "method": self.method,
                            "component": kind,
                            "layer": layer,
                            "index": None if INDEX_NAMES[kind] is None else index,
                            "score": float(scores[layer, index]),
                        }
                    )
        return rows

    def plot(
        self, other: CircuitResult | None = None, *, title: str | None = None, dpi: int = 80
    ) -> Figure:
        r"""
        Draws heatmaps of the head scores (layers x heads) and the residual
        scores (layers x positions) and, with ``other``, one scatter plot per
        component type of these scores against ``other``'s.

        Args:
            other (CircuitResult, optional): Scores to compare with, usually
                        activation patching.
            title (str, optional): Figure title.
            dpi (int, optional): Resolution of the figure. Default: 80

        Returns:
            *matplotlib.figure.Figure*: the figure.
        """
        from captum_gim.circuits.plot import plot_result

        return plot_result(self, other, title=title, dpi=dpi)


def correlation(a: CircuitResult, b: CircuitResult) -> dict[str, dict[str, float]]:
    r"""
    Pearson and Spearman correlation of two results, per component type, over
    the batch-mean scores of every component both results have.

    Args:
        a (CircuitResult): e.g. attribution patching with GIM.
        b (CircuitResult): e.g. activation patching.

    Returns:
        *dict[str, dict[str, float]]*: ``{"heads": {"pearson": r, "spearman":
        rho, "n": count}, ...}``; ``nan`` where a result is constant.

    Examples::

        >>> from captum_gim.circuits import correlation
        >>> correlation(gim_result, patching_result)["heads"]["pearson"]
    """
    out: dict[str, dict[str, float]] = {}
    for kind in a.per_example:
        if kind not in b.per_example:
            continue
        x, y = a._mean(kind), b._mean(kind)
        assert x is not None and y is not None
        if x.shape != y.shape:
            raise ValueError(
                f"The {kind} scores have shapes {tuple(x.shape)} and {tuple(y.shape)}; "
                "compare results of the same model and inputs."
            )
        x, y = x.reshape(-1).double(), y.reshape(-1).double()
        out[kind] = {
            "pearson": pearson(x, y),
            "spearman": pearson(rank(x), rank(y)),
            "n": float(x.numel()),
        }
    return out


def pearson(x: Tensor, y: Tensor) -> float:
    r"""Pearson correlation of two 1-D tensors (``nan`` when one is constant)."""
    x, y = x - x.mean(), y - y.mean()
    denominator = float(x.norm() * y.norm())
    return float((x * y).sum()) / denominator if denominator > 0 else float("nan")


def rank(x: Tensor) -> Tensor:
    r"""Ranks from 1, ties getting their average rank (as Spearman's rho needs)."""
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    average = ends - (counts.to(torch.float64) - 1) / 2
    del values
    return average[inverse]
