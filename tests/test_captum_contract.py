"""Captum's public contract for InputXGradient and LayerGradientXActivation.

Every call is made twice: GIM with all rules off against the Captum parent
(equal values), and GIM with its rules on (same shapes and types; the model has
LayerNorms, so the frozen-norm rule changes the values).
"""

from __future__ import annotations

import pytest
import torch
from captum.attr import InputXGradient, LayerGradientXActivation, NoiseTunnel
from captum.metrics import infidelity, sensitivity_max
from torch import Tensor, nn

from captum_gim import GIMAttribution, GIMConfig, LayerGIM
from captum_gim.attr.targets import TargetError, TargetIndexError

OFF = GIMConfig.all_rules_off()
BATCH = 3


class TwoInputModel(nn.Module):
    """Two inputs, a scalar extra argument, LayerNorms (a rule site), 4 outputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm_x = nn.LayerNorm(5)
        self.norm_y = nn.LayerNorm(6)
        self.linear_x = nn.Linear(5, 8)
        self.linear_y = nn.Linear(6, 8)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.norm_x.weight.add_(0.3 * torch.randn(5))
            self.norm_y.weight.add_(0.3 * torch.randn(6))

    def forward(self, x: Tensor, y: Tensor | None = None, scale: float = 1.0) -> Tensor:
        hidden = self.linear_x(self.norm_x(x))
        if y is not None:
            hidden = hidden + self.linear_y(self.norm_y(y))
        return self.head(torch.tanh(hidden)) * scale


@pytest.fixture
def model() -> TwoInputModel:
    return TwoInputModel().eval()


def _x() -> Tensor:
    return torch.randn(BATCH, 5, generator=torch.Generator().manual_seed(1))


def _y() -> Tensor:
    return torch.randn(BATCH, 6, generator=torch.Generator().manual_seed(2))


TARGETS = {
    "int": 2,
    "tuple": (1,),
    "list": [0, 3, 1],
    "tensor": torch.tensor([3, 0, 2]),
    "tensor_scalar": torch.tensor(1),
}


def _same_form(ours: object, reference: object) -> None:
    assert type(ours) is type(reference)
    if isinstance(reference, Tensor):
        assert isinstance(ours, Tensor)
        assert ours.shape == reference.shape and ours.dtype == reference.dtype
    else:
        assert isinstance(ours, tuple) and isinstance(reference, tuple)
        assert len(ours) == len(reference)
        for a, b in zip(ours, reference, strict=True):
            _same_form(a, b)


def _equal(ours: object, reference: object) -> None:
    _same_form(ours, reference)
    if isinstance(reference, Tensor):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    else:
        for a, b in zip(ours, reference, strict=True):  # type: ignore[call-overload]
            _equal(a, b)


def _differs(ours: object, reference: object) -> bool:
    if isinstance(reference, Tensor):
        return not torch.allclose(ours, reference, atol=1e-6)  # type: ignore[arg-type]
    return any(_differs(a, b) for a, b in zip(ours, reference, strict=True))  # type: ignore[call-overload]


# ---- InputXGradient ---------------------------------------------------------------


@pytest.mark.parametrize("target_name", sorted(TARGETS))
def test_single_tensor_input_every_target_form(model: TwoInputModel, target_name: str) -> None:
    target = TARGETS[target_name]
    reference = InputXGradient(model).attribute(_x(), target=target)
    _equal(GIMAttribution(model, config=OFF).attribute(_x(), target=target), reference)
    # positional target means the same as in Captum
    _equal(GIMAttribution(model, config=OFF).attribute(_x(), target), reference)
    ours = GIMAttribution(model).attribute(_x(), target)
    _same_form(ours, reference)
    assert _differs(ours, reference)  # the frozen-norm rule is on


def test_tuple_input_returns_tuple(model: TwoInputModel) -> None:
    reference = InputXGradient(model).attribute((_x(),), target=1)
    assert isinstance(reference, tuple)
    _equal(GIMAttribution(model, config=OFF).attribute((_x(),), 1), reference)
    _same_form(GIMAttribution(model).attribute((_x(),), 1), reference)


def test_multiple_inputs_with_additional_forward_args(model: TwoInputModel) -> None:
    inputs, extra = (_x(), _y()), (2.5,)
    reference = InputXGradient(model).attribute(inputs, [1, 2, 0], extra)
    ours_off = GIMAttribution(model, config=OFF).attribute(inputs, [1, 2, 0], extra)
    _equal(ours_off, reference)
    ours = GIMAttribution(model).attribute(inputs, [1, 2, 0], extra)
    _same_form(ours, reference)
    assert _differs(ours, reference)


def test_additional_forward_args_single_value_and_none(model: TwoInputModel) -> None:
    """Captum accepts a bare non-tuple extra argument and None."""
    for extra in (None, _y()):
        reference = InputXGradient(model).attribute(_x(), 0, extra)
        _equal(GIMAttribution(model, config=OFF).attribute(_x(), 0, extra), reference)


def test_target_none_for_one_output_per_example() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 1), nn.Flatten(0))
    reference = InputXGradient(net).attribute(_x())
    _equal(GIMAttribution(net, config=OFF).attribute(_x()), reference)


def test_plain_function_forward_with_rules_off_is_input_x_gradient() -> None:
    weight = torch.randn(5, 4, generator=torch.Generator().manual_seed(4))

    def forward(x: Tensor) -> Tensor:
        return torch.sin(x) @ weight

    reference = InputXGradient(forward).attribute(_x(), 2)
    _equal(GIMAttribution(forward, config=OFF).attribute(_x(), 2), reference)
    with pytest.raises(Exception, match="model="):
        GIMAttribution(forward)  # rules on: a model is needed


def test_multiply_by_inputs_false_is_the_gradient(model: TwoInputModel) -> None:
    x = _x().requires_grad_()
    (gradient,) = torch.autograd.grad(model(x)[:, 1].sum(), x)
    ours = GIMAttribution(model, config=OFF, multiply_by_inputs=False).attribute(_x(), 1)
    torch.testing.assert_close(ours, gradient)
    assert GIMAttribution(model, multiply_by_inputs=False).multiplies_by_inputs is False
    assert InputXGradient(model).multiplies_by_inputs is GIMAttribution(model).multiplies_by_inputs


def test_baselines_are_keyword_only_and_subtracted(model: TwoInputModel) -> None:
    baseline = 0.3 * torch.ones(BATCH, 5)
    x = _x().requires_grad_()
    (gradient,) = torch.autograd.grad(model(x)[:, 1].sum(), x)
    ours = GIMAttribution(model, config=OFF).attribute(_x(), 1, baselines=baseline)
    torch.testing.assert_close(ours, (_x() - baseline) * gradient)


@pytest.mark.parametrize("wrong_target", [0.5, torch.tensor([0.5, 0.1, 0.2]), "cat"])
def test_positional_float_or_string_target_raises_type_error(
    model: TwoInputModel, wrong_target: object
) -> None:
    """attribute(x, 0.5) -- a baseline by IntegratedGradients' position -- fails early."""
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(TypeError, match="target"):
        GIMAttribution(model).attribute(_x(), wrong_target)  # type: ignore[arg-type]
    assert not calls  # before any forward pass


