"""PyTorch's own nn.MultiheadAttention and nn.Transformer{Encoder,Decoder}Layer."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from captum.attr import InputXGradient, LLMGradientAttribution, TextTokenInput
from torch import Tensor, nn

from captum_gim import GIMAttribution, GIMConfig, LayerGIM, UnsupportedModuleError, gim_rules
from captum_gim.sites.attention.multihead import multi_head_attention

OFF = GIMConfig.all_rules_off()
RULES = GIMConfig(temperature=2.0, freeze_norm=True, q_scale=0.25, k_scale=0.25, v_scale=0.5)


# ---- an independent reference: surrogates whose derivative is the rule -------------


def _scaled(x: Tensor, scale: float) -> Tensor:
    return x * scale + x.detach() * (1.0 - scale)


def reference_mha(
    m: nn.MultiheadAttention,
    x: Tensor,
    memory: Tensor,
    padding: Tensor | None,
    config: GIMConfig,
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """Batch-first attention of x over memory, one head at a time, with the rules;
    ``dropout_mask`` (batch x heads x queries x keys, already scaled by 1 / (1 - p))
    multiplies the probabilities, as attention dropout does."""
    w_q, w_k, w_v = m.in_proj_weight.chunk(3)
    b_q, b_k, b_v = m.in_proj_bias.chunk(3)
    size = m.embed_dim // m.num_heads
    heads = []
    for h in range(m.num_heads):
        rows = slice(h * size, (h + 1) * size)
        q = _scaled(x @ w_q[rows].T + b_q[rows], config.q_scale)
        k = _scaled(memory @ w_k[rows].T + b_k[rows], config.k_scale)
        v = _scaled(memory @ w_v[rows].T + b_v[rows], config.v_scale)
        scores = torch.einsum("bqd,bkd->bqk", q, k) / size**0.5
        if padding is not None:
            scores = scores.masked_fill(padding[:, None, :], float("-inf"))
        probs = torch.softmax(scores, -1)
        t = config.temperature or 1.0
        if t != 1.0:
            tempered = torch.softmax(scores / t, -1)
            probs = probs.detach() + t * (tempered - tempered.detach())
        if dropout_mask is not None:
            probs = probs * dropout_mask[:, h]
        heads.append(probs @ v)
    return torch.cat(heads, -1) @ m.out_proj.weight.T + m.out_proj.bias


@contextlib.contextmanager
def reference_rules(
    model: nn.Module, config: GIMConfig, dropout_mask: Tensor | None = None
) -> Iterator[None]:
    """Replaces every attention's output by reference_mha and freezes LayerNorms."""
    handles = []
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):

            def attention_hook(m, args, kwargs, output):  # type: ignore[no-untyped-def]
                query, key = args[0], args[1]
                padding = kwargs.get("key_padding_mask")
                padding = padding if padding is None else padding.bool()
                if not m.batch_first:
                    query, key = query.transpose(0, 1), key.transpose(0, 1)
                out = reference_mha(m, query, key, padding, config, dropout_mask)
                return (out if m.batch_first else out.transpose(0, 1)), output[1]

            handles.append(module.register_forward_hook(attention_hook, with_kwargs=True))
        if isinstance(module, nn.LayerNorm) and config.freeze_norm:

            def norm_hook(m, args, output):  # type: ignore[no-untyped-def]
                x = args[0]
                mean = x.mean(-1, keepdim=True)
                sigma = ((x - mean) ** 2).mean(-1, keepdim=True).add(m.eps).sqrt()
                return (x - mean) / sigma.detach() * m.weight + m.bias

            handles.append(module.register_forward_hook(norm_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---- nn.MultiheadAttention -----------------------------------------------------


@pytest.mark.parametrize(
    ("batch_first", "add_bias_kv", "add_zero_attn", "bias", "kdim"),
    list(itertools.product([True, False], [False, True], [False, True], [True, False], [None, 6])),
)
def test_recomputation_reproduces_every_configuration(
    batch_first: bool, add_bias_kv: bool, add_zero_attn: bool, bias: bool, kdim: int | None
) -> None:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(
        8, 2, batch_first=batch_first, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn,
        bias=bias, kdim=kdim, vdim=kdim,
    ).eval()  # fmt: skip
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 5, kdim or 8), torch.randn(3, 5, kdim or 8)
    if not batch_first:
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, -2:] = True
    masks = [None, torch.randn(4, 5), torch.rand(4, 5) > 0.7, torch.randn(6, 4, 5)]
    for attn_mask, key_padding_mask in itertools.product(masks, [None, padding]):
        for need_weights, average in [(True, True), (True, False), (False, True)]:
            call = dict(
                key_padding_mask=key_padding_mask,
                attn_mask=attn_mask,
                need_weights=need_weights,
                average_attn_weights=average,
            )
            expected = m(q, k, v, **call)
            ours = multi_head_attention(m, RULES, q, k, v, **call)  # type: ignore[arg-type]
            torch.testing.assert_close(ours[0], expected[0], equal_nan=True)
            if need_weights:
                torch.testing.assert_close(ours[1], expected[1], equal_nan=True)
            else:
                assert ours[1] is None


