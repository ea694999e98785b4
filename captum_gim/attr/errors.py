"""Errors of the gradient computation turned into errors that say the fix."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def clear_gradient_errors() -> Iterator[None]:
    r"""
    Turns errors of the gradient computation that have a known cause into
    errors that say the fix (reentrant gradient checkpointing).
    """
    try:
        yield
    except RuntimeError as error:
        if "use_reentrant=True" not in str(error):
            raise
        raise RuntimeError(
            "The model uses reentrant gradient checkpointing (use_reentrant=True), "
            "which cannot compute gradients with torch.autograd.grad as Captum "
            "does. Enable it with model.gradient_checkpointing_enable("
            "gradient_checkpointing_kwargs={'use_reentrant': False}) (the "
            "transformers default; GIM gives the same attributions as without "
            "checkpointing), or call model.eval(), which turns checkpointing off."
        ) from error
