"""Reliability: faults, bad input, callers' tensors, threads, compile, checkpointing.

Every fault injected here must leave the model exactly as it was (hooks, configs,
training flags, parameters, buffers, requires_grad, .grad, compiled calls) and the
next call must give exactly the results of an untouched model.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable

import pytest
import torch
from captum.attr import IntegratedGradients, Saliency
from tiny_models import FAMILY_BY_NAME, assert_same, logits_of, sample_ids, snapshot
from torch import nn

import captum_gim.rules.norms as norms
import captum_gim.sites.exclusive as exclusive
import captum_gim.sites.install as install
import captum_gim.sites.norms.hooks as norm_hooks
from captum_gim import GIMAttribution, GIMConfig, LayerGIM, gim_rules


def _prepare(model: nn.Module) -> nn.Module:
    """Some frozen parameters and some existing .grad, which must survive."""
    model.get_input_embeddings().weight.requires_grad_(False)
    head = model.get_output_embeddings() or model.lm_head
    head.weight.grad = torch.full_like(head.weight, 0.5)
    return model


def _gim(model: nn.Module, embeds: torch.Tensor, **kwargs) -> torch.Tensor:
    return GIMAttribution(logits_of(model), model, **kwargs).attribute(embeds, target=3)


def _plain(model: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    return Saliency(logits_of(model)).attribute(embeds, target=3, abs=False)


class _Boom(Exception):
    pass


def _raise(error: BaseException) -> Callable[..., None]:
    def fail(*_: object, **__: object) -> None:
        raise error

    return fail


def _fault_forward_raises(model, embeds, monkeypatch):
    def forward(e):
        model(inputs_embeds=e)
        raise _Boom("forward failed after the model ran")

    return lambda: GIMAttribution(forward, model).attribute(embeds, target=3), _Boom, None


def _fault_invalid_target(model, embeds, monkeypatch):
    return lambda: _gim_target(model, embeds, 10_000), IndexError, None


def _gim_target(model, embeds, target):
    return GIMAttribution(logits_of(model), model).attribute(embeds, target=target)


def _fault_interrupt_in_tensor_hook(model, embeds, monkeypatch):
    def register(_, __, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden.register_hook(_raise(KeyboardInterrupt()))

    first_block = next(m for n, m in model.named_modules() if n.endswith(("layers.0", "h.0")))
    handle = first_block.register_forward_hook(register)
    return lambda: _gim(model, embeds), KeyboardInterrupt, handle.remove


def _fault_interrupt_in_module_backward_hook(model, embeds, monkeypatch):
    norm = [m for n, m in model.named_modules() if n.endswith(("norm", "ln_f"))][-1]
    handle = norm.register_full_backward_hook(_raise(KeyboardInterrupt()))
    return lambda: _gim(model, embeds), KeyboardInterrupt, handle.remove


def _fault_rule_fails_in_forward(model, embeds, monkeypatch):
    monkeypatch.setattr(norm_hooks, "frozen_rms_norm", _raise(_Boom("rms rule failed")))
    monkeypatch.setattr(norm_hooks, "frozen_layer_norm", _raise(_Boom("layer-norm rule failed")))
    return lambda: _gim(model, embeds), _Boom, None


def _fault_rule_fails_in_backward(model, embeds, monkeypatch):
    monkeypatch.setattr(norms._FrozenNorm, "backward", staticmethod(_raise(_Boom("backward"))))
    return lambda: _gim(model, embeds), _Boom, None


def _fault_install_fails_halfway(model, embeds, monkeypatch):
    original = install.route_attention
    calls = []

    def route(module, config, *args):
        calls.append(module)
        if len(calls) == 2:
            raise _Boom("second attention module could not be routed")
        return original(module, config, *args)

    monkeypatch.setattr(install, "route_attention", route)
    return lambda: _gim(model, embeds), _Boom, None


def _fault_interrupt_in_integrated_gradients(model, embeds, monkeypatch):
    calls = []

    def forward(e):
        calls.append(1)
        if len(calls) == 1:
            e.register_hook(_raise(KeyboardInterrupt()))
        return logits_of(model)(e)

    def run():
        with gim_rules(model):
            IntegratedGradients(forward).attribute(embeds, target=3, n_steps=4)

    return run, KeyboardInterrupt, None


def _fault_interrupt_in_layer_gim(model, embeds, monkeypatch):
    ids = sample_ids()
    layer = model.get_input_embeddings()

    def forward(input_ids):
        out = model(input_ids).logits[:, -1]
        out.register_hook(_raise(KeyboardInterrupt()))
        return out

    return lambda: LayerGIM(forward, layer, model).attribute(ids, target=3), KeyboardInterrupt, None


FAULTS = [
    _fault_forward_raises,
    _fault_invalid_target,
    _fault_interrupt_in_tensor_hook,
    _fault_interrupt_in_module_backward_hook,
    _fault_rule_fails_in_forward,
    _fault_rule_fails_in_backward,
    _fault_install_fails_halfway,
    _fault_interrupt_in_integrated_gradients,
    _fault_interrupt_in_layer_gim,
]
MODELS = [("llama", "sdpa"), ("gpt2", "eager")]
# The experts' gated split registers tensor hooks in the forward pass: faults in
# the backward pass must not leave those behind either.
CASES = [(fault, *model) for fault in FAULTS for model in MODELS] + [
    (_fault_interrupt_in_tensor_hook, "qwen2_moe", "sdpa"),
    (_fault_rule_fails_in_backward, "qwen2_moe", "sdpa"),
]
_REFERENCES: dict[tuple[str, str], tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _reference(name: str, implementation: str):
    if (name, implementation) not in _REFERENCES:
        model = _prepare(FAMILY_BY_NAME[name].build(implementation))
        embeds = model.get_input_embeddings()(sample_ids()).detach()
        _REFERENCES[name, implementation] = (
            model,
            embeds,
            _gim(model, embeds),
            _plain(model, embeds),
        )
    return _REFERENCES[name, implementation]


@pytest.mark.parametrize(
    ("fault", "name", "implementation"),
    CASES,
    ids=[f"{f.__name__.removeprefix('_fault_')}-{n}-{i}" for f, n, i in CASES],
)
def test_model_left_exactly_as_it_was_after_a_fault(
    fault, name, implementation, monkeypatch
) -> None:
    model, embeds, gim_before, plain_before = _reference(name, implementation)
    before = snapshot(model)
    run, error, cleanup = fault(model, embeds, monkeypatch)
    injected_hooks = snapshot(model)["hooks"]  # a fault's own injection hook is not GIM's
    with pytest.raises(error):
        run()
    after = snapshot(model)
    assert after["hooks"] == injected_hooks
    after["hooks"] = before["hooks"]
    assert_same(before, after)
    if cleanup is not None:
        cleanup()
    monkeypatch.undo()
    assert_same(before, snapshot(model))
    # Usable again, with exactly the results of an untouched model.
    assert torch.equal(_gim(model, embeds), gim_before)
    assert torch.equal(_plain(model, embeds), plain_before)


def test_callers_tensors_are_never_modified() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa")
    ids = sample_ids()
    leaf = model.get_input_embeddings()(ids).detach()
    leaf_requiring_grad = leaf.clone().requires_grad_()
    non_leaf = model.get_input_embeddings()(ids)  # requires grad through the embedding weights
    baseline = torch.randn_like(leaf[:1])
    mask = torch.ones(ids.shape, dtype=torch.long)
    target = torch.tensor([3, 5])
    tensors = [leaf, leaf_requiring_grad, non_leaf, baseline, mask, target]
    state = [(t.clone(), t._version, t.requires_grad, t.grad_fn, t.is_leaf) for t in tensors]
    gim = GIMAttribution(logits_of(model), model)
    for inputs in (leaf, leaf_requiring_grad, non_leaf):
        got = gim.attribute(inputs, baselines=baseline, target=target, additional_forward_args=mask)
        assert torch.isfinite(got).all()
    layer = LayerGIM(
        lambda i, m: model(i, attention_mask=m).logits[:, -1], model.get_input_embeddings(), model
    )
    layer.attribute(ids, target=target, additional_forward_args=mask, layer_baselines=baseline)
    for tensor, (value, version, requires_grad, grad_fn, is_leaf) in zip(tensors, state):
        assert torch.equal(tensor, value) and tensor._version == version
        assert tensor.requires_grad == requires_grad and tensor.grad_fn is grad_fn
        assert tensor.is_leaf == is_leaf and (not is_leaf or tensor.grad is None)


def test_forward_writing_into_its_input_is_refused_and_the_input_kept() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa")
    embeds = model.get_input_embeddings()(sample_ids()).detach()
    original = embeds.clone()

    def forward(e):
        e.mul_(2.0)
        return logits_of(model)(e)

    with pytest.raises(RuntimeError, match="in-place"):
        GIMAttribution(forward, model).attribute(embeds, target=3)
    assert torch.equal(embeds, original) and not embeds.requires_grad


def test_shared_input_tensor_across_threads() -> None:
    """A starts, B starts on the same input tensor, A finishes while B is in its forward.

    With Captum's apply/undo_gradient_requirements, A would switch requires_grad
    of the shared tensor off under B's feet and B's backward would fail; GIM
    differentiates detached aliases, so both get their single-threaded result.
    """
    models = [FAMILY_BY_NAME["llama"].build("sdpa") for _ in range(2)]
    embeds = models[0].get_input_embeddings()(sample_ids()).detach()
    expected = [_gim(model, embeds) for model in models]
    a_in_forward, b_in_forward, a_done = threading.Event(), threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def forward_a(e):
        a_in_forward.set()
        assert b_in_forward.wait(timeout=60)
        return logits_of(models[0])(e)

    def forward_b(e):
        b_in_forward.set()
        output = logits_of(models[1])(e)
        assert a_done.wait(timeout=60)
        return output

    def run(key: str, forward, model, done: threading.Event | None) -> None:
        try:
            results[key] = GIMAttribution(forward, model).attribute(embeds, target=3)
        except Exception as error:  # reported below
            results[key] = error
        finally:
            if done is not None:
                done.set()

    a = threading.Thread(target=run, args=("a", forward_a, models[0], a_done))
    a.start()
    assert a_in_forward.wait(timeout=60)
    b = threading.Thread(target=run, args=("b", forward_b, models[1], None))
    b.start()
    a.join()
    b.join()
    for key, value in zip("ab", expected):
        assert isinstance(results[key], torch.Tensor), results[key]
        assert torch.equal(results[key], value)
    assert not embeds.requires_grad


def test_threads_mixing_methods_families_and_plain_gradients() -> None:
    llama = FAMILY_BY_NAME["llama"]
    models = [
        llama.build("sdpa"),
        llama.build("eager"),
        FAMILY_BY_NAME["gpt2"].build("sdpa"),
        llama.build("sdpa"),
    ]
    ids = sample_ids(length=12)

    def job(index: int) -> torch.Tensor:
        model = models[index]
        embeds = model.get_input_embeddings()(ids).detach()
        if index == 0:
            return _gim(model, embeds, temperature=2.0)
        if index == 1:
            layer = LayerGIM(
                lambda i: model(i).logits[:, -1],
                model.get_input_embeddings(),
                model,
                temperature=3.0,
                q_scale=1.0,
                freeze_norm=False,
            )
            return layer.attribute(ids, target=[3, 4])
        if index == 2:
            return _gim(model, embeds, config=GIMConfig(gate_scale=1.0, v_scale=0.3))
        return _plain(model, embeds)  # same class as models 0 and 1, no rules

    expected = [job(i) for i in range(4)]
    barrier = threading.Barrier(4)
    results: dict[int, list] = {i: [] for i in range(4)}

    def work(index: int) -> None:
        barrier.wait()
        for _ in range(3):
            try:
                results[index].append(job(index))
            except Exception as error:
                results[index].append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(4):
        for got in results[index]:
            assert isinstance(got, torch.Tensor), got
            assert torch.equal(got, expected[index]), index


def test_same_model_in_two_threads_is_refused_not_corrupted() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa")
    embeds = model.get_input_embeddings()(sample_ids()).detach()
    expected = _gim(model, embeds)
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with gim_rules(model):
            inside.set()
            release.wait(timeout=60)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(timeout=60)
    try:
        with pytest.raises(RuntimeError, match="already active"):
            _gim(model, embeds)
    finally:
        release.set()
        holder.join()
    assert torch.equal(_gim(model, embeds), expected)


def test_rules_on_a_model_and_its_submodule_are_never_stacked() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa")
    embeds = model.get_input_embeddings()(sample_ids()).detach()
    expected = _gim(model, embeds)
    before = snapshot(model)

    def inner(e):
        return model.lm_head(model.model(inputs_embeds=e).last_hidden_state)[:, -1]

    with gim_rules(model):
        with pytest.raises(RuntimeError, match="shares module"):
            GIMAttribution(inner, model.model).attribute(embeds, target=3)
    with gim_rules(model.model):
        with pytest.raises(RuntimeError, match="already active"):
            with gim_rules(model):
                pass
    assert_same(before, snapshot(model))
    assert torch.equal(_gim(model, embeds), expected)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        (64, IndexError, r"target = 64 is out of range .* shape \(2, 64\).* \[-64, 63\]"),
        (-65, IndexError, r"target = -65 is out of range"),
        ([1, 99], IndexError, r"target\[1\] = 99 is out of range .* \[0, 63\]"),
        (torch.tensor([1, 70]), IndexError, r"target\[1\] = 70"),
        (torch.tensor([-1, 2]), IndexError, r"target\[0\] = -1 .* \[0, 63\]"),
        ((0, 5), ValueError, r"target = \(0, 5\) has 2 indices.*at most 1"),
        ([1, 2, 3], ValueError, r"target has 3 entries but the batch has 2"),
        (torch.tensor([[1], [2]]), ValueError, r"target has shape \(2, 1\)"),
        (torch.tensor(1.0), TypeError, r"target has dtype torch.float32"),
        (None, ValueError, r"target is None, but forward_func returns \(64,\) outputs"),
    ],
)
def test_bad_targets_are_named_before_any_backward(llama, embeds, target, error, message) -> None:
    backward_ran = []
    handle = llama.lm_head.register_full_backward_hook(lambda *_: backward_ran.append(1))
    try:
        with pytest.raises(error, match=message):
            _gim_target(llama, embeds, target)
    finally:
        handle.remove()
    assert not backward_ran and not exclusive._active_modules


def test_layer_gim_target_and_output_checks(llama) -> None:
    layer = llama.get_input_embeddings()
    with pytest.raises(IndexError, match=r"target = \(-1, 64\) .* shape \(2, 7, 64\)"):
        LayerGIM(lambda i: llama(i).logits, layer, llama).attribute(sample_ids(), target=(-1, 64))
    with pytest.raises(ValueError, match="a list of ints, which needs an output of shape"):
        LayerGIM(lambda i: llama(i).logits, layer, llama).attribute(sample_ids(), target=[1, 2])
    with pytest.raises(ValueError, match="single scalar"):
        LayerGIM(lambda i: llama(i).logits.sum(), layer, llama).attribute(sample_ids())


@pytest.mark.parametrize("shape", [(2, 0), (0, 5)])
def test_empty_token_ids_are_refused(llama, shape) -> None:
    layer = llama.get_input_embeddings()
    with pytest.raises(ValueError, match=r"inputs\[0\] is empty"):
        LayerGIM(lambda i: llama(i).logits[:, -1], layer, llama).attribute(
            torch.zeros(shape, dtype=torch.long), target=3
        )


def test_empty_token_dimension_of_embeddings_is_refused(llama) -> None:
    with pytest.raises(ValueError, match=r"inputs\[0\] is empty \(shape \(2, 0, 32\)\)"):
        _gim_target(llama, torch.zeros(2, 0, 32), 3)


def test_baseline_of_another_dtype_or_device_is_named(llama, embeds) -> None:
    gim = GIMAttribution(logits_of(llama), llama)
    with pytest.raises(
        TypeError, match=r"baselines\[0\] has dtype torch.float64 .*\.to\(torch.float32\)"
    ):
        gim.attribute(embeds, baselines=torch.zeros(2, 7, 32, dtype=torch.float64), target=3)
    with pytest.raises(ValueError, match=r"baselines\[0\] is on meta"):
        gim.attribute(embeds, baselines=torch.zeros(2, 7, 32, device="meta"), target=3)
    layer = LayerGIM(lambda i: llama(i).logits[:, -1], llama.get_input_embeddings(), llama)
    with pytest.raises(ValueError, match=r"baselines\[0\] has shape \(3, 7, 32\)"):
        layer.attribute(sample_ids(), target=3, layer_baselines=torch.zeros(3, 7, 32))


@pytest.mark.parametrize(
    ("setting", "value", "error"),
    [
        ("temperature", 0.0, ValueError),
        ("temperature", -2.0, ValueError),
        ("temperature", math.nan, ValueError),
        ("q_scale", math.inf, ValueError),
        ("up_scale", math.nan, ValueError),
        ("v_scale", "0.5", TypeError),
    ],
)
def test_bad_settings_are_refused_by_every_entry_point(llama, setting, value, error) -> None:
    forward = logits_of(llama)
    with pytest.raises(error, match=setting):
        GIMAttribution(forward, llama, **{setting: value})
    with pytest.raises(error, match=setting):
        LayerGIM(forward, llama.get_input_embeddings(), llama, **{setting: value})
    with pytest.raises(error, match=setting):
        with gim_rules(llama, **{setting: value}):
            pass
    assert not exclusive._active_modules


# ----------------------------------------------------- training mode, dropout


def test_training_mode_with_dropout_warns_and_stays_valid() -> None:
    model = FAMILY_BY_NAME["gpt2"].build("eager").train()
    embeds = model.get_input_embeddings()(sample_ids()).detach()
    with pytest.warns(UserWarning, match=r"training mode with active dropout .*model\.eval\(\)"):
        torch.manual_seed(5)
        first = _gim(model, embeds)
    with pytest.warns(UserWarning):
        torch.manual_seed(5)
        again = _gim(model, embeds)
    assert torch.isfinite(first).all() and torch.equal(first, again)
    # With the rules off the result is the plain gradient under the same dropout masks.
    with pytest.warns(UserWarning):
        torch.manual_seed(5)
        off = _gim(model, embeds, multiply_by_inputs=False, config=GIMConfig.all_rules_off())
    torch.manual_seed(5)
    assert torch.equal(off, _plain(model, embeds))


def test_attention_dropout_in_config_is_named() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa", attention_dropout=0.2).train()
    embeds = model.get_input_embeddings()(sample_ids()).detach()
    with pytest.warns(UserWarning, match="attention_dropout=0.2"):
        got = _gim(model, embeds)
    assert torch.isfinite(got).all()


def test_training_mode_without_dropout_does_not_warn() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa")
    embeds = model.get_input_embeddings()(sample_ids()).detach()
    expected = _gim(model, embeds)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(_gim(model, embeds), expected)


# ------------------------------------------------------------- torch.compile


class _LastLogits(nn.Module):
    """A forward function that is a module, so that it can be torch.compile'd."""

    def __init__(self, lm: nn.Module, from_ids: bool = False) -> None:
        super().__init__()
        self.lm, self.from_ids = lm, from_ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.lm(x) if self.from_ids else self.lm(inputs_embeds=x)
        return output.logits[:, -1]


