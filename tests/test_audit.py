"""The forward-pass audit: every softmax, normalization and product of two
input-dependent tensors is covered by a rule, kept exact by design, or refused
by name; parts are refused only for rules that are on; and the audit runs once
per model."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from captum.attr import InputXGradient
from reference import ReferenceGap, reference_gradient
from tiny_models import FAMILIES, FAMILY_BY_NAME, assert_same, logits_of, sample_ids, snapshot
from torch import Tensor, nn

import captum_gim.sites.audit.forward as audit_module
from captum_gim import (
    GIMAttribution,
    GIMConfig,
    LayerGIM,
    UnsupportedModuleError,
    gim_rules,
    register_gated_mlp,
)
from captum_gim.sites.audit.forward import run_audit
from captum_gim.sites.discovery import discover_sites

OFF = GIMConfig.all_rules_off()
MLP_ONLY = GIMConfig(temperature=1.0, freeze_norm=False, q_scale=1.0, k_scale=1.0, v_scale=1.0)


def scaled(x: Tensor, scale: float) -> Tensor:
    """Forward x, gradient scale * grad (the reference's rule-3 surrogate)."""
    return x * scale + x.detach() * (1.0 - scale)


class MyMLP(nn.Module):
    """The README's gated MLP: parts named a, b, out."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out, self.act = (
            nn.Linear(8, 16),
            nn.Linear(8, 16),
            nn.Linear(16, 8),
            nn.SiLU(),
        )
        self.reference = False

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.act(self.a(x)), self.b(x)
        if self.reference:
            gate, up = scaled(gate, 0.5), scaled(up, 0.5)
        return self.out(gate * up)


class ParameterMLP(nn.Module):
    """A gated MLP whose projections are parameters used directly (x @ W_gate)."""

    def __init__(self) -> None:
        super().__init__()
        self.W_gate = nn.Parameter(0.3 * torch.randn(8, 16))
        self.W_in = nn.Parameter(0.3 * torch.randn(8, 16))
        self.W_out = nn.Parameter(0.3 * torch.randn(16, 8))
        self.reference = False

    def forward(self, x: Tensor) -> Tensor:
        gate, up = F.gelu(x @ self.W_gate), x @ self.W_in
        if self.reference:
            gate, up = scaled(gate, 0.5), scaled(up, 0.5)
        return (gate * up) @ self.W_out


def _with(mlp: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), mlp, nn.Linear(8, 3)).eval()


def _input_x_gradient(model: nn.Module, x: Tensor, target: int = 0) -> Tensor:
    return InputXGradient(model).attribute(x.clone().requires_grad_(), target=target)


@pytest.mark.parametrize("mlp_class", [MyMLP, ParameterMLP])
def test_gated_mlp_recognised_by_data_flow_equals_the_reference(mlp_class: type) -> None:
    torch.manual_seed(1)
    mlp = mlp_class()
    model = _with(mlp)
    x = torch.randn(3, 8)
    before = model(x)
    gim = GIMAttribution(model).attribute(x, target=1)
    assert torch.equal(model(x), before)  # forward unchanged after the call
    mlp.reference = True
    expected = _input_x_gradient(model, x, target=1)
    torch.testing.assert_close(gim, expected, rtol=1e-5, atol=1e-7)
    mlp.reference = False
    assert not torch.allclose(gim, _input_x_gradient(model, x, target=1))


class StaticMLP(nn.Module):
    """Recognised by its part names (gate_proj/up_proj/down_proj)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(8, 16), nn.Linear(8, 16)
        self.down_proj, self.act_fn = nn.Linear(16, 8), nn.SiLU()
        self.reference = False

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.act_fn(self.gate_proj(x)), self.up_proj(x)
        if self.reference:
            gate, up = scaled(gate, 0.5), scaled(up, 0.5)
        return self.down_proj(gate * up)


class Outer(MyMLP):
    """A gated product of its own around a gated-MLP child: each split once."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = StaticMLP()

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(super().forward(x))


def test_nested_gated_mlps_are_each_split_once() -> None:
    torch.manual_seed(1)
    outer = Outer()
    model = _with(outer)
    x = torch.randn(3, 8)
    gim = GIMAttribution(model).attribute(x, target=1)
    outer.reference = outer.inner.reference = True
    torch.testing.assert_close(gim, _input_x_gradient(model, x, target=1), rtol=1e-5, atol=1e-7)


def test_registered_gated_mlp_is_split_once() -> None:
    torch.manual_seed(1)
    mlp = MyMLP()
    model = _with(mlp)
    x = torch.randn(3, 8)
    with register_gated_mlp(MyMLP, gate="a", up="b", down="out", activation="act"):
        gim = GIMAttribution(model).attribute(x, target=1)
    mlp.reference = True
    torch.testing.assert_close(gim, _input_x_gradient(model, x, target=1), rtol=1e-5, atol=1e-7)


def test_gated_mlp_by_data_flow_is_checked_on_every_call() -> None:
    class Switching(MyMLP):
        def forward(self, x: Tensor) -> Tensor:
            if x.shape[0] == 1:  # this call computes no gated product
                return self.out(self.act(self.a(x)))
            return super().forward(x)

    model = _with(Switching())
    gim = GIMAttribution(model)
    gim.attribute(torch.randn(3, 8), target=0)  # audited: recognised as gated
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(Switching\).*no such product"):
        gim.attribute(torch.randn(1, 8), target=0)


class MaxNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x / (x.abs().amax(-1, keepdim=True) + 1e-5)


class Mixer(nn.Module):
    """A depthwise short convolution gated by the input (a convolutional token mixer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, groups=4, padding=2)

    def forward(self, x: Tensor) -> Tensor:
        mixed = self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        return mixed * x


@pytest.mark.parametrize("part", [MaxNorm, Mixer])
def test_every_rule_off_refuses_nothing_and_equals_input_x_gradient(part: type) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), part(), nn.Linear(4, 3)).eval()
    x = torch.randn(2, 5, 4)

    def forward(inputs: Tensor) -> Tensor:
        return model(inputs)[:, -1]

    gim = GIMAttribution(forward, model, config=OFF).attribute(x, target=0)
    expected = InputXGradient(forward).attribute(x.clone().requires_grad_(), target=0)
    torch.testing.assert_close(gim, expected)
    with pytest.raises(UnsupportedModuleError, match=f"'1' \\({part.__name__}\\)"):
        GIMAttribution(forward, model).attribute(x, target=0)


