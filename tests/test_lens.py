"""TransformerLens 3's HookedTransformer gets every GIM rule exactly, or is refused.

The reference is written on TransformerLens's own hook points, independently of
captum_gim: ``hook_scale`` detached (rule 2), the pattern's backward tempered
from ``hook_attn_scores`` (rule 1), and the gradients of ``hook_q`` / ``hook_k``
/ ``hook_v`` and of the gated MLPs' branch hook points scaled (rule 3).
"""

from __future__ import annotations

import dataclasses
from importlib.metadata import version

import pytest
import torch
from captum.attr import InputXGradient

from captum_gim import GIMAttribution, GIMConfig, UnsupportedModuleError, gim_rules

transformer_lens = pytest.importorskip(
    "transformer_lens", reason="TransformerLens is not installed (pip install captum_gim[lens])"
)
if int(version("transformer-lens").split(".")[0]) >= 4:
    pytest.skip(
        "HookedTransformer was removed in TransformerLens 4 (tests/test_lens_bridge.py "
        "covers its TransformerBridge)",
        allow_module_level=True,
    )

from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402
from transformer_lens.components import LayerNorm  # noqa: E402
from transformer_lens.components.mlps.gated_mlp import GatedMLP  # noqa: E402

TARGET = 3
#: name -> HookedTransformerConfig settings (on top of the tiny defaults) and
#: whether TransformerLens folds the norms and centres the writing weights.
MODELS = {
    "ln_gelu": (dict(normalization_type="LN"), False),
    "ln_pre": (dict(normalization_type="LNPre"), False),
    "ln_folded": (dict(normalization_type="LN"), True),
    "ln_solu": (dict(normalization_type="LN", act_fn="solu_ln"), False),
    "rms_swiglu_rotary": (
        dict(normalization_type="RMS", gated_mlp=True, act_fn="silu", rotary=True),
        False,
    ),
    "rms_swiglu_rotary_gqa": (
        dict(normalization_type="RMS", gated_mlp=True, act_fn="silu", rotary=True, kv=2),
        False,
    ),
    "rms_pre_geglu": (dict(normalization_type="RMSPre", gated_mlp=True), False),
    "rms_swiglu_folded": (
        dict(normalization_type="RMS", gated_mlp=True, act_fn="silu", rotary=True),
        True,
    ),
    "rms_qk_norm": (dict(normalization_type="RMS", use_qk_norm=True, rotary=True), False),
    "gpt_oss_moe": (
        dict(
            normalization_type="RMS",
            num_experts=4,
            experts_per_token=2,
            original_architecture="GptOssForCausalLM",
        ),
        False,
    ),
    "moe": (
        dict(normalization_type="RMS", act_fn="silu", num_experts=4, experts_per_token=2),
        False,
    ),
}
RULES = {
    "softmax": dataclasses.replace(GIMConfig.all_rules_off(), temperature=2.0),
    "norm": dataclasses.replace(GIMConfig.all_rules_off(), freeze_norm=True),
    "qkv": dataclasses.replace(GIMConfig.all_rules_off(), q_scale=0.25, k_scale=0.25, v_scale=0.5),
    "gated": dataclasses.replace(GIMConfig.all_rules_off(), gate_scale=0.5, up_scale=0.5),
    "all": GIMConfig(),
    "uneven": GIMConfig(temperature=3.0, q_scale=0.3, k_scale=0.6, gate_scale=0.2, up_scale=0.7),
}


def build(name: str) -> HookedTransformer:
    settings, fold = MODELS[name]
    settings = dict(settings)
    rotary, kv = settings.pop("rotary", False), settings.pop("kv", None)
    torch.manual_seed(0)
    config = HookedTransformerConfig(
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_head=8,
        d_mlp=48,
        d_vocab=50,
        n_ctx=32,
        act_fn=settings.pop("act_fn", "gelu"),
        n_key_value_heads=kv,
        positional_embedding_type="rotary" if rotary else "standard",
        rotary_dim=8 if rotary else None,
        seed=0,
        **settings,
    )
    model = HookedTransformer(config).eval()
    with torch.no_grad():  # random weights (std 0.2) and norm scales, so every rule matters
        for parameter_name, parameter in model.named_parameters():
            scale_like = parameter_name.endswith(".w")
            parameter.copy_(scale_like + 0.2 * torch.randn_like(parameter))
    if fold:
        model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    return model


