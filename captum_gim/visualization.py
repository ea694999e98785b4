"""Token heatmaps for attributions of language models, drawn with matplotlib.

* :func:`plot_token_heatmap` draws one text as coloured tokens, wrapped like prose.
* :func:`plot_methods_side_by_side` stacks the same text once per attribution method, so
  that GIM can be compared with Captum's methods token by token.
* :func:`plot_token_matrix` draws a prompt-token by generated-token matrix, as Captum's
  ``LLMAttributionResult.plot_token_attr`` does, but returns the figure.
* :func:`save_figure` writes a figure as PNG, SVG, PDF or a self-contained HTML page.
* :func:`token_html` / :func:`write_token_html` write the tokens as coloured text in a
  self-contained HTML page, one row per target and the value of each token on hover.

All plots and pages use one colour convention, Captum's: positive attributions are
green, negative ones red, zero white (:data:`ATTRIBUTION_CMAP`), so the same scores look
the same here and in Captum's ``visualize_text`` and ``plot_token_attr``. Figures are built with
:class:`matplotlib.figure.Figure` directly, so nothing is registered with ``pyplot``,
nothing is shown, and the functions work headless and in loops without leaking figures.
Text falls back glyph by glyph to an installed CJK font (Noto Sans CJK, WenQuanYi, ...),
so Chinese, Japanese and Korean tokens are drawn; without one a warning says so, once.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, LinearSegmentedColormap, Normalize, to_hex
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Rectangle
from matplotlib.textpath import TextToPath

from captum_gim._fonts import families, warn_if_unrenderable
from captum_gim.text import cell_width, decode_markers, display_token, shorten

__all__ = [
    "plot_methods_side_by_side",
    "plot_token_heatmap",
    "plot_token_matrix",
    "save_figure",
    "token_html",
    "token_lines_html",
    "write_token_html",
]

#: One value per token: a tensor, a numpy array or a sequence of floats.
AttributionLike = torch.Tensor | np.ndarray | Sequence[float]

_SUPPORTED_SUFFIXES = (".png", ".svg", ".pdf", ".html")
# Matrices with at most this many cells get their values written into the cells.
_MAX_ANNOTATED_CELLS = 300
_MAX_TICK_LABEL_CHARS = 24
_DEFAULT_WRAP_WIDTH = 80

# Geometry of the text heatmaps, in units of the font size (1 em = fontsize points).
_LINE_HEIGHT_EM = 1.6  # distance between two lines of tokens
_BOX_HEIGHT = 0.85  # height of a token's box, as a fraction of the line height
_BOX_PAD = 0.15  # blank space inside a box on each side of its text, in characters
_BOX_GAP = 0.12  # blank space between two boxes, in characters
_MARGIN_IN = 0.3  # left and right figure margins, in inches
_TOP_IN = 0.15  # top figure margin, in inches
_ROW_GAP_IN = 0.1  # space between the rows of plot_methods_side_by_side, in inches

#: The colour map of every plot and page: red for negative, white for zero, green for
#: positive attributions, as Captum's ``visualize_text`` and ``plot_token_attr`` show them.
ATTRIBUTION_CMAP = LinearSegmentedColormap.from_list("RdWhGn", ["red", "white", "green"])


# --------------------------------------------------------------------------- inputs


def _check_tokens(name: str, tokens: Sequence[str]) -> list[str]:
    if isinstance(tokens, str):
        raise TypeError(
            f"{name} must be a sequence of token strings, not one str; pass the tokens, "
            "e.g. tokenizer.convert_ids_to_tokens(input_ids[0])."
        )
    tokens = list(tokens)
    if not tokens:
        raise ValueError(f"{name} is empty; pass at least one token.")
    bad = [type(t).__name__ for t in tokens if not isinstance(t, str)]
    if bad:
        raise TypeError(
            f"{name} must contain str tokens, got {bad[0]}; convert ids to tokens first, "
            "e.g. tokenizer.convert_ids_to_tokens(ids)."
        )
    return tokens


def _as_array(
    name: str, values: AttributionLike | Sequence[Sequence[float]], ndim: int
) -> np.ndarray:
    """Converts ``values`` to a float array with ``ndim`` dimensions.

    Leading dimensions of size one (a batch of one) are dropped.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(values, dtype=np.float64)
    shape = tuple(array.shape)
    while array.ndim > ndim and array.shape[0] == 1:
        array = array[0]
    if array.ndim != ndim:
        hint = (
            "one value per token; sum over the embedding dimension and drop the batch "
            "dimension first, e.g. attributions.sum(-1)[0]"
            if ndim == 1
            else "one row per generated token and one column per prompt token"
        )
        raise ValueError(f"{name} must be {ndim}-D ({hint}), got shape {shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values; replace them first.")
    return array


