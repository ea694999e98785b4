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
        if isinstance(current, int | float) or (current is None and name in ("head_dim", "num_key_value_heads")):
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


def build(family: str, implementation: str) -> nn.Module:
    """The tiny random causal LM of ``family``; raises with the reason it cannot be built."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = CONFIG_MAPPING[family]()
    _shrink(config)
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
    except Exception as error:  # noqa: BLE001 - reported as the reason
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
    except Exception as error:  # noqa: BLE001
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


def write_docs(path: Path) -> None:
    rows, totals = [], {"every rule": 0, "refused": 0, "unbuildable": 0}
    for family in causal_families():
        cells = [run_case(family, implementation) for implementation in ("eager", "sdpa")]
        status = cells[0][0]
        totals[status] += 1
        rows.append(
            f"| {family} | "
            + " | ".join(f"{s}: {d}".replace("|", "/") for s, d in cells)
            + " |"
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
        "",
        "| family | eager | sdpa |",
        "|---|---|---|",
    ]
    path.write_text("\n".join(header + rows) + "\n")


if __name__ == "__main__":
    if "--write-docs" in sys.argv:
        torch.set_num_threads(1)
        write_docs(Path(__file__).resolve().parent.parent / "docs" / "coverage.md")