def embeddings(model: HookedTransformer) -> torch.Tensor:
    tokens = torch.tensor([[5, 17, 3, 9, 21, 2, 11, 7]])
    x = model.embed(tokens)
    if model.cfg.positional_embedding_type == "standard":
        x = x + model.pos_embed(tokens)
    return x.detach()


def forward_of(model: HookedTransformer):
    return lambda x: model(x, start_at_layer=0)[:, -1]


def reference(
    model: HookedTransformer, x: torch.Tensor, config: GIMConfig, forward=None
) -> torch.Tensor:
    """GIM written on TransformerLens's hook points, not with captum_gim."""
    temperature = config.temperature or 1.0
    scores: dict[str, torch.Tensor] = {}

    def scaled(scale: float):
        return lambda t, hook: t.detach() + scale * (t - t.detach())

    def keep_scores(t, hook):
        scores[hook.name] = t
        return t

    def tempered(pattern, hook):
        s = scores[hook.name.replace("hook_pattern", "hook_attn_scores")]
        p_t = torch.softmax(s / temperature, dim=-1)  # d(T p_T)/ds = p_T (g - <g, p_T>)
        return pattern.detach() + temperature * (p_t - p_t.detach())

    def ends(suffix: str):
        return lambda name: name.endswith(suffix)

    hooks = [
        (ends("attn.hook_attn_scores"), keep_scores),
        (ends("attn.hook_pattern"), tempered),
        (ends("attn.hook_q"), scaled(config.q_scale)),
        (ends("attn.hook_k"), scaled(config.k_scale)),
        (ends("attn.hook_v"), scaled(config.v_scale)),
    ]
    if config.freeze_norm:
        hooks.append((ends("hook_scale"), lambda t, hook: t.detach()))
    if model.cfg.num_experts:  # the experts' gate is hook_gate, their up branch hook_pre
        hooks += [
            (lambda n: ".experts." in n and n.endswith("hook_gate"), scaled(config.gate_scale)),
            (lambda n: ".experts." in n and n.endswith("hook_pre"), scaled(config.up_scale)),
        ]
    elif model.cfg.gated_mlp:
        hooks += [
            (ends("mlp.hook_pre"), scaled(config.gate_scale)),
            (ends("mlp.hook_pre_linear"), scaled(config.up_scale)),
        ]
    x = x.clone().requires_grad_()
    with model.hooks(fwd_hooks=hooks):
        score = (forward or forward_of(model))(x)[:, TARGET].sum()
    (gradient,) = torch.autograd.grad(score, x)
    return x.detach() * gradient


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request) -> HookedTransformer:
    return build(request.param)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_hooked_transformer_gets_each_rule_exactly(model, rule) -> None:
    x, config = embeddings(model), RULES[rule]
    want = reference(model, x, config)
    got = GIMAttribution(forward_of(model), model, config=config).attribute(x, target=TARGET)
    assert relative_error(got, want) < 1e-5
    assert relative_error(reference(model, x, GIMConfig.all_rules_off()), want) > 1e-3 or (
        rule == "gated" and not model.cfg.gated_mlp and not model.cfg.num_experts
    )


def test_hooked_encoder_gets_every_rule_exactly() -> None:
    """TransformerLens's BERT (embedding LayerNorm, bidirectional attention), by LayerGIM."""
    from transformer_lens import HookedEncoder

    from captum_gim import LayerGIM

    torch.manual_seed(0)
    config = HookedTransformerConfig(
        d_model=32, n_layers=2, n_heads=4, d_head=8, d_mlp=48, d_vocab=50, n_ctx=32,
        act_fn="gelu", attention_dir="bidirectional", normalization_type="LN", seed=0,
    )  # fmt: skip
    encoder = HookedEncoder(config).eval()
    with torch.no_grad():
        for parameter_name, parameter in encoder.named_parameters():
            parameter.copy_(parameter_name.endswith(".w") + 0.2 * torch.randn_like(parameter))
    tokens = torch.tensor([[5, 17, 3, 9, 21, 2, 11, 7]])
    embedded = encoder.embed(tokens).detach()

    def from_embeddings(e):  # the encoder's forward after its embedding
        def replace(_, __, ___):
            return e

        handle = encoder.embed.register_forward_hook(replace)
        try:
            return encoder(tokens)[:, 0]
        finally:
            handle.remove()

    want = reference(encoder, embedded, GIMConfig(), forward=from_embeddings)
    gim = LayerGIM(lambda ids: encoder(ids)[:, 0], encoder.embed, encoder)
    got = gim.attribute(tokens, target=TARGET)
    assert relative_error(got, want) < 1e-5