def _check_length(name: str, values: np.ndarray, tokens: Sequence[str]) -> None:
    if len(values) != len(tokens):
        raise ValueError(
            f"{name} has {len(values)} values but tokens has {len(tokens)}; pass exactly "
            "one attribution per token (drop special tokens from both, or from neither)."
        )


def _symmetric_norm(values: np.ndarray, max_abs: float | None) -> Normalize:
    if max_abs is None:
        max_abs = float(np.abs(values).max()) if values.size else 0.0
        max_abs = max_abs if max_abs > 0 else 1.0
    elif not max_abs > 0:
        raise ValueError(f"max_abs must be positive, got {max_abs}.")
    return Normalize(vmin=-max_abs, vmax=max_abs)


def _colormap(cmap: str | Colormap) -> Colormap:
    return matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap


def _text_color(face: tuple[float, ...]) -> str:
    luminance = 0.299 * face[0] + 0.587 * face[1] + 0.114 * face[2]
    return "white" if luminance < 0.5 else "black"


def _root_figure(ax: Axes) -> Figure:
    figure = ax.figure
    while not isinstance(figure, Figure):  # a SubFigure: climb to the real figure
        figure = figure.figure
    return figure


# --------------------------------------------------------------------------- tokens


@lru_cache(maxsize=32)
def _char_width_in(fontsize: float) -> float:
    """Advance of one character of the monospace font, in inches."""
    font = FontProperties(family="monospace", size=fontsize)
    width, _, _ = TextToPath().get_text_width_height_descent("0" * 100, font, False)
    return width / 100 / 72


@dataclass(frozen=True)
class _TokenLayout:
    """Where each token goes, in character cells (x) and lines (y)."""

    labels: list[str]
    x: list[float]
    width: list[float]
    line: list[int]
    n_lines: int
    wrap_width: int


def _layout_tokens(tokens: Sequence[str], wrap_width: int) -> _TokenLayout:
    warn_if_unrenderable(tokens)
    if wrap_width < 4:
        raise ValueError(f"wrap_width must be at least 4 characters, got {wrap_width}.")
    labels, xs, widths, lines = [], [], [], []
    x, line = 0.0, 0
    for token in tokens:
        label = shorten(display_token(token), wrap_width - 1)
        width = cell_width(label) + 2 * _BOX_PAD
        if x > 0 and x + width > wrap_width:
            x, line = 0.0, line + 1
        labels.append(label)
        xs.append(x)
        widths.append(width)
        lines.append(line)
        x += width + _BOX_GAP
        if "\n" in decode_markers(token):  # keep the text's own line breaks
            x, line = 0.0, line + 1
    n_lines = lines[-1] + 1
    return _TokenLayout(labels, xs, widths, lines, n_lines, wrap_width)


def _draw_tokens(
    ax: Axes,
    layout: _TokenLayout,
    values: np.ndarray,
    norm: Normalize,
    cmap: Colormap,
    fontsize: float,
) -> None:
    """Draws one coloured box per token into ``ax``, in character and line units."""
    top = (1 - _BOX_HEIGHT) / 2
    faces = cmap(norm(values))
    for i, (label, x, width, line, face) in enumerate(
        zip(layout.labels, layout.x, layout.width, layout.line, faces)
    ):
        box = Rectangle((x, line + top), width, _BOX_HEIGHT, facecolor=face, lw=0)
        box.set_gid(f"token-{i}")
        ax.add_artist(box)  # not add_patch: the limits are set below, once
        ax.text(
            x + _BOX_PAD,
            line + 0.5,
            label,
            family=families("monospace"),
            fontsize=fontsize,
            color=_text_color(face),
            va="center_baseline",
            ha="left",
        )
    ax.set_xlim(0, layout.wrap_width)
    ax.set_ylim(layout.n_lines, 0)
    ax.set_axis_off()


