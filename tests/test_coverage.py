"""Whole-library coverage: every causal-LM family of the installed transformers.

Each family is built from its default config, shrunk to a tiny model (random
weights, std 0.2, norm weights perturbed away from 1), under eager and sdpa.
A case passes when GIM either applies every rule it finds, with the forward
bitwise unchanged and each rule changing the attribution, or refuses with a
named ``UnsupportedModuleError``. ``python tests/test_coverage.py --write-docs``
writes the table in docs/coverage.md.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from captum_gim import GIMConfig, UnsupportedModuleError, gim_rules
from captum_gim.sites import find_rule_sites

OFF = GIMConfig.all_rules_off()
RULES = {
    "softmax": dataclasses.replace(OFF, temperature=2.0),
    "norm": dataclasses.replace(OFF, freeze_norm=True),
    "qkv": dataclasses.replace(OFF, q_scale=0.25, k_scale=0.25, v_scale=0.5),
    "gated_mlp": dataclasses.replace(OFF, gate_scale=0.5, up_scale=0.5),
}
SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    ffn_dim=48,
    num_hidden_layers=2,
    num_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=16,
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
)
BUILD_SECONDS = 20
TARGET = 3


def causal_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrink(config: transformers.PretrainedConfig) -> None:
    for name, value in SMALL.items():
        current = getattr(config, name, "absent")
        if isinstance(current, int | float) or (
            current is None and name in ("head_dim", "num_key_value_heads")
        ):
            try:
                setattr(config, name, value)
            except (AttributeError, ValueError, TypeError):
                pass
    for name in ("text_config", "decoder", "encoder"):
        inner = getattr(config, name, None)
        if isinstance(inner, transformers.PretrainedConfig):
            _shrink(inner)


def _alarm(*_: object) -> None:
    raise TimeoutError(f"building takes over {BUILD_SECONDS} s")


# The config fields through which transformers' _init_weights reads the weights' std.
INIT_STD_NAMES = ("initializer_range", "init_std")


def build(family: str, implementation: str) -> nn.Module:
    """The tiny random causal LM of ``family``; raises with the reason it cannot be built."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = CONFIG_MAPPING[family]()
    _shrink(config)
    for name in INIT_STD_NAMES:  # non-trivial random weights: std 0.2, not the pretraining init
        if hasattr(config, name):
            setattr(config, name, 0.2)
    torch.manual_seed(0)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(BUILD_SECONDS)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if sum(p.numel() for p in model.parameters()) > 5_000_000:
        raise MemoryError("over 5M parameters after shrinking the config")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name.lower():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _logits(model: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    return model(inputs_embeds=embeds).logits[:, -1]


def run_case(family: str, implementation: str) -> tuple[str, str]:
    """Returns (status, detail): 'unbuildable', 'refused' or 'every rule'."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build(family, implementation)
    except Exception as error:
        return "unbuildable", f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    try:
        sites = find_rule_sites(model)
    except UnsupportedModuleError as error:
        return "refused", str(error).splitlines()[1].strip(" -")[:160]
    ids = torch.arange(1, 7)[None] % model.config.get_text_config().vocab_size
    try:
        embeds = model.get_input_embeddings()(ids).detach()
        with torch.no_grad():
            expected = _logits(model, embeds)
            if not torch.equal(expected, _logits(model, embeds)):
                return "unbuildable", "its forward is not deterministic without GIM"
    except Exception as error:
        return "unbuildable", f"forward fails: {type(error).__name__}"
    try:
        with gim_rules(model), torch.no_grad():
            got = _logits(model, embeds)
        assert torch.equal(got, expected), "forward changed under gim_rules"
        plain = _gradient(model, embeds, OFF)
        parts = {
            "softmax": sites.attentions,
            "qkv": sites.attentions,
            "norm": sites.norms,
            "gated_mlp": sites.gated_mlps,
        }
        applied = []
        for rule, config in RULES.items():
            if not parts[rule]:
                continue
            changed = _gradient(model, embeds, config)
            error = float((changed - plain).norm() / plain.norm())
            assert error > 1e-4, f"rule {rule} did not change the attribution"
            applied.append(rule)
    except UnsupportedModuleError as error:
        return "refused", str(error).splitlines()[0][:160]
    return "every rule", ", ".join(applied)


def _gradient(model: nn.Module, embeds: torch.Tensor, config: GIMConfig) -> torch.Tensor:
    x = embeds.clone().requires_grad_()
    with gim_rules(model, config=config):
        output = _logits(model, x)[:, TARGET].sum()
        return torch.autograd.grad(output, x)[0]


CASES = [
    pytest.param(family, implementation, id=f"{family}-{implementation}")
    for family in causal_families()
    for implementation in ("eager", "sdpa")
]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "implementation"), CASES)
def test_family_gets_every_rule_or_a_named_refusal(family: str, implementation: str) -> None:
    status, detail = run_case(family, implementation)
    if status == "unbuildable":
        pytest.skip(detail)
    if status == "refused":
        assert "'" in detail, f"refusal does not name a module: {detail}"


def _safe_case(family: str, implementation: str) -> tuple[str, str]:
    try:
        return run_case(family, implementation)
    except AssertionError as error:
        return "WRONG", str(error)


def write_docs(path: Path) -> None:
    rows, totals = [], {"every rule": 0, "refused": 0, "unbuildable": 0, "WRONG": 0}
    for family in causal_families():
        cells = [_safe_case(family, implementation) for implementation in ("eager", "sdpa")]
        status = cells[0][0]
        totals[status] += 1
        rows.append(
            f"| {family} | " + " | ".join(f"{s}: {d}".replace("|", "/") for s, d in cells) + " |"
        )
        print(family, cells[0][0], flush=True)
    built = totals["every rule"] + totals["refused"]
    header = [
        "# GIM coverage of transformers' causal-LM families",
        "",
        f"Generated by `python tests/test_coverage.py --write-docs` with transformers "
        f"{transformers.__version__} and torch {torch.__version__}: each family built from "
        "a tiny config with random weights (status by the eager implementation).",
        "",
        f"- every rule: {totals['every rule']} of {built} families that build",
        f"- refused by name: {totals['refused']}",
        f"- cannot be built from a tiny config: {totals['unbuildable']}",
        f"- forward changed or a rule without effect: {totals['WRONG']}",
        "",
        "| family | eager | sdpa |",
        "|---|---|---|",
    ]
    path.write_text("\n".join(header + rows) + "\n")


if __name__ == "__main__":
    if "--write-docs" in sys.argv:
        torch.set_num_threads(1)
        write_docs(Path(__file__).resolve().parent.parent / "docs" / "coverage.md")


def _tiny(family: str, implementation: str = "eager") -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build(family, implementation)


def test_nemotron_one_plus_w_layer_norm_is_frozen_with_its_own_scale() -> None:
    """Regression: NemotronLayerNorm1P subclasses nn.LayerNorm but scales by (1 + w)."""
    from reference import reference_gradient

    model = _tiny("nemotron")
    embeds = model.get_input_embeddings()(torch.arange(1, 7)[None]).detach()
    config = RULES["norm"]
    got = _gradient(model, embeds, config)
    want = reference_gradient(model, lambda x: _logits(model, x), embeds, TARGET, config)
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_gpt_oss_sinks_keep_the_forward_and_get_the_tempered_softmax() -> None:
    """Regression: gpt-oss's attention sinks are neither dropped nor ignored."""
    from reference import reference_gradient

    model = _tiny("gpt_oss")
    embeds = model.get_input_embeddings()(torch.arange(1, 7)[None]).detach()
    with torch.no_grad():
        expected = _logits(model, embeds)
    with pytest.warns(UserWarning, match="GptOssExperts"), gim_rules(model, strict=False):
        with torch.no_grad():
            got = _logits(model, embeds)
    assert torch.equal(got, expected)
    config = RULES["softmax"]
    x = embeds.clone().requires_grad_()
    with pytest.warns(UserWarning, match="GptOssExperts"):
        with gim_rules(model, config=config, strict=False):
            grad = torch.autograd.grad(_logits(model, x)[:, TARGET].sum(), x)[0]
    want = reference_gradient(model, lambda e: _logits(model, e), embeds, TARGET, config)
    assert float((grad - want).norm() / want.norm()) < 1e-5
    assert float((grad - _gradient_plain(model, embeds)).norm()) > 1e-4


def _gradient_plain(model: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    x = embeds.clone().requires_grad_()
    return torch.autograd.grad(_logits(model, x)[:, TARGET].sum(), x)[0]


class _OnePlusWRMSNorm(nn.Module):
    """Not an nn.RMSNorm subclass and no telling name beyond 'norm'."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-0.5, 0.5, width))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rho = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x / rho * (1.0 + self.weight)


@pytest.mark.parametrize(
    "norm",
    [
        _OnePlusWRMSNorm(8),
        nn.LayerNorm(8, bias=False),
        nn.GroupNorm(2, 4),
        nn.InstanceNorm1d(4, affine=True),
    ],
    ids=["rms-1+w", "layernorm-no-bias", "groupnorm", "instancenorm"],
)
def test_norm_variants_match_their_formula(norm: nn.Module) -> None:
    """Rule 2 on norm variants against the frozen statistic written by formula."""
    model = nn.Sequential(nn.Linear(8, 8), norm, nn.Linear(8, 3))
    torch.manual_seed(0)
    if isinstance(norm, (nn.GroupNorm, nn.InstanceNorm1d)):
        model = nn.Sequential(nn.Unflatten(1, (4, 2)), norm, nn.Flatten(), nn.Linear(8, 3))
    x = torch.randn(2, 8, requires_grad=True)
    with gim_rules(model, config=RULES["norm"]):
        got = torch.autograd.grad(model(x)[:, 0].sum(), x)[0]
    handle = norm.register_forward_hook(lambda m, a, out: _frozen_by_formula(m, a[0]))
    try:
        want = torch.autograd.grad(model(x)[:, 0].sum(), x)[0]
    finally:
        handle.remove()
    torch.testing.assert_close(got, want)
    plain = torch.autograd.grad(model(x)[:, 0].sum(), x)[0]
    assert float((got - plain).norm()) > 1e-4


def _frozen_by_formula(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, _OnePlusWRMSNorm):
        rho = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + module.eps)
        return x / rho.detach() * (1.0 + module.weight)
    if isinstance(module, nn.LayerNorm):
        sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + module.eps)
        return (x - x.mean(-1, keepdim=True)) / sigma.detach() * module.weight
    groups = module.num_groups if isinstance(module, nn.GroupNorm) else x.shape[1]
    grouped = x.reshape(x.shape[0], groups, -1)
    sigma = torch.sqrt(grouped.var(-1, unbiased=False, keepdim=True) + module.eps)
    y = ((grouped - grouped.mean(-1, keepdim=True)) / sigma.detach()).reshape(x.shape)
    return y * module.weight[:, None] + module.bias[:, None]


def test_batch_norm_is_affine_in_eval_and_refused_with_batch_statistics() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    x = torch.randn(3, 4, requires_grad=True)
    with gim_rules(model, config=RULES["norm"]):
        got = torch.autograd.grad(model(x)[:, 0].sum(), x)[0]
    torch.testing.assert_close(got, torch.autograd.grad(model(x)[:, 0].sum(), x)[0])
    model.train()
    with pytest.raises(UnsupportedModuleError, match="batch statistics"):
        with gim_rules(model, config=RULES["norm"]):
            model(x)


def test_misread_norm_is_refused_on_the_call_not_given_a_wrong_gradient() -> None:
    norm = _OnePlusWRMSNorm(8)
    model = nn.Sequential(nn.Linear(8, 8), norm, nn.Linear(8, 3))
    x = torch.randn(2, 8, requires_grad=True)
    with gim_rules(model, config=RULES["norm"]):
        norm.eps = 0.5  # the cached form no longer describes the module
        output = model(x)[:, 0].sum()
        with pytest.raises(UnsupportedModuleError, match="_OnePlusWRMSNorm"):
            torch.autograd.grad(output, x)
