"""Half-precision models and models dispatched by accelerate get GIM with every rule.

Half precision: a bf16 or fp16 model, given the fp32 embeddings cast to its dtype,
gives GIM attributions within a fixed relative error of the fp32 model's (the
rule arithmetic runs in fp32), and GIM loses no more precision than Captum's
InputXGradient does on the same pair of models. Run with ``pytest -s`` to see the
measured errors.

Dispatch: a model whose weights accelerate moves on the fly (``dispatch_model``
with a device map that offloads to disk, or ``cpu_offload``) gets the same
attributions as the same model undispatched, every rule reaches the dispatched
modules, and after the call its hooks are exactly accelerate's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from captum.attr import InputXGradient
from tiny_models import FAMILY_BY_NAME, logits_of, sample_ids
from torch import Tensor, nn

from captum_gim import GIMAttribution, GIMConfig, gim_rules
from captum_gim.sites.attention.routed import GIM_ATTENTION
from captum_gim.sites.discovery import find_rule_sites

TARGET = 5

# ---------------------------------------------------------------------------
# Half precision
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """Bounds on how far half-precision GIM attributions may be from fp32's."""

    relative_error: float  # ||a_half - a_fp32|| / ||a_fp32|| over all attributions
    cosine: float  # least cosine similarity of the token scores of one example
    top3_overlap: float  # least share of fp32's top-3 tokens among half's top-3
    vs_input_x_gradient: float = 2.0  # GIM's error <= this x InputXGradient's + EPSILON


#: Measured on the tiny models below, on CPU (inputs of this file, and a sweep
#: over 4 seeds x 2 lengths x 2 targets): worst relative error bf16 0.023 (dense
#: models; MoE up to 0.12 where bf16 flips a router decision), fp16 0.0038; GIM's
#: error at most 1.23x InputXGradient's. Bounds: a safety margin of 2x or more.
TOLERANCES = {
    torch.bfloat16: Tolerance(relative_error=0.05, cosine=0.995, top3_overlap=2 / 3),
    torch.float16: Tolerance(relative_error=0.01, cosine=0.9995, top3_overlap=2 / 3),
}
EPSILON = 1e-3


@dataclass(frozen=True)
class PrecisionCase:
    """One model of the half-precision comparison."""

    family: str
    implementation: str
    experts: str | None = None

    @property
    def label(self) -> str:
        experts = f"-experts_{self.experts}" if self.experts else ""
        return f"{self.family}-{self.implementation}{experts}"

    def build(self, dtype: torch.dtype, seed: int = 0) -> nn.Module:
        """The tiny model in ``dtype`` (same seed: same weights before the cast)."""
        return FAMILY_BY_NAME[self.family].build(
            self.implementation, seed=seed, dtype=dtype, experts_implementation=self.experts
        )


PRECISION_CASES = [
    PrecisionCase("llama", "eager"),
    PrecisionCase("llama", "sdpa"),
    PrecisionCase("gemma3", "sdpa"),
    PrecisionCase("gpt2", "sdpa"),
    PrecisionCase("qwen2_moe", "eager", experts="eager"),
    PrecisionCase("qwen2_moe", "sdpa", experts="grouped_mm"),
]


@dataclass(frozen=True)
class PrecisionMeasurement:
    """How far half-precision attributions are from fp32's, for GIM and InputXGradient."""

    gim_error: float
    input_x_gradient_error: float
    cosine: float
    top3_overlap: float
    router_flips: int

    def line(self, label: str, dtype: torch.dtype) -> str:
        """One printable line of the measurement."""
        return (
            f"[precision] {label:32s} {str(dtype).removeprefix('torch.'):9s} "
            f"GIM rel.err {self.gim_error:.4f}  InputXGradient rel.err "
            f"{self.input_x_gradient_error:.4f}  ratio "
            f"{self.gim_error / self.input_x_gradient_error:.2f}  token cos "
            f"{self.cosine:.5f}  top-3 overlap {self.top3_overlap:.2f}  "
            f"router flips {self.router_flips}"
        )


def relative_error(approximate: Tensor, exact: Tensor) -> float:
    """``||approximate - exact|| / ||exact||``, computed in fp32."""
    approximate, exact = approximate.detach().float(), exact.detach().float()
    return float((approximate - exact).norm() / exact.norm())


