r"""
Fonts of the figures: matplotlib's font fallback to a CJK font where one is installed.

Matplotlib's default fonts (DejaVu Sans and DejaVu Sans Mono) have no Chinese, Japanese or
Korean glyphs, which then render as boxes. :func:`families` gives a family list that
falls back, glyph by glyph, to an installed CJK font (Noto Sans CJK, Source Han Sans,
WenQuanYi, Droid Sans Fallback, ...; on Debian and Ubuntu ``apt-get install -y
fonts-noto-cjk``). :func:`warn_if_unrenderable` warns once per process when a label has
CJK characters and no such font is installed.
"""

from __future__ import annotations

import contextlib
import unicodedata
import warnings
from collections.abc import Iterable
from functools import lru_cache

__all__ = ["cjk_font", "families", "warn_if_unrenderable"]

# Family names of common CJK fonts, monospaced ones first.
_CJK_FAMILIES = (
    "Noto Sans Mono CJK SC",
    "Noto Sans Mono CJK JP",
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans CJK KR",
    "Noto Serif CJK SC",
    "Source Han Sans SC",
    "Source Han Sans",
    "WenQuanYi Zen Hei Mono",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Droid Sans Fallback",
    "AR PL UMing CN",
    "Noto Sans SC",
    "Noto Sans JP",
)
# File names of the same fonts, for fonts installed after matplotlib cached its font list.
_CJK_FILES = ("cjk", "wqy", "droidsansfallback", "sourcehan", "uming", "ukai", "notosanssc")
_CJK_SCRIPTS = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "BOPOMOFO", "FULLWIDTH", "IDEOGRAPHIC")
_warned: list[bool] = []


@lru_cache(maxsize=1)
def cjk_font() -> str | None:
    r"""
    Returns:
        *str or None*: The family name of an installed CJK font, or None.
    """
    from matplotlib import font_manager

    installed = {font.name for font in font_manager.fontManager.ttflist}
    for name in _CJK_FAMILIES:
        if name in installed:
            return name
    found = [
        path
        for path in font_manager.findSystemFonts()  # installed after the cache was written
        if any(part in path.lower().replace("-", "").replace("_", "") for part in _CJK_FILES)
    ]
    heavy = ("bold", "black", "heavy", "medium", "semi", "light", "thin")
    # regular weights first, and sans before serif
    for path in sorted(
        found, key=lambda p: (any(w in p.lower() for w in heavy), "serif" in p.lower(), p)
    ):
        try:
            font_manager.fontManager.addfont(path)
            name = str(font_manager.FontProperties(fname=path).get_name())
        except (OSError, RuntimeError, ValueError):
            continue
        for other in found:  # its other weights (bold titles)
            if other != path:
                with contextlib.suppress(OSError, RuntimeError, ValueError):
                    font_manager.fontManager.addfont(other)
        return name
    return None


def families(generic: str) -> list[str]:
    r"""
    Args:
        generic (str): ``"monospace"`` or ``"sans-serif"``.

    Returns:
        *list[str]*: ``[generic]``, followed by an installed CJK font for matplotlib's
        glyph-by-glyph fallback.
    """
    cjk = cjk_font()
    return [generic] if cjk is None else [generic, cjk]


def has_cjk(text: str) -> bool:
    r"""
    Returns:
        *bool*: True when ``text`` has a Chinese, Japanese or Korean character.
    """
    return any(
        ord(char) > 0x2E7F and unicodedata.name(char, "").startswith(_CJK_SCRIPTS) for char in text
    )


def warn_if_unrenderable(labels: Iterable[str]) -> None:
    r"""
    Warns once per process when a label has CJK characters and no CJK font is
    installed (they would be drawn as boxes).

    Args:
        labels (Iterable[str]): The texts about to be drawn.
    """
    if _warned or cjk_font() is not None or not any(has_cjk(label) for label in labels):
        return
    _warned.append(True)
    warnings.warn(
        "These tokens have Chinese, Japanese or Korean characters, and no font with those "
        "glyphs is installed, so the figure draws them as boxes; install one (e.g. "
        "apt-get install -y fonts-noto-cjk) or use the .html output, which the browser "
        "renders with its own fonts.",
        UserWarning,
        stacklevel=3,
    )
