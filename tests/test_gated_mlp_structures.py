"""Gated-MLP structures beyond gate_proj/up_proj: each against a slow reference.

Every structure is taken from a tiny transformers config (hidden 32) with std
0.2 random weights and checked on its own: the GIM gradient of a fixed linear
read-out of the MLP's output equals a hand-written recomputation of the MLP
whose gate and up branches get the scales through a custom autograd function;
the forward is bitwise unchanged; the rule changes the gradient; and a
deliberately different structure is refused with ``UnsupportedModuleError``.
Unequal scales (0.3 for the gate, 0.7 for the up branch) make a swapped or
misread gate/up layout visible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_gim import GIMConfig, UnsupportedModuleError, gim_rules
from captum_gim.sites import find_rule_sites

GATE, UP = 0.3, 0.7
SPLIT = dataclasses.replace(GIMConfig.all_rules_off(), gate_scale=GATE, up_scale=UP)
TOKENS = 10


class _Scale(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` (the reference's split)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def scaled(x: Tensor, scale: float) -> Tensor:
    return _Scale.apply(x, scale)


def randomize(module: nn.Module) -> nn.Module:
    """Weights with std 0.2; norm weights around 1."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
            if "norm" in name:
                parameter.add_(1.0)
    return module.eval()


def hidden(seed: int = 1) -> Tensor:
    return torch.randn(TOKENS, 32, generator=torch.Generator().manual_seed(seed))


def readout(output: Tensor) -> Tensor:
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(2))
    return (output * weights).sum()