class HandRMS(nn.Module):
    """An RMS norm written inline in a module that is not a norm class."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class KernelMixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return (self.q(x) @ self.k(x).transpose(-1, -2)) @ self.v(x)


@pytest.mark.parametrize(
    ("part", "operation", "config"),
    [
        (HandRMS, "computes mul: a normalization", GIMConfig(freeze_norm=True)),
        (KernelMixer, "computes matmul: a matrix product", GIMConfig()),
    ],
)
def test_unaccounted_part_is_refused_by_name_or_kept_exact_with_a_warning(
    part: type, operation: str, config: GIMConfig
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), part(), nn.Linear(4, 3)).eval()
    x = torch.randn(2, 5, 4)

    def forward(inputs: Tensor) -> Tensor:
        return model(inputs)[:, -1]

    with pytest.raises(UnsupportedModuleError, match=f"'1' \\({part.__name__}\\) {operation}"):
        GIMAttribution(forward, model, config=config).attribute(x, target=0)
    before = forward(x)
    with pytest.warns(UserWarning, match=f"'1' \\({part.__name__}\\) {operation}"):
        gim = GIMAttribution(forward, model, config=config, strict=False).attribute(x, target=0)
    assert torch.equal(forward(x), before)
    # nothing else in the model has a rule: the kept-exact part gives InputXGradient
    expected = InputXGradient(forward).attribute(x.clone().requires_grad_(), target=0)
    torch.testing.assert_close(gim, expected)


class GatedNorm(nn.Module):
    """Probes as an RMS norm, but its calls pass a gate (as Mamba's RMSNormGated)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.2 * torch.randn(4))

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        if gate is not None:
            x = x * F.silu(gate)
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class GatedNormBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.norm = nn.Linear(4, 4), GatedNorm()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x, self.gate(x))


