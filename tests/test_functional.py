"""The rule mathematics on bare tensors, against the formulas of docs/GIM_SPEC.md."""

from __future__ import annotations

import pytest
import torch

from captum_gim.rules import (
    frozen_layer_norm,
    frozen_rms_norm,
    scale_gradient,
    tempered_softmax,
    tempered_softmax_backward,
)

torch.manual_seed(0)


def _grad(output: torch.Tensor, inputs: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(output, inputs, upstream)[0]


@pytest.mark.parametrize("scale", [0.25, 0.5, 2.0, torch.tensor([0.5, 1.0, 2.0])])
def test_scale_gradient_is_identity_forward_and_scales_backward(scale) -> None:
    x = torch.randn(4, 3, requires_grad=True)
    upstream = torch.randn(4, 3)
    y = scale_gradient(x, scale)
    assert torch.equal(y, x)
    torch.testing.assert_close(_grad(y, x, upstream), upstream * scale)


def test_scale_of_one_returns_the_tensor_itself() -> None:
    x = torch.randn(3, requires_grad=True)
    assert scale_gradient(x, 1.0) is x


@pytest.mark.parametrize("with_weight", [True, False])
def test_frozen_layer_norm_matches_spec_formula(with_weight) -> None:
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64) if with_weight else None
    y = torch.nn.functional.layer_norm(x, (8,), weight, None, eps=1e-5)
    frozen = frozen_layer_norm(x, y, weight, 1e-5)
    assert torch.equal(frozen, y)
    upstream = torch.randn_like(y)
    w_g = upstream * (weight if weight is not None else 1.0)
    sigma = torch.sqrt(x.detach().var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = (w_g - w_g.mean(-1, keepdim=True)) / sigma
    torch.testing.assert_close(_grad(frozen, x, upstream), expected)


def test_frozen_layer_norm_differs_from_exact_gradient() -> None:
    x = torch.randn(3, 8, requires_grad=True)
    y = torch.nn.functional.layer_norm(x, (8,))
    upstream = torch.randn_like(y)
    exact = _grad(y, x, upstream)
    y = torch.nn.functional.layer_norm(x, (8,))
    frozen = _grad(frozen_layer_norm(x, y, None, 1e-5), x, upstream)
    assert not torch.allclose(exact, frozen, atol=1e-4)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_frozen_rms_norm_matches_spec_formula(offset) -> None:
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64)
    rho = torch.sqrt(x.detach().pow(2).mean(-1, keepdim=True) + 1e-6)
    y = (offset + weight) * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    frozen = frozen_rms_norm(x, y, weight, 1e-6, weight_offset=offset)
    assert torch.equal(frozen, y)
    upstream = torch.randn_like(y)
    torch.testing.assert_close(_grad(frozen, x, upstream), (offset + weight) * upstream / rho)


def test_frozen_norm_over_two_trailing_dims() -> None:
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.layer_norm(x, (4, 5))
    upstream = torch.randn_like(y)
    sigma = torch.sqrt(x.detach().var((-2, -1), unbiased=False, keepdim=True) + 1e-5)
    expected = (upstream - upstream.mean((-2, -1), keepdim=True)) / sigma
    got = _grad(frozen_layer_norm(x, y, None, 1e-5, n_dims=2), x, upstream)
    torch.testing.assert_close(got, expected)


def _tempered_reference(
    scores: torch.Tensor, upstream: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T times the derivative of softmax(s / T): the 1/T factor the rule drops, put back."""
    s = scores.detach().clone().requires_grad_()
    return temperature * _grad(torch.softmax(s / temperature, -1), s, upstream)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_tempered_softmax_backward_matches_spec(temperature) -> None:
    scores = 3 * torch.randn(2, 3, 4, 6, requires_grad=True)
    upstream = torch.randn(2, 3, 4, 6)
    probs = tempered_softmax(scores, temperature)
    assert torch.equal(probs, torch.softmax(scores.detach(), -1))
    expected = _tempered_reference(scores, upstream, temperature)
    torch.testing.assert_close(_grad(probs, scores, upstream), expected)


def test_temperature_one_is_the_exact_softmax_gradient() -> None:
    scores = torch.randn(5, 7, requires_grad=True)
    upstream = torch.randn(5, 7)
    exact = _grad(torch.softmax(scores, -1), scores, upstream)
    torch.testing.assert_close(_grad(tempered_softmax(scores, 1.0), scores, upstream), exact)


def test_masked_keys_get_zero_tempered_probability() -> None:
    scores = torch.randn(3, 6, dtype=torch.float64)
    scores[:, 4:] = float("-inf")
    upstream = torch.randn(3, 6, dtype=torch.float64)
    grad = tempered_softmax_backward(scores, upstream, 2.0)
    assert torch.all(grad[:, 4:] == 0)
    torch.testing.assert_close(
        grad[:, :4], _tempered_reference(scores[:, :4], upstream[:, :4], 2.0)
    )


def test_fully_masked_row_gets_zero_gradient() -> None:
    scores = torch.full((2, 5), float("-inf"))
    grad = tempered_softmax_backward(scores, torch.randn(2, 5), 2.0)
    assert torch.equal(grad, torch.zeros(2, 5))
