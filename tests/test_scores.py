"""The one spelling of the score: score="logit" (default) or "log-prob"; the old spellings
warn for one release."""

from __future__ import annotations

import warnings

import pytest

from captum_gim.scores import resolve_score


def test_the_new_spellings_pass_silently_and_logit_is_the_default() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_score(None) == "logit"
        assert resolve_score("logit") == "logit"
        assert resolve_score("log-prob") == "log-prob"


def test_old_spellings_warn_and_mean_the_same() -> None:
    with pytest.warns(DeprecationWarning, match="score='log_prob' is deprecated"):
        assert resolve_score("log_prob") == "log-prob"
    with pytest.warns(DeprecationWarning, match="log_probs=True is deprecated"):
        assert resolve_score(None, log_probs=True) == "log-prob"
    with pytest.warns(DeprecationWarning, match="log_probs=False is deprecated"):
        assert resolve_score(None, log_probs=False) == "logit"


def test_unknown_or_doubled_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="score must be 'logit' or 'log-prob', got 'prob'"):
        resolve_score("prob")
    with pytest.raises(TypeError, match="pass score= only"):
        resolve_score("logit", log_probs=True)