def test_bool_passed_positionally_as_model_raises_hint(model: TwoInputModel) -> None:
    """Captum's InputXGradient(forward_func, multiply_by_inputs) by position."""
    with pytest.raises((TypeError, ValueError), match="multiply_by_inputs"):
        GIMAttribution(model, False)  # type: ignore[arg-type]


def test_convergence_delta_flag_of_parent(model: TwoInputModel) -> None:
    """InputXGradient has no convergence delta; neither has GIM."""
    assert InputXGradient(model).has_convergence_delta() is False
    assert GIMAttribution(model).has_convergence_delta() is False
    with pytest.raises(TypeError):
        GIMAttribution(model).attribute(_x(), 0, return_convergence_delta=True)  # type: ignore[call-arg]


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel(model: TwoInputModel, nt_type: str) -> None:
    def run(method: object) -> object:
        torch.manual_seed(7)
        return NoiseTunnel(method).attribute(  # type: ignore[arg-type]
            (_x(), _y()), nt_type=nt_type, nt_samples=4, stdevs=0.1, target=2
        )

    reference = run(InputXGradient(model))
    _equal(run(GIMAttribution(model, config=OFF)), reference)
    _same_form(run(GIMAttribution(model)), reference)


def test_captum_metrics_infidelity_and_sensitivity(model: TwoInputModel) -> None:
    def perturb(inputs: Tensor) -> tuple[Tensor, Tensor]:
        noise = 0.05 * torch.randn_like(inputs)
        return noise, inputs - noise

    def scores(method: InputXGradient | GIMAttribution) -> tuple[Tensor, Tensor]:
        attributions = method.attribute(_x(), 1)
        torch.manual_seed(11)
        inf = infidelity(model, perturb, _x(), attributions, target=1, n_perturb_samples=3)
        torch.manual_seed(12)
        sens = sensitivity_max(method.attribute, _x(), target=1, n_perturb_samples=3)
        return inf, sens

    reference = scores(InputXGradient(model))
    _equal(scores(GIMAttribution(model, config=OFF)), reference)
    _same_form(scores(GIMAttribution(model)), reference)


