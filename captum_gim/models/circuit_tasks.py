r"""
The names-task prompts of the bundled circuit models (``ioi_llama`` and
``planted_circuit_llama``, trained by ``benchmarks/train_circuit_models.py``).

A prompt is ``<bos> A B f S f ?``: two different names ``A`` and ``B``, a
filler, the subject ``S`` (one of ``A`` and ``B``), a filler and ``?``; the
answer is the *other* name (the indirect object, as in IOI). The
counterfactual prompt replaces ``S`` by a third name ``C`` (MIB's "ABC"
corruption), so nothing says which name to give. The metric is the logit of
the indirect object minus the logit of the subject at the last position.

Examples::

    >>> from captum_gim.models import load_model
    >>> from captum_gim.models.circuit_tasks import names_prompts
    >>> model, _ = load_model("ioi_llama")
    >>> prompts = names_prompts(8, seed=1)
    >>> bool((prompts.metric(model(prompts.clean).logits) > 0).all())
    True
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

SPECIALS = ("<pad>", "<bos>", "<unk>")
NAMES = 12
FILLERS = 8
LENGTH = 7  # <bos> A B f S f ?


def vocabulary() -> dict[str, int]:
    r"""Token to id: the specials, names ``n0``.., fillers ``f0``.. and ``?``."""
    words = [*SPECIALS, *(f"n{i}" for i in range(NAMES)), *(f"f{i}" for i in range(FILLERS)), "?"]
    return {word: i for i, word in enumerate(words)}


@dataclass
class NamesPrompts:
    r"""Clean and counterfactual prompts of the names task."""

    #: ``batch x 7`` token ids.
    clean: Tensor
    #: The same with the subject replaced by a third name.
    corrupted: Tensor
    #: The indirect object (the answer) and the subject, per prompt.
    answer: Tensor
    subject: Tensor

    def metric(self, logits: Tensor) -> Tensor:
        r"""Logit of the answer minus logit of the subject at the last position."""
        rows = torch.arange(logits.shape[0], device=logits.device)
        last = logits[:, -1]
        return (
            last[rows, self.answer.to(logits.device)] - last[rows, self.subject.to(logits.device)]
        )

    @property
    def metric_fn(self) -> Callable[[Tensor], Tensor]:
        r"""``metric`` as a plain function."""
        return self.metric


def names_prompts(n: int, seed: int = 0) -> NamesPrompts:
    r"""
    Args:
        n (int): How many prompts.
        seed (int, optional): Random seed. Default: 0

    Returns:
        *NamesPrompts*: clean and corrupted prompts and the metric.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = vocabulary()
    first_name, first_filler = ids["n0"], ids["f0"]
    clean = torch.zeros(n, LENGTH, dtype=torch.long)
    corrupted = torch.zeros_like(clean)
    answer = torch.zeros(n, dtype=torch.long)
    subject = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        a, b, c = (torch.randperm(NAMES, generator=generator)[:3] + first_name).tolist()
        f1, f2 = (torch.randint(FILLERS, (2,), generator=generator) + first_filler).tolist()
        s, io = (a, b) if bool(torch.rand((), generator=generator) < 0.5) else (b, a)
        clean[i] = torch.tensor([ids["<bos>"], a, b, f1, s, f2, ids["?"]])
        corrupted[i] = torch.tensor([ids["<bos>"], a, b, f1, c, f2, ids["?"]])
        answer[i], subject[i] = io, s
    return NamesPrompts(clean, corrupted, answer, subject)


def planted_circuit(name: str = "planted_circuit_llama") -> list[str]:
    r"""
    The true circuit of a bundled model with a planted circuit, as MIB edge
    names (from its ``task.json``).

    Args:
        name (str, optional): The bundled model. Default: ``"planted_circuit_llama"``

    Returns:
        *list[str]*: e.g. ``["input->a1.h0<q>", ..., "a1.h1->logits"]``.
    """
    from captum_gim.models import model_path

    task = json.loads((model_path(name) / "task.json").read_text(encoding="utf-8"))
    if "circuit_edges" not in task:
        raise ValueError(f"Bundled model {name!r} has no planted circuit.")
    return list(task["circuit_edges"])