def gradient(call: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    x = x.clone().requires_grad_()
    return torch.autograd.grad(readout(call(x)), x)[0]


def gim_gradient(module: nn.Module, call: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    with gim_rules(module, config=SPLIT):
        return gradient(call, x)


def assert_split(
    module: nn.Module,
    call: Callable[[Tensor], Tensor],
    reference: Callable[[Tensor], Tensor],
) -> None:
    """GIM equals the reference, keeps the forward bitwise, and changes the gradient."""
    x = hidden()
    with torch.no_grad():
        plain_output = call(x)
    with gim_rules(module, config=SPLIT):
        rules_output = call(x.clone().requires_grad_())
    assert torch.equal(rules_output.detach(), plain_output)
    torch.testing.assert_close(reference(x), plain_output, rtol=1e-5, atol=1e-6)
    got = gim_gradient(module, call, x)
    torch.testing.assert_close(got, gradient(reference, x), rtol=1e-4, atol=1e-6)
    plain = gradient(call, x)
    assert float((got - plain).norm() / plain.norm()) > 0.05


def swiglu_reference(gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> Callable:
    """``down(silu(gate(x)) * up(x))`` by hand (no biases), the branches scaled."""

    def forward(x: Tensor) -> Tensor:
        product = F.silu(scaled(x @ gate.weight.T, GATE)) * scaled(x @ up.weight.T, UP)
        return product @ down.weight.T

    return forward


def routing(experts: int, top_k: int = 2) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(TOKENS, experts, generator=generator)
    weights, indices = logits.softmax(-1).topk(top_k, dim=-1)
    return indices, weights


# --- gpt-oss experts: interleaved fused gate/up, clamped SwiGLU, (up + 1) ----------------


def gpt_oss_experts(implementation: str = "eager") -> nn.Module:
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    config = GptOssConfig(hidden_size=32, intermediate_size=24, num_local_experts=4)
    config._experts_implementation = implementation
    torch.manual_seed(0)
    return randomize(GptOssExperts(config))


def gpt_oss_reference(experts: nn.Module, indices: Tensor, weights: Tensor) -> Callable:
    """gpt-oss's experts by hand: gate = even, up = odd elements of x @ W + b."""

    def forward(x: Tensor) -> Tensor:
        rows = []
        for token in range(x.shape[0]):
            total = torch.zeros(x.shape[-1])
            for slot, expert in enumerate(indices[token].tolist()):
                gate_up = (
                    x[token] @ experts.gate_up_proj[expert] + experts.gate_up_proj_bias[expert]
                )
                gate = scaled(gate_up[0::2], GATE).clamp(max=experts.limit)
                up = scaled(gate_up[1::2], UP).clamp(-experts.limit, experts.limit)
                product = (up + 1) * (gate * torch.sigmoid(experts.alpha * gate))
                down = product @ experts.down_proj[expert] + experts.down_proj_bias[expert]
                total = total + weights[token, slot] * down
            rows.append(total)
        return torch.stack(rows)

    return forward


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_gpt_oss_experts_split_at_their_gating_function(implementation: str) -> None:
    experts = gpt_oss_experts(implementation)
    indices, weights = routing(4)
    assert_split(
        experts,
        lambda x: experts(x, indices, weights),
        gpt_oss_reference(experts, indices, weights),
    )
    assert "_apply_gate" not in experts.__dict__  # the instance is left as it was


def test_gpt_oss_experts_with_a_misread_layout_are_refused() -> None:
    experts = gpt_oss_experts()
    experts.is_concatenated = True  # claims [gate; up] halves; the weights are interleaved
    indices, weights = routing(4)
    with pytest.raises(UnsupportedModuleError, match=r"GptOssExperts.*depend on both"):
        gim_gradient(experts, lambda x: experts(x, indices, weights), hidden())
    assert "_apply_gate" not in experts.__dict__


class _SummedGate(nn.Module):
    """An experts gating function that adds instead of multiplying."""

    def __call__(self, gate_up: Tensor) -> Tensor:
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        return gate * torch.sigmoid(gate) + up


def test_experts_gating_that_is_not_a_product_is_refused() -> None:
    experts = gpt_oss_experts()
    experts.__dict__["_apply_gate"] = _SummedGate()
    indices, weights = routing(4)
    try:
        with pytest.raises(UnsupportedModuleError, match="not a product"):
            gim_gradient(experts, lambda x: experts(x, indices, weights), hidden())
        assert isinstance(experts.__dict__["_apply_gate"], _SummedGate)  # restored
    finally:
        del experts.__dict__["_apply_gate"]


def test_experts_forward_that_bypasses_the_gating_function_is_refused() -> None:
    experts = gpt_oss_experts()

    def bypass(x: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        gate_up = x @ experts.gate_up_proj[0]
        return F.silu(gate_up[:, ::2]) @ experts.down_proj[0]

    experts.forward = bypass  # type: ignore[method-assign]
    with pytest.raises(UnsupportedModuleError, match="does not call its gating function"):
        gim_gradient(experts, lambda x: experts(x, *routing(4)), hidden())


# --- MiniMax-M3: [gate; up] experts and a dense clamped SwiGLU written inline --------------


def minimax_config() -> Any:
    from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import (
        MiniMaxM3VLTextConfig,
    )

    config = MiniMaxM3VLTextConfig(
        hidden_size=32, intermediate_size=24, dense_intermediate_size=24, num_local_experts=4
    )
    config._experts_implementation = "eager"
    return config


def test_minimax_experts_split_their_halves() -> None:
    from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLExperts

    torch.manual_seed(0)
    experts = randomize(MiniMaxM3VLExperts(minimax_config()))
    indices, weights = routing(4)
    limit, alpha = experts.swiglu_limit, experts.swiglu_alpha

    def reference(x: Tensor) -> Tensor:
        rows = []
        for token in range(x.shape[0]):
            total = torch.zeros(x.shape[-1])
            for slot, expert in enumerate(indices[token].tolist()):
                gate, up = F.linear(x[token], experts.gate_up_proj[expert]).chunk(2)
                gate = scaled(gate, GATE).clamp(max=limit)
                up = scaled(up, UP).clamp(-limit, limit)
                product = (up + 1) * (gate * torch.sigmoid(alpha * gate))
                total = total + weights[token, slot] * F.linear(product, experts.down_proj[expert])
            rows.append(total)
        return torch.stack(rows)

    assert_split(experts, lambda x: experts(x, indices, weights), reference)


def minimax_dense() -> nn.Module:
    from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLDenseMLP

    torch.manual_seed(0)
    return randomize(MiniMaxM3VLDenseMLP(minimax_config()))


def test_minimax_dense_clamped_swiglu_is_split() -> None:
    mlp = minimax_dense()
    limit, alpha = mlp.swiglu_limit, mlp.swiglu_alpha

    def reference(x: Tensor) -> Tensor:
        gate, up = (x @ mlp.gate_up_proj.weight.T).chunk(2, dim=-1)
        gate = scaled(gate, GATE).clamp(max=limit)
        up = scaled(up, UP).clamp(-limit, limit)
        return ((up + 1) * (gate * torch.sigmoid(alpha * gate))) @ mlp.down_proj.weight.T

    assert_split(mlp, mlp, reference)


def test_dense_swiglu_with_another_alpha_inline_is_refused() -> None:
    mlp = minimax_dense()

    def forward(x: Tensor) -> Tensor:
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        glu = gate * torch.sigmoid(gate * 2 * mlp.swiglu_alpha)
        return mlp.down_proj((up + 1.0) * glu)

    mlp.forward = forward  # type: ignore[method-assign]
    with pytest.raises(UnsupportedModuleError, match="input of its 'down_proj' differs"):
        gim_gradient(mlp, mlp, hidden())


# --- BitNet: a norm between the product and the down projection ---------------------------


def bitnet_mlp() -> nn.Module:
    from transformers import BitNetConfig
    from transformers.models.bitnet.modeling_bitnet import BitNetMLP

    config = BitNetConfig(hidden_size=32, intermediate_size=24)
    torch.manual_seed(0)
    return randomize(BitNetMLP(config))


def test_bitnet_product_is_checked_at_its_sub_norm() -> None:
    mlp = bitnet_mlp()
    norm = mlp.ffn_sub_norm

    def reference(x: Tensor) -> Tensor:
        gate = scaled(x @ mlp.gate_proj.weight.T, GATE)
        up = scaled(x @ mlp.up_proj.weight.T, UP)
        product = F.relu(gate).square() * up  # BitNet's relu2 activation
        rms = product.pow(2).mean(-1, keepdim=True).add(norm.variance_epsilon).rsqrt()
        return (norm.weight * product * rms) @ mlp.down_proj.weight.T

    assert mlp.config.hidden_act == "relu2"
    assert_split(mlp, mlp, reference)


def bitnet_with_an_extra_term() -> nn.Module:
    """BitNet's MLP whose sub-norm reads ``act(gate) * up + 0.5 * up``."""
    mlp = bitnet_mlp()

    def forward(x: Tensor) -> Tensor:
        up = mlp.up_proj(x)
        return mlp.down_proj(mlp.ffn_sub_norm(mlp.act_fn(mlp.gate_proj(x)) * up + 0.5 * up))

    mlp.forward = forward  # type: ignore[method-assign]
    return mlp


def test_bitnet_with_an_extra_term_before_the_sub_norm_is_refused() -> None:
    mlp = bitnet_with_an_extra_term()
    with pytest.raises(UnsupportedModuleError, match=r"BitNetMLP.*'ffn_sub_norm' differs"):
        gim_gradient(mlp, mlp, hidden())


def test_product_read_by_no_child_module_is_refused() -> None:
    mlp = bitnet_mlp()

    def forward(x: Tensor) -> Tensor:
        product = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        return F.linear(product, mlp.down_proj.weight)

    mlp.forward = forward  # type: ignore[method-assign]
    with pytest.raises(UnsupportedModuleError, match="no child module reads the product"):
        gim_gradient(mlp, mlp, hidden())


# --- ModernBERT: one fused Wi chunked in the forward, dropout before Wo -------------------


def modernbert_mlp() -> nn.Module:
    from transformers import ModernBertConfig
    from transformers.models.modernbert.modeling_modernbert import ModernBertMLP

    config = ModernBertConfig(hidden_size=32, intermediate_size=24)
    torch.manual_seed(0)
    return randomize(ModernBertMLP(config))


def test_modernbert_fused_wi_is_split() -> None:
    mlp = modernbert_mlp()

    def reference(x: Tensor) -> Tensor:
        fused = x @ mlp.Wi.weight.T
        activated, linear = fused.chunk(2, dim=-1)
        product = F.gelu(scaled(activated, GATE)) * scaled(linear, UP)
        return product @ mlp.Wo.weight.T

    assert mlp.config.hidden_activation == "gelu"
    assert_split(mlp, mlp, reference)


def test_modernbert_with_the_activation_on_the_other_half_is_refused() -> None:
    mlp = modernbert_mlp()

    def forward(x: Tensor) -> Tensor:
        linear, activated = mlp.Wi(x).chunk(2, dim=-1)
        return mlp.Wo(mlp.drop(mlp.act(activated) * linear))

    mlp.forward = forward  # type: ignore[method-assign]
    with pytest.raises(UnsupportedModuleError, match=r"ModernBertMLP.*'drop' differs"):
        gim_gradient(mlp, mlp, hidden())


# --- shared experts: modules are split, bare parameter tensors are refused by name ----------


def test_qwen2_moe_shared_expert_is_split() -> None:
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeMLP

    config = Qwen2MoeConfig(hidden_size=32, intermediate_size=24)
    torch.manual_seed(0)
    mlp = randomize(Qwen2MoeMLP(config, intermediate_size=16))
    assert_split(mlp, mlp, swiglu_reference(mlp.gate_proj, mlp.up_proj, mlp.down_proj))


def test_shared_experts_with_parameter_projections_are_refused_by_name() -> None:
    from transformers.models.inkling.configuration_inkling import InklingTextConfig
    from transformers.models.inkling.modeling_inkling import InklingSharedExperts

    config = InklingTextConfig(hidden_size=32, moe_intermediate_size=16, n_shared_experts=1)
    shared = InklingSharedExperts(config)
    with pytest.raises(UnsupportedModuleError, match=r"InklingSharedExperts.*parameter tensors"):
        find_rule_sites(nn.ModuleDict({"shared_experts": shared}))


def test_dbrx_expert_glu_with_parameter_projections_is_refused_by_name() -> None:
    """DBRX's experts compute ``act(x w1^T) * (x v1^T)`` from bare parameters."""
    from transformers import DbrxConfig
    from transformers.models.dbrx.modeling_dbrx import DbrxExpertGLU

    config = DbrxConfig(d_model=32, ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 4})
    glu = DbrxExpertGLU(config.ffn_config)
    with pytest.raises(UnsupportedModuleError, match=r"DbrxExpertGLU.*w1 and v1.*parameter"):
        find_rule_sites(nn.ModuleDict({"mlp": glu}))


# --- LFM2: w1/w3 with the activation called inline; Moshi, JetMoE: fused by width -----------


def lfm2_mlp() -> nn.Module:
    from transformers import Lfm2Config
    from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP

    config = Lfm2Config(hidden_size=32, intermediate_size=24, block_auto_adjust_ff_dim=False)
    torch.manual_seed(0)
    return randomize(Lfm2MLP(config))


def test_lfm2_inline_silu_is_split() -> None:
    mlp = lfm2_mlp()
    assert_split(mlp, mlp, swiglu_reference(mlp.w1, mlp.w3, mlp.w2))


def test_inline_activation_outside_the_known_ones_is_refused() -> None:
    mlp = lfm2_mlp()
    mlp.forward = lambda x: mlp.w2(torch.tanh(mlp.w1(x)) * mlp.w3(x))  # type: ignore[method-assign]
    with pytest.raises(UnsupportedModuleError, match=r"Lfm2MLP.*'w2' differs.*silu, gelu"):
        gim_gradient(mlp, mlp, hidden())


def test_moshi_fc1_twice_as_wide_as_fc2_is_split_into_halves() -> None:
    from transformers import MoshiConfig
    from transformers.models.moshi.modeling_moshi import MoshiGatingMLP

    config = MoshiConfig(hidden_size=32, ffn_dim=48, audio_encoder_config={}).get_text_config()
    torch.manual_seed(0)
    mlp = randomize(MoshiGatingMLP(config))

    def reference(x: Tensor) -> Tensor:
        gate, up = (x @ mlp.fc1.weight.T).chunk(2, dim=-1)
        product = mlp.activation_fn(scaled(gate, GATE)) * scaled(up, UP)
        return product @ mlp.fc2.weight.T

    assert_split(mlp, lambda x: mlp(x[None])[0], reference)


def test_plain_fc1_fc2_mlp_is_left_exact_by_the_gated_mlp_rule() -> None:
    """OPT's ``fc2(relu(fc1(x)))`` multiplies no two branches: the gate and up
    scales leave its gradient exactly as it is."""
    from transformers import OPTConfig, OPTModel

    config = OPTConfig(
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        word_embed_proj_dim=32,
    )
    torch.manual_seed(0)
    model = randomize(OPTModel(config))

    def call(x: Tensor) -> Tensor:
        return model(inputs_embeds=x[None]).last_hidden_state[0]

    x = hidden()
    torch.testing.assert_close(gim_gradient(model, call, x), gradient(call, x), rtol=0, atol=0)


def test_jetmoe_experts_split_their_halves() -> None:
    from transformers import JetMoeConfig
    from transformers.models.jetmoe.modeling_jetmoe import JetMoeMoE

    config = JetMoeConfig(hidden_size=32, intermediate_size=24, num_local_experts=4)
    torch.manual_seed(0)
    moe = randomize(JetMoeMoE(config))

    def reference(x: Tensor) -> Tensor:
        _, batch_index, batch_gates, expert_size, _ = moe.router(x)
        rows = x[batch_index].split(expert_size, dim=0)
        outputs = []
        for expert, row in enumerate(rows):
            gate, up = F.linear(row, moe.input_linear.weight[expert]).chunk(2, dim=-1)
            product = moe.activation(scaled(gate, GATE)) * scaled(up, UP)
            outputs.append(F.linear(product, moe.output_linear.weight[expert]))
        weighted = torch.cat(outputs) * batch_gates[:, None]
        return torch.zeros_like(x).index_add(0, batch_index, weighted) + moe.bias

    assert_split(moe, lambda x: moe(x[None])[0], reference)


def test_product_check_failing_under_strict_false_warns_and_keeps_exact_gradients() -> None:
    mlp = bitnet_with_an_extra_term()
    x = hidden()
    with torch.no_grad():
        expected = mlp(x)
    with pytest.warns(UserWarning, match=r"skip this call.*BitNetMLP.*'ffn_sub_norm' differs"):
        with gim_rules(mlp, config=SPLIT, strict=False):
            y = x.clone().requires_grad_()
            output = mlp(y)
            got = torch.autograd.grad(readout(output), y)[0]
    assert torch.equal(output.detach(), expected)
    torch.testing.assert_close(got, gradient(mlp, x), rtol=0, atol=0)


def test_gating_function_failing_under_strict_false_warns_and_keeps_exact_gradients() -> None:
    experts = gpt_oss_experts()
    experts.__dict__["_apply_gate"] = _SummedGate()
    indices, weights = routing(4)

    def call(x: Tensor) -> Tensor:
        return experts(x, indices, weights)

    x = hidden()
    try:
        with pytest.warns(UserWarning, match=r"skip this call.*GptOssExperts.*not a product"):
            with gim_rules(experts, config=SPLIT, strict=False):
                got = gradient(call, x)
        torch.testing.assert_close(got, gradient(call, x), rtol=0, atol=0)
    finally:
        del experts.__dict__["_apply_gate"]
