r"""
Tokens as people read them, and plain-text tables.

* :func:`readable_tokens` turns token ids into the text each token stands for, with the
  tokenizer's own ``convert_tokens_to_string`` (so GPT-2's byte-level markers such as
  ``Ġ`` and ``Ċ``, SentencePiece's ``▁`` and WordPiece's ``##`` all come out as text).
* :func:`display_token` is the label drawn for one token string: subword markers that are
  still there decoded, and empty or whitespace-only tokens made visible.
* :func:`format_table` aligns rows of text and numbers.

The command line, :func:`captum_gim.compare` and :mod:`captum_gim.visualization` all show
tokens through these functions, so a token reads the same in a table, a figure and a page.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from captum_gim._quiet import quiet_transformers

__all__ = [
    "cell_width",
    "display_token",
    "encode_text",
    "format_table",
    "format_value",
    "readable_tokens",
    "shorten",
]

# Subword markers of byte-level BPE (GPT-2, Llama 3, Qwen) and SentencePiece, for token
# strings that did not go through a tokenizer.
_MARKERS = {"Ġ": " ", "▁": " ", "Ċ": "\n", "ĉ": "\t"}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_VISIBLE_WHITESPACE = {" ": "␣", "\t": "⇥", "\n": "⏎", "\r": "⏎"}


def encode_text(tokenizer: Any, text: str, what: str) -> list[int]:
    r"""
    The token ids of ``text`` as the model reads it (special tokens included).

    Args:
        tokenizer: A Hugging Face tokenizer.
        text (str): The text.
        what (str): How to name the text in the error, e.g. ``"--prompt"``.

    Raises:
        ValueError: With one line, when ``text`` has no tokens of its own.
    """
    with quiet_transformers():  # the length is checked against the model's own limit
        ids = list(tokenizer(text)["input_ids"])
        if not tokenizer(text, add_special_tokens=False)["input_ids"]:
            raise ValueError(f"{what} {text!r} has no tokens; give some text")
    return ids


def readable_tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    r"""
    The text of each token, as the tokenizer itself converts it.

    Special tokens (``<bos>``, ``[CLS]``, ...) keep their names; every other token is
    converted alone with ``tokenizer.convert_tokens_to_string``, so a byte-level
    ``"Ġcapital"`` reads ``" capital"`` and ``"▁Paris"`` reads ``"Paris"`` or
    ``" Paris"`` as the tokenizer decides. A token that converts to nothing (part of a
    multi-byte character) keeps its raw string.

    Args:
        tokenizer (PreTrainedTokenizerBase): A transformers tokenizer (anything with
                    ``convert_ids_to_tokens``; ``convert_tokens_to_string`` is used when
                    it has one).
        ids (Sequence[int]): Token ids.

    Returns:
        *list[str]*:
        - **tokens**: One string per id.

    Examples::

        >>> from captum_gim.models import load_model
        >>> from captum_gim.text import readable_tokens
        >>> model, tokenizer = load_model()
        >>> readable_tokens(tokenizer, tokenizer("the good movie").input_ids)
        ['<bos>', 'the', 'good', 'movie']
    """
    ids = [int(i) for i in ids]
    raw = list(tokenizer.convert_ids_to_tokens(ids))
    convert = getattr(tokenizer, "convert_tokens_to_string", None)
    special = set(getattr(tokenizer, "all_special_ids", ()))
    if convert is None:
        return [str(token) for token in raw]
    tokens = []
    for token_id, token in zip(ids, raw):
        text = str(token) if token_id in special or token is None else convert([token])
        tokens.append(text if text and "\ufffd" not in text else str(token))
    return tokens


def display_token(token: str) -> str:
    r"""
    The label shown for one token string.

    Subword markers still in the string are decoded (``"Ġ"`` and ``"▁"`` to spaces,
    ``"Ċ"`` and ``<0x0A>`` to newlines, a leading WordPiece ``"##"`` dropped), then
    whitespace is made visible where it would be lost: ``"∅"`` for an empty token,
    ``"␣"`` for a space-only token, and ``"⇥"`` / ``"⏎"`` for tabs and newlines.

    Args:
        token (str): A token, as a tokenizer spells it or as :func:`readable_tokens`
                    converts it.

    Returns:
        *str*:
        - **label**: The visible label, on one line.

    Examples::

        >>> display_token("Ġcapital"), display_token(" "), display_token("##ing")
        (' capital', '␣', 'ing')
    """
    text = decode_markers(token)
    if text == "":
        return "∅"
    if text.isspace():
        return "".join(_VISIBLE_WHITESPACE.get(c, "·") for c in text)
    for char in "\r\n\t":
        text = text.replace(char, _VISIBLE_WHITESPACE[char])
    return text


def decode_markers(token: str) -> str:
    r"""
    The text a raw token string stands for: subword markers become spaces or newlines.

    Args:
        token (str): A token string.

    Returns:
        *str*: The text, possibly with spaces and line breaks.
    """
    if token.startswith("##") and len(token) > 2:  # WordPiece continuation
        return token[2:]
    token = _BYTE_TOKEN.sub(
        lambda m: chr(int(m.group(1), 16)) if int(m.group(1), 16) < 0x80 else m.group(0),
        token,
    )
    for marker, text in _MARKERS.items():
        token = token.replace(marker, text)
    return token


def cell_width(text: str) -> int:
    r"""
    Returns:
        *int*: The width of ``text`` in monospace character cells (wide CJK characters
        take two).
    """
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def shorten(text: str, cells: int) -> str:
    r"""
    Returns:
        *str*: ``text`` cut to at most ``cells`` character cells, with ``"…"`` if cut.
    """
    if cell_width(text) <= cells:
        return text
    while cell_width(text) > cells - 1:
        text = text[:-1]
    return text + "…"


def format_value(value: float, digits: int = 4) -> str:
    r"""
    A number with ``digits`` significant digits, so that small values are not rounded
    to zero: ``0.5``, ``-12.25``, ``1.2e-07``.

    Args:
        value (float): The number.
        digits (int, optional): Significant digits.
                    Default: 4

    Returns:
        *str*: The number as text.

    Examples::

        >>> format_value(1.234567e-7), format_value(0.5), format_value(-12.25)
        ('1.235e-07', '0.5', '-12.25')
    """
    return f"{value:.{digits}g}"


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    digits: int = 4,
    *,
    significant: bool = False,
) -> str:
    r"""
    Formats rows as an aligned plain-text table: text left-aligned, numbers
    right-aligned with ``digits`` digits after the decimal point (or ``digits``
    significant digits). Text cells are shown with :func:`display_token`, so tokens
    stay visible and on one line.

    Args:
        headers (Sequence[str]): The column names.
        rows (Sequence[Sequence[object]]): The rows, one value per column.
        digits (int, optional): Digits after the decimal point of floats, or
                    significant digits with ``significant=True``.
                    Default: 4
        significant (bool, optional): Show floats with :func:`format_value`, so that
                    small values keep their digits (``1.2e-07``, not ``0.0000``).
                    Default: False

    Returns:
        *str*:
        - **table**: The header, a rule and the rows, without a trailing newline.

    Examples::

        >>> print(format_table(["token", "GIM"], [["good", 0.5]]))
        token     GIM
        -----  ------
        good   0.5000
    """
    cells = [[_cell(v, digits, significant) for v in row] for row in rows]
    header_cells = [_cell(h, digits, significant) for h in headers]
    numeric = [
        all(isinstance(row[i], (int, float)) or row[i] == "" for row in rows)
        for i in range(len(headers))
    ]
    widths = [
        max([cell_width(h), *(cell_width(r[i]) for r in cells)]) for i, h in enumerate(header_cells)
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            " " * (w - cell_width(v)) + v if right else v + " " * (w - cell_width(v))
            for v, w, right in zip(values, widths, numeric)
        ]
        return "  ".join(parts).rstrip()

    rule = ["-" * w for w in widths]
    return "\n".join([line(header_cells), line(rule), *(line(r) for r in cells)])


def _cell(value: object, digits: int, significant: bool = False) -> str:
    if isinstance(value, float):
        return format_value(value, digits) if significant else f"{value:.{digits}f}"
    if isinstance(value, int) or value == "":
        return str(value)
    return display_token(str(value)).strip() or display_token(str(value))
