"""Drawing the top edges of a circuit with matplotlib (no graphviz needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from captum_gim.circuits.edge_result import EdgeResult

POSITIVE = "#2ca02c"  # Captum: positive green
NEGATIVE = "#d62728"  # negative red
STYLES: dict[str, Any] = {"q": "-", "k": "--", "v": ":"}


def _position(name: str, num_heads: int) -> tuple[float, float]:
    """(x, y) of a node: layer l's heads on row 2l + 1, its MLP on row 2l + 2."""
    base = name.split("<")[0]
    if base == "input":
        return (num_heads - 1) / 2, 0.0
    if base == "logits":
        return (num_heads - 1) / 2, -1.0  # placed by the caller
    if base.startswith("m"):
        return (num_heads - 1) / 2, 2.0 * int(base[1:]) + 2
    layer, head = base[1:].split(".h")
    return float(head), 2.0 * int(layer) + 1


def draw_edges(
    result: EdgeResult, k: int = 25, *, title: str | None = None, dpi: int = 80
) -> Figure:
    r"""
    Args:
        result (EdgeResult): Edge scores.
        k (int, optional): How many top edges to draw. Default: 25
        title (str, optional): Figure title.
        dpi (int, optional): Resolution. Default: 80

    Returns:
        *matplotlib.figure.Figure*: the drawing.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    num_heads = int(result.config["n_heads"])
    num_layers = int(result.config["n_layers"])
    top = result.top(k)
    largest = max((abs(score) for _, score in top), default=1.0) or 1.0
    top_row = 2.0 * num_layers + 1

    def where(name: str) -> tuple[float, float]:
        x, y = _position(name, num_heads)
        return (x, top_row) if y < 0 else (x, y)

    figure = Figure(figsize=(max(4.0, 1.2 * num_heads + 1), 1.0 + 0.8 * top_row), dpi=dpi)
    axes = figure.add_subplot()
    used: set[str] = {"input", "logits"}
    for name, score in top:
        parent, child = name.split("->")
        used |= {parent, child.split("<")[0]}
        letter = child[-2] if child.endswith(">") else "q"
        (x0, y0), (x1, y1) = where(parent), where(child)
        axes.annotate(
            "",
            xy=(x1, y1),
            xytext=(x0, y0),
            arrowprops=dict(
                arrowstyle="->",
                color=POSITIVE if score > 0 else NEGATIVE,
                linewidth=0.5 + 3.5 * abs(score) / largest,
                linestyle=STYLES[letter] if child.endswith(">") else "-",
                connectionstyle="arc3,rad=0.08",
                shrinkA=9,
                shrinkB=9,
            ),
        )
    for name in sorted(used):
        x, y = where(name)
        axes.text(
            x,
            y,
            name,
            ha="center",
            va="center",
            fontsize=8,
            bbox=dict(boxstyle="round", facecolor="#f0f0f0", edgecolor="black"),
        )
    axes.set_xlim(-0.8, num_heads - 0.2)
    axes.set_ylim(-0.7, top_row + 0.7)
    axes.axis("off")
    legend = [
        Line2D([], [], color=POSITIVE, label="positive score"),
        Line2D([], [], color=NEGATIVE, label="negative score"),
        *(
            Line2D([], [], color="black", linestyle=s, label=f"<{c}> input")
            for c, s in STYLES.items()
        ),
    ]
    axes.legend(handles=legend, fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.set_title(title or f"Top {len(top)} edges ({result.method})")
    figure.tight_layout()
    return figure
