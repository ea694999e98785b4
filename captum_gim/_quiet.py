"""Loading without transformers' warnings and weight-loading progress bars."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    r"""
    Silences transformers' warnings and progress bars inside the block, and restores
    the caller's verbosity and progress-bar setting after it, also on errors.
    """
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    if verbosity >= logging.ERROR and not bars:  # already quiet (a nested block): no cost
        yield
        return
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