def _plot_rows(
    layout: _TokenLayout,
    rows: Sequence[tuple[str | None, np.ndarray]],
    norm: Normalize,
    cmap: Colormap,
    fontsize: float,
    title: str | None,
    colorbar_label: str,
) -> Figure:
    """A figure sized in inches so one x unit is one character and one y unit a line."""
    em = fontsize / 72
    line_h = _LINE_HEIGHT_EM * em
    width_in = layout.wrap_width * _char_width_in(fontsize)
    label_h = 1.8 * em
    title_h = 2.6 * em if title else 0.0
    cbar_h = 0.12
    bottom_h = 0.2 + cbar_h + 3.2 * em
    rows_h = [(label_h if label else 0.0) + layout.n_lines * line_h for label, _ in rows]
    fig_w = width_in + 2 * _MARGIN_IN
    fig_h = _TOP_IN + title_h + sum(rows_h) + _ROW_GAP_IN * (len(rows) - 1) + bottom_h
    fig = Figure(figsize=(fig_w, fig_h))
    if title:
        fig.text(
            0.5,
            1 - _TOP_IN / fig_h,
            title,
            ha="center",
            va="top",
            fontsize=1.2 * fontsize,
            fontweight="bold",
            family=families("sans-serif"),
        )
    y_top = fig_h - _TOP_IN - title_h  # inches from the bottom edge
    for (label, values), row_h in zip(rows, rows_h):
        axes_h = layout.n_lines * line_h
        ax = fig.add_axes(
            (
                _MARGIN_IN / fig_w,
                (y_top - row_h) / fig_h,
                width_in / fig_w,
                axes_h / fig_h,
            )
        )
        if label:
            ax.set_title(
                label,
                loc="left",
                fontsize=fontsize,
                fontweight="bold",
                pad=2,
                family=families("sans-serif"),
            )
        _draw_tokens(ax, layout, values, norm, cmap, fontsize)
        y_top -= row_h + _ROW_GAP_IN
    cbar_w = min(width_in, 4.0)
    cax = fig.add_axes(
        (
            (fig_w - cbar_w) / 2 / fig_w,
            (bottom_h - 0.15 - cbar_h) / fig_h,
            cbar_w / fig_w,
            cbar_h / fig_h,
        )
    )
    cbar = fig.colorbar(ScalarMappable(norm, cmap), cax=cax, orientation="horizontal")
    cbar.ax.tick_params(labelsize=0.85 * fontsize)
    cbar.set_label(colorbar_label, fontsize=0.9 * fontsize)
    return fig


# --------------------------------------------------------------------------- public