def token_cosine(approximate: Tensor, exact: Tensor) -> float:
    """Least cosine similarity, over the examples, of the token scores (sum over hidden)."""
    cosine = nn.functional.cosine_similarity(
        approximate.detach().float().sum(-1), exact.detach().float().sum(-1), dim=-1
    )
    return float(cosine.min())


def top_k_overlap(approximate: Tensor, exact: Tensor, k: int = 3) -> float:
    """Least share, over the examples, of the exact top-k tokens in the approximate top-k."""
    top_approximate = approximate.detach().float().sum(-1).topk(k, dim=-1).indices
    top_exact = exact.detach().float().sum(-1).topk(k, dim=-1).indices
    shared = (top_approximate[:, :, None] == top_exact[:, None, :]).any(-1).sum(-1)
    return float(shared.min()) / k


def router_choices(model: nn.Module, embeds: Tensor) -> list[Tensor]:
    """The sorted top-k experts each token is routed to, per MoE layer (empty if dense)."""
    if not hasattr(model.config, "num_experts_per_tok"):
        return []
    with torch.no_grad():
        output = model(inputs_embeds=embeds, output_router_logits=True)
    top_k = model.config.num_experts_per_tok
    return [
        logits.float().topk(top_k, dim=-1).indices.sort(dim=-1).values
        for logits in output.router_logits
    ]


def measure_precision(
    case: PrecisionCase, dtype: torch.dtype, seed: int = 0, length: int = 12
) -> PrecisionMeasurement:
    """GIM (default rules) and InputXGradient on the fp32 and ``dtype`` models."""
    full = case.build(torch.float32, seed)
    half = case.build(dtype, seed)
    embeds = full.get_input_embeddings()(sample_ids(batch=2, length=length)).detach()
    half_embeds = embeds.to(dtype)

    gim_full = GIMAttribution(logits_of(full), full).attribute(embeds, target=TARGET)
    gim_half = GIMAttribution(logits_of(half), half).attribute(half_embeds, target=TARGET)
    ixg_full = InputXGradient(logits_of(full)).attribute(embeds, target=TARGET)
    ixg_half = InputXGradient(logits_of(half)).attribute(half_embeds, target=TARGET)
    assert gim_half.dtype == dtype and torch.isfinite(gim_half).all()

    flips = sum(
        int((a != b).any(-1).sum())
        for a, b in zip(router_choices(full, embeds), router_choices(half, half_embeds))
    )
    return PrecisionMeasurement(
        gim_error=relative_error(gim_half, gim_full),
        input_x_gradient_error=relative_error(ixg_half, ixg_full),
        cosine=token_cosine(gim_half, gim_full),
        top3_overlap=top_k_overlap(gim_half, gim_full),
        router_flips=flips,
    )


# Captum's InputXGradient says it set requires_grad on the embeddings itself.
input_x_gradient_warning = pytest.mark.filterwarnings(
    "ignore:Input Tensor 0 did not already require gradients"
)


@input_x_gradient_warning
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", PRECISION_CASES, ids=lambda case: case.label)
def test_half_precision_attributions_close_to_fp32(case: PrecisionCase, dtype: torch.dtype) -> None:
    """bf16/fp16 GIM is within the documented tolerance of fp32 GIM, and the
    rules add no precision loss beyond the model's own (InputXGradient's)."""
    measured = measure_precision(case, dtype)
    print(measured.line(case.label, dtype))
    tolerance = TOLERANCES[dtype]
    # The tolerance assumes the half model routes every token like the fp32
    # one; a flipped router decision changes the function itself (see below).
    assert measured.router_flips == 0
    assert measured.gim_error < tolerance.relative_error
    assert measured.cosine > tolerance.cosine
    assert measured.top3_overlap >= tolerance.top3_overlap
    assert measured.gim_error <= (
        tolerance.vs_input_x_gradient * measured.input_x_gradient_error + EPSILON
    )


