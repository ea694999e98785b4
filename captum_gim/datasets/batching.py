r"""
Batches by length and a token budget, and the split-and-retry that keeps an
out-of-memory error (or one bad row) from losing the run.

Rows are sorted by length, longest first (an out-of-memory error shows on the first
batch, not at the end), and cut into batches whose padded size
``rows x longest row`` stays within the token budget. :func:`run_splitting` runs a
batch; on an out-of-memory error it splits the batch in halves and runs each, down
to single rows, and a single row that still fails gets its one-line error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from captum_gim._messages import one_line
from captum_gim.sites.discovery import UnsupportedModuleError

__all__ = ["length_batches", "run_splitting"]

LOG = logging.getLogger("captum_gim.datasets")
Item = TypeVar("Item")
Result = TypeVar("Result")


def length_batches(
    items: Sequence[Item],
    lengths: Sequence[int],
    max_tokens_per_batch: int,
    batch_size: int | None = None,
) -> list[list[Item]]:
    r"""
    Cuts items into batches of similar length within a token budget.

    Args:
        items (Sequence): The items (e.g. encoded rows).
        lengths (Sequence[int]): The token count of each item.
        max_tokens_per_batch (int): Largest ``rows x longest row`` of a batch; an
                    item longer than this is a batch alone.
        batch_size (int, optional): Largest number of rows of a batch; None leaves
                    it to the token budget.
                    Default: None

    Returns:
        *list[list]*: The batches, longest items first.

    Examples::

        >>> length_batches("abcd", [3, 9, 4, 8], max_tokens_per_batch=18)
        [['b', 'd'], ['c', 'a']]
    """
    if max_tokens_per_batch < 1:
        raise ValueError(f"max_tokens_per_batch must be >= 1, got {max_tokens_per_batch}.")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}.")
    order = sorted(range(len(items)), key=lambda i: -lengths[i])
    batches: list[list[Item]] = []
    current: list[Item] = []
    longest = 0
    for i in order:
        size = len(current) + 1
        full = batch_size is not None and size > batch_size
        if current and (full or size * max(longest, lengths[i]) > max_tokens_per_batch):
            batches.append(current)
            current, longest = [], 0
        current.append(items[i])
        longest = max(longest, lengths[i])
    if current:
        batches.append(current)
    return batches


def run_splitting(
    batch: Sequence[Item],
    compute: Callable[[Sequence[Item]], list[Result]],
    failed: Callable[[Item, str], Result],
) -> list[Result]:
    r"""
    Runs ``compute`` on a batch, splitting it in halves on an out-of-memory error or
    any other error, down to single rows; a row that fails alone becomes
    ``failed(row, one-line error)``, and the other rows are kept.

    :class:`~captum_gim.UnsupportedModuleError` is a property of the model, not of a
    row, and is raised.

    Args:
        batch (Sequence): The rows of one batch.
        compute (Callable): Returns one result per row, in order.
        failed (Callable): The result of a row that failed, from the row and the error.

    Returns:
        *list*: One result per row, in order.
    """
    try:
        return compute(batch)
    except UnsupportedModuleError:
        raise
    except Exception as error:  # out of memory, or a problem of one row: split
        out_of_memory = isinstance(error, torch.OutOfMemoryError)
        if out_of_memory and torch.cuda.is_available():
            torch.cuda.empty_cache()
        message = ("out of memory: " if out_of_memory else "") + one_line(error)
        if len(batch) == 1:
            return [failed(batch[0], message)]
        LOG.info("batch of %d rows failed (%s); splitting it", len(batch), message)
    half = len(batch) // 2
    return run_splitting(batch[:half], compute, failed) + run_splitting(
        batch[half:], compute, failed
    )