def test_misread_norm_with_strict_false_runs_with_the_warning_and_its_exact_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), GatedNormBlock(), nn.Linear(4, 3)).eval()
    x = torch.randn(2, 4)
    norm_only = GIMConfig(temperature=1.0, q_scale=1.0, k_scale=1.0, v_scale=1.0)
    norm_only = GIMConfig(**{**norm_only.__dict__, "gate_scale": 1.0, "up_scale": 1.0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gim = GIMAttribution(model, config=norm_only, strict=False).attribute(x, target=0)
    assert any("'1.norm' (GatedNorm)" in str(w.message) for w in caught)
    torch.testing.assert_close(gim, _input_x_gradient(model, x))
    with pytest.raises(UnsupportedModuleError, match=r"'1.norm' \(GatedNorm\)"):
        GIMAttribution(model, config=norm_only).attribute(x, target=0)


def test_backward_outside_the_forward_is_refused_naming_the_fix() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    loss = model(torch.randn(2, 4)).sum()
    with pytest.raises(RuntimeError, match="around the forward pass as well"):
        with gim_rules(model):
            loss.backward()
    loss = model(torch.randn(2, 4)).sum()
    with pytest.warns(UserWarning, match="forward pass ran before the block"):
        with gim_rules(model, strict=False):
            loss.backward()
    with gim_rules(model):  # forward and backward inside: no warning
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(torch.randn(2, 4)).sum().backward()
    assert all(p._backward_hooks is None for p in model.parameters())


def test_audit_runs_once_per_model_and_again_after_the_tree_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    audits: list[int] = []
    real = audit_module.run_audit

    def counted(*args: object, **kwargs: object) -> audit_module.Audit:
        audits.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    rules_module = sys.modules["captum_gim.attr.gim_rules"]  # the package exports the function
    monkeypatch.setattr(rules_module, "run_audit", counted)
    model = _with(MyMLP())
    gim = GIMAttribution(model)
    first = gim.attribute(torch.randn(3, 8), target=0)
    gim.attribute(torch.randn(3, 8), target=0)
    GIMAttribution(model, strict=False).attribute(torch.randn(3, 8), target=0)
    assert len(audits) == 1
    model.append(nn.Identity())
    gim.attribute(torch.randn(3, 8), target=0)
    assert len(audits) == 2
    assert first.shape == (3, 8)


def test_layer_gim_audits_token_id_models() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa")

    def forward(ids: Tensor) -> Tensor:
        return model(ids).logits[:, -1]

    ids = sample_ids()
    attributions = LayerGIM(forward, model.get_input_embeddings(), model=model).attribute(
        ids, target=3
    )
    assert attributions.shape == (*ids.shape, 32)


def _audit(model: nn.Module, ids: Tensor | None = None) -> audit_module.Audit:
    ids = sample_ids() if ids is None else ids
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    forward = logits_of(model)
    return run_audit(model, discover_sites(model), lambda: forward(embeds))


@pytest.mark.parametrize(
    ("family", "implementation"),
    [(f.name, i) for f in FAMILIES for i in f.implementations],
)
def test_tiny_families_have_no_unaccounted_operation(family: str, implementation: str) -> None:
    model = FAMILY_BY_NAME[family].build(implementation)
    audit = _audit(model)
    assert audit.refused() == []
    kinds = {(e.kind, e.status) for e in audit.entries}
    assert ("attention", "covered") in kinds
    assert ("norm", "covered") in kinds


def test_moe_routing_weights_and_router_softmax_are_listed_as_exact() -> None:
    audit = _audit(FAMILY_BY_NAME["mixtral"].build("sdpa"))
    exact = {(e.module, e.kind) for e in audit.exact()}
    assert ("model.layers.0.mlp.experts", "routing weights x expert outputs") in exact
    assert ("model.layers.0.mlp.gate", "softmax outside attention") in exact
    assert audit.refused() == []


def test_shared_expert_gate_is_listed_as_exact() -> None:
    audit = _audit(FAMILY_BY_NAME["qwen2_moe"].build("sdpa"))
    assert ("model.layers.0.mlp", "activation gate") in {(e.module, e.kind) for e in audit.exact()}


def _tiny(config_name: str, model_name: str, **settings: object) -> nn.Module:
    import transformers

    base = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        initializer_range=0.2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**base, **settings})
    return getattr(transformers, model_name)._from_config(config, attn_implementation="sdpa").eval()