@input_x_gradient_warning
def test_bf16_router_flip_costs_gim_no_more_than_input_x_gradient() -> None:
    """Where bf16 rounding moves a token to other experts, the model computes a
    different function, so attributions move beyond the dense tolerance; GIM
    then still stays as close to fp32 as InputXGradient does."""
    case = PRECISION_CASES[4]
    measured = measure_precision(case, torch.bfloat16, seed=1)
    print(measured.line(f"{case.label} seed 1", torch.bfloat16))
    assert measured.router_flips > 0  # the inputs really flip a routing decision
    assert measured.gim_error <= (
        TOLERANCES[torch.bfloat16].vs_input_x_gradient * measured.input_x_gradient_error + EPSILON
    )
    assert measured.cosine > 0.9


# ---------------------------------------------------------------------------
# Models dispatched by accelerate
# ---------------------------------------------------------------------------

#: Offloaded to disk: layer 0, the final norm and the head; the rest stays on
#: the CPU (with accelerate's hooks, but not offloaded).
DISK_DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "disk",
    "model.layers.1": "cpu",
    "model.norm": "disk",
    "lm_head": "disk",
}
DISPATCH_MODES = ["disk_device_map", "cpu_offload"]

RULES_OFF = GIMConfig.all_rules_off()
RULE_CONFIGS = {
    "rules_off": RULES_OFF,
    "softmax_temperature": replace(RULES_OFF, temperature=2.0),
    "qkv_split": replace(RULES_OFF, q_scale=0.25, k_scale=0.25, v_scale=0.5),
    "gated_mlp_split": replace(RULES_OFF, gate_scale=0.5, up_scale=0.5),
    "freeze_norm": replace(RULES_OFF, freeze_norm=True),
    "all_rules": GIMConfig(),
}
#: Layer 0 and the final norm on the GPU, the rest on the CPU, nothing offloaded.
SPLIT_DEVICE_MAP = {
    "model.embed_tokens": "cpu",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cuda:0",
    "model.layers.1": "cpu",
    "model.norm": "cuda:0",
    "lm_head": "cpu",
}


def build_llama() -> nn.Module:
    """The tiny Llama of every dispatch test (same weights on every call)."""
    return FAMILY_BY_NAME["llama"].build("sdpa")


def dispatch(model: nn.Module, mode: str, offload_dir: Path) -> nn.Module:
    """``model`` with accelerate's hooks, whose offloaded weights live on the meta
    device and are moved in by the hooks for each forward pass."""
    if mode == "disk_device_map":
        model = dispatch_model(model, device_map=DISK_DEVICE_MAP, offload_dir=str(offload_dir))
    else:
        model = cpu_offload(model, execution_device=torch.device("cpu"))
    assert any(parameter.is_meta for parameter in model.parameters())
    return model


def hook_state(model: nn.Module) -> dict[str, tuple[Any, ...]]:
    """Every module's accelerate hook, its forward wrapper, its torch hooks,
    its config object and where its parameters live."""
    state = {}
    for name, module in model.named_modules():
        attributes = module.__dict__
        state[name] = (
            attributes.get("_hf_hook"),
            attributes.get("forward"),
            attributes.get("_old_forward"),
            tuple(module._forward_hooks.items()),
            tuple(module._forward_pre_hooks.items()),
            tuple(module._backward_hooks.items()),
            tuple(module._backward_pre_hooks.items()),
            id(attributes.get("config")),
            tuple(str(p.device) for p in module.parameters(recurse=False)),
        )
    return state


def attribute(model: nn.Module, embeds: Tensor, config: GIMConfig) -> Tensor:
    """GIM attributions of the last position's logit ``TARGET``."""
    return GIMAttribution(logits_of(model), model, config=config).attribute(embeds, target=TARGET)


@pytest.mark.parametrize("rules", list(RULE_CONFIGS))
@pytest.mark.parametrize("mode", DISPATCH_MODES)
def test_dispatched_model_gets_every_rule(mode: str, rules: str, tmp_path: Path) -> None:
    """Dispatched and undispatched attributions agree under each rule alone and
    all rules; each rule changes them (it reached the dispatched modules); and
    the model keeps exactly accelerate's hooks."""
    reference = build_llama()
    embeds = reference.get_input_embeddings()(sample_ids()).detach()
    model = dispatch(build_llama(), mode, tmp_path)
    torch.testing.assert_close(
        logits_of(model)(embeds), logits_of(reference)(embeds), rtol=0, atol=0
    )
    before = hook_state(model)

    config = RULE_CONFIGS[rules]
    expected = attribute(reference, embeds, config)
    got = attribute(model, embeds, config)

    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    if config != RULES_OFF:
        rules_off = attribute(model, embeds, RULES_OFF)
        assert (got - rules_off).abs().max() > 1e-3
    assert hook_state(model) == before


