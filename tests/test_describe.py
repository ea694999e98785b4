"""describe() and `captum-gim inspect`: every rule site with its rule and form,
every product or softmax kept exact by design, every refused part."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import FAMILY_BY_NAME, sample_ids, snapshot
from torch import Tensor, nn

from captum_gim import GIMConfig, describe
from captum_gim.cli import main
from captum_gim.models import model_path


def _rows(model: nn.Module, inputs: object = None) -> dict[str, tuple[str, str, str]]:
    description = describe(model, inputs)
    return {r.module: (r.category, r.rule, r.form) for r in description.records}


def test_llama_lists_every_norm_attention_and_gated_mlp_with_its_form() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa")
    before = snapshot(model)
    description = describe(model, (sample_ids(),))
    rows = {r.module: (r.category, r.rule, r.form) for r in description.records}
    assert rows["model.layers.0.input_layernorm"] == (
        "rule site",
        "frozen norm",
        "RMS, scale w, eps 1e-06",
    )
    assert rows["model.layers.0.self_attn"] == ("rule site", "rule 1 + q/k/v split", "sdpa")
    assert rows["model.layers.1.mlp"] == (
        "rule site",
        "gate/up split",
        "down_proj(act_fn(gate_proj) * up_proj)",
    )
    assert rows["model.norm"][1] == "frozen norm"
    assert len(description.rule_sites) == 2 * 4 + 1
    assert description.exact == [] and description.refused == []
    text = str(description)
    assert "model.layers.0.input_layernorm" in text and "Refused (0)" in text
    after = snapshot(model)
    for key in ("hooks", "global_hooks", "configs", "training", "active"):
        assert before[key] == after[key]


def test_gemma3_norms_are_read_with_their_one_plus_w_scale() -> None:
    model = FAMILY_BY_NAME["gemma3"].build("eager")
    rows = _rows(model, (sample_ids(),))
    assert rows["model.layers.0.input_layernorm"] == (
        "rule site",
        "frozen norm",
        "RMS, scale 1+w, eps 1e-06",
    )
    assert rows["model.layers.0.self_attn.q_norm"][1] == "frozen norm"
    assert rows["model.layers.0.self_attn"] == ("rule site", "rule 1 + q/k/v split", "eager")


def test_gpt2_layer_norms_have_a_bias() -> None:
    model = FAMILY_BY_NAME["gpt2"].build("sdpa")
    rows = _rows(model, {"input_ids": sample_ids()})
    assert rows["transformer.h.0.ln_1"] == (
        "rule site",
        "frozen norm",
        "LayerNorm, scale w, bias, eps 1e-05",
    )
    assert rows["transformer.h.0.attn"][1] == "rule 1 + q/k/v split"


def test_mixture_of_experts_lists_what_it_keeps_exact() -> None:
    model = FAMILY_BY_NAME["mixtral"].build("sdpa")
    description = describe(model, (sample_ids(),))
    exact = {(r.module, r.rule) for r in description.exact}
    assert ("model.layers.0.mlp.experts", "routing weights x expert outputs") in exact
    assert ("model.layers.0.mlp.gate", "softmax outside attention") in exact


class Custom(nn.Module):
    """A gated MLP by data flow, a hand-written norm, and nn.MultiheadAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.a, self.b, self.out = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(x, x, x, need_weights=False)[0]
        h = self.norm(x)
        h = self.out(torch.sigmoid(self.a(h)) * self.b(h))
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_custom_module_gets_sites_by_data_flow_and_names_what_is_refused() -> None:
    torch.manual_seed(0)
    model = Custom().eval()
    description = describe(model, torch.randn(2, 5, 8))
    rows = {(r.module, r.category, r.rule) for r in description.records}
    assert ("attention", "rule site", "rule 1 + q/k/v split") in rows
    assert ("norm", "rule site", "frozen norm") in rows
    assert ("<model>", "rule site", "gate/up split") in rows
    assert ("<model>", "refused", "norm") in rows
    # a part is refused only for a rule that is on
    off = describe(model, torch.randn(2, 5, 8), config=GIMConfig(freeze_norm=False))
    assert off.refused == []


def test_describe_without_inputs_lists_the_structural_sites() -> None:
    description = describe(FAMILY_BY_NAME["qwen3"].build("sdpa"))
    assert not description.audited
    assert "not audited" in description.table()
    assert any(r.module == "model.layers.0.self_attn.q_norm" for r in description.rule_sites)


def test_describe_refuses_what_is_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module"):
        describe(lambda x: x)  # type: ignore[arg-type]


def test_inspect_prints_the_bundled_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--model", str(model_path())]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.input_layernorm" in out
    assert "rule 1 + q/k/v split" in out
    assert "Refused (0)" in out


def test_inspect_names_a_missing_directory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--model", "/no/such/dir"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_transformer_lens_model_lists_its_norms_attention_and_gated_mlps() -> None:
    lens = pytest.importorskip("transformer_lens", reason="TransformerLens is not installed")
    torch.manual_seed(0)
    config = lens.HookedTransformerConfig(
        d_model=32, n_layers=2, n_heads=4, d_head=8, d_vocab=64, n_ctx=32, act_fn="silu",
        normalization_type="RMS", gated_mlp=True, positional_embedding_type="rotary",
        n_key_value_heads=2,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TL 3.9 deprecates HookedTransformer
        model = lens.HookedTransformer(config).eval()
    description = describe(model, torch.arange(6)[None])
    rules = {(r.module, r.rule) for r in description.records if r.category == "rule site"}
    for layer in range(2):
        assert (f"blocks.{layer}.ln1", "frozen norm") in rules
        assert (f"blocks.{layer}.ln2", "frozen norm") in rules
        assert (f"blocks.{layer}.attn", "rule 1 + q/k/v split") in rules
        assert (f"blocks.{layer}.mlp", "gate/up split") in rules
    assert ("ln_final", "frozen norm") in rules
    assert not [r for r in description.records if r.category == "refused"]
    assert "RMS, scale w, eps 1e-05" in description.table()
