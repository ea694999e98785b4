"""Figures of circuit scores: heatmaps of heads and residual positions, and a
scatter plot of one result against another.

Figures are built with :class:`matplotlib.figure.Figure` directly, so nothing is
registered with ``pyplot`` and they work headless.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

if TYPE_CHECKING:
    from captum_gim.circuits.result import CircuitResult

_HEATMAPS = (("heads", "head"), ("residual", "position"))


def plot_result(
    result: CircuitResult,
    other: CircuitResult | None = None,
    *,
    title: str | None = None,
    dpi: int = 80,
) -> Figure:
    r"""
    Heatmaps (layers x heads, layers x positions) of ``result`` and, with
    ``other``, one scatter plot per shared component type.

    Args:
        result (CircuitResult): The scores to draw.
        other (CircuitResult, optional): Scores to compare with (y axis).
        title (str, optional): Figure title.
        dpi (int, optional): Resolution. Default: 80

    Returns:
        *matplotlib.figure.Figure*: the figure.
    """
    heatmaps = [(kind, label) for kind, label in _HEATMAPS if kind in result.per_example]
    shared = [] if other is None else [k for k in result.per_example if k in other.per_example]
    panels = len(heatmaps) + len(shared)
    if panels == 0:
        raise ValueError(
            f"Nothing to plot: the result has {result.components}; compute 'heads' or "
            "'residual', or pass another result with the same components."
        )
    figure = Figure(figsize=(3.6 * panels, 3.0), dpi=dpi, layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    for ax, (kind, label) in zip(axes, heatmaps):
        scores = result._mean(kind)
        assert scores is not None
        _heatmap(figure, ax, scores, label, f"{result.method}: {kind}")
    for ax, kind in zip(axes[len(heatmaps) :], shared):
        assert other is not None
        _scatter(ax, result, other, kind)
    if title:
        figure.suptitle(title)
    return figure


def _heatmap(figure: Figure, ax: Axes, scores: Tensor, label: str, title: str) -> None:
    from captum_gim.visualization import ATTRIBUTION_CMAP  # Captum's: positive green

    values = scores.detach().float().cpu().numpy()
    limit = float(abs(values).max()) or 1.0
    image = ax.imshow(values, cmap=ATTRIBUTION_CMAP, vmin=-limit, vmax=limit, aspect="auto")
    ax.set_yticks(range(values.shape[0]))
    if values.shape[1] <= 32:
        ax.set_xticks(range(values.shape[1]))
        ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel(label)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    figure.colorbar(image, ax=ax, shrink=0.8)


def _scatter(ax: Axes, result: CircuitResult, other: CircuitResult, kind: str) -> None:
    x, y = result._mean(kind), other._mean(kind)
    assert x is not None and y is not None
    xs, ys = x.reshape(-1).float().cpu().numpy(), y.reshape(-1).float().cpu().numpy()
    ax.scatter(xs, ys, s=10, alpha=0.7)
    low, high = float(min(xs.min(), ys.min())), float(max(xs.max(), ys.max()))
    ax.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel(result.method)
    ax.set_ylabel(other.method)
    ax.set_title(kind, fontsize=9)
