"""The dtype the rule arithmetic runs in."""

from __future__ import annotations

import torch
from torch import Tensor


def rule_dtype(x: Tensor) -> torch.dtype:
    r"""
    Returns:
        *torch.dtype*: the dtype the rule arithmetic runs in for ``x``: float32,
        or float64 when ``x`` is float64.
    """
    return torch.promote_types(x.dtype, torch.float32)