def plot_token_heatmap(
    tokens: Sequence[str],
    attributions: AttributionLike,
    *,
    title: str | None = None,
    ax: Axes | None = None,
    cmap: str | Colormap = ATTRIBUTION_CMAP,
    max_abs: float | None = None,
    wrap_width: int | None = None,
    fontsize: float = 10.0,
) -> Figure:
    r"""
    Draws one text as a row of coloured tokens, wrapped onto lines like prose.

    Each token is a box coloured by its attribution on a diverging colour map centred on
    zero (green for positive and red for negative by default), with a colour bar
    below. Subword markers are turned back into text: ``"Ġ"`` and ``"▁"`` become spaces,
    ``"Ċ"`` and ``<0x0A>`` newlines, and the WordPiece prefix ``"##"`` is dropped. Tokens
    that would be invisible are marked: ``"∅"`` for an empty token, ``"␣"`` for a space,
    ``"⇥"`` for a tab and ``"⏎"`` for a newline, after which the text continues on a new
    line. The figure's height grows with the number of wrapped lines, so long texts
    (hundreds of tokens) stay readable.

    Args:

        tokens (Sequence[str]): The tokens, as the tokenizer spells them, e.g. from
                    ``tokenizer.convert_ids_to_tokens(input_ids[0])``.
        attributions (Tensor, np.ndarray or Sequence[float]): One attribution per token,
                    shape ``(len(tokens),)``. Leading dimensions of size one (a batch of
                    one) are dropped; sum over the embedding dimension before calling.
        title (str, optional): Title drawn above the text.
                    Default: None
        ax (Axes, optional): Axes to draw into. The figure then keeps its size, the
                    colour bar takes space from ``ax``, and lines are as wide as ``ax``
                    unless ``wrap_width`` is given; make ``ax`` tall enough for all the
                    lines. If None, a new figure sized to the text is created.
                    Default: None
        cmap (str or Colormap, optional): A diverging colour map.
                    Default: :data:`ATTRIBUTION_CMAP` (red, white, green)
        max_abs (float, optional): Attribution mapped to the ends of the colour map, as
                    ``[-max_abs, max_abs]``. Use the same value for several plots to make
                    their colours comparable. If None, the largest absolute attribution.
                    Default: None
        wrap_width (int, optional): Maximum length of a line, in characters. If None,
                    80, or as many as fit in the width of ``ax`` when it is given.
                    Default: None
        fontsize (float, optional): Font size of the tokens, in points.
                    Default: 10.0

    Returns:
        *Figure*:
        - The figure, neither shown nor registered with ``pyplot``. Save it with
          :func:`save_figure` or ``fig.savefig``.

    Examples::

        >>> from captum_gim.visualization import plot_token_heatmap, save_figure
        >>> tokens = ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
        >>> fig = plot_token_heatmap(tokens, [0.1, 0.2, -0.05, 0.9, 0.0],
        ...                          title="GIM")
        >>> path = save_figure(fig, "heatmap.png")
    """
    tokens = _check_tokens("tokens", tokens)
    values = _as_array("attributions", attributions, ndim=1)
    _check_length("attributions", values, tokens)
    norm = _symmetric_norm(values, max_abs)
    colormap = _colormap(cmap)
    if ax is None:
        layout = _layout_tokens(tokens, wrap_width or _DEFAULT_WRAP_WIDTH)
        return _plot_rows(layout, [(None, values)], norm, colormap, fontsize, title, "Attribution")
    fig = _root_figure(ax)
    char_w = _char_width_in(fontsize)
    if wrap_width is None:
        axes_width_in = ax.get_position().width * fig.get_figwidth()
        wrap_width = max(4, int(axes_width_in / char_w))
    layout = _layout_tokens(tokens, wrap_width)
    _draw_tokens(ax, layout, values, norm, colormap, fontsize)
    if title:
        ax.set_title(
            title, fontsize=1.2 * fontsize, fontweight="bold", family=families("sans-serif")
        )
    cbar = fig.colorbar(ScalarMappable(norm, colormap), ax=ax, orientation="horizontal", shrink=0.6)
    cbar.set_label("Attribution")
    # Keep the proportions of text (an x unit is a character, a y unit is a line), with
    # the text at the top of the axes.
    ax.set_aspect(_LINE_HEIGHT_EM * fontsize / 72 / char_w, anchor="N")
    return fig