def _hook_counts(model: nn.Module) -> list[int]:
    return [
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    ]


def test_hooks_removed_on_failure(model: TwoInputModel) -> None:
    before = _hook_counts(model)
    with pytest.raises(IndexError):
        GIMAttribution(model).attribute(_x(), 9)
    with pytest.raises(IndexError):
        LayerGIM(model, model.norm_x).attribute(_x(), 9)

    def broken(x: Tensor) -> Tensor:
        model(x)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        GIMAttribution(broken, model=model).attribute(_x(), 0)
    assert _hook_counts(model) == before


# ---- exception types ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "captum_raises", "ours"),
    [
        (9, IndexError, TargetIndexError),
        ([0, 1], AssertionError, TargetError),
        ((0, 0), AssertionError, TargetError),
    ],
)
def test_target_errors_are_also_assertion_errors(
    model: TwoInputModel, target: object, captum_raises: type[Exception], ours: type[Exception]
) -> None:
    """Ours are ValueError/IndexError and AssertionError: except clauses written for
    Captum (AssertionError, or IndexError for an index out of range) catch them."""
    with pytest.raises(captum_raises):
        InputXGradient(model).attribute(_x(), target=target)  # type: ignore[arg-type]
    with pytest.raises(captum_raises):
        GIMAttribution(model).attribute(_x(), target)  # type: ignore[arg-type]
    with pytest.raises(ours) as raised:
        GIMAttribution(model).attribute(_x(), target)  # type: ignore[arg-type]
    assert isinstance(raised.value, AssertionError)
    base = IndexError if ours is TargetIndexError else ValueError
    assert isinstance(raised.value, base)
    assert "\n" not in str(raised.value)


# ---- LayerGradientXActivation ------------------------------------------------------


@pytest.mark.parametrize("target_name", sorted(TARGETS))
def test_layer_every_target_form(model: TwoInputModel, target_name: str) -> None:
    target = TARGETS[target_name]
    reference = LayerGradientXActivation(model, model.norm_x).attribute(_x(), target)
    _equal(LayerGIM(model, model.norm_x, config=OFF).attribute(_x(), target), reference)
    _same_form(LayerGIM(model, model.norm_x).attribute(_x(), target), reference)


@pytest.mark.parametrize("to_input", [False, True])
def test_layer_positional_arguments_mean_the_same(model: TwoInputModel, to_input: bool) -> None:
    """attribute(inputs, target, additional_forward_args, attribute_to_layer_input, grad_kwargs)."""
    inputs, extra = (_x(), _y()), (0.7,)
    layer = model.linear_y
    reference = LayerGradientXActivation(model, layer).attribute(inputs, 1, extra, to_input, {})
    ours = LayerGIM(model, layer, config=OFF).attribute(inputs, 1, extra, to_input, {})
    _equal(ours, reference)
    _same_form(LayerGIM(model, layer).attribute(inputs, 1, extra, to_input, {}), reference)


