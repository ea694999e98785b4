"""Tests for captum_gim.visualization: figure sizes, wrapping, colours, files, errors."""

from __future__ import annotations

import base64
import html
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from captum.attr import LLMAttributionResult
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from captum_gim.visualization import (
    plot_methods_side_by_side,
    plot_token_heatmap,
    plot_token_matrix,
    save_figure,
    token_html,
    write_token_html,
)

TOKENS = ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", "."]
VALUES = [0.1, 0.4, -0.2, 0.9, 0.0, -0.6, 0.3]


def _long_text(n: int) -> list[str]:
    words = ["Ġthe", "Ġmodel", "Ġattributes", "Ġeach", "Ġtoken", ",", "Ġand"]
    return ["Once"] + [words[i % len(words)] for i in range(n - 1)]


def _token_boxes(fig: Figure) -> list:
    """The token rectangles of every row, in drawing order."""
    return [p for ax in fig.axes for p in ax.patches if (p.get_gid() or "").startswith("token-")]


def _lines_of(fig: Figure) -> set[float]:
    return {round(box.get_y(), 6) for box in _token_boxes(fig)}


def _assert_png_has_figure_size(path: Path, fig: Figure, dpi: float) -> None:
    """The PNG is the figure's size in inches times dpi (matplotlib truncates pixels)."""
    height, width = mpimg.imread(path).shape[:2]
    expected_width, expected_height = fig.get_size_inches() * dpi
    assert abs(width - expected_width) < 1
    assert abs(height - expected_height) < 1


# --------------------------------------------------------------------------- heatmap


def test_heatmap_png_has_the_figure_size_in_pixels(tmp_path: Path) -> None:
    fig = plot_token_heatmap(TOKENS, torch.tensor(VALUES), title="GIM")
    path = save_figure(fig, tmp_path / "heatmap.png", dpi=50)
    _assert_png_has_figure_size(path, fig, 50)


def test_long_text_wraps_onto_lines_and_figure_grows_in_height() -> None:
    short = plot_token_heatmap(_long_text(10), np.ones(10), wrap_width=60)
    long = plot_token_heatmap(_long_text(200), np.linspace(-1, 1, 200), wrap_width=60)
    assert len(_lines_of(short)) == 1
    assert len(_lines_of(long)) >= 10
    assert long.get_figheight() > short.get_figheight() + 1.0
    assert long.get_figwidth() == pytest.approx(short.get_figwidth())
    for box in _token_boxes(long):
        assert box.get_x() + box.get_width() <= 60 + 1e-9


def test_wider_wrap_width_gives_fewer_lines() -> None:
    tokens, values = _long_text(200), np.ones(200)
    narrow = plot_token_heatmap(tokens, values, wrap_width=40)
    wide = plot_token_heatmap(tokens, values, wrap_width=120)
    assert len(_lines_of(wide)) < len(_lines_of(narrow))
    assert wide.get_figwidth() > narrow.get_figwidth()