def plot_methods_side_by_side(
    tokens: Sequence[str],
    attributions_by_method: Mapping[str, AttributionLike],
    *,
    normalize: bool = True,
    title: str | None = None,
    cmap: str | Colormap = ATTRIBUTION_CMAP,
    wrap_width: int = 80,
    fontsize: float = 10.0,
) -> Figure:
    r"""
    Draws the same text once per attribution method, one method per row.

    Every row uses the token layout of :func:`plot_token_heatmap`, and the layout is
    identical across rows, so a token is at the same place in each one. This makes it
    easy to compare, e.g., GIM with Captum's ``Saliency`` or ``IntegratedGradients``.

    Args:

        tokens (Sequence[str]): The tokens, as the tokenizer spells them.
        attributions_by_method (Mapping[str, Tensor, np.ndarray or Sequence[float]]):
                    For each method name (the row's label, in mapping order), one
                    attribution per token, shape ``(len(tokens),)``; leading dimensions
                    of size one are dropped.
        normalize (bool, optional): If True, each method's attributions are divided by
                    their own largest absolute value, so every row spans ``[-1, 1]``;
                    use it when the methods have different scales. If False, all rows
                    share the colour scale of the largest absolute attribution overall.
                    Default: True
        title (str, optional): Title drawn above the rows.
                    Default: None
        cmap (str or Colormap, optional): A diverging colour map.
                    Default: :data:`ATTRIBUTION_CMAP` (red, white, green)
        wrap_width (int, optional): Maximum length of a line, in characters.
                    Default: 80
        fontsize (float, optional): Font size of the tokens, in points.
                    Default: 10.0

    Returns:
        *Figure*:
        - The figure, one row of tokens per method and one shared colour bar.

    Examples::

        >>> import torch
        >>> from captum_gim.visualization import plot_methods_side_by_side
        >>> tokens = ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
        >>> fig = plot_methods_side_by_side(tokens, {
        ...     "GIM": torch.tensor([0.1, 0.2, -0.05, 0.9, 0.0]),
        ...     "Saliency": [0.3, 0.1, 0.1, 0.5, 0.2],
        ... })
    """
    tokens = _check_tokens("tokens", tokens)
    if not attributions_by_method:
        raise ValueError(
            "attributions_by_method is empty; pass a mapping such as "
            "{'GIM': attributions, 'Saliency': other_attributions}."
        )
    rows = []
    for method, attributions in attributions_by_method.items():
        name = f"attributions_by_method[{method!r}]"
        values = _as_array(name, attributions, ndim=1)
        _check_length(name, values, tokens)
        if normalize:
            values = values / max(float(np.abs(values).max()), np.finfo(float).tiny)
        rows.append((str(method), values))
    if normalize:
        norm = Normalize(vmin=-1.0, vmax=1.0)
        label = "Attribution / max |attribution| of the method"
    else:
        norm = _symmetric_norm(np.concatenate([v for _, v in rows]), None)
        label = "Attribution"
    layout = _layout_tokens(tokens, wrap_width)
    return _plot_rows(layout, rows, norm, _colormap(cmap), fontsize, title, label)