def test_qwen3_next_attention_output_gate_is_listed_as_exact_and_the_call_runs() -> None:
    model = _tiny(
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        layer_types=["full_attention", "full_attention"],
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
    )
    audit = _audit(model)
    exact = {(e.module, e.kind) for e in audit.exact()}
    assert ("model.layers.0.self_attn", "attention output gate") in exact
    assert ("model.layers.0.mlp.experts", "routing weights x expert outputs") in exact
    assert audit.refused() == []
    _equals_reference(model)


def _equals_reference(model: nn.Module) -> None:
    """GIM equals tests/reference.py, which keeps every product it does not name exact."""
    embeds = model.get_input_embeddings()(sample_ids(1, 6)).detach()
    forward = logits_of(model)
    before = forward(embeds)
    got = GIMAttribution(forward, model, multiply_by_inputs=False).attribute(embeds, target=3)
    assert torch.equal(forward(embeds), before)
    try:
        want = reference_gradient(model, forward, embeds, 3, GIMConfig())
    except ReferenceGap as gap:
        pytest.skip(f"the reference has no formula for a part: {gap}")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_gemma4_per_layer_input_gate_is_listed_as_exact() -> None:
    model = _tiny(
        "Gemma4TextConfig",
        "Gemma4ForCausalLM",
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=64,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
        num_global_key_value_heads=2,
        global_head_dim=8,
    )
    audit = _audit(model)
    assert ("model.layers.0", "activation gate") in {(e.module, e.kind) for e in audit.exact()}
    assert audit.refused() == []
    _equals_reference(model)


def test_granite_hybrid_with_strict_false_runs_with_the_warning() -> None:
    model = _tiny(
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        layer_types=["mamba", "attention"],
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_n_groups=1,
        mamba_expand=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        shared_intermediate_size=16,
    )
    embeds = model.get_input_embeddings()(sample_ids(1, 6)).detach()
    forward = logits_of(model)
    before = forward(embeds)
    with pytest.raises(UnsupportedModuleError, match=r"'model\.layers\.0\.mamba'"):
        GIMAttribution(forward, model).attribute(embeds, target=3)
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mamba"):
        attributions = GIMAttribution(forward, model, strict=False).attribute(embeds, target=3)
    assert torch.isfinite(attributions).all()
    assert torch.equal(forward(embeds), before)


