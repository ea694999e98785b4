"""Attention computed with plain torch ops (outside AttentionInterface).

The families below computed their attention with plain torch ops when they were
added; a transformers release may move one onto AttentionInterface (Falcon in
5.25), so the tests assert what users rely on, whichever route the installed
transformers takes: the forward unchanged and the attribution equal to the
reference. The hand-written attentions at the end always take the traced route.

The reference shares no code with captum_gim: the softmax is replaced, for the
test only, by a surrogate whose derivative is rule 1, and the q/k/v projection
outputs get rule 3's gradient scales through forward hooks, with each family's
fused q/k/v layout written out here.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import test_coverage
import torch
from torch import Tensor, nn

from captum_gim import GIMConfig, UnsupportedModuleError, gim_rules

RULES = GIMConfig(temperature=2.0, freeze_norm=False, q_scale=0.25, k_scale=0.4, v_scale=0.5)
F = nn.functional
_softmax = F.softmax


def _scaled(x: Tensor, scale: Tensor | float) -> Tensor:
    return x * scale + x.detach() * (1.0 - scale)


def _surrogate_softmax(temperature: float):
    def softmax(scores: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype=None):
        probs = _softmax(scores, dim=dim, dtype=dtype)
        tempered = _softmax(scores.to(probs.dtype) / temperature, dim=dim)
        return probs.detach() + temperature * (tempered - tempered.detach())

    return softmax


def _labels(layout: str, width: int, heads: int) -> list[str]:
    """Which of q, k, v each output channel of a fused projection is."""
    if layout == "thirds":
        third = width // 3
        return ["q"] * third + ["k"] * third + ["v"] * third
    head_dim = width // (3 * heads)
    if layout == "per_head":  # (heads, 3, head_dim): Bloom, GPT-NeoX-Japanese
        return (["q"] * head_dim + ["k"] * head_dim + ["v"] * head_dim) * heads
    if layout == "multi_query":  # (heads + 2, head_dim): Falcon
        head_dim = width // (heads + 2)
        return ["q"] * (heads * head_dim) + ["k"] * head_dim + ["v"] * head_dim
    raise ValueError(layout)


# family -> separate (q, k, v) module name endings, or (fused name, layout).
PROJECTIONS = {
    "gpt_neo": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    "xglm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "trocr": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "rembert": ("self.query", "self.key", "self.value"),
    "roformer": ("self.query", "self.key", "self.value"),
    "megatron-bert": ("self.query", "self.key", "self.value"),
    "big_bird": ("self.query", "self.key", "self.value"),
    "xlm": (".q_lin", ".k_lin", ".v_lin"),
    "git": ("self.query", "self.key", "self.value"),
    "mvp": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mpt": ("attn.Wqkv", "thirds"),
    "openai-gpt": ("attn.c_attn", "thirds"),
    "bloom": ("self_attention.query_key_value", "per_head"),
    "gpt_neox_japanese": ("attention.query_key_value", "per_head"),
    "falcon": ("self_attention.query_key_value", "multi_query"),
    "deberta-v2": ("self.query_proj", "self.key_proj", "self.value_proj"),
}
#: The families as the coverage test builds them, by the names above.
FAMILIES = {
    **{name: test_coverage.Family(name, name) for name in PROJECTIONS},
    "deberta-v2": test_coverage.Family("deberta-v2", "deberta-v2", "encoder"),
    # Disentangled attention: q and k also enter the scores through the
    # relative-position terms q r_k^T and k r_q^T (refused, see below).
    "deberta-v2-relative": test_coverage.Family(
        "deberta-v2-relative",
        "deberta-v2",
        "encoder",
        (("relative_attention", True), ("pos_att_type", ["c2p", "p2c"])),
    ),
}


def _reference_hooks(model: nn.Module, family: str, config: GIMConfig) -> list:
    scales = {"q": config.q_scale, "k": config.k_scale, "v": config.v_scale}
    spec = PROJECTIONS[family]
    handles = []
    heads = model.config.get_text_config().num_attention_heads
    for name, module in model.named_modules():
        if len(spec) == 3:
            for letter, ending in zip("qkv", spec):
                if name.endswith(ending):
                    scale = scales[letter]
                    handles.append(
                        module.register_forward_hook(lambda m, a, y, s=scale: _scaled(y, s))
                    )
        elif name.endswith(spec[0]):

            def hook(m: nn.Module, a: tuple, y: Tensor, layout: str = spec[1]) -> Tensor:
                labels = _labels(layout, y.shape[-1], heads)
                scale = torch.tensor([scales[x] for x in labels], dtype=y.dtype)
                return _scaled(y, scale)

            handles.append(module.register_forward_hook(hook))
    assert handles, f"no q/k/v projections found for {family}"
    return handles


def _embeds(model: nn.Module) -> Tensor:
    ids = torch.arange(1, 8)[None] % model.config.get_text_config().vocab_size
    return model.get_input_embeddings()(ids).detach()


def _gradient(model: nn.Module, family: str, x: Tensor) -> Tensor:
    x = x.clone().requires_grad_()
    scores = test_coverage.outputs(model, FAMILIES[family].kind, x)
    (grad,) = torch.autograd.grad(scores[:, test_coverage.TARGET].sum(), x)
    return grad


def build(family: str, implementation: str) -> nn.Module:
    """The coverage test's tiny model, without its build-time limit."""
    limit = test_coverage.BUILD_SECONDS
    test_coverage.BUILD_SECONDS = 600
    try:
        return test_coverage.build(FAMILIES[family], implementation)
    finally:
        test_coverage.BUILD_SECONDS = limit