def plot_token_matrix(
    input_tokens: Sequence[str],
    output_tokens: Sequence[str],
    matrix: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
    *,
    title: str | None = None,
    ax: Axes | None = None,
    cmap: str | Colormap = ATTRIBUTION_CMAP,
    max_abs: float | None = None,
    annotate: bool | None = None,
    fmt: str = ".2f",
    fontsize: float = 9.0,
    row_label: str = "Target token",
) -> Figure:
    r"""
    Draws the attribution of each target token to each prompt token as a matrix.

    Rows are target (given or generated) tokens and columns prompt tokens, as in Captum's
    ``LLMAttributionResult.token_attr``. Prompt tokens are written vertically below the
    matrix so that long prompts stay legible, and the figure grows with the number of
    tokens. Tokens are shown as in :func:`plot_token_heatmap` (markers decoded, invisible
    tokens marked) and shortened to 24 characters.

    Args:

        input_tokens (Sequence[str]): The prompt tokens, one per column.
        output_tokens (Sequence[str]): The target (given or generated) tokens, one per row.
        matrix (Tensor, np.ndarray or nested sequence): Attributions of shape
                    ``(len(output_tokens), len(input_tokens))``, e.g.
                    ``LLMAttributionResult.token_attr``. Leading dimensions of size one
                    are dropped.
        title (str, optional): Title drawn above the matrix.
                    Default: None
        ax (Axes, optional): Axes to draw into; the figure then keeps its size. If None,
                    a new figure sized to the matrix is created.
                    Default: None
        cmap (str or Colormap, optional): A diverging colour map.
                    Default: :data:`ATTRIBUTION_CMAP` (red, white, green)
        max_abs (float, optional): Attribution mapped to the ends of the colour map, as
                    ``[-max_abs, max_abs]``. If None, the largest absolute attribution.
                    Default: None
        annotate (bool, optional): Whether to write each value into its cell. If None,
                    values are written only when the matrix has at most 300 cells.
                    Default: None
        fmt (str, optional): Format specification of the written values.
                    Default: ``".2f"``
        fontsize (float, optional): Font size of the labels, in points.
                    Default: 9.0
        row_label (str, optional): The label of the rows' axis, e.g.
                    ``"Generated token"`` for a generation.
                    Default: ``"Target token"``

    Returns:
        *Figure*:
        - The figure with the matrix and a colour bar.

    Examples::

        >>> from captum.attr import LLMAttributionResult
        >>> from captum_gim.visualization import plot_token_matrix
        >>> result = LLMAttributionResult(
        ...     input_tokens=["Paris", "Ġis", "Ġin"], output_tokens=["ĠFrance", "."],
        ...     seq_attr=[0.5, 0.1, 0.3], token_attr=[[0.5, 0.1, 0.3], [0.0, 0.2, -0.1]])
        >>> fig = plot_token_matrix(result.input_tokens, result.output_tokens,
        ...                         result.token_attr)
    """
    input_tokens = _check_tokens("input_tokens", input_tokens)
    output_tokens = _check_tokens("output_tokens", output_tokens)
    data = _as_array("matrix", matrix, ndim=2)
    expected = (len(output_tokens), len(input_tokens))
    if data.shape != expected:
        fix = (
            "transpose it (matrix.T)"
            if data.shape == expected[::-1]
            else "pass the tokens the matrix was computed for"
        )
        raise ValueError(
            f"matrix has shape {data.shape} but (len(output_tokens), len(input_tokens)) "
            f"is {expected}: rows are generated tokens and columns prompt tokens; {fix}."
        )
    norm = _symmetric_norm(data, max_abs)
    colormap = _colormap(cmap)
    if annotate is None:
        annotate = data.size <= _MAX_ANNOTATED_CELLS
    x_labels = [shorten(display_token(t), _MAX_TICK_LABEL_CHARS) for t in input_tokens]
    y_labels = [shorten(display_token(t), _MAX_TICK_LABEL_CHARS) for t in output_tokens]

    if ax is None:
        em = fontsize / 72
        char_w = 0.62 * em  # a generous average width of the sans-serif tick labels
        cell_h = max(1.8 * em, 0.2)
        widest = format(-(norm.vmax or 0.0), fmt)  # the longest value annotation
        cell_w = max(cell_h, (len(widest) + 1) * char_w) if annotate else cell_h
        left = 0.5 + char_w * max(cell_width(s) for s in y_labels)
        bottom = 0.6 + char_w * max(cell_width(s) for s in x_labels)
        width = max(4.0, left + cell_w * data.shape[1] + 1.4)
        height = max(3.0, bottom + cell_h * data.shape[0] + (0.6 if title else 0.3))
        fig = Figure(figsize=(width, height), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = _root_figure(ax)
    image = ax.imshow(data, cmap=colormap, norm=norm, aspect="auto", interpolation="nearest")
    warn_if_unrenderable([*x_labels, *y_labels, title or ""])
    font = families("sans-serif")
    ax.set_xticks(
        np.arange(data.shape[1]), labels=x_labels, rotation=90, fontsize=fontsize, family=font
    )
    ax.set_yticks(np.arange(data.shape[0]), labels=y_labels, fontsize=fontsize, family=font)
    ax.set_xlabel("Prompt token", fontsize=fontsize)
    ax.set_ylabel(row_label, fontsize=fontsize)
    if title:
        ax.set_title(
            title, fontsize=1.2 * fontsize, fontweight="bold", family=families("sans-serif")
        )
    if annotate:
        for (row, col), value in np.ndenumerate(data):
            ax.text(
                col,
                row,
                format(value, fmt),
                ha="center",
                va="center",
                fontsize=0.8 * fontsize,
                color=_text_color(colormap(norm(value))),
            )
    cbar = fig.colorbar(image, ax=ax)
    cbar.set_label("Attribution", fontsize=fontsize)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], *, dpi: float | None = None) -> Path:
    r"""
    Saves a figure as PNG, SVG, PDF or a self-contained HTML page, chosen by suffix.

    ``.png``, ``.svg`` and ``.pdf`` are written by matplotlib. ``.html`` writes a page
    with the figure embedded as a base64 PNG image, which needs no other file and opens
    in any browser or notebook. The figure's own size is kept (no tight cropping), so a
    PNG is ``fig.get_size_inches() * dpi`` pixels.

    Args:

        fig (Figure): The figure, e.g. from :func:`plot_token_heatmap`.
        path (str or os.PathLike): The file to write; its suffix (case-insensitive)
                    chooses the format. Its directory must exist.
        dpi (float, optional): Resolution of PNG images (also the one embedded in HTML),
                    in dots per inch. If None, the figure's own ``fig.dpi``.
                    Default: None

    Returns:
        *Path*:
        - The path written.

    Examples::

        >>> from captum_gim.visualization import plot_token_heatmap, save_figure
        >>> fig = plot_token_heatmap(["Hello", "Ġworld"], [0.5, -0.2])
        >>> path = save_figure(fig, "hello.html")
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SUPPORTED_SUFFIXES:
        raise ValueError(
            f"Cannot save {str(path)!r}: unsupported suffix {path.suffix!r}. "
            f"save_figure writes {', '.join(_SUPPORTED_SUFFIXES)}; "
            "change the file name's suffix."
        )
    dpi = fig.dpi if dpi is None else dpi
    if suffix != ".html":
        fig.savefig(path, format=suffix[1:], dpi=dpi)
        return path
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    image = base64.b64encode(buffer.getvalue()).decode("ascii")
    name = html.escape(path.stem)
    path.write_text(
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{name}</title>\n</head>\n<body>\n"
        f'<img src="data:image/png;base64,{image}" alt="{name}" '
        'style="max-width: 100%;">\n'
        "</body>\n</html>\n",
        encoding="utf-8",
    )
    return path


_HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #111; background: #fff; }
h1 { font-size: 1.2em; }
.row { margin: 0 0 1.2em 0; max-width: 60em; }
.label { font-weight: bold; margin-bottom: 0.3em; }
.text { font-family: ui-monospace, monospace; font-size: 15px; line-height: 1.9; }
.tok { display: inline-block; padding: 0 0.15em; margin: 1px; border-radius: 3px;
       white-space: pre; }
.legend { font-size: 0.9em; color: #444; margin-bottom: 1em; }
"""


