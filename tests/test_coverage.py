"""Whole-library coverage: every causal-LM family of the installed transformers,
and the encoders and encoder-decoders of Captum's tutorials.

Each family is built from its default config, shrunk to a tiny model (random
weights, std 0.2, norm weights perturbed away from 1), under eager and sdpa.
A case passes when GIM either

- applies every rule it finds, with the forward bitwise unchanged, each rule
  changing the attribution, the attribution with all rules equal to the
  independent reference of ``tests/reference.py`` (where the reference knows
  every part of the model), and the audit of its forward pass
  (:func:`captum_gim.describe`) accounting for every softmax, normalization and
  product (none refused, the ones kept exact by design recorded by kind), or
- refuses with an ``UnsupportedModuleError`` that names the module (found from
  the model's structure or by the audit); with ``strict=False`` the same model
  then runs with a warning that names every skipped part, and its forward stays
  bitwise unchanged.

``python tests/test_coverage.py --write-docs`` writes the table in docs/coverage.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import signal
import sys
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from reference import ReferenceGap, reference_gradient
from torch import nn

from captum_gim import GIMConfig, ModelDescription, UnsupportedModuleError, describe, gim_rules
from captum_gim.sites import RuleSites, find_rule_sites
from captum_gim.sites.audit.forward import EXACT_KINDS

OFF = GIMConfig.all_rules_off()
ALL = GIMConfig()
RULES = {
    "softmax": dataclasses.replace(OFF, temperature=2.0),
    "norm": dataclasses.replace(OFF, freeze_norm=True),
    "qkv": dataclasses.replace(OFF, q_scale=0.25, k_scale=0.25, v_scale=0.5),
    "gated_mlp": dataclasses.replace(OFF, gate_scale=0.5, up_scale=0.5),
}
SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    d_model=32,
    embedding_size=32,
    pooler_hidden_size=32,
    intermediate_size=48,
    ffn_dim=48,
    d_ff=48,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    num_hidden_layers=2,
    num_layers=2,
    encoder_layers=2,
    decoder_layers=2,
    num_attention_heads=4,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    d_kv=8,
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
    qk_head_dim=16,
    rotary_dim=8,
    v_head_dim=8,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    mamba_d_ssm=32,
    mamba_n_heads=4,
    mamba_d_head=8,
    mamba_d_state=16,
    mamba_chunk_size=8,
    # Sizes that only some families have (their default configs allocate GBs).
    vocab_size_per_layer_input=64,  # Gemma 3n, Gemma 4: per-layer input embeddings
    hidden_size_per_layer_input=8,
    unpadded_vocab_size=64,  # Inkling 2
    swa_head_dim=8,
    encoder_hash_byte_group_vocab=64,  # BLT
    hidden_size_global=32,
    shape_vocab_size=64,  # RoCBert
    pronunciation_vocab_size=64,
    shape_embed_dim=32,
    pronunciation_embed_dim=32,
    lru_width=32,  # RecurrentGemma
    attention_hidden_size=64,  # Zamba: twice the hidden size
    mamba_dt_rank=4,
    embedding_dim=32,  # xLSTM
    depthwise_separable_out_channel=32,  # Phi-4 multimodal's audio encoder
    ext_pw_out_channel=32,
    nemo_conv_channels=32,
)
#: Only for the encoders (in the causal-LM families these names mean other things).
ENCODER_SMALL = dict(
    dim=32,
    hidden_dim=48,
    n_layers=2,
    n_heads=4,
    num_heads=4,
    num_decoder_layers=2,
    global_attn_every_n_layers=2,
    local_attention=4,
    num_labels=4,
)
#: Arguments of the config class, by model type, for families whose default
#: config the generic shrinking cannot make tiny (each with the reason).
CONFIG_ARGUMENTS: dict[str, dict[str, object]] = {
    # the attention reads a rope_theta and clamps by a clip_qkv its default config lacks
    "dbrx": {
        "n_heads": 4,
        "n_layers": 2,
        "attn_config": {"rope_theta": 10000.0, "kv_n_heads": 2, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 48, "moe_top_k": 2},
    },
    # per-layer attention settings: two layers keep the config homogeneous
    # (indexed attention; the sliding-window layers start at the third)
    "dots3_note_text": {"num_hidden_layers": 2, "index_n_heads": 4, "index_head_dim": 64},
    "dots3_note": {
        "text_config": {"num_hidden_layers": 2, "index_n_heads": 4, "index_head_dim": 64}
    },
    # the default config has no RoPE parameters for its layer type
    "cohere_compass_text": {
        "rope_parameters": {
            "full_attention": {
                "rope_type": "default",
                "rope_theta": 1e4,
                "mrope_section": [2, 1, 1],
            }
        }
    },
    # its causal LM asks for a decoder config
    "reformer": {
        "is_decoder": True,
        "axial_pos_shape": (8, 16),
        "axial_pos_embds_dim": (16, 16),
        "attention_head_size": 8,
        "feed_forward_size": 48,
        "hash_seed": 0,
    },
    # an assistant (drafting) model: its default config is invalid, and every layer
    # reads the key/value states of the model it drafts for
    "gemma4_assistant": {
        "text_config": {
            "num_hidden_layers": 2,
            "num_kv_shared_layers": 2,
            "hidden_size_per_layer_input": 0,
            "vocab_size_per_layer_input": 0,
        }
    },
    # the default config leaves the layer types unset
    "lfm2_moe": {"num_hidden_layers": 2, "layer_types": ["conv", "full_attention"]},
    # the default config leaves the number of experts unset
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
}
#: Attributes set after the generic shrinking ("a.b": attribute b of sub-config a).
AFTER_SHRINKING: dict[str, dict[str, object]] = {
    # Mamba-2 mixers: heads x head size = expand x hidden size
    "bamba": {"mamba_d_head": 16},
    "granitemoehybrid": {"mamba_d_head": 16},
    "mamba2": {"num_heads": 8, "n_groups": 1, "state_size": 16},
    "zamba2": {
        "mamba_headdim": 8,
        "layers_block_type": ["linear_attention", "hybrid"],
        "hybrid_layer_ids": [1],
    },
    # one sliding-window and one full-attention layer (the first layers are all sliding)
    **{
        model_type: {f"{prefix}layer_types": ["sliding_attention", "full_attention"]}
        for model_type, prefix in (
            ("gemma4", "text_config."),
            ("gemma4_text", ""),
            ("gemma4_unified", "text_config."),
            ("gemma4_unified_text", ""),
        )
    },
    # the last layers reuse the key/value states of earlier layers of their type
    "gemma3n_text": {
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "num_kv_shared_layers": 2,
        "intermediate_size": [48] * 4,
        "activation_sparsity_pattern": [0.95, 0.0, 0.0, 0.0],
    },
    # Zamba ties one shared transformer block across its hybrid layers: two of them
    "zamba": {
        "num_hidden_layers": 3,
        "layers_block_type": ["linear_attention", "hybrid", "hybrid"],
    },
    # the global transformer reads cross_attn_k patches of the local encoder's width
    "blt": {
        "global_config.hidden_size": 64,
        "global_config.head_dim": 16,
        "encoder_config.hidden_size_global": 64,
        "decoder_config.hidden_size_global": 64,
    },
}
#: Why a family cannot be built or run tiny: a reason of the family itself.
WHY_UNBUILDABLE = {
    "gemma3n": "its vision tower is a timm model, and timm is not a test dependency "
    "(gemma3n_text is its language model)",
    "gemma4_assistant": "a drafting model: every layer reads the key/value states of the "
    "model it drafts for, so it has no forward of its own",
    "gemma4_unified_assistant": "a drafting model: every layer reads the key/value states of "
    "the model it drafts for, so no config of its own builds",
    "reformer": "its reversible layers compute their backward pass only in training mode",
}
#: Families whose model needs a setting before its first forward.
MODEL_SETUP: dict[str, Callable[[nn.Module], None]] = {
    # X-MOD routes every token through the adapter of one language
    "xmod": lambda model: model.set_default_language(model.config.languages[0]),
}
#: Families whose causal-LM class takes one sub-config of theirs.
DECODER_CONFIG = {"musicgen": "decoder", "musicgen_melody": "decoder"}
BUILD_SECONDS = 20
MAX_PARAMETERS = 5_000_000
TARGET = 3
#: Relative L2 distance to the reference within float32 rounding (the rules change
#: attributions by more than 1e-3).
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Family:
    """A model family as the coverage test builds it."""

    #: The name in the table.
    name: str
    #: The key of transformers' CONFIG_MAPPING.
    model_type: str
    #: "causal" (the causal-LM head, target: a next-token logit), "encoder" (the
    #: sequence-classification head, target: a class logit) or "seq2seq" (the LM
    #: head, target: a logit of the decoder's last position).
    kind: str = "causal"
    #: Config arguments besides the defaults.
    overrides: tuple[tuple[str, object], ...] = ()


def causal_families() -> list[Family]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return [Family(name, name) for name in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)]


#: The encoders of Captum's tutorials, and T5 and BART.
ENCODERS = [
    Family("bert", "bert", "encoder"),
    Family("roberta", "roberta", "encoder"),
    Family("distilbert", "distilbert", "encoder"),
    Family("deberta-v2", "deberta-v2", "encoder"),
    Family("electra", "electra", "encoder"),
    Family("modernbert", "modernbert", "encoder"),
    Family("xlm-roberta", "xlm-roberta", "encoder"),
    Family("t5", "t5", "seq2seq"),
    Family("t5 (gated-gelu, v1.1)", "t5", "seq2seq", (("feed_forward_proj", "gated-gelu"),)),
    Family("bart", "bart", "seq2seq"),
]
IMPLEMENTATIONS = ("eager", "sdpa")
#: Cases (test ids) that fail today, for the reason given: reported, not hidden.
KNOWN_GAPS: dict[str, str] = {}


def _shrink(config: transformers.PretrainedConfig, sizes: dict[str, object]) -> None:
    layers = _layer_count(config)
    for name, value in sizes.items():
        try:
            current = getattr(config, name, "absent")
        except Exception:  # a per-layer attribute of a heterogeneous config
            continue
        if isinstance(current, int | float) or (
            current is None
            and name
            in ("head_dim", "num_key_value_heads", "n_group", "topk_group", "num_experts_per_tok")
        ):
            try:
                setattr(config, name, value)
            except (AttributeError, ValueError, TypeError, NotImplementedError):
                pass
    if isinstance(getattr(config, "kv_lora_rank", None), int):
        # Multi-head latent attention (DeepSeek V2/V3, MiniCPM3, ...) gives every
        # query head its own key and value: no key/value heads to share.
        try:
            config.num_key_value_heads = config.num_attention_heads
        except (AttributeError, ValueError, TypeError):
            pass
    _shrink_per_layer_lists(config, layers)
    for name in {"text_config", "decoder", "encoder", *getattr(config, "sub_configs", {})}:
        inner = getattr(config, name, None)
        if isinstance(inner, transformers.PretrainedConfig):
            _shrink(inner, sizes)


def _special_tokens_in_vocabulary(config: transformers.PretrainedConfig) -> None:
    """Image, audio and other special token ids moved into the shrunk vocabulary
    (the top ids, which the test's inputs never use)."""
    vocab = SMALL["vocab_size"]
    assert isinstance(vocab, int)
    free = iter(range(vocab - 1, 8, -1))
    for inner in (config, *(getattr(config, name, None) for name in config.sub_configs)):
        if not isinstance(inner, transformers.PretrainedConfig):
            continue
        for name, value in list(vars(inner).items()):
            if name.endswith(("_token_id", "_token_index")) and isinstance(value, int):
                if value >= vocab:
                    with contextlib.suppress(Exception):
                        setattr(inner, name, next(free))


def _layer_count(config: transformers.PretrainedConfig) -> int | None:
    for name in ("num_hidden_layers", "num_layers"):
        with contextlib.suppress(Exception):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
    return None


def _shrink_per_layer_lists(config: transformers.PretrainedConfig, layers: int | None) -> None:
    """Per-layer lists (layer types, MLP types) cut to their first layers, as many as
    the shrunk config has (the layers a model that reads only the first ones builds)."""
    shrunk = _layer_count(config)
    if layers is None or shrunk is None or shrunk >= layers:
        return
    for name, value in list(vars(config).items()):
        if name.startswith("_") or not isinstance(value, list | tuple) or len(value) != layers:
            continue
        with contextlib.suppress(Exception):
            setattr(config, name, value[:shrunk])


def _alarm(*_: object) -> None:
    raise TimeoutError(f"building takes over {BUILD_SECONDS} s")


# The config fields through which transformers' _init_weights reads the weights' std.
INIT_STD_NAMES = ("initializer_range", "init_std")


class NoImplementation(Exception):
    """The family does not run this attention implementation."""


def _model_class(kind: str) -> type:
    return {
        "causal": transformers.AutoModelForCausalLM,
        "encoder": transformers.AutoModelForSequenceClassification,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
    }[kind]


def build(family: Family, implementation: str) -> nn.Module:
    """The tiny random model of ``family``; raises with the reason it cannot be built."""
    arguments = {**CONFIG_ARGUMENTS.get(family.model_type, {}), **dict(family.overrides)}
    config = transformers.CONFIG_MAPPING[family.model_type](**arguments)
    _shrink(config, SMALL if family.kind == "causal" else {**SMALL, **ENCODER_SMALL})
    _special_tokens_in_vocabulary(config)
    for path, value in AFTER_SHRINKING.get(family.model_type, {}).items():
        *parents, name = path.split(".")
        target = config
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)
    for name in INIT_STD_NAMES:  # non-trivial random weights: std 0.2, not the pretraining init
        if hasattr(config, name):
            setattr(config, name, 0.2)
    factory = _model_class(family.kind).from_config
    if family.model_type in DECODER_CONFIG:
        # MusicGen's causal LM is its decoder, built from the decoder's config
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        factory = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]._from_config
        config = getattr(config, DECODER_CONFIG[family.model_type])
    with torch.device("meta"):  # counts the parameters without allocating them
        try:
            size = sum(p.numel() for p in factory(config).parameters())
        except Exception:
            size = 0  # built for real below, which gives the reason
    if size > MAX_PARAMETERS:
        raise MemoryError(f"{size / 1e6:.0f}M parameters after shrinking the config")
    torch.manual_seed(0)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(BUILD_SECONDS)
    try:
        model = factory(config, attn_implementation=implementation)
    except ValueError as error:
        if "does not support an attention implementation" in str(error):
            raise NoImplementation(f"no {implementation}") from None
        raise
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if family.model_type in MODEL_SETUP:
        MODEL_SETUP[family.model_type](model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name.lower():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
            elif parameter.dim() == 2 and float(parameter.std()) < 0.05:
                # a family whose _init_weights ignores initializer_range (OpenAI GPT's Conv1D)
                parameter.normal_(0.0, 0.2, generator=generator)
    return model.eval()


#: Families whose forward reads the token ids besides their embeddings: the test
#: passes the ids and puts the attributed embeddings in place of the embedding
#: layer's output.
READS_TOKEN_IDS = {
    "blt": "entropy patching and hashed n-gram embeddings",
    "cpmant": "position and segment ids derived from the ids",
    "deepseek_v4": "hash routing of its first layers",
}


def token_ids(model: nn.Module, length: int) -> torch.Tensor:
    """The test's input ids, 1 .. length (within the vocabulary)."""
    return torch.arange(1, length + 1)[None] % model.config.get_text_config().vocab_size


def input_embeddings(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The embeddings of ``ids`` (summed over MusicGen's per-codebook embeddings)."""
    layer = model.get_input_embeddings()
    if isinstance(layer, nn.ModuleList):
        return sum(embedding(ids) for embedding in layer)
    return layer(ids)


def outputs(model: nn.Module, kind: str, embeds: torch.Tensor) -> torch.Tensor:
    """The scores [batch, n] whose column TARGET is attributed."""
    embeds = embeds.clone()  # CTRL and GIT scale the input embeddings in place
    if model.config.model_type in READS_TOKEN_IDS:
        return _outputs_from_ids(model, embeds)
    logits = model(**model_inputs(model, kind, embeds)).logits
    return logits if kind == "encoder" else logits[:, -1]


def model_inputs(model: nn.Module, kind: str, embeds: torch.Tensor) -> dict[str, object]:
    """The keyword arguments of the model's forward for ``embeds`` (the token ids
    for the families that read them: their embeddings count as the input)."""
    if model.config.model_type in READS_TOKEN_IDS:
        return {"input_ids": token_ids(model, embeds.shape[1]), "use_cache": False}
    if kind == "encoder":
        return {"inputs_embeds": embeds}
    if kind == "causal":
        return {"inputs_embeds": embeds, "use_cache": False}
    start = getattr(model.config, "decoder_start_token_id", None) or 0
    decoder_ids = torch.tensor([[start, 5, 7]])
    return {"inputs_embeds": embeds, "decoder_input_ids": decoder_ids, "use_cache": False}


def audit_inputs(model: nn.Module, kind: str, embeds: torch.Tensor) -> dict[str, object]:
    """``example_inputs`` for the audit: the embeddings as a tensor that requires grad
    and that the model may scale in place (not a leaf)."""
    return model_inputs(model, kind, embeds.detach().requires_grad_().clone())


def _outputs_from_ids(model: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    layer = model.get_input_embeddings()

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # CPM-Ant puts prompt tokens before the ids: the test's tokens are the last ones
        return torch.cat([output[:, : -embeds.shape[1]], embeds.to(output.dtype)], dim=1)

    handle = layer.register_forward_hook(hook)
    try:
        ids = token_ids(model, embeds.shape[1])
        return model(input_ids=ids, use_cache=False).logits[:, -1]
    finally:
        handle.remove()


@dataclass
class Result:
    """What one family under one attention implementation gets."""

    #: "every rule", "refused", "unbuildable" or "no such implementation".
    status: str
    #: The rules applied, or the full refusal or build error.
    detail: str
    #: Equality with tests/reference.py ("" where not compared).
    reference: str = ""
    #: What strict=False does with a refused model ("" where not refused).
    lenient: str = ""
    #: The kinds of products and softmaxes the audit found kept exact by design,
    #: each with its number of (module, operation) entries ("" where none).
    exact: str = ""


def run_case(family: Family, implementation: str) -> Result:
    """Builds and checks one case; raises AssertionError where GIM is wrong."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build(family, implementation)
    except NoImplementation as missing:
        return Result("no such implementation", str(missing))
    except Exception as error:
        return Result("unbuildable", f"{type(error).__name__}: {_first_line(error)}")
    ids = token_ids(model, 6)
    try:
        embeds = input_embeddings(model, ids).detach()
        expected = _plain_outputs(model, family.kind, embeds)
        if not torch.equal(expected, _plain_outputs(model, family.kind, embeds)):
            return Result("unbuildable", "its forward is not deterministic without GIM")
    except Exception as error:
        return Result(
            "unbuildable", f"its forward fails: {type(error).__name__}: {_first_line(error)}"
        )
    try:
        plain = _gradient(model, family.kind, embeds, None)
    except Exception as error:
        return Result(
            "unbuildable", f"its gradient fails: {type(error).__name__}: {_first_line(error)}"
        )
    # The audit of one forward pass (cached for the model, so the gim_rules blocks
    # below apply it: what it refuses raises there, by name).
    description = describe(model, audit_inputs(model, family.kind, embeds))
    assert description.inputs_seen, "the audit saw no operation depending on the inputs"
    exact = _exact_kinds(description)
    try:
        sites = find_rule_sites(model)
        x = embeds.clone().requires_grad_()
        with gim_rules(model, example_inputs=audit_inputs(model, family.kind, embeds)):
            got = outputs(model, family.kind, x)
        assert torch.equal(got.detach(), expected), "forward changed under gim_rules"
        attribution = torch.autograd.grad(got[:, TARGET].sum(), x)[0]
        parts = {
            "softmax": sites.attentions + sites.traced_attentions + sites.torch_attentions,
            "qkv": sites.attentions + sites.traced_attentions + sites.torch_attentions,
            "norm": sites.norms,
            "gated_mlp": sites.gated_mlps,
        }
        applied = []
        for rule, config in RULES.items():
            if not parts[rule]:
                continue
            changed = _gradient(model, family.kind, embeds, config)
            assert _distance(changed, plain) > 1e-4, f"rule {rule} did not change the attribution"
            applied.append(rule)
    except UnsupportedModuleError as error:
        assert "'" in str(error), f"refusal does not name a module: {error}"
        lenient = _check_lenient(model, family.kind, embeds, expected, str(error))
        return Result("refused", _problems(str(error)), lenient=lenient, exact=exact)
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
        raise AssertionError(f"fails under the rules: {_named(error)}") from error
    unaccounted = [f"{r.module}: {r.rule} ({r.form})" for r in description.refused]
    assert not unaccounted, f"every rule, but the audit refuses {unaccounted}"
    reference = _check_reference(model, family.kind, embeds, attribution)
    return Result("every rule", ", ".join(applied), reference=reference, exact=exact)


def _exact_kinds(description: ModelDescription) -> str:
    """The kinds kept exact by design, with how many (module, operation) entries each."""
    count = Counter(record.rule for record in description.exact)
    return ", ".join(f"{kind} ({n})" for kind, n in sorted(count.items()))


def _plain_outputs(model: nn.Module, kind: str, embeds: torch.Tensor) -> torch.Tensor:
    """The outputs as a gradient computation sees them (inputs that require grad)."""
    return outputs(model, kind, embeds.clone().requires_grad_()).detach()


def _gradient(
    model: nn.Module, kind: str, embeds: torch.Tensor, config: GIMConfig | None
) -> torch.Tensor:
    """The GIM gradient under ``config``; the plain gradient for None."""
    x = embeds.clone().requires_grad_()
    with gim_rules(model, config=config) if config else contextlib.nullcontext():
        output = outputs(model, kind, x)[:, TARGET].sum()
        return torch.autograd.grad(output, x)[0]


def _distance(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _check_reference(
    model: nn.Module, kind: str, embeds: torch.Tensor, attribution: torch.Tensor
) -> str:
    """GIM with every rule against tests/reference.py, where the reference knows every part."""
    if find_rule_sites(model).traced_attentions:  # its own reference: test_traced_attention.py
        return "n/a: attention outside AttentionInterface (tests/test_traced_attention.py)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = reference_gradient(model, lambda e: outputs(model, kind, e), embeds, TARGET, ALL)
    except ReferenceGap as gap:
        return f"n/a: {gap}"
    distance = _distance(attribution, want)
    assert distance < TOLERANCE, f"differs from the reference by {distance:.2g} (relative L2)"
    return f"equal ({distance:.0e})"


def _check_lenient(
    model: nn.Module, kind: str, embeds: torch.Tensor, expected: torch.Tensor, refusal: str
) -> str:
    """strict=False: the forward bitwise unchanged, a warning naming every refused part,
    and the rules still applied elsewhere."""
    names = re.findall(r"'([^']+)' \(", refusal)
    x = embeds.clone().requires_grad_()
    audited = audit_inputs(model, kind, embeds)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with gim_rules(model, strict=False, example_inputs=audited):
                got = outputs(model, kind, x)
                attribution = torch.autograd.grad(got[:, TARGET].sum(), x)[0]
    except UnsupportedModuleError as error:
        assert "'" in str(error), f"refusal does not name a module: {error}"
        return f"still refused on the call: {_problems(str(error))}"
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
        raise AssertionError(f"fails under strict=False: {_named(error)}") from error
    assert torch.equal(got.detach(), expected), "forward changed under strict=False"
    warned = "\n".join(str(w.message) for w in caught if "GIM rules skip" in str(w.message))
    unnamed = [name for name in names if f"'{name}'" not in warned]
    assert not unnamed, f"the strict=False warning does not name {unnamed}"
    assert torch.isfinite(attribution).all()
    skipped = len(re.findall(r"^  - ", warned, re.M))
    left = _sites_quietly(model)
    if left.attentions or left.norms or left.gated_mlps:
        plain = _gradient(model, kind, embeds, None)
        assert _distance(attribution, plain) > 1e-4, "strict=False applied no rule at all"
        return f"forward unchanged; warning names the {skipped} skipped parts; rest gets the rules"
    return f"forward unchanged; warning names the {skipped} skipped parts; no rule left"


def _sites_quietly(model: nn.Module) -> RuleSites:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return find_rule_sites(model, strict=False)


def _named(error: BaseException) -> str:
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else ""


def _problems(refusal: str) -> str:
    """The refusal's named problems, one per line, without the advice around them."""
    lines = [line.strip()[2:] for line in refusal.splitlines() if line.startswith("  - ")]
    return "\n".join(lines) if lines else _first_line(Exception(refusal))


def _case_id(family: Family, implementation: str) -> str:
    return f"{family.name.split(' ')[0]}{'-gated' if family.overrides else ''}-{implementation}"


CASES = [
    pytest.param(
        family,
        implementation,
        id=_case_id(family, implementation),
        marks=[pytest.mark.xfail(reason=KNOWN_GAPS[_case_id(family, implementation)])]
        if _case_id(family, implementation) in KNOWN_GAPS
        else [],
    )
    for family in causal_families() + ENCODERS
    for implementation in IMPLEMENTATIONS
]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "implementation"), CASES)
def test_family_gets_every_rule_or_a_named_refusal(family: Family, implementation: str) -> None:
    result = run_case(family, implementation)
    if result.status in ("unbuildable", "no such implementation"):
        pytest.skip(result.detail)


def _safe_case(family: Family, implementation: str) -> Result:
    try:
        return run_case(family, implementation)
    except AssertionError as error:
        return Result("WRONG", str(error))


#: Short labels of the refusal reasons, by a phrase of the refusal message.
REFUSAL_REASONS = {
    "without transformers' AttentionInterface": "attention outside AttentionInterface",
    "normalization layer of unknown form": "norm of unknown form",
    "gate, up and down parts are not recognised": "gated MLP not recognised",
    "differs from act(gate) * up": "gated MLP computes another product",
    "parameter tensors multiplied inside": "gated MLP with parameter-tensor projections",
    "does not read as softmax(q k^T) v": "attention without a softmax (linear or recurrent)",
    "outside q k^T": "q or k enter the scores outside q k^T",
    "convolutional token mixer": "state-space or convolutional token mixer",
    "runs attention implementation": "unsupported attention implementation",
    "frozen-norm rule's recomputation": "norm check failed on the call",
    # found by the audit of the forward pass (captum_gim/sites/audit/forward.py)
    "outside every norm the rules recognise": "normalization outside every norm site (audit)",
    "not softmax attention": "product of two activations that is not softmax attention (audit)",
    "outside every attention rule site": "softmax attention outside every attention site (audit)",
    "by its data flow": "gated MLP found by data flow, its product missing on the call",
    "the audit could not read": "operation the audit cannot read",
}
BUILD_REASONS = {
    "parameters after shrinking": "over 5M parameters after shrinking",
    "building takes over": f"build takes over {BUILD_SECONDS} s",
    "forward fails": "forward fails on the tiny model",
    "gradient fails": "gradient fails on the tiny model",
    "not deterministic": "forward not deterministic",
}


def refusal_reasons(detail: str) -> list[str]:
    """The short labels of a refusal, one per kind of problem it names."""
    found = {label for phrase, label in REFUSAL_REASONS.items() if phrase in detail}
    return sorted(found) or ["other"]


def build_reason(detail: str) -> str:
    for phrase, label in BUILD_REASONS.items():
        if phrase in detail:
            return label
    return "config cannot be built tiny"


def _cell(result: Result) -> str:
    if result.status == "every rule":
        return f"every rule: {result.detail}"
    if result.status == "refused":
        return "refused: " + "; ".join(refusal_reasons(result.detail))
    if result.status == "unbuildable":
        return f"unbuildable: {build_reason(result.detail)}"
    if result.status == "WRONG":
        return f"**WRONG**: {result.detail}"
    return f"({result.detail})"


def _lenient_cell(result: Result) -> str:
    if not result.lenient:
        return ""
    if result.lenient.startswith("forward unchanged"):
        return "forward unchanged, warns"
    return "still refused on the call"


def _family_result(results: dict[str, Result]) -> Result:
    """The family's status: eager's, or sdpa's where only sdpa builds."""
    eager, sdpa = results["eager"], results["sdpa"]
    built = ("unbuildable", "no such implementation")
    if eager.status in built and sdpa.status not in built:
        return sdpa
    return eager


def _md(text: str) -> str:
    return text.replace("|", "/").replace("\n", "; ")


def _section(title: str, families: list[Family]) -> tuple[list[str], dict[str, Result]]:
    rows = [
        "| family | eager | sdpa | reference | strict=False | kept exact by design (audit) |",
        "|---|---|---|---|---|---|",
    ]
    chosen = {}
    for family in families:
        results = {i: _safe_case(family, i) for i in IMPLEMENTATIONS}
        result = _family_result(results)
        chosen[family.name] = result
        cells = [_cell(results[i]) for i in IMPLEMENTATIONS]
        reference = " / ".join(dict.fromkeys(r.reference for r in results.values() if r.reference))
        lenient = " / ".join(dict.fromkeys(_lenient_cell(r) for r in results.values() if r.lenient))
        cells += [reference, lenient, result.exact]
        rows.append(f"| {family.name} | " + " | ".join(map(_md, cells)) + " |")
        print(family.name, result.status, flush=True)
    return [f"## {title}", "", *rows, ""], chosen


def _totals(results: dict[str, Result]) -> list[str]:
    count = Counter(r.status for r in results.values())
    built = count["every rule"] + count["refused"] + count["WRONG"]
    refused: dict[str, list[str]] = defaultdict(list)
    for name, r in results.items():
        for label in refusal_reasons(r.detail) if r.status == "refused" else ():
            refused[label].append(name)
    unbuilt = Counter(build_reason(r.detail) for r in results.values() if r.status == "unbuildable")
    compared = [r.reference for r in results.values() if r.reference]
    equal = sum(text.startswith("equal") for text in compared)
    lenient = [r.lenient for r in results.values() if r.lenient]
    unchanged = sum(text.startswith("forward unchanged") for text in lenient)
    share = 100 * count["every rule"] / max(built, 1)
    lines = [
        f"- **every rule: {count['every rule']} of {built} families that build ({share:.0f} %)**",
        f"- refused by name: {count['refused']}",
        *(
            f"  - {label}: {len(names)} ({', '.join(names)})"
            for label, names in sorted(refused.items(), key=lambda item: -len(item[1]))
        ),
        f"- forward changed, a rule without effect or unequal to the reference: {count['WRONG']}",
        f"- cannot be built from a tiny config: {count['unbuildable']}",
        *(f"  - {label}: {n}" for label, n in unbuilt.most_common()),
        f"- equal to the independent reference: {equal} of the {len(compared)} with every rule "
        f"(the others have a part the reference does not implement)",
        f"- refused, with strict=False: forward bitwise unchanged and a warning naming every "
        f"skipped part: {unchanged} of {len(lenient)}; still refused on the call: "
        f"{len(lenient) - unchanged}",
        "- kept exact by design (the audit), families with each kind: "
        + (
            ", ".join(f"{kind} {n}" for kind, n in _exact_families(results).most_common()) or "none"
        ),
    ]
    return lines


def _exact_families(results: dict[str, Result]) -> Counter[str]:
    """How many families (every rule or refused) have each kind kept exact by design."""
    return Counter(
        re.sub(r" \(\d+\)$", "", kind)
        for r in results.values()
        if r.exact
        for kind in r.exact.split(", ")
    )


def _details(results: dict[str, Result]) -> list[str]:
    lines = ["## Refusals and failures in full", ""]
    for name, result in results.items():
        if result.status in ("refused", "WRONG"):
            problems = result.detail.splitlines()
            lines.append(f"- **{name}** ({result.status}):")
            lines += [f"  - {_md(problem)}" for problem in problems]
            if result.lenient and not result.lenient.startswith("forward unchanged"):
                lines.append(f"  - with strict=False: {_md(result.lenient)}")
    lines += ["", "## Families that cannot be built from a tiny config", ""]
    for name, result in results.items():
        if result.status == "unbuildable":
            detail = _md(result.detail)
            why = WHY_UNBUILDABLE.get(name)
            lines.append(f"- **{name}**: {why} ({detail})" if why else f"- **{name}**: {detail}")
    return [*lines, ""]


def write_docs(path: Path) -> None:
    causal_rows, causal = _section("Causal-LM families", causal_families())
    encoder_rows, encoders = _section("Encoders and encoder-decoders", ENCODERS)
    header = [
        "# GIM coverage of transformers' model families",
        "",
        "Generated by `python tests/test_coverage.py --write-docs` with transformers "
        f"{transformers.__version__} and torch {torch.__version__}. Every family of "
        "transformers' causal-LM mapping, and the encoders and encoder-decoders of Captum's "
        "tutorials, is built from a tiny config with random weights (std 0.2, norm weights "
        "perturbed away from 1) and checked under eager and sdpa: forward bitwise unchanged, "
        "each rule changes the attribution, every rule together equals the independent "
        "reference of `tests/reference.py` (where it knows every part), and a refused model "
        "runs with `strict=False` with its forward unchanged and a warning that names the "
        "skipped parts. A family's status is its eager one (sdpa's where only sdpa builds).",
        "",
        f"The tables are for transformers {transformers.__version__}, the installed release: "
        "families, their defaults and their forward code change between releases, so "
        "regenerate them for another one.",
        "",
        "Every case also has its forward pass audited (`captum_gim.describe(model, inputs)`, "
        "the audit GIMAttribution runs on its first call): every softmax, normalization and "
        "product of two input-dependent tensors is covered by a rule site, kept exact by "
        "design, or refused by name. A family marked *every rule* has no refused or "
        "unaccounted operation; the column *kept exact by design* lists, for the family's "
        "status case, the kinds of products and softmaxes the method leaves exact "
        '(GIM_SPEC.md, "Products and softmaxes the rules do not name"), with the number '
        "of (module, operation) entries of each:",
        "",
        *(f"- *{kind}*: {why}" for kind, why in EXACT_KINDS.items()),
        "",
        "## Causal-LM families: totals",
        "",
        *_totals(causal),
        "",
        "## Encoders and encoder-decoders: totals",
        "",
        *_totals(encoders),
        "",
    ]
    details = _details({**causal, **{f"{n} (encoder)": r for n, r in encoders.items()}})
    path.write_text("\n".join(header + encoder_rows + causal_rows + details))


if __name__ == "__main__":
    if "--write-docs" in sys.argv:
        torch.set_num_threads(1)
        write_docs(Path(__file__).resolve().parent.parent / "docs" / "coverage.md")


def _tiny(name: str, implementation: str = "eager") -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build(Family(name, name), implementation)


def _logits(model: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    return outputs(model, "causal", embeds)


def test_nemotron_one_plus_w_layer_norm_is_frozen_with_its_own_scale() -> None:
    """Regression: NemotronLayerNorm1P subclasses nn.LayerNorm but scales by (1 + w)."""
    model = _tiny("nemotron")
    embeds = model.get_input_embeddings()(torch.arange(1, 7)[None]).detach()
    config = RULES["norm"]
    got = _gradient(model, "causal", embeds, config)
    want = reference_gradient(model, lambda x: _logits(model, x), embeds, TARGET, config)
    assert float((got - want).norm() / want.norm()) < 1e-5


def test_gpt_oss_sinks_keep_the_forward_and_get_the_tempered_softmax() -> None:
    """Regression: gpt-oss's attention sinks are neither dropped nor ignored."""
    model = _tiny("gpt_oss")
    embeds = model.get_input_embeddings()(torch.arange(1, 7)[None]).detach()
    with torch.no_grad():
        expected = _logits(model, embeds)
    with gim_rules(model), torch.no_grad():
        got = _logits(model, embeds)
    assert torch.equal(got, expected)
    config = RULES["softmax"]
    x = embeds.clone().requires_grad_()
    with gim_rules(model, config=config):
        grad = torch.autograd.grad(_logits(model, x)[:, TARGET].sum(), x)[0]
    want = reference_gradient(model, lambda e: _logits(model, e), embeds, TARGET, config)
    assert float((grad - want).norm() / want.norm()) < 1e-5
    assert float((grad - _gradient_plain(model, embeds)).norm()) > 1e-4


def _with_settings(model_type: str, **settings: object) -> Result:
    """The coverage case of ``model_type`` with more attributes set after shrinking."""
    saved = AFTER_SHRINKING.get(model_type)
    AFTER_SHRINKING[model_type] = {**(saved or {}), **settings}
    try:
        return run_case(Family(model_type, model_type), "eager")
    finally:
        if saved is None:
            del AFTER_SHRINKING[model_type]
        else:
            AFTER_SHRINKING[model_type] = saved


def test_gemma4_moe_kv_sharing_and_per_layer_inputs_equal_the_reference() -> None:
    """Gemma 4 text with experts beside its MLP, the last two layers reading the
    key/value states of earlier ones, and per-layer input embeddings."""
    result = _with_settings(
        "gemma4_text",
        num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=2,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=16,
    )
    assert result.status == "every rule" and result.reference.startswith("equal"), result


def test_gemma3n_is_refused_by_name_with_and_without_its_sparse_gate() -> None:
    """Gemma 3n's first layers keep the top 5 % of the gate (a cutoff from the gate's
    mean and std, which GIM does not split); without that sparsity, AltUp's magnitude
    matching (x * rms(x0) / rms(x), a normalization outside every norm site, which
    rule 2 would not freeze) is refused by the audit, and strict=False still runs."""
    sparse = run_case(Family("gemma3n_text", "gemma3n_text"), "eager")
    assert sparse.status == "refused" and "(Gemma3nTextMLP)" in sparse.detail, sparse
    dense = _with_settings("gemma3n_text", activation_sparsity_pattern=[0.0] * 4)
    assert dense.status == "refused", dense
    assert "'model' (Gemma3nTextModel) computes div: a normalization" in dense.detail, dense
    assert dense.lenient.startswith("forward unchanged"), dense


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


def _norm_variants() -> dict[str, nn.Module]:
    """One module per formula of tests/reference.py, from PyTorch and transformers."""
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm
    from transformers.models.dory.modeling_dory import DoryL2Norm
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.llama4.modeling_llama4 import Llama4TextL2Norm
    from transformers.models.nemotron.modeling_nemotron import NemotronLayerNorm1P
    from transformers.models.olmo.modeling_olmo import OlmoLayerNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return {
        "layernorm-w-b": nn.LayerNorm(8),
        "layernorm-w": nn.LayerNorm(8, bias=False),
        "layernorm-none": nn.LayerNorm(8, elementwise_affine=False),
        "layernorm-w-cohere": CohereLayerNorm(8),
        "layernorm-none-olmo": OlmoLayerNorm(8),
        "layernorm-1+w-b-nemotron": NemotronLayerNorm1P(8),
        "rmsnorm-w": nn.RMSNorm(8, eps=1e-6),
        "rmsnorm-w-eps-none": nn.RMSNorm(8),
        "rmsnorm-none": nn.RMSNorm(8, eps=1e-6, elementwise_affine=False),
        "rmsnorm-w-llama": LlamaRMSNorm(8),
        "rmsnorm-w-t5": T5LayerNorm(8),
        "rmsnorm-1+w-gemma": GemmaRMSNorm(8),
        "rmsnorm-none-llama4-l2": Llama4TextL2Norm(),
        "l2norm-dory": DoryL2Norm(),
    }


@pytest.mark.parametrize("variant", list(_norm_variants()))
def test_frozen_norm_variants_equal_the_reference_formula(variant: str) -> None:
    """Rule 2 on each norm variant against the reference's formula, which also checks
    that its formula reproduces the module's forward."""
    norm = _norm_variants()[variant]
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in norm.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape))
    model = nn.Sequential(nn.Linear(8, 8), norm, nn.Linear(8, 3))
    x = torch.randn(2, 8)
    got = _gradient_of(model, x, RULES["norm"])
    want = reference_gradient(model, model, x, 0, RULES["norm"])
    assert _distance(got, want) < 1e-5
    assert _distance(got, _gradient_of(model, x, None)) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rms_norm_without_eps_uses_the_inputs_machine_epsilon(dtype: torch.dtype) -> None:
    """nn.RMSNorm(eps=None) adds torch.finfo(input dtype).eps: with inputs small
    enough for the epsilon to matter, the frozen statistic must use that one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8), nn.Linear(8, 3)).to(dtype)
    x = 1e-4 * torch.randn(2, 8, dtype=dtype)
    got = _gradient_of(model, x, RULES["norm"])
    want = reference_gradient(model, model, x, 0, RULES["norm"])
    assert _distance(got, want) < 1e-5
    assert _distance(got, _gradient_of(model, x, None)) > 1e-3


def _gradient_of(model: nn.Module, x: torch.Tensor, config: GIMConfig | None) -> torch.Tensor:
    x = x.clone().requires_grad_()
    with gim_rules(model, config=config) if config else contextlib.nullcontext():
        return torch.autograd.grad(model(x)[:, 0].sum(), x)[0]


def test_reference_refuses_a_norm_it_has_no_formula_for() -> None:
    """The reference raises rather than give a wrong reference (here: a (1 + w)
    RMSNorm missing from its table)."""

    class OffsetRMSNorm(_OnePlusWRMSNorm):
        pass

    model = nn.Sequential(nn.Linear(8, 8), OffsetRMSNorm(8), nn.Linear(8, 3))
    with pytest.raises(ReferenceGap, match="OffsetRMSNorm"):
        reference_gradient(model, model, torch.randn(2, 8), 0, RULES["norm"])


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mistral"])
def test_flex_attention_gets_the_same_attribution_as_eager(model_type: str) -> None:
    """flex_attention (no backward on the CPU): the forward value is flex's own, the
    gradient the rules' recomputation, equal to the eager model's GIM gradient."""
    family = Family(model_type, model_type)
    eager, flex = (build(family, impl) for impl in ("eager", "flex_attention"))
    flex.load_state_dict(eager.state_dict())
    embeds = eager.get_input_embeddings()(torch.arange(1, 7)[None]).detach()
    with torch.no_grad():
        expected = outputs(flex, "causal", embeds)
    x = embeds.clone().requires_grad_()
    with gim_rules(flex):
        got = outputs(flex, "causal", x)
        attribution = torch.autograd.grad(got[:, TARGET].sum(), x)[0]
    assert torch.equal(got.detach(), expected)
    want = _gradient(eager, "causal", embeds, ALL)
    assert _distance(attribution, want) < 1e-5
    assert _distance(want, _gradient(eager, "causal", embeds, None)) > 1e-3