def _reference(family: str, config: GIMConfig, monkeypatch: pytest.MonkeyPatch) -> Tensor:
    model = build(family, "eager")
    handles = _reference_hooks(model, family, config)
    with monkeypatch.context() as patch:
        patch.setattr(F, "softmax", _surrogate_softmax(float(config.temperature)))
        try:
            return _gradient(model, family, _embeds(model))
        finally:
            for handle in handles:
                handle.remove()


CASES = [(family, "eager") for family in PROJECTIONS] + [("falcon", "sdpa")]


def test_q_and_k_entering_the_scores_outside_their_product_are_refused() -> None:
    """DeBERTa's relative-position terms read q and k outside q k^T: their scales
    at the projections (the spec's rule 3) cannot be applied at the product."""
    model = build("deberta-v2-relative", "eager")
    x = _embeds(model).requires_grad_()
    with pytest.raises(UnsupportedModuleError, match=r"'.*attention.self'.*outside q k\^T"):
        with gim_rules(model, config=RULES):
            test_coverage.outputs(model, "encoder", x)


@pytest.mark.slow
@pytest.mark.parametrize("family,implementation", CASES)
def test_traced_family_equals_the_reference(
    family: str, implementation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build(family, implementation)
        x = _embeds(model)
        kind = FAMILIES[family].kind
        with torch.no_grad():
            expected = test_coverage.outputs(model, kind, x)
            with gim_rules(model, config=RULES):
                assert torch.equal(test_coverage.outputs(model, kind, x), expected)
        with gim_rules(model, config=RULES):
            got = _gradient(model, family, x)
        plain = _gradient(model, family, x)
        reference = _reference(family, RULES, monkeypatch)
    assert float((reference - plain).norm() / plain.norm()) > 1e-4
    assert float((got - reference).norm() / reference.norm()) < 1e-5


class _HandWrittenAttention(nn.Module):
    """Attention in one of the styles transformers' older families use."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 16)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (t.reshape(1, -1, 2, 8).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        mask = torch.ones(q.shape[-2], k.shape[-2]).tril().bool()
        if self.style == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            if self.style == "einsum":
                s = torch.einsum("bhqd,bhkd->bhqk", q, k)
            elif self.style == "baddbmm":
                bias = torch.zeros(2, q.shape[2], k.shape[2])
                s = bias.baddbmm(batch1=q.flatten(0, 1), batch2=k.flatten(0, 1).mT, alpha=1.0)
                s = s.view(1, 2, q.shape[2], k.shape[2])
            else:
                s = q @ k.transpose(-1, -2)
            s = (s / 8**0.5).masked_fill(~mask, torch.finfo(s.dtype).min)
            p = nn.Softmax(dim=-1)(s) if self.style == "module" else F.softmax(s, dim=-1)
            o = torch.matmul(p, v)
        return self.out(o.transpose(1, 2).reshape(1, -1, 16))


class _Model(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.self_attention = attention

    def forward(self, x: Tensor) -> Tensor:
        return self.self_attention(x) + x


def _hand_written_reference(model: _Model, x: Tensor, config: GIMConfig) -> Tensor:
    attention = model.self_attention
    labels = ["q"] * 16 + ["k"] * 16 + ["v"] * 16
    scales = {"q": config.q_scale, "k": config.k_scale, "v": config.v_scale}
    scale = torch.tensor([scales[letter] for letter in labels])
    handle = attention.qkv.register_forward_hook(lambda m, a, y: _scaled(y, scale))
    surrogate = _surrogate_softmax(float(config.temperature))
    x = x.clone().requires_grad_()
    try:
        q, k, v = (
            t.reshape(1, -1, 2, 8).transpose(1, 2) for t in attention.qkv(x).chunk(3, dim=-1)
        )
        mask = torch.ones(q.shape[-2], k.shape[-2]).tril().bool()
        s = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~mask, torch.finfo(q.dtype).min)
        o = surrogate(s, dim=-1) @ v
        y = attention.out(o.transpose(1, 2).reshape(1, -1, 16)) + x
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(y[:, -1].sum(), x)
    return grad


@pytest.mark.parametrize("style", ["matmul", "einsum", "baddbmm", "module", "sdpa"])
def test_hand_written_attention_gets_both_rules(style: str) -> None:
    torch.manual_seed(0)
    model = _Model(_HandWrittenAttention(style))
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        expected = model(x)
        with gim_rules(model, config=RULES):
            assert torch.equal(model(x), expected)
    x_grad = x.clone().requires_grad_()
    with gim_rules(model, config=RULES):
        (got,) = torch.autograd.grad(model(x_grad)[:, -1].sum(), x_grad)
    reference = _hand_written_reference(model, x, RULES)
    assert torch.allclose(got, reference, rtol=1e-5, atol=1e-6)
    assert torch._C._len_torch_function_stack() == 0


class _LinearAttention(nn.Module):
    """A product of activations that is no attention (linear attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return (q @ k.transpose(-1, -2)).tril() @ v


def test_attention_that_is_not_softmax_attention_is_refused_by_name() -> None:
    model = _Model(_LinearAttention())
    x = torch.randn(1, 4, 8, requires_grad=True)
    with pytest.raises(UnsupportedModuleError, match=r"'self_attention' \(_LinearAttention\)"):
        with gim_rules(model):
            model(x)
    assert torch._C._len_torch_function_stack() == 0
    assert not model.self_attention._forward_hooks and not model.self_attention._forward_pre_hooks


def test_non_strict_keeps_exact_gradients_and_names_the_module() -> None:
    model = _Model(_LinearAttention())
    x = torch.randn(1, 4, 8, requires_grad=True)
    (plain,) = torch.autograd.grad(model(x).sum(), x)
    with pytest.warns(UserWarning, match="_LinearAttention"), gim_rules(model, strict=False):
        output = model(x)
        (got,) = torch.autograd.grad(output.sum(), x)
    assert torch.equal(output, model(x))
    assert torch.equal(got, plain)


def test_an_error_inside_the_forward_leaves_no_trace_behind() -> None:
    model = _Model(_HandWrittenAttention("matmul"))
    with pytest.raises(RuntimeError), gim_rules(model):
        model(torch.randn(1, 5, 7, requires_grad=True))  # wrong width
    assert torch._C._len_torch_function_stack() == 0
    assert not model.self_attention._forward_hooks


def test_other_threads_are_untouched() -> None:
    torch.manual_seed(0)
    model, other = _Model(_HandWrittenAttention("matmul")), _Model(_HandWrittenAttention("matmul"))
    x = torch.randn(1, 5, 16, requires_grad=True)
    (exact,) = torch.autograd.grad(other(x)[:, -1].sum(), x)
    results: list[Tensor] = []
    inside, done = threading.Event(), threading.Event()

    def run_other() -> None:
        inside.wait(10)
        (grad,) = torch.autograd.grad(other(x)[:, -1].sum(), x)
        results.append(grad)
        done.set()

    def pause(*_: object) -> None:  # runs while this thread's trace is open
        inside.set()
        done.wait(10)

    handle = model.self_attention.out.register_forward_pre_hook(pause)
    thread = threading.Thread(target=run_other)
    thread.start()
    try:
        with gim_rules(model, config=RULES):
            torch.autograd.grad(model(x)[:, -1].sum(), x)
    finally:
        handle.remove()
        thread.join()
    assert torch.allclose(results[0], exact, rtol=1e-6, atol=1e-7)  # the rules change it by ~50 %
