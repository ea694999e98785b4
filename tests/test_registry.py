"""The registration API: register_norm, register_gated_mlp, unregister.

A registered class gets its rule, equal to a reference written by formula here;
a wrong registration is refused on the first call by the per-call check (never
a wrong gradient); bad arguments raise one-line errors naming the fix; and
registrations are per class, removable and safe to make from several threads.
"""

from __future__ import annotations

import dataclasses
import doctest
import threading
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import captum_gim
from captum_gim import (
    GIMConfig,
    UnsupportedModuleError,
    gim_rules,
    register_gated_mlp,
    register_norm,
    unregister,
)
from captum_gim.sites import find_rule_sites
from captum_gim.sites import registry as registry_module

OFF = GIMConfig.all_rules_off()
FREEZE = dataclasses.replace(OFF, freeze_norm=True)
SPLIT = dataclasses.replace(OFF, gate_scale=0.3, up_scale=0.7)


class GainNorm(nn.Module):
    """An RMS norm the probe cannot read: its weight is ``gain``, its eps ``tiny``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.gain = nn.Parameter(1.0 + 0.2 * torch.randn(width))
        self.tiny = 3e-3

    def forward(self, x: Tensor) -> Tensor:
        return self.gain * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.tiny)


class SubGainNorm(GainNorm):
    pass


class GatedLinearUnit(nn.Module):
    """A SwiGLU whose parts have names of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_lin = nn.Linear(8, 12)
        self.up_lin = nn.Linear(8, 12)
        self.out = nn.Linear(12, 8)
        self.silu = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.silu(self.gate_lin(x)) * self.up_lin(x))


class FusedUnit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.both = nn.Linear(8, 24)
        self.out = nn.Linear(12, 8)
        self.silu = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.both(x).chunk(2, dim=-1)
        return self.out(self.silu(gate) * up)


@pytest.fixture(autouse=True)
def _clean_registry():
    yield
    for cls in (GainNorm, SubGainNorm, GatedLinearUnit, FusedUnit):
        unregister(cls)


def inputs() -> Tensor:
    return torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1)) + 0.3


def gradient(model: nn.Module, config: GIMConfig | None = None) -> Tensor:
    x = inputs().requires_grad_()
    weights = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))
    if config is None:
        return torch.autograd.grad((model(x) * weights).sum(), x)[0]
    with gim_rules(model, config=config):
        output = model(x)
        with torch.no_grad():
            assert torch.equal(output, model(x.detach()))  # the forward is unchanged
        return torch.autograd.grad((output * weights).sum(), x)[0]


def read_out() -> Tensor:
    return torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2))


def model_with(part: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), part).eval()


# --- norms --------------------------------------------------------------------------------


def test_unreadable_norm_is_refused_with_the_registration_hint() -> None:
    with pytest.raises(UnsupportedModuleError, match="register_norm"):
        find_rule_sites(model_with(GainNorm()))


def test_registered_norm_gets_the_frozen_statistic() -> None:
    torch.manual_seed(0)
    model = model_with(GainNorm())
    linear, norm = model[0], model[1]
    with register_norm(GainNorm, centered=False, weight="gain", eps="tiny"):
        assert len(find_rule_sites(model).norms) == 1
        got = gradient(model, FREEZE)
    # Reference: y = gain * h / rho with rho a constant, h = linear(x).
    x = inputs().requires_grad_()
    h = linear(x)
    rho = h.pow(2).mean(-1, keepdim=True).add(norm.tiny).sqrt().detach()
    want = torch.autograd.grad((norm.gain * h / rho * read_out()).sum(), x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert float((got - gradient(model)).norm()) > 1e-3


def test_wrongly_registered_norm_is_refused_on_the_call() -> None:
    model = model_with(GainNorm())
    with register_norm(GainNorm, centered=True, weight="gain", eps="tiny"):
        with pytest.raises(UnsupportedModuleError, match=r"GainNorm.*differs"):
            gradient(model, FREEZE)


def test_registration_that_does_not_fit_the_module_names_the_fix() -> None:
    model = model_with(GainNorm())
    with register_norm(GainNorm, centered=False, weight="gain", eps="epsilon"):
        with pytest.raises(UnsupportedModuleError, match=r"eps='epsilon'.*register_norm"):
            find_rule_sites(model)
    with register_norm(GainNorm, centered=False, eps=1e-6):  # no tensor called weight
        with pytest.raises(UnsupportedModuleError, match="weight='weight'"):
            find_rule_sites(model)
    with pytest.warns(UserWarning, match="bias='beta'"):
        with register_norm(GainNorm, centered=False, weight="gain", eps=1e-6, bias="beta"):
            find_rule_sites(model, strict=False)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: register_norm(GainNorm(), centered=False), TypeError, "type\\(module\\)"),
        (lambda: register_norm(int, centered=False), TypeError, "nn.Module subclass"),
        (lambda: register_norm(GainNorm, centered="yes"), TypeError, "centered must be"),
        (lambda: register_norm(GainNorm, centered=False, scale="w+1"), ValueError, "'1\\+w'"),
        (lambda: register_norm(GainNorm, centered=False, eps=-1.0), ValueError, "eps must"),
        (lambda: register_norm(GainNorm, centered=False, weight="g.w"), TypeError, "weight"),
        (
            lambda: register_gated_mlp(GatedLinearUnit, gate=1, up="b", down="c", activation="d"),
            TypeError,
            "gate must be the name",
        ),
    ],
)
def test_bad_registrations_raise_one_line_errors(call: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message) as raised:
        call()
    assert "\n" not in str(raised.value)


