"""One-line error messages, shared by the command line and the dataset runs."""

from __future__ import annotations

__all__ = ["one_line"]


def one_line(error: BaseException) -> str:
    r"""
    Returns:
        *str*: The whole message of ``error`` on one line (its class name when it
        has no message).
    """
    text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
    return text or type(error).__name__
