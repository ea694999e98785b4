"""Soak test: 10,000 attributions of random sizes leave no memory or hook growth.

Not in the default run; run with ``python -m pytest -m soak -s tests/test_soak.py``.
"""

from __future__ import annotations

import gc
import random
import time

import psutil
import pytest
import torch
import torch.nn.modules.module as module_globals
from captum.attr import Saliency
from tiny_models import FAMILY_BY_NAME, VOCAB, logits_of
from torch import nn

import captum_gim.sites.attention.routed as attention
import captum_gim.sites.exclusive as exclusive
from captum_gim import GIMAttribution, LayerGIM, gim_rules

CALLS = 10_000
CHECKPOINT_EVERY = 1_000
WARM_UP = 1_000  # memory is compared from here on: allocator caches fill first
RSS_GROWTH_BOUND = 32 * 2**20
OBJECT_GROWTH_BOUND = 2_000


def _hooks(model: nn.Module) -> int:
    per_module = sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )
    per_parameter = sum(len(p._backward_hooks or {}) for p in model.parameters())
    global_hooks = sum(
        len(getattr(module_globals, name))
        for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
    )
    return per_module + per_parameter + global_hooks


def _live_state() -> dict[str, int]:
    gc.collect()
    return {
        "rss": psutil.Process().memory_info().rss,
        "objects": len(gc.get_objects()),
        "active": len(exclusive._active_modules),
        "sites": len(getattr(attention, "_sites", {})),
    }


def _one_call(model: nn.Module, rng: random.Random) -> None:
    batch, length = rng.randint(1, 3), rng.randint(1, 16)
    ids = torch.randint(0, VOCAB, (batch, length))
    embeds = model.get_input_embeddings()(ids).detach()
    forward = logits_of(model)
    kind = rng.random()
    target: object = rng.randrange(VOCAB)
    if rng.random() < 0.5:
        target = [rng.randrange(VOCAB) for _ in range(batch)]
    if kind < 0.55:
        baseline = rng.choice(
            [None, 0.5, torch.randn(1, length, 32), torch.randn(batch, length, 32)]
        )
        temperature = rng.choice([1.0, 2.0, 4.0])
        GIMAttribution(forward, model, temperature=temperature).attribute(
            embeds, baselines=baseline, target=target
        )
    elif kind < 0.75:
        LayerGIM(lambda i: model(i).logits[:, -1], model.get_input_embeddings(), model).attribute(
            ids, target=target
        )
    elif kind < 0.85:
        with gim_rules(model):
            Saliency(forward).attribute(embeds, target=target, abs=False)
    elif kind < 0.93:
        with pytest.raises(IndexError):
            GIMAttribution(forward, model).attribute(embeds, target=VOCAB + rng.randrange(5))
    else:

        def interrupted(e: torch.Tensor) -> torch.Tensor:
            output = forward(e)
            output.register_hook(_interrupt)
            return output

        with pytest.raises(KeyboardInterrupt):
            GIMAttribution(interrupted, model).attribute(embeds, target=target)


def _interrupt(_: torch.Tensor) -> None:
    raise KeyboardInterrupt


@pytest.mark.soak
def test_ten_thousand_attributions_without_growth() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = FAMILY_BY_NAME["llama"].build("sdpa")
        parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
        hooks = _hooks(model)
        rng = random.Random(0)
        torch.manual_seed(0)
        checkpoints = []
        start = time.perf_counter()
        for call in range(1, CALLS + 1):
            _one_call(model, rng)
            if call % CHECKPOINT_EVERY == 0:
                state = _live_state()
                state.update(call=call, hooks=_hooks(model), seconds=time.perf_counter() - start)
                checkpoints.append(state)
                print(
                    f"{call:>6} calls  {state['seconds']:7.1f} s  rss {state['rss'] / 2**20:7.1f} MiB"
                    f"  objects {state['objects']:>7}  hooks {state['hooks']}"
                    f"  active {state['active']}  sites {state['sites']}"
                )
                assert state["hooks"] == hooks and state["active"] == 0 and state["sites"] == 0
    finally:
        torch.set_num_threads(threads)
    warm = next(c for c in checkpoints if c["call"] == WARM_UP)
    last = checkpoints[-1]
    assert last["rss"] - warm["rss"] < RSS_GROWTH_BOUND, (warm["rss"], last["rss"])
    assert last["objects"] - warm["objects"] < OBJECT_GROWTH_BOUND, (
        warm["objects"],
        last["objects"],
    )
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, parameters[name]) and parameter.grad is None, name