def test_forward_unchanged_and_no_hook_left(model) -> None:
    x = embeddings(model)
    plain = forward_of(model)(x)
    with gim_rules(model):
        under_rules = forward_of(model)(x.requires_grad_())
    assert torch.equal(plain, under_rules)
    assert all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )


def test_all_rules_off_is_input_x_gradient(model) -> None:
    x = embeddings(model)
    off = GIMAttribution(forward_of(model), model, config=GIMConfig.all_rules_off())
    plain = InputXGradient(forward_of(model)).attribute(x, target=TARGET)
    assert torch.equal(off.attribute(x, target=TARGET), plain)


def test_issue_repro_frozen_norm_is_applied() -> None:
    """Issue 19: GIM equalled GIM with freeze_norm=False on a HookedTransformer."""
    m = HookedTransformer(
        HookedTransformerConfig(
            d_model=64,
            n_layers=2,
            n_heads=4,
            d_head=16,
            d_vocab=128,
            n_ctx=64,
            act_fn="gelu",
            normalization_type="LN",
            seed=0,
        )
    ).eval()
    x = m.embed(torch.arange(8)[None]).detach()
    f = lambda e: m(e, start_at_layer=0)[:, -1]  # noqa: E731
    frozen = GIMAttribution(f, m).attribute(x, target=3)
    assert not torch.equal(frozen, GIMAttribution(f, m, freeze_norm=False).attribute(x, target=3))


def test_user_hooks_keep_running_and_do_not_change_the_result() -> None:
    model = build("rms_swiglu_rotary")
    x, seen = embeddings(model), []
    want = reference(model, x, GIMConfig())
    cache = [(lambda n: n.endswith("hook_post"), lambda t, hook: seen.append(hook.name))]
    with model.hooks(fwd_hooks=cache):
        got = GIMAttribution(forward_of(model), model).attribute(x, target=TARGET)
    assert seen[-2:] == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    assert relative_error(got, want) < 1e-5


class _MaxNorm(LayerNorm):
    """Named and built like a TransformerLens norm, but divides by the maximum."""

    def forward(self, x):
        return self.hook_normalized(x / self.hook_scale(x.abs().amax(-1, keepdim=True))) * self.w


class _DoubledGatedMLP(GatedMLP):
    """A gated MLP whose hook_post reads 2 act(gate) up, not act(gate) up."""

    def forward(self, x):
        gate = self.hook_pre(x @ self.W_gate)
        up = self.hook_pre_linear(x @ self.W_in)
        return self.hook_post(2 * self.act_fn(gate) * up) @ self.W_out


def test_unknown_norm_is_refused_by_name() -> None:
    model = build("ln_gelu")
    model.blocks[1].ln2 = _MaxNorm(model.cfg)
    x = embeddings(model)
    with pytest.raises(UnsupportedModuleError, match=r"blocks\.1\.ln2.*_MaxNorm"):
        GIMAttribution(forward_of(model), model).attribute(x, target=TARGET)
    with pytest.warns(UserWarning, match=r"blocks\.1\.ln2"):
        GIMAttribution(forward_of(model), model, strict=False).attribute(x, target=TARGET)


def test_gated_mlp_computing_another_product_is_refused_by_name() -> None:
    model = build("rms_swiglu_rotary")
    doubled = _DoubledGatedMLP(model.cfg)
    doubled.load_state_dict(model.blocks[0].mlp.state_dict())
    model.blocks[0].mlp = doubled
    x = embeddings(model)
    with pytest.raises(UnsupportedModuleError, match=r"blocks\.0\.mlp.*_DoubledGatedMLP"):
        GIMAttribution(forward_of(model), model).attribute(x, target=TARGET)


@pytest.mark.parametrize("name", ["ln_gelu", "rms_swiglu_rotary"])
def test_bfloat16_hooked_transformer_is_close_to_the_float32_reference(name) -> None:
    model, reference_model = build(name), build(name)
    model.cfg.dtype = torch.bfloat16
    model.to(torch.bfloat16)
    x = embeddings(reference_model)
    got = GIMAttribution(forward_of(model), model).attribute(x.bfloat16(), target=TARGET)
    assert relative_error(got.float(), reference(reference_model, x, GIMConfig())) < 0.05