def _pixel_in_box(fig: Figure, index: int) -> np.ndarray:
    """RGB of the rendered figure just below the top edge of token ``index``'s box."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3] / 255.0
    box = _token_boxes(fig)[index].get_window_extent(canvas.get_renderer())
    column = int((box.x0 + box.x1) / 2)
    row = pixels.shape[0] - int(box.y1) + 2  # display y grows upwards, image rows down
    return pixels[row, column]


def test_positive_token_is_green_negative_red_and_zero_neutral() -> None:
    # "." draws only near the baseline, so the top of each box is pure fill colour.
    fig = plot_token_heatmap([".", ".", "."], [0.5, 0.0, -0.5], max_abs=1.0)
    positive, zero, negative = (_pixel_in_box(fig, i) for i in range(3))
    assert positive[1] > positive[0] + 0.2 and positive[1] > positive[2] + 0.2
    assert negative[0] > negative[1] + 0.3 and negative[0] > negative[2] + 0.3
    assert (zero > 0.9).all()


def test_colours_match_captums_visualize_text_and_plot_token_attr() -> None:
    from captum.attr._utils.visualization import _get_color

    # visualize_text: positive scores get hue 120 (green), negative hue 0 (red).
    assert _get_color(0.5).startswith("hsl(120,") and _get_color(-0.5).startswith("hsl(0,")
    scores = [0.5, 0.0, -0.5]
    result = LLMAttributionResult(
        input_tokens=["a", "b", "c"], output_tokens=["x"], seq_attr=scores, token_attr=[scores]
    )
    captum_fig, ax = result.plot_token_attr(show=False)
    image = ax.images[0]
    ours = plot_token_heatmap([".", ".", "."], scores, max_abs=0.5)
    for index, value in enumerate(scores):
        theirs = np.asarray(image.cmap(image.norm(value)))[:3]
        np.testing.assert_allclose(_pixel_in_box(ours, index), theirs, atol=0.02)
    plt.close(captum_fig)


def test_max_abs_sets_a_symmetric_colour_scale() -> None:
    fig = plot_token_heatmap(TOKENS, VALUES, max_abs=2.0)
    colorbar_axes = fig.axes[-1]
    assert colorbar_axes.get_xlim() == pytest.approx((-2.0, 2.0))
    default = plot_token_heatmap(TOKENS, VALUES)
    assert default.axes[-1].get_xlim() == pytest.approx((-0.9, 0.9))


def test_subword_markers_are_decoded_and_invisible_tokens_marked() -> None:
    tokens = ["Hello", "Ġworld", "▁again", "play", "##ing", "", "Ġ", "\t", "Ċ", "next"]
    fig = plot_token_heatmap(tokens, np.zeros(len(tokens)))
    labels = [text.get_text() for text in fig.axes[0].texts]
    assert labels == [
        "Hello",
        " world",
        " again",
        "play",
        "ing",
        "∅",
        "␣",
        "⇥",
        "⏎",
        "next",
    ]
    boxes = _token_boxes(fig)
    assert boxes[-1].get_y() > boxes[-2].get_y()  # a newline token ends the line
    assert boxes[-1].get_x() == 0


def test_heatmap_accepts_batched_tensor_with_grad_and_low_precision() -> None:
    attributions = torch.tensor([VALUES], dtype=torch.bfloat16, requires_grad=True)
    fig = plot_token_heatmap(TOKENS, attributions * 2)
    assert len(_token_boxes(fig)) == len(TOKENS)


def test_heatmap_draws_into_given_axes_and_registers_nothing_with_pyplot() -> None:
    before = plt.get_fignums()
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot()
    assert plot_token_heatmap(TOKENS, VALUES, ax=ax, title="GIM") is fig
    assert len(ax.patches) == len(TOKENS)
    plot_methods_side_by_side(TOKENS, {"GIM": VALUES})
    plot_token_matrix(TOKENS, ["ĠParis"], [VALUES])
    assert plt.get_fignums() == before


# --------------------------------------------------------------------------- methods


def test_side_by_side_rows_share_the_token_layout(tmp_path: Path) -> None:
    tokens = _long_text(60)
    methods = {
        "GIM": torch.linspace(-1, 1, 60),
        "Saliency": np.abs(np.sin(np.arange(60))),
        "Integrated Gradients": list(np.cos(np.arange(60))),
    }
    fig = plot_methods_side_by_side(tokens, methods, title="Comparison", wrap_width=60)
    rows = [ax for ax in fig.axes if ax.patches]
    assert [ax.get_title(loc="left") for ax in rows] == list(methods)
    positions = [[(p.get_x(), p.get_y()) for p in ax.patches] for ax in rows]
    assert positions[0] == positions[1] == positions[2]
    path = save_figure(fig, tmp_path / "methods.png", dpi=40)
    _assert_png_has_figure_size(path, fig, 40)


def test_normalize_makes_each_method_span_its_own_scale() -> None:
    values = np.array(VALUES)
    fig = plot_methods_side_by_side(TOKENS, {"a": values, "b": 100 * values})
    small, large = ([p.get_facecolor() for p in ax.patches] for ax in fig.axes[:2])
    assert small == large
    shared = plot_methods_side_by_side(TOKENS, {"a": values, "b": 100 * values}, normalize=False)
    small, large = ([p.get_facecolor() for p in ax.patches] for ax in shared.axes[:2])
    assert small != large
    assert shared.axes[-1].get_xlim() == pytest.approx((-90.0, 90.0))


# --------------------------------------------------------------------------- matrix


def test_llm_attribution_result_plots_as_token_matrix(tmp_path: Path) -> None:
    result = LLMAttributionResult(
        input_tokens=TOKENS,
        output_tokens=["ĠParis", ".", "Ċ"],
        seq_attr=torch.tensor(VALUES),
        token_attr=torch.tensor([VALUES, VALUES[::-1], [0.0] * len(TOKENS)]),
    )
    fig = plot_token_matrix(
        result.input_tokens,
        result.output_tokens,
        result.token_attr,
        title="Attribution",
    )
    ax = fig.axes[0]
    assert len(ax.texts) == 3 * len(TOKENS)  # small enough to write every value
    assert [t.get_text() for t in ax.get_yticklabels()] == [" Paris", ".", "⏎"]
    assert all(t.get_rotation() == 90 for t in ax.get_xticklabels())
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Prompt token", "Target token")
    generated = plot_token_matrix(TOKENS, ["a"], [VALUES], row_label="Generated token")
    assert generated.axes[0].get_ylabel() == "Generated token"
    path = save_figure(fig, tmp_path / "matrix.png", dpi=40)
    _assert_png_has_figure_size(path, fig, 40)


def test_long_prompt_matrix_grows_and_drops_value_annotations() -> None:
    outputs = ["ĠA", "ĠB"]
    small = plot_token_matrix(_long_text(10), outputs, np.ones((2, 10)))
    large = plot_token_matrix(_long_text(200), outputs, np.ones((2, 200)))
    assert len(large.axes[0].texts) == 0
    assert large.get_figwidth() > 2 * small.get_figwidth()


# --------------------------------------------------------------------------- files


def test_svg_and_html_files_are_written_and_self_contained(tmp_path: Path) -> None:
    fig = plot_token_heatmap(TOKENS, VALUES)
    svg = save_figure(fig, tmp_path / "heatmap.svg")
    assert svg.stat().st_size > 0
    assert "<svg" in svg.read_text(encoding="utf-8")
    page = save_figure(fig, tmp_path / "heatmap.HTML").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    match = re.search(r'src="data:image/png;base64,([^"]+)"', page)
    assert match is not None
    assert base64.b64decode(match.group(1)).startswith(b"\x89PNG")


def test_unknown_suffix_is_rejected_naming_the_supported_ones(tmp_path: Path) -> None:
    fig = plot_token_heatmap(TOKENS, VALUES)
    with pytest.raises(ValueError, match=r"'\.jpg'.*\.png, \.svg, \.pdf, \.html"):
        save_figure(fig, tmp_path / "heatmap.jpg")
    assert not (tmp_path / "heatmap.jpg").exists()


# --------------------------------------------------------------------------- errors


def test_length_mismatch_names_the_argument_and_counts() -> None:
    with pytest.raises(ValueError, match="attributions has 6 values but tokens has 7"):
        plot_token_heatmap(TOKENS, VALUES[:-1])
    with pytest.raises(ValueError, match=r"attributions_by_method\['Saliency'\] has 3"):
        plot_methods_side_by_side(TOKENS, {"GIM": VALUES, "Saliency": [1.0, 2.0, 3.0]})


def test_unreduced_attributions_ask_to_sum_the_embedding_dimension() -> None:
    with pytest.raises(ValueError, match=r"sum over the embedding.*shape \(1, 7, 4\)"):
        plot_token_heatmap(TOKENS, torch.ones(1, len(TOKENS), 4))


def test_transposed_matrix_is_rejected_with_a_hint() -> None:
    with pytest.raises(ValueError, match=r"shape \(7, 2\).*\(2, 7\).*transpose"):
        plot_token_matrix(TOKENS, ["ĠA", "ĠB"], np.ones((len(TOKENS), 2)))


def test_bad_tokens_and_values_are_rejected() -> None:
    with pytest.raises(TypeError, match="not one str"):
        plot_token_heatmap("The capital", [1.0, 2.0])
    with pytest.raises(ValueError, match="tokens is empty"):
        plot_token_heatmap([], [])
    with pytest.raises(ValueError, match="NaN"):
        plot_token_heatmap(["a", "b"], [1.0, float("nan")])
    with pytest.raises(ValueError, match="attributions_by_method is empty"):
        plot_methods_side_by_side(TOKENS, {})
    with pytest.raises(ValueError, match="max_abs must be positive"):
        plot_token_heatmap(TOKENS, VALUES, max_abs=0.0)


# --------------------------------------------------------------------------- HTML pages

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (apt-get install -y chromium); "
    "the HTML page is checked in a real browser",
)


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def test_token_page_holds_every_token_as_text_with_its_value() -> None:
    tokens = ["The", "Ġcapital", " <of>", "\n", "Paris"]
    page = token_html(tokens, {"Paris": [0.5, -0.25, 0.0, 0.1, 1.0]}, title="GIM")
    spans = re.findall(
        r'<span class="tok" style="([^"]*)" title="([^"]*)"[^>]*>([^<]*)</span>', page
    )
    assert [html.unescape(text) for _, _, text in spans] == [
        "The",
        " capital",
        " <of>",
        "⏎",
        "Paris",
    ]
    assert "+0.5" in spans[0][1] and "-0.25" in spans[1][1]  # the value on hover
    assert "http" not in page and "<script" not in page and "<img" not in page


@needs_chromium
def test_token_page_renders_500_tokens_in_headless_chromium(tmp_path: Path) -> None:
    tokens = [f" word{i}" for i in range(500)]
    rows = {"0: ĠParis": np.sin(np.arange(500.0)), "1: Ġis": np.cos(np.arange(500.0))}
    rows["sum"] = rows["0: ĠParis"] + rows["1: Ġis"]
    path = write_token_html(tmp_path / "page.html", tokens, rows, title="GIM")
    dom = _chromium("--dump-dom", path.as_uri()).stdout
    texts = re.findall(r'<span class="tok"[^>]*>([^<]*)</span>', dom)
    assert texts == tokens * 3  # one row per target token plus their sum, every token as text
    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1000,1400", path.as_uri())
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.std() > 0.1  # not blank
    green = (pixels[..., 1] > pixels[..., 0] + 0.2).mean()
    red = (pixels[..., 0] > pixels[..., 1] + 0.2).mean()
    assert green > 0.02 and red > 0.02  # positive tokens green, negative red


CJK = ["北京", "是", "中国", "的", "首都"]


def test_cjk_tokens_are_drawn_with_an_installed_cjk_font(tmp_path: Path) -> None:
    import warnings

    from captum_gim import _fonts

    if _fonts.cjk_font() is None:
        pytest.skip("no CJK font installed (apt-get install -y fonts-noto-cjk; .ci/run does)")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        save_figure(plot_token_heatmap(CJK, VALUES[:5], title="GIM: 首都"), tmp_path / "a.png")
        save_figure(plot_token_matrix(CJK, CJK[:2], [VALUES[:5]] * 2), tmp_path / "b.png")
    missing = [str(w.message) for w in seen if "missing from" in str(w.message)]
    assert missing == [] and not any("no font" in str(w.message) for w in seen)


def test_cjk_tokens_without_a_cjk_font_warn_once(monkeypatch, tmp_path: Path) -> None:
    import warnings

    from captum_gim import _fonts

    monkeypatch.setattr(_fonts, "cjk_font", lambda: None)
    monkeypatch.setattr(_fonts, "_warned", [])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        plot_token_heatmap(TOKENS, VALUES)  # no CJK: no warning
        assert not [w for w in seen if "fonts-noto-cjk" in str(w.message)]
        plot_token_heatmap(CJK, VALUES[:5])
        plot_token_matrix(CJK, CJK[:1], [VALUES[:5]])
    ours = [w for w in seen if "fonts-noto-cjk" in str(w.message)]
    assert len(ours) == 1 and "Chinese, Japanese or Korean" in str(ours[0].message)