def test_compiled_wrapper_as_forward_func_is_unwrapped() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa")
    ids = sample_ids()
    embeds = model.get_input_embeddings()(ids).detach()
    expected = _gim(model, embeds)
    forward = _LastLogits(model)
    compiled = torch.compile(forward, backend="eager")
    gim = GIMAttribution(compiled)
    assert gim.model is forward and gim.forward_func is forward
    assert torch.equal(gim.attribute(embeds, target=3), expected)
    assert torch.equal(GIMAttribution(compiled, compiled).attribute(embeds, target=3), expected)
    by_ids = torch.compile(_LastLogits(model, from_ids=True), backend="eager")
    layer = LayerGIM(by_ids, model.get_input_embeddings())
    assert layer.model is by_ids._orig_mod
    torch.testing.assert_close(layer.attribute(ids, target=3), expected, rtol=1e-5, atol=1e-7)


def test_compiled_wrapper_only_as_model_is_refused() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa")
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(TypeError, match=r"model is a torch.compile'd module .*_orig_mod"):
        GIMAttribution(lambda e: compiled(inputs_embeds=e).logits[:, -1], compiled)
    with pytest.raises(TypeError, match=r"model is a torch.compile'd module"):
        with gim_rules(compiled):
            pass
    model.model.layers[1] = torch.compile(model.model.layers[1], backend="eager")
    with pytest.raises(
        TypeError, match=r"Submodule 'model.layers.1' of model is a torch.compile'd"
    ):
        with gim_rules(model):
            pass
    assert not exclusive._active_modules