def token_html(
    tokens: Sequence[str],
    rows: Mapping[str, AttributionLike],
    *,
    title: str | None = None,
    cmap: str | Colormap = ATTRIBUTION_CMAP,
) -> str:
    r"""
    A self-contained HTML page of the tokens as coloured text, one row per target.

    Every token is a ``<span class="tok">`` holding its text, its background coloured
    by its score (green positive, red negative by default), and its value in a tooltip
    (``title``) and in ``data-score``. Each row is scaled by its own largest absolute
    score, shown in the row's label. The page needs no network and no script, and long
    texts (hundreds of tokens) wrap like prose.

    Args:

        tokens (Sequence[str]): The tokens, as text (e.g. from
                    :func:`captum_gim.text.readable_tokens`) or as the tokenizer spells
                    them.
        rows (Mapping[str, Tensor, np.ndarray or Sequence[float]]): For each row
                    label (e.g. a target token, or ``"sum"``), one score per token.
        title (str, optional): Heading of the page.
                    Default: None
        cmap (str or Colormap, optional): A diverging colour map.
                    Default: :data:`ATTRIBUTION_CMAP`

    Returns:
        *str*:
        - **page**: The HTML document.

    Examples::

        >>> from captum_gim.visualization import token_html
        >>> page = token_html(["The", " capital", " of"], {"Paris": [0.1, 0.9, -0.2]})
    """
    tokens = _check_tokens("tokens", tokens)
    if not rows:
        raise ValueError("rows is empty; pass a mapping such as {'Paris': scores}.")
    colormap = _colormap(cmap)
    body = [_token_row(label, tokens, scores, colormap) for label, scores in rows.items()]
    return _html_page(title, body)


