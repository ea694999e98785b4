"""The GIM paper's layer experiment: residual-stream positions scored per layer,
judged by comprehensiveness and sufficiency under mean ablation.

For a layer ``l`` and a prompt, position ``t`` of the residual stream that
block ``l`` reads (``x``) gets the score ``(x_t - mean_s x_s) . g_t``, with
``g`` the gradient of the target logit at ``x`` in the clean run: plain
(``"atp"``, the authors' ``grad``), under the GIM rules (``"gim"``), or
integrated from ``x`` to the sequence mean (``"ig"``, ``steps`` points
``alpha = k / (steps - 1)``). The positions are then replaced by the sequence
mean, at that layer only, in the order of the scores (comprehensiveness, the
first and last positions never replaced, up to 50) or keeping only the top
ones (sufficiency, 50 to 99 % replaced), through
:func:`captum_gim.metrics.comprehensiveness` and
:func:`captum_gim.metrics.sufficiency`, with drops normalised by the
unperturbed logit (``normalized_aopc``), as in the authors'
``src/evaluation/evaluate_layers.py``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from captum_gim import GIMConfig, gim_rules
from captum_gim.circuits.components import find_components
from captum_gim.circuits.edges import block_input, hooks, with_block_input

LAYER_METHODS = ("gim", "atp", "ig")
_REPLACED = -1  # the "token" that marks a position replaced by the sequence mean


@dataclass
class LayerFaithfulness:
    r"""Per-layer comprehensiveness and sufficiency of one method."""

    method: str
    #: Mean normalised comprehensiveness per layer (higher is better).
    comprehensiveness: list[float]
    #: Mean normalised sufficiency per layer (lower is better).
    sufficiency: list[float]


def _residual(model: nn.Module, layer: int, input_ids: Tensor) -> Tensor:
    block = find_components(model, input_ids).layers[layer].block
    saved: list[Tensor] = []
    handles = [
        block.register_forward_pre_hook(
            lambda _, a, k: saved.append(block_input(a, k).detach()), with_kwargs=True
        )
    ]
    with hooks(handles), torch.no_grad():
        model(input_ids=input_ids)
    return saved[0]


def _logit_from(
    model: nn.Module, layer: int, input_ids: Tensor, answers: Tensor, residual: Tensor
) -> Tensor:
    """The answer logit at the last position with block ``layer``'s input replaced."""
    block = find_components(model, input_ids).layers[layer].block
    handles = [
        block.register_forward_pre_hook(
            lambda _, a, k: with_block_input(a, k, residual), with_kwargs=True
        )
    ]
    with hooks(handles):
        logits = model(input_ids=input_ids).logits[:, -1]
    return logits[torch.arange(len(answers)), answers]


def position_scores(
    model: nn.Module,
    input_ids: Tensor,
    answers: Tensor,
    layer: int,
    method: str = "gim",
    *,
    steps: int = 50,
    config: GIMConfig | None = None,
) -> Tensor:
    r"""
    Scores of the residual-stream positions that block ``layer`` reads.

    Args:
        model (nn.Module): A transformers causal LM.
        input_ids (Tensor): ``batch x tokens`` (no padding).
        answers (Tensor): The answer token per prompt (its last-position logit is the target).
        layer (int): The block.
        method (str, optional): ``"gim"``, ``"atp"`` or ``"ig"``. Default: ``"gim"``
        steps (int, optional): Integration points of ``"ig"``. Default: 50
        config (GIMConfig, optional): The GIM settings.

    Returns:
        *Tensor*: ``batch x tokens`` scores.
    """
    if method not in LAYER_METHODS:
        raise ValueError(f"method must be one of {LAYER_METHODS}, got {method!r}.")
    clean = _residual(model, layer, input_ids)
    mean = clean.mean(1, keepdim=True)
    points = [0.0] if method != "ig" else [k / (steps - 1) for k in range(steps)]
    grad = torch.zeros_like(clean)
    rules = (
        gim_rules(model, config=config, example_inputs=input_ids)
        if method == "gim"
        else contextlib.nullcontext()
    )
    with rules, torch.enable_grad():
        for alpha in points:
            x = ((1 - alpha) * clean + alpha * mean).requires_grad_(True)
            logit = _logit_from(model, layer, input_ids, answers, x)
            (g,) = torch.autograd.grad(logit.sum(), x)
            grad += g / len(points)
    return ((clean - mean) * grad).sum(-1)


def layer_faithfulness(
    model: nn.Module,
    input_ids: Tensor,
    answers: Tensor,
    *,
    methods: tuple[str, ...] = LAYER_METHODS,
    layers: list[int] | None = None,
    steps: int = 50,
    config: GIMConfig | None = None,
) -> list[LayerFaithfulness]:
    r"""
    The GIM paper's layer experiment (see the module docstring).

    Args:
        model (nn.Module): A transformers causal LM.
        input_ids (Tensor): ``batch x tokens`` prompts of one length (no padding).
        answers (Tensor): The answer token of each prompt.
        methods (tuple of str, optional): Any of ``"gim"``, ``"atp"``, ``"ig"``.
        layers (list of int, optional): Blocks to score. Default: all
        steps (int, optional): Integration points of ``"ig"``. Default: 50
        config (GIMConfig, optional): The GIM settings.

    Returns:
        *list[LayerFaithfulness]*: one per method.

    Examples::

        >>> from captum_gim.metrics import layer_faithfulness
        >>> rows = layer_faithfulness(model, input_ids, answers)
        >>> rows[0].method, rows[0].comprehensiveness
    """
    from captum_gim.metrics import comprehensiveness, sufficiency

    layers = list(range(find_components(model, input_ids).num_layers)) if layers is None else layers
    out = []
    for method in methods:
        comp, suff = [], []
        for layer in layers:
            scores = position_scores(
                model, input_ids, answers, layer, method, steps=steps, config=config
            )
            clean = _residual(model, layer, input_ids)

            def forward(
                marked: Tensor, real: Tensor, layer: int = layer, clean: Tensor = clean
            ) -> Tensor:
                rows = _rows_of(real, input_ids)
                x = clean[rows].clone()
                replaced = marked == _REPLACED
                x[replaced] = x.mean(1, keepdim=True).expand_as(x)[replaced]
                with torch.no_grad():
                    logits = _logit_from(model, layer, real, answers[rows], x)
                return logits

            args: Any = (input_ids,)
            c = comprehensiveness(
                forward, input_ids, scores, _REPLACED, additional_forward_args=args
            )
            s = sufficiency(forward, input_ids, scores, _REPLACED, additional_forward_args=args)
            comp.append(float(c.normalized_aopc.mean()))
            suff.append(float(s.normalized_aopc.mean()))
        out.append(LayerFaithfulness(method, comp, suff))
    return out


def _rows_of(real: Tensor, input_ids: Tensor) -> Tensor:
    """The prompt each row of ``real`` (copies of one prompt) comes from."""
    match = (input_ids[None] == real[:, None]).all(-1)  # copies x batch
    return match.float().argmax(1)