def before_hook(state: dict[str, tuple[Any, ...]], model: nn.Module, module: nn.Module) -> Any:
    """The accelerate hook ``state`` recorded for ``module`` of ``model``."""
    name = next(name for name, candidate in model.named_modules() if candidate is module)
    return state[name][0]


@pytest.mark.parametrize("mode", DISPATCH_MODES)
def test_rule_hooks_sit_beside_accelerate_hooks(mode: str, tmp_path: Path) -> None:
    """Inside ``gim_rules`` every norm, gated-MLP projection and attention module
    of the dispatched model carries its rule next to accelerate's forward
    wrapper; when the block ends only accelerate's hooks are left."""
    model = dispatch(build_llama(), mode, tmp_path)
    embeds = model.get_input_embeddings()(sample_ids()).detach()
    before = hook_state(model)
    sites = find_rule_sites(model)
    assert len(sites.norms) == 5 and len(sites.attentions) == 2 and len(sites.gated_mlps) == 2
    hooked = [norm.module for norm in sites.norms]
    hooked += [
        getattr(mlp.module, branch)
        for mlp in sites.gated_mlps
        for branch in ("gate_proj", "up_proj")
    ]

    with gim_rules(model):
        inside = hook_state(model)
        logits_of(model)(embeds)  # the forward runs through both kinds of hooks
        for module in hooked:
            assert len(module._forward_hooks) == 1
            assert module.__dict__["_hf_hook"] is before_hook(before, model, module)
        for _, attention in sites.attentions:
            assert attention.config._attn_implementation == GIM_ATTENTION
    for name, (hf_hook, forward, old_forward, *_) in inside.items():
        assert (hf_hook, forward, old_forward) == before[name][:3], name
    assert hook_state(model) == before


@pytest.mark.parametrize("mode", DISPATCH_MODES)
def test_accelerate_hooks_intact_after_a_failing_call(mode: str, tmp_path: Path) -> None:
    """A call that raises midway through the forward pass of a dispatched model
    still removes every rule and leaves accelerate's hooks working."""
    model = dispatch(build_llama(), mode, tmp_path)
    embeds = model.get_input_embeddings()(sample_ids()).detach()
    expected = attribute(model, embeds, RULE_CONFIGS["qkv_split"])

    def explode(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        raise KeyboardInterrupt

    handle = model.model.layers[1].mlp.register_forward_hook(explode)
    before = hook_state(model)
    with pytest.raises(KeyboardInterrupt):
        attribute(model, embeds, GIMConfig())
    assert hook_state(model) == before
    handle.remove()
    torch.testing.assert_close(
        attribute(model, embeds, RULE_CONFIGS["qkv_split"]), expected, rtol=0, atol=0
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device beside the CPU")
@pytest.mark.parametrize("rules", list(RULE_CONFIGS))
def test_model_split_over_gpu_and_cpu_gets_every_rule(rules: str) -> None:
    """Layers on two devices (no offloading): the same attributions as the
    undispatched model under each rule, and each rule changes them."""
    reference = build_llama()
    embeds = reference.get_input_embeddings()(sample_ids()).detach()
    model = dispatch_model(build_llama(), device_map=SPLIT_DEVICE_MAP, main_device="cpu")
    assert {parameter.device.type for parameter in model.parameters()} == {"cpu", "cuda"}
    before = hook_state(model)

    config = RULE_CONFIGS[rules]
    got = attribute(model, embeds, config)

    # GPU and CPU kernels round differently: measured up to 2e-6 apart.
    torch.testing.assert_close(got, attribute(reference, embeds, config), rtol=1e-4, atol=1e-5)
    if config != RULES_OFF:
        assert (got - attribute(model, embeds, RULES_OFF)).abs().max() > 1e-3
    assert hook_state(model) == before