def test_registration_is_per_class_and_removable() -> None:
    handle = register_norm(GainNorm, centered=False, weight="gain", eps="tiny")
    assert len(find_rule_sites(model_with(GainNorm())).norms) == 1
    with pytest.raises(UnsupportedModuleError):  # a subclass is not registered
        find_rule_sites(model_with(SubGainNorm()))
    again = register_norm(GainNorm, centered=False, weight="gain", eps=3e-3)
    handle.remove()  # an older handle leaves the newer registration alone
    assert len(find_rule_sites(model_with(GainNorm())).norms) == 1
    again.remove()
    with pytest.raises(UnsupportedModuleError):
        find_rule_sites(model_with(GainNorm()))
    register_norm(GainNorm, centered=False, weight="gain", eps="tiny")
    unregister(GainNorm)
    with pytest.raises(UnsupportedModuleError):
        find_rule_sites(model_with(GainNorm()))


def test_registrations_from_several_threads_all_land() -> None:
    classes = [type(f"ThreadNorm{i}", (GainNorm,), {}) for i in range(16)]
    barrier = threading.Barrier(len(classes))

    def register(cls: type[nn.Module]) -> None:
        barrier.wait()
        register_norm(cls, centered=False, weight="gain", eps="tiny")

    threads = [threading.Thread(target=register, args=(cls,)) for cls in classes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        model = nn.Sequential(*(cls() for cls in classes))
        assert len(find_rule_sites(model).norms) == len(classes)
    finally:
        for cls in classes:
            unregister(cls)
    assert not any(cls in registry_module._registry for cls in classes)


# --- gated MLPs ---------------------------------------------------------------------------


def test_unrecognised_gated_mlp_is_refused_with_the_registration_hint() -> None:
    with pytest.raises(UnsupportedModuleError, match="register_gated_mlp"):
        find_rule_sites(model_with(GatedLinearUnit()))


def test_registered_gated_mlp_gets_the_split() -> None:
    model = model_with(GatedLinearUnit())
    linear, mlp = model[0], model[1]
    with register_gated_mlp(
        GatedLinearUnit, gate="gate_lin", up="up_lin", down="out", activation="silu"
    ):
        got = gradient(model, SPLIT)
    x = inputs().requires_grad_()
    h = linear(x)
    gate, up = mlp.gate_lin(h), mlp.up_lin(h)
    # Reference: the gradient into gate is 0.3 of the exact one, into up 0.7.
    gate = 0.3 * gate + 0.7 * gate.detach()
    up = 0.7 * up + 0.3 * up.detach()
    want = torch.autograd.grad(
        (mlp.out(torch.nn.functional.silu(gate) * up) * read_out()).sum(), x
    )[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert float((got - gradient(model)).norm()) > 1e-3


def test_registered_fused_gated_mlp_gets_the_split() -> None:
    model = model_with(FusedUnit())
    linear, mlp = model[0], model[1]
    with register_gated_mlp(FusedUnit, gate="both", up=None, down="out", activation="silu"):
        got = gradient(model, SPLIT)
    x = inputs().requires_grad_()
    gate, up = mlp.both(linear(x)).chunk(2, dim=-1)
    gate = 0.3 * gate + 0.7 * gate.detach()
    up = 0.7 * up + 0.3 * up.detach()
    want = torch.autograd.grad(
        (mlp.out(torch.nn.functional.silu(gate) * up) * read_out()).sum(), x
    )[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_wrongly_registered_gated_mlp_is_refused_on_the_call() -> None:
    model = model_with(GatedLinearUnit())
    with register_gated_mlp(
        GatedLinearUnit, gate="up_lin", up="gate_lin", down="out", activation="silu"
    ):
        with pytest.raises(UnsupportedModuleError, match=r"GatedLinearUnit.*'out' differs"):
            gradient(model, SPLIT)


def test_gated_registration_that_does_not_fit_names_the_fix() -> None:
    model = model_with(GatedLinearUnit())
    with register_gated_mlp(
        GatedLinearUnit, gate="gate_lin", up="up_lin", down="down", activation="silu"
    ):
        with pytest.raises(UnsupportedModuleError, match=r"down='down'.*register_gated_mlp"):
            find_rule_sites(model)
    with register_gated_mlp(
        GatedLinearUnit, gate="gate_lin", up="up_lin", down="out", activation="act"
    ):
        with pytest.raises(UnsupportedModuleError, match="activation='act'"):
            find_rule_sites(model)


def test_registry_examples_run() -> None:
    result = doctest.testmod(registry_module, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


def test_registration_functions_are_public() -> None:
    for name in ("register_norm", "register_gated_mlp", "unregister"):
        assert name in captum_gim.__all__