class SelfAttention(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 3)
        self.batch_first = batch_first

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        seq = x if self.batch_first else x.transpose(0, 1)
        out, _ = self.attention(seq, seq, seq, key_padding_mask=padding)
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out[:, 0])


def _embeds() -> Tensor:
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_rules_equal_reference(batch_first: bool) -> None:
    model = SelfAttention(batch_first).eval()
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    ours = GIMAttribution(model, config=RULES).attribute(_embeds(), 1, (padding,))
    with reference_rules(model, RULES):
        reference = InputXGradient(model).attribute(_embeds(), 1, (padding,))
    torch.testing.assert_close(ours, reference)
    off = GIMAttribution(model, config=OFF).attribute(_embeds(), 1, (padding,))
    torch.testing.assert_close(off, InputXGradient(model).attribute(_embeds(), 1, (padding,)))
    assert not torch.allclose(ours, off)
    assert _hooks(model) == 0


def test_mha_mismatch_is_refused_by_name() -> None:
    class Shifted(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            out, weights = super().forward(*args, **kwargs)
            return out + 1.0, weights

    model = SelfAttention().eval()
    model.attention.__class__ = Shifted
    with pytest.raises(UnsupportedModuleError, match=r"'attention' \(MultiheadAttention\)"):
        GIMAttribution(model).attribute(_embeds(), 0)
    assert _hooks(model) == 0


@pytest.mark.parametrize("strict", [True, False])
def test_mha_training_dropout_warns_and_gets_the_rules_under_the_same_mask(strict: bool) -> None:
    model = SelfAttention()
    model.attention.dropout = 0.3
    model.train()
    with pytest.warns(UserWarning, match=r"training mode with active dropout .*model\.eval"):
        torch.manual_seed(7)
        ours = GIMAttribution(model, config=RULES, strict=strict).attribute(_embeds(), 1)
    # the mask the module's own forward draws first after the seed: (batch * heads) x q x k
    torch.manual_seed(7)
    mask = F.dropout(torch.ones(2 * 2, 5, 5), p=0.3).view(2, 2, 5, 5)
    with reference_rules(model, RULES, dropout_mask=mask):
        reference = InputXGradient(model).attribute(_embeds(), 1)
    torch.testing.assert_close(ours, reference)
    torch.manual_seed(7)
    plain = model(_embeds())
    torch.manual_seed(7)
    with pytest.warns(UserWarning, match="training mode"), gim_rules(model, config=RULES):
        assert torch.equal(model(_embeds()), plain)  # the forward, dropout included, unchanged
    assert _hooks(model) == 0


class CaptumDummyLLM(nn.Module):
    """The model of Captum's own LLM attribution tests (tests/attr/test_llm_attr.py:
    embedding, one nn.TransformerEncoderLayer, linear head), never put in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(256, 10)
        self.linear = nn.Linear(10, 256)
        self.trans = nn.TransformerEncoderLayer(d_model=10, nhead=2, batch_first=True)

    def forward(self, input_ids: Tensor, *args: object, **kwargs: object) -> object:
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.linear(self.trans(self.emb(input_ids))))


class CharTokenizer:
    """Captum's DummyTokenizer, reduced: one character per token, 0 = <sos>."""

    def encode(self, text: str, add_special_tokens: bool = True, return_tensors=None):  # type: ignore[no-untyped-def]
        ids = [ord(s[0]) for s in text.split(" ")]
        ids = [0, *ids] if add_special_tokens else ids
        return torch.tensor([ids]) if return_tensors else ids

    def __call__(
        self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False
    ) -> dict:
        result: dict = {"input_ids": self.encode(text, add_special_tokens)}
        if return_offsets_mapping:
            starts = [i for i, c in enumerate(text) if c != " "]
            result["offset_mapping"] = [(0, 0)] * add_special_tokens + [(i, i + 1) for i in starts]
        return result

    def convert_ids_to_tokens(self, ids):  # type: ignore[no-untyped-def]
        one = lambda i: "<sos>" if i == 0 else chr(i)  # noqa: E731
        return one(ids) if isinstance(ids, int) else [one(i) for i in ids]

    def decode(self, ids: Tensor) -> str:
        return " ".join(self.convert_ids_to_tokens(ids.tolist()))


@pytest.mark.parametrize("strict", [True, False])
def test_captums_llm_test_model_in_training_mode_works_with_layer_gim(strict: bool) -> None:
    model, tokenizer = CaptumDummyLLM(), CharTokenizer()
    assert model.training and model.trans.self_attn.dropout > 0
    llm_attr = LLMGradientAttribution(LayerGIM(model, model.emb, strict=strict), tokenizer)
    inp = TextTokenInput("a b c", tokenizer)
    with pytest.warns(UserWarning, match="training mode with active dropout"):
        result = llm_attr.attribute(inp, "m n o p q")
    assert result.token_attr.shape == (5, 4) and torch.isfinite(result.token_attr).all()
    assert result.input_tokens == ["<sos>", "a", "b", "c"]
    assert _hooks(model) == 0


# ---- nn.TransformerEncoderLayer / DecoderLayer, fast path ------------------------


class Encoder(nn.Module):
    """Fast-path eligible: batch_first, even heads, relu, eval."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        return self.head(self.encoder(x, src_key_padding_mask=padding)[:, 0])


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerDecoderLayer(
            8, 2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        memory = torch.ones_like(x) * 0.1
        return self.head(self.layer(x, memory)[:, -1])


@pytest.mark.parametrize("model_class", [Encoder, Decoder])
def test_transformer_layers_rules_equal_reference(model_class: type[nn.Module]) -> None:
    model = model_class().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = [dict(vars(m)) for m in model.modules()]
    ours = GIMAttribution(model, config=RULES).attribute(_embeds(), 2)
    with reference_rules(model, RULES):
        reference = InputXGradient(model).attribute(_embeds(), 2)
    torch.testing.assert_close(ours, reference)
    off = GIMAttribution(model, config=OFF).attribute(_embeds(), 2)
    torch.testing.assert_close(off, InputXGradient(model).attribute(_embeds(), 2))
    assert not torch.allclose(ours, off)
    # the model is left exactly as it was: weights, attributes, no hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [dict(vars(m)) for m in model.modules()] == attributes
    assert _hooks(model) == 0


def test_encoder_fast_path_disabled_for_the_call_and_restored() -> None:
    model = Encoder().eval()
    for p in model.parameters():
        p.requires_grad_(False)  # otherwise the fast path is skipped for grads anyway
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    assert model.encoder.use_nested_tensor
    seen = []

    def spy(_: nn.Module, args: tuple[Tensor, ...]) -> None:
        seen.append((model.encoder.use_nested_tensor, args[0].is_nested))

    handle = model.encoder.layers[0].register_forward_pre_hook(spy)
    with torch.no_grad():  # without GIM the fast path nests the input
        model(_embeds(), padding)
    assert seen[-1] == (True, True)
    ours = LayerGIM(model, model.encoder.layers[1], config=RULES).attribute(
        _embeds(), 1, (padding,)
    )
    assert seen[-1] == (False, False)  # during the call: no nested fast path
    handle.remove()
    assert model.encoder.use_nested_tensor  # restored
    assert ours.shape == (2, 5, 8) and torch.isfinite(ours[:, :3]).all()
    assert _hooks(model) == 0
