"""Tiny random transformers of every supported family, built from config classes,
and a snapshot of everything a GIM call could leave behind on a model."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.modules.module as module_globals
import transformers
from torch import Tensor, nn

import captum_gim.sites.exclusive as exclusive

VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    initializer_range=0.2,
)
DECODER = dict(COMMON, intermediate_size=48, num_key_value_heads=2, max_position_embeddings=64)


@dataclass(frozen=True)
class Family:
    """A model family: how to build it and whether it is causal."""

    name: str
    config_class: str
    model_class: str
    settings: dict
    causal: bool = True
    implementations: tuple[str, ...] = ("eager", "sdpa")

    def build(
        self,
        implementation: str,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        experts_implementation: str | None = None,
        **overrides: object,
    ) -> nn.Module:
        torch.manual_seed(seed)
        config = getattr(transformers, self.config_class)(**{**self.settings, **overrides})
        model_class = getattr(transformers, self.model_class)
        extra = {"experts_implementation": experts_implementation} if experts_implementation else {}
        model = model_class._from_config(config, attn_implementation=implementation, **extra)
        _randomize_norm_weights(model)
        return model.to(dtype).eval()


def _randomize_norm_weights(model: nn.Module) -> None:
    """Random init leaves norm weights at 1 or 0; perturb them so the rules see real scales."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name.lower():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


FAMILIES = [
    Family("llama", "LlamaConfig", "LlamaForCausalLM", DECODER),
    Family("mistral", "MistralConfig", "MistralForCausalLM", dict(DECODER, sliding_window=4)),
    Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", DECODER),
    Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(DECODER, head_dim=8)),
    Family("gemma", "GemmaConfig", "GemmaForCausalLM", dict(DECODER, head_dim=8)),
    Family(
        "gemma2",
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            DECODER,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=4,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=10.0,
        ),
        implementations=("eager",),  # transformers has no sdpa for soft-capped attention
    ),
    Family(
        "gemma3",
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(DECODER, head_dim=8, query_pre_attn_scalar=8, sliding_window=4),
    ),
    Family("phi3", "Phi3Config", "Phi3ForCausalLM", dict(DECODER, pad_token_id=0)),
    Family(
        "mixtral",
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(DECODER, num_local_experts=4, num_experts_per_tok=2),
    ),
    Family(
        "qwen2_moe",
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            DECODER,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
        ),
    ),
    Family(
        "gpt2",
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2
        ),
    ),
    Family(
        "gpt_neox",
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(COMMON, intermediate_size=48, max_position_embeddings=64, rotary_pct=0.5),
    ),
    Family(
        "bert",
        "BertConfig",
        "BertForMaskedLM",
        dict(COMMON, intermediate_size=48, max_position_embeddings=64),
        causal=False,
    ),
    Family(
        "roberta",
        "RobertaConfig",
        "RobertaForMaskedLM",
        dict(COMMON, intermediate_size=48, max_position_embeddings=70, pad_token_id=1),
        causal=False,
    ),
]
FAMILY_BY_NAME = {family.name: family for family in FAMILIES}


@functools.cache
def shared_model(name: str, implementation: str = "sdpa") -> nn.Module:
    """One model per family and attention implementation, built once and shared by
    every test that leaves it as it was (tests that change a model build their own)."""
    return FAMILY_BY_NAME[name].build(implementation)


class PlainMLPModel(nn.Module):
    """A plain PyTorch model without attention: embeddings, LayerNorm, MLP, head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 32)
        self.norm = nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
        self.final_norm = nn.RMSNorm(32, eps=1e-6)
        self.head = nn.Linear(32, VOCAB)
        with torch.no_grad():
            self.norm.weight.add_(0.1 * torch.randn(32))
            self.final_norm.weight.add_(0.1 * torch.randn(32))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(
        self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None
    ) -> Tensor:
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        hidden = hidden + self.mlp(self.norm(hidden))
        return self.head(self.final_norm(hidden))


def logits_of(model: nn.Module) -> Callable[..., Tensor]:
    """Forward function from input embeddings to the output logits, as Captum uses it."""

    def forward(inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if isinstance(model, PlainMLPModel):
            return model(inputs_embeds=inputs_embeds)[:, -1]
        output = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        return output.logits[:, -1]

    return forward


def sample_ids(batch: int = 2, length: int = 7, seed: int = 3) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def snapshot(model: nn.Module) -> dict:
    """Everything a GIM call could leave behind on a model, copied."""
    return {
        "hooks": [
            (name, *(tuple(getattr(m, d)) for d in HOOK_DICTS)) for name, m in model.named_modules()
        ],
        "global_hooks": [len(getattr(module_globals, d)) for d in GLOBAL_HOOK_DICTS],
        "configs": [
            (name, id(m.config), m.config._attn_implementation)
            for name, m in model.named_modules()
            if hasattr(m, "config")
        ],
        "config_values": dict(model.config.__dict__) if hasattr(model, "config") else None,
        "training": [m.training for m in model.modules()],
        "compiled": [m.__dict__.get("_compiled_call_impl") for m in model.modules()],
        "parameters": {
            name: (
                p.detach().clone(),
                p.requires_grad,
                None if p.grad is None else p.grad.clone(),
                p._version,
                p._backward_hooks,
            )
            for name, p in model.named_parameters()
        },
        "buffers": {name: b.clone() for name, b in model.named_buffers()},
        "active": len(exclusive._active_modules),
    }


def assert_same(before: dict, after: dict) -> None:
    """Two snapshots of a model are equal: the model was left exactly as it was."""
    for key in ("hooks", "global_hooks", "configs", "config_values", "training", "active"):
        assert before[key] == after[key], key
    assert all(a is b for a, b in zip(before["compiled"], after["compiled"]))
    for name, (value, requires_grad, grad, _, tensor_hooks) in before["parameters"].items():
        now = after["parameters"][name]
        assert torch.equal(value, now[0]) and requires_grad == now[1], name
        assert (grad is None and now[2] is None) or torch.equal(grad, now[2]), name
        assert tensor_hooks == now[4], name
    for name, value in before["buffers"].items():
        assert torch.equal(value, after["buffers"][name]), name