def test_module_compiled_in_place_runs_eagerly_under_the_rules() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa")
    embeds = model.get_input_embeddings()(sample_ids()).detach()
    expected = _gim(model, embeds)
    model.compile(backend="eager")
    model.model.layers[0].compile(backend="eager")
    before = snapshot(model)
    assert torch.equal(_gim(model, embeds), expected)
    with gim_rules(model):
        assert model._compiled_call_impl is None
    assert_same(before, snapshot(model))
    assert model._compiled_call_impl is not None


# --------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize(("name", "implementation"), [("llama", "sdpa"), ("gpt2", "eager")])
def test_gradient_checkpointing_gives_the_same_attributions(name, implementation) -> None:
    family = FAMILY_BY_NAME[name]
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) if name == "gpt2" else {}
    reference = family.build(implementation, **no_dropout)
    ids = sample_ids()
    embeds = reference.get_input_embeddings()(ids).detach()
    expected = _gim(reference, embeds)
    model = family.build(implementation, **no_dropout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated alias
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert torch.equal(_gim(model, embeds), expected)
    layer = LayerGIM(lambda i: model(i).logits[:, -1], model.get_input_embeddings(), model)
    torch.testing.assert_close(layer.attribute(ids, target=3), expected, rtol=1e-5, atol=1e-7)
    with gim_rules(model):  # the recomputation in the backward pass runs inside the block
        saliency = Saliency(logits_of(model)).attribute(embeds, target=3, abs=False)
    assert torch.equal(saliency * embeds, expected)


def test_reentrant_gradient_checkpointing_says_why_not() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa")
    embeds = model.get_input_embeddings()(sample_ids()).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    before = snapshot(model)
    with pytest.raises(
        RuntimeError, match=r"reentrant gradient checkpointing .*use_reentrant': False"
    ):
        _gim(model, embeds)
    assert_same(before, snapshot(model))


# -------------------------------------------------------------- determinism


def _call_ig(model, embeds):
    with gim_rules(model):
        return IntegratedGradients(logits_of(model)).attribute(embeds, target=3, n_steps=4)


def _call_layer(model, embeds):
    ids = sample_ids()
    return LayerGIM(
        lambda i: model(i).logits[:, -1], model.get_input_embeddings(), model
    ).attribute(ids, target=[3, 9])


@pytest.mark.parametrize(
    ("name", "implementation", "call"),
    [
        ("llama", "eager", _gim),
        ("gemma2", "eager", _gim),
        ("qwen2_moe", "sdpa", _gim),
        ("gpt2", "sdpa", _call_layer),
        ("phi3", "sdpa", _call_ig),
    ],
)
def test_same_call_twice_is_bitwise_identical(name, implementation, call) -> None:
    model = FAMILY_BY_NAME[name].build(implementation)
    embeds = model.get_input_embeddings()(sample_ids(length=9)).detach()
    assert torch.equal(call(model, embeds), call(model, embeds))
