"""The figures: comprehensiveness curves and the self-repair panels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from faithfulness_study.evaluation import MethodRecord
from faithfulness_study.self_repair import EVIDENCE_COUNTS, SELF_REPAIR_SCORES, SelfRepairRow
from faithfulness_study.tasks import Benchmark

MAX_CURVE_STEPS = 12


# ----------------------------------------------------------------------- figures


def _curve_matrix(record: MethodRecord, steps: int) -> np.ndarray:
    """Comprehensiveness curves of all examples, cut to ``steps`` steps."""
    return np.stack([curve[:steps] for curve in record.curves])


def curve_steps(records: dict[str, MethodRecord]) -> int:
    r"""Steps every example has (at most ``MAX_CURVE_STEPS``)."""
    shortest = min(curve.size for curve in next(iter(records.values())).curves)
    return min(shortest, MAX_CURVE_STEPS)


def _line_style(name: str) -> dict[str, object]:
    """Line style of a method in the curve figure."""
    if name == "GIM":
        return {"color": "black", "linewidth": 2.5}
    if name.startswith("GIM:"):
        return {"linestyle": "--", "linewidth": 1.2}
    if name == "Random":
        return {"color": "grey", "linestyle": ":", "linewidth": 1.5}
    return {"linewidth": 1.2}


def plot_curves(
    benchmarks: Sequence[tuple[Benchmark, dict[str, MethodRecord]]], path: Path
) -> None:
    r"""
    Mean comprehensiveness curves, one panel per benchmark, written as PNG.

    Args:
        benchmarks (Sequence): Each benchmark with its per-example results.
        path (Path): Output file.
    """
    figure = Figure(figsize=(6.2 * len(benchmarks) + 3.2, 4.8))
    axes = figure.subplots(1, len(benchmarks), squeeze=False)[0]
    for ax, (bench, records) in zip(axes, benchmarks):
        steps = curve_steps(records)
        x = np.arange(1, steps + 1)
        colors = matplotlib.colormaps["tab20"](np.linspace(0, 1, len(records)))
        for color, (name, record) in zip(colors, records.items()):
            style = {"color": color, **_line_style(name)}
            ax.plot(x, _curve_matrix(record, steps).mean(axis=0), label=name, **style)
        ax.set_title(f"{bench.title}\n({len(bench.prompts)} examples)", fontsize=10)
        ax.set_xlabel("top-ranked tokens replaced by the baseline token")
        ax.set_ylabel(f"mean drop of the {bench.score_name}")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    figure.subplots_adjust(left=0.06, right=0.8, bottom=0.12, top=0.86, wspace=0.22)
    figure.savefig(path, dpi=110)


SELF_REPAIR_PANELS = (
    ("precision", "precision at k (k = evidence tokens)"),
    ("concentration", "evidence share of |scores| of inner tokens"),
    ("share", "sum of evidence scores / drop at once"),
)


def plot_self_repair(rows: Sequence[SelfRepairRow], path: Path) -> None:
    r"""
    Grouped bars of the self-repair study, one panel per measure, one group
    per evidence count, one bar per score type; written as PNG.

    Args:
        rows (Sequence[SelfRepairRow]): The summarized study.
        path (Path): Output file.
    """
    figure = Figure(figsize=(15, 4.6))
    panels = figure.subplots(1, len(SELF_REPAIR_PANELS))
    width = 0.84 / len(SELF_REPAIR_SCORES)
    colors = matplotlib.colormaps["tab10"](np.arange(len(SELF_REPAIR_SCORES)))
    for ax, (attr, ylabel) in zip(panels, SELF_REPAIR_PANELS):
        for i, (score, color) in enumerate(zip(SELF_REPAIR_SCORES, colors)):
            selected = [r for r in rows if r.score == score]
            offset = (i - (len(SELF_REPAIR_SCORES) - 1) / 2) * width
            x = np.array([r.count for r in selected]) + offset
            means, errors = zip(*(getattr(r, attr) for r in selected))
            ax.bar(x, means, width, yerr=errors, label=score, color=color, capsize=2)
        ax.set_xticks(list(EVIDENCE_COUNTS))
        ax.set_xlabel("redundant evidence tokens in the prompt")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    panels[-1].axhline(1.0, color="black", linewidth=0.8)
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    figure.suptitle("Self-repair on the bundled model: scores of the evidence tokens")
    figure.subplots_adjust(left=0.05, right=0.99, bottom=0.25, top=0.9, wspace=0.25)
    figure.savefig(path, dpi=110)
