r"""
What is explained of a target token or label: its ``"logit"`` (the default everywhere,
as in the GIM paper) or its ``"log-prob"`` (``log_softmax`` of the logits, Captum's
``LLMGradientAttribution`` choice).

Every function and class of captum_gim spells this ``score="logit" | "log-prob"``, and
the command line ``--score logit|log-prob``. :func:`resolve_score` checks the value and
still accepts, for one release and with a ``DeprecationWarning``, the older spellings
``score="log_prob"`` and ``log_probs=True``.
"""

from __future__ import annotations

import warnings
from typing import Literal

__all__ = ["SCORES", "Score", "resolve_score"]

#: The two scores of a target token or label.
SCORES: tuple[str, ...] = ("logit", "log-prob")

#: The type of ``score=``.
Score = Literal["logit", "log-prob"]

_OLD_SPELLINGS = {"log_prob": "log-prob"}


def resolve_score(score: str | None, *, log_probs: bool | None = None, where: str = "") -> str:
    r"""
    The score to explain, from ``score=`` and the deprecated ``log_probs=``.

    Args:
        score (str or None): ``"logit"`` or ``"log-prob"``; None means ``"logit"``
                    (or what ``log_probs`` says). ``"log_prob"`` is accepted with a
                    ``DeprecationWarning``.
        log_probs (bool or None, optional): The deprecated boolean spelling; None when
                    not given. Not together with ``score``.
                    Default: None
        where (str, optional): The function's name, for messages.
                    Default: ``""``

    Returns:
        *str*: ``"logit"`` or ``"log-prob"``.

    Examples::

        >>> from captum_gim.scores import resolve_score
        >>> resolve_score(None), resolve_score("log-prob")
        ('logit', 'log-prob')
    """
    prefix = f"{where}: " if where else ""
    if log_probs is not None:
        if score is not None:
            raise TypeError(f"{prefix}pass score= only; log_probs= is its deprecated spelling.")
        replacement = "log-prob" if log_probs else "logit"
        warnings.warn(
            f"{prefix}log_probs={log_probs!r} is deprecated and will be removed in the next "
            f"release; pass score={replacement!r}.",
            DeprecationWarning,
            stacklevel=3,
        )
        return replacement
    if score is None:
        return "logit"
    if score in _OLD_SPELLINGS:
        warnings.warn(
            f"{prefix}score={score!r} is deprecated and will be removed in the next release; "
            f"pass score={_OLD_SPELLINGS[score]!r}.",
            DeprecationWarning,
            stacklevel=3,
        )
        return _OLD_SPELLINGS[score]
    if score not in SCORES:
        raise ValueError(f"{prefix}score must be 'logit' or 'log-prob', got {score!r}.")
    return score