def test_layer_constructor_keywords_of_parent(model: TwoInputModel) -> None:
    for memory_efficient in (False, True):
        reference = LayerGradientXActivation(
            model, model.norm_x, device_ids=None, multiply_by_inputs=False
        ).attribute(_x(), 2)
        ours = LayerGIM(
            model,
            model.norm_x,
            device_ids=None,
            multiply_by_inputs=False,
            memory_efficient=memory_efficient,
            config=OFF,
        ).attribute(_x(), 2)
        _equal(ours, reference)


def test_layer_positional_device_ids_in_model_slot_raises_hint(model: TwoInputModel) -> None:
    """Captum's LayerGradientXActivation(forward_func, layer, device_ids) by position."""
    with pytest.raises((TypeError, ValueError), match="device_ids"):
        LayerGIM(model, model.norm_x, [0])  # type: ignore[arg-type]


def test_layer_list_of_layers(model: TwoInputModel) -> None:
    layers = [model.norm_x, model.linear_x, model.head]
    reference = LayerGradientXActivation(model, layers).attribute(_x(), 1)
    ours_off = LayerGIM(model, layers, config=OFF).attribute(_x(), 1)
    assert isinstance(ours_off, list) and len(ours_off) == 3
    for a, b in zip(ours_off, reference, strict=True):
        _equal(a, b)
    ours = LayerGIM(model, layers).attribute(_x(), 1)
    singles = [LayerGIM(model, layer).attribute(_x(), 1) for layer in layers]
    for a, b in zip(ours, singles, strict=True):
        _equal(a, b)


def test_layer_list_with_per_layer_baselines(model: TwoInputModel) -> None:
    layers = [model.norm_x, model.linear_x]
    baselines = [torch.full((BATCH, 5), 0.1), torch.full((BATCH, 8), -0.2)]
    ours = LayerGIM(model, layers).attribute(_x(), 1, layer_baselines=baselines)
    singles = [
        LayerGIM(model, layer).attribute(_x(), 1, layer_baselines=baseline)
        for layer, baseline in zip(layers, baselines, strict=True)
    ]
    for a, b in zip(ours, singles, strict=True):
        _equal(a, b)
    # without the baseline the values differ
    assert _differs(ours[1], LayerGIM(model, model.linear_x).attribute(_x(), 1))


def test_layer_list_with_wrong_baselines_raises_before_backward(model: TwoInputModel) -> None:
    layers = [model.norm_x, model.linear_x]
    backward_calls = []
    model.head.register_full_backward_hook(lambda *_: backward_calls.append(1))
    with pytest.raises(ValueError, match="layer_baselines"):
        LayerGIM(model, layers).attribute(_x(), 1, layer_baselines=[torch.zeros(BATCH, 5)])
    with pytest.raises((ValueError, RuntimeError)):
        LayerGIM(model, layers).attribute(
            _x(), 1, layer_baselines=[torch.zeros(BATCH, 5), torch.zeros(BATCH, 3)]
        )
    assert not backward_calls


def test_layer_noise_tunnel(model: TwoInputModel) -> None:
    def run(method: object) -> object:
        torch.manual_seed(3)
        return NoiseTunnel(method).attribute(_x(), nt_samples=3, stdevs=0.1, target=0)  # type: ignore[arg-type]

    reference = run(LayerGradientXActivation(model, model.norm_x))
    _equal(run(LayerGIM(model, model.norm_x, config=OFF)), reference)
    _same_form(run(LayerGIM(model, model.norm_x)), reference)


def test_layer_convergence_delta_flag_of_parent(model: TwoInputModel) -> None:
    layer = LayerGIM(model, model.norm_x)
    assert (
        layer.has_convergence_delta()
        is LayerGradientXActivation(model, model.norm_x).has_convergence_delta()
    )