class IndexEmbed(nn.Module):
    """An embedding by indexing a parameter (as TransformerLens's Embed), not nn.Embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.randn(16, 4))

    def forward(self, ids: Tensor) -> Tensor:
        return self.W_E[ids]


def test_layer_gim_audits_from_its_layer_when_the_embedding_is_not_nn_embedding() -> None:
    torch.manual_seed(0)
    embed = IndexEmbed()
    model = nn.Sequential(embed, nn.Linear(4, 4), HandRMS(), nn.Linear(4, 3)).eval()

    def forward(ids: Tensor) -> Tensor:
        return model(ids)[:, -1]

    with pytest.raises(UnsupportedModuleError, match=r"'2' \(HandRMS\) computes mul"):
        LayerGIM(forward, embed, model=model).attribute(torch.tensor([[1, 2, 3]]), target=0)


def test_operations_of_the_forward_function_outside_the_model_are_kept_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)).eval()

    def forward(inputs: Tensor) -> Tensor:  # a normalization of the target, outside the model
        hidden = model(inputs)
        return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)

    x = torch.randn(2, 4)
    reference = GIMAttribution(forward, model).attribute(x, target=0)
    audit = run_audit(model, discover_sites(model), lambda: forward(x.requires_grad_()))
    assert audit.refused() == []
    assert ("<forward>", "outside the model") in {(e.module, e.kind) for e in audit.exact()}
    assert torch.isfinite(reference).all()


def test_gim_rules_audits_its_example_inputs_for_any_captum_method() -> None:
    from captum.attr import IntegratedGradients, Saliency

    torch.manual_seed(1)
    mlp = MyMLP()
    model = _with(mlp)
    before = snapshot(model)
    x = torch.randn(3, 8)
    with gim_rules(model, example_inputs=x):
        saliency = Saliency(model).attribute(x.clone(), target=1, abs=False)
    assert_same(before, snapshot(model))
    expected = GIMAttribution(model, multiply_by_inputs=False).attribute(x, target=1)
    torch.testing.assert_close(saliency, expected)

    refused = nn.Sequential(nn.Linear(4, 4), HandRMS(), nn.Linear(4, 3)).eval()
    before = snapshot(refused)
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(HandRMS\) computes mul"):
        with gim_rules(refused, example_inputs=torch.randn(2, 4)):
            IntegratedGradients(refused).attribute(torch.randn(2, 4), target=0, n_steps=4)
    assert_same(before, snapshot(refused))


class _GatedNorm(nn.Module):
    """A norm followed by a gate computed from its output (AXK2's GatedRMSNorm):
    ``y * sigmoid(W y)`` with ``y = RMSNorm(x)``."""

    def __init__(self, width: int) -> None:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        super().__init__()
        self.norm = LlamaRMSNorm(width, eps=1e-6)  # x * rsqrt(mean(x^2) + eps), in torch ops
        self.gate = nn.Linear(width, width)
        self.reference = False

    def forward(self, x: Tensor) -> Tensor:
        if self.reference:  # the frozen norm written by formula
            rho = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            y = x / rho.detach() * self.norm.weight
        else:
            y = self.norm(x)
        return y * torch.sigmoid(self.gate(y))


def test_a_gate_on_a_frozen_norms_output_is_exact_not_an_unknown_norm() -> None:
    """Regression (axk2): the norm's statistic is the covered norm's; the gate after
    it is listed as kept exact, and GIM freezes the inner norm only."""
    gated = _GatedNorm(8)
    with torch.no_grad():
        gated.norm.weight.add_(0.3 * torch.randn(8))
    model = _with(gated)
    x = torch.randn(2, 8)
    audit = run_audit(model, discover_sites(model), lambda: model(x.clone().requires_grad_()))
    assert audit.refused() == []
    assert ("1", "activation gate") in {(e.module, e.kind) for e in audit.exact()}
    config = GIMConfig(freeze_norm=True)
    got = GIMAttribution(model, config=config, multiply_by_inputs=False).attribute(x, target=0)
    gated.reference = True
    x_ref = x.clone().requires_grad_()
    want = torch.autograd.grad(model(x_ref)[:, 0].sum(), x_ref)[0]
    gated.reference = False
    torch.testing.assert_close(got, want)
    x_plain = x.clone().requires_grad_()
    plain = torch.autograd.grad(model(x_plain)[:, 0].sum(), x_plain)[0]
    assert float((got - plain).norm()) > 1e-4