def token_lines_html(
    examples: Sequence[tuple[str, Sequence[str], AttributionLike]],
    *,
    title: str | None = None,
    header: str = "",
    cmap: str | Colormap = ATTRIBUTION_CMAP,
) -> str:
    r"""
    A self-contained HTML page with one coloured line per example, each as a row
    of :func:`token_html` (its own tokens, scaled by its own largest |score|).

    Args:

        examples (Sequence[tuple[str, Sequence[str], scores]]): For each example,
                    its label, its tokens and one score per token.
        title (str, optional): Heading of the page.
                    Default: None
        header (str, optional): HTML placed after the legend (e.g. a summary and
                    links to other pages); the caller escapes its text.
                    Default: ``""``
        cmap (str or Colormap, optional): A diverging colour map.
                    Default: :data:`ATTRIBUTION_CMAP`

    Returns:
        *str*:
        - **page**: The HTML document.

    Examples::

        >>> from captum_gim.visualization import token_lines_html
        >>> page = token_lines_html([("0", ["a", "b"], [0.1, -0.3]), ("1", ["c"], [1.0])])
    """
    colormap = _colormap(cmap)
    body = [header] if header else []
    for label, tokens, scores in examples:
        body.append(_token_row(label, _check_tokens("tokens", tokens), scores, colormap))
    return _html_page(title, body)


def _html_page(title: str | None, body: Sequence[str]) -> str:
    escape = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        f"<title>{escape(title or 'GIM attributions')}</title>",
        f"<style>{_HTML_STYLE}</style></head>",
        "<body>",
    ]
    if title:
        parts.append(f"<h1>{escape(title)}</h1>")
    parts.append(
        '<p class="legend">Green: positive attribution, red: negative; each row is scaled '
        "by its own largest |score|. Hover over a token for its value.</p>"
    )
    parts.extend(body)
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


def _token_row(label: str, tokens: list[str], scores: AttributionLike, colormap: Colormap) -> str:
    escape = html.escape
    name = f"rows[{label!r}]"
    values = _as_array(name, scores, ndim=1)
    _check_length(name, values, tokens)
    faces = colormap(np.asarray(_symmetric_norm(values, None)(values)))  # one call per row
    spans = []
    for index, (token, value, face) in enumerate(zip(tokens, values, faces)):
        face = tuple(float(c) for c in face)
        text = display_token(token) if decode_markers(token).strip() == "" else token
        text = decode_markers(text)
        spans.append(
            f'<span class="tok" style="background:{to_hex(face)};color:'
            f'{_text_color(face)}" title="#{index} {escape(repr(text))}: {value:+.4g}" '
            f'data-index="{index}" data-score="{value:.6g}">{escape(text)}</span>'
        )
    largest = float(np.abs(values).max()) if values.size else 0.0
    return (
        f'<div class="row"><div class="label">{escape(str(label))} '
        f"<small>(max |score| {largest:.4g})</small></div>"
        f'<div class="text">{"".join(spans)}</div></div>'
    )


def write_token_html(
    path: str | os.PathLike[str],
    tokens: Sequence[str],
    rows: Mapping[str, AttributionLike],
    *,
    title: str | None = None,
    cmap: str | Colormap = ATTRIBUTION_CMAP,
) -> Path:
    r"""
    Writes :func:`token_html` to ``path`` (UTF-8).

    Args:

        path (str or os.PathLike): The ``.html`` file to write; its directory must exist.
        tokens (Sequence[str]): The tokens.
        rows (Mapping[str, Tensor, np.ndarray or Sequence[float]]): One score per token
                    for each row label.
        title (str, optional): Heading of the page.
                    Default: None
        cmap (str or Colormap, optional): A diverging colour map.
                    Default: :data:`ATTRIBUTION_CMAP`

    Returns:
        *Path*:
        - The path written.

    Examples::

        >>> from captum_gim.visualization import write_token_html
        >>> path = write_token_html("paris.html", ["The", " capital"], {"Paris": [0.2, 0.8]})
    """
    path = Path(path)
    path.write_text(token_html(tokens, rows, title=title, cmap=cmap), encoding="utf-8")
    return path
