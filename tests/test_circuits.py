"""captum_gim.circuits against slow references written here with hand-made hooks.

The references name each model's modules by hand (the library finds them by
structure), patch one component at a time with its own forward hooks, and compute
AtP as (clean - corrupted) x gradient from ``retain_grad``.
"""

from __future__ import annotations

import math

import pytest
import torch
from matplotlib.figure import Figure
from tiny_models import FAMILY_BY_NAME, VOCAB, PlainMLPModel
from torch import Tensor, nn

from captum_gim import GIMConfig, UnsupportedModuleError, gim_rules
from captum_gim.circuits import (
    CircuitResult,
    activation_patching,
    atp_star,
    attribution_patching,
    correlation,
    find_components,
)
from captum_gim.circuits.result import rank

HEADS = 4
LENGTH = 6
ALL = ("heads", "mlps", "residual", "neurons")


def by_hand(name: str, model: nn.Module) -> dict[str, object]:
    """Each family's blocks and component modules, named by hand."""
    if name == "llama":
        blocks = model.model.layers
        return dict(
            blocks=blocks,
            out_proj=[b.self_attn.o_proj for b in blocks],
            mlp=[b.mlp for b in blocks],
            down=[b.mlp.down_proj for b in blocks],
        )
    if name == "gpt2":
        blocks = model.transformer.h
        return dict(
            blocks=blocks,
            out_proj=[b.attn.c_proj for b in blocks],
            mlp=[b.mlp for b in blocks],
            down=[b.mlp.c_proj for b in blocks],
        )
    blocks = model.bert.encoder.layer
    return dict(
        blocks=blocks,
        out_proj=[b.attention.output.dense for b in blocks],
        mlp=[b.output.dense for b in blocks],
        down=[b.output.dense for b in blocks],
    )


def inputs(name: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Three prompts, padded (left for decoders, right for BERT), corrupted in one or two tokens."""
    generator = torch.Generator().manual_seed(5)
    clean = torch.randint(3, VOCAB, (3, LENGTH), generator=generator)
    corrupted = clean.clone()
    corrupted[:, 3] = torch.randint(3, VOCAB, (3,), generator=generator)
    corrupted[0, 4] = 2
    mask = torch.ones_like(clean)
    if FAMILY_BY_NAME[name].causal:
        mask[1, :2] = 0
        mask[2, :1] = 0
    else:
        mask[1, -2:] = 0
    return (
        {"input_ids": clean, "attention_mask": mask},
        {"input_ids": corrupted, "attention_mask": mask},
    )


def metric_for(name: str):
    position = -1 if FAMILY_BY_NAME[name].causal else 1

    def metric(logits: Tensor) -> Tensor:
        return logits[:, position, 7] - logits[:, position, 8]

    return metric


def _first(x):
    return x[0] if isinstance(x, tuple) else x


def _modules(parts: dict, kind: str, layer: int) -> tuple[nn.Module, str]:
    """(module, "input"/"output") holding a component type's activation."""
    if kind == "residual":
        return (
            (parts["blocks"][0], "input") if layer == 0 else (parts["blocks"][layer - 1], "output")
        )
    if kind == "heads":
        return parts["out_proj"][layer], "input"
    if kind == "mlps":
        return parts["mlp"][layer], "output"
    return parts["down"][layer], "input"


def _hook(module: nn.Module, point: str, fn):
    """fn(tensor) -> tensor on a module's first input or first output."""
    if point == "input":

        def pre(_, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(_, __, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    return module.register_forward_hook(post)


def _count(kind: str, activation: Tensor) -> int:
    return {"heads": HEADS, "mlps": 1, "residual": activation.shape[1]}.get(
        kind, activation.shape[-1]
    )


def reference_activation_patching(name, model, clean, corrupted, metric, kinds):
    parts = by_hand(name, model)
    layers = len(parts["blocks"])
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        base = metric(model(**corrupted).logits)
        for kind in kinds:
            rows = []
            for layer in range(layers + (kind == "residual")):
                module, point = _modules(parts, kind, layer)
                saved = {}
                handle = _hook(
                    module, point, lambda t, saved=saved: saved.setdefault("x", t.clone())
                )
                model(**clean)
                handle.remove()
                source = saved["x"]
                effects = []
                for index in range(_count(kind, source)):

                    def patch(t, index=index, kind=kind, source=source):
                        t = t.clone()
                        if kind == "heads":
                            d = t.shape[-1] // HEADS
                            t[..., index * d : (index + 1) * d] = source[
                                ..., index * d : (index + 1) * d
                            ]
                        elif kind == "mlps":
                            t = source.clone()
                        elif kind == "residual":
                            t[:, index] = source[:, index]
                        else:
                            t[..., index] = source[..., index]
                        return t

                    handle = _hook(module, point, patch)
                    effects.append(metric(model(**corrupted).logits) - base)
                    handle.remove()
                rows.append(torch.stack(effects, 1))
            stacked = torch.stack(rows, 1)
            out[kind] = stacked[..., 0] if kind == "mlps" else stacked
    return out


def reference_atp(name, model, clean, corrupted, metric, kinds, rules=None):
    """(clean - corrupted) x gradient with retain_grad; under gim_rules when rules is a GIMConfig."""
    parts = by_hand(name, model)
    layers = len(parts["blocks"])
    sites = [(k, i) for k in kinds for i in range(layers + (k == "residual"))]
    clean_acts, corrupted_acts = {}, {}

    def keep(store, site, retain):
        def fn(t):
            if retain:
                t.retain_grad()
            store[site] = t
            return t

        return fn

    handles = [_hook(*_modules(parts, *s), keep(clean_acts, s, False)) for s in sites]
    with torch.no_grad():
        model(**clean)
    for h in handles:
        h.remove()
    handles = [_hook(*_modules(parts, *s), keep(corrupted_acts, s, True)) for s in sites]
    try:
        if rules is None:
            metric(model(**corrupted).logits).sum().backward()
        else:
            with gim_rules(model, config=rules):
                metric(model(**corrupted).logits).sum().backward()
    finally:
        for h in handles:
            h.remove()
    out: dict[str, list[Tensor]] = {k: [] for k in kinds}
    for kind, layer in sites:
        x = corrupted_acts[(kind, layer)]
        product = (clean_acts[(kind, layer)] - x.detach()) * x.grad
        if kind == "heads":
            product = product.unflatten(-1, (HEADS, -1)).sum((1, 3))
        elif kind == "mlps":
            product = product.sum((1, 2))
        elif kind == "residual":
            product = product.sum(2)
        else:
            product = product.sum(1)
        out[kind].append(product)
    model.zero_grad(set_to_none=True)
    return {k: torch.stack(v, 1) for k, v in out.items()}


CASES = [
    ("llama", "sdpa"),
    ("llama", "eager"),
    ("gpt2", "sdpa"),
    ("bert", "sdpa"),
    ("bert", "eager"),
]


def _build(name: str, implementation: str) -> nn.Module:
    return FAMILY_BY_NAME[name].build(implementation)


@pytest.mark.parametrize("name,implementation", CASES)
def test_activation_patching_equals_hand_patching(name, implementation) -> None:
    model = _build(name, implementation)
    clean, corrupted = inputs(name)
    metric = metric_for(name)
    got = activation_patching(model, clean, corrupted, metric, components=ALL, max_batch_size=8)
    want = reference_activation_patching(name, model, clean, corrupted, metric, ALL)
    for kind in ALL:
        torch.testing.assert_close(got.per_example[kind], want[kind], rtol=1e-4, atol=1e-5)
    assert got.per_example["heads"].abs().sum() > 0


@pytest.mark.parametrize("name,implementation", CASES)
def test_atp_equals_gradient_times_difference_by_hand(name, implementation) -> None:
    model = _build(name, implementation)
    clean, corrupted = inputs(name)
    metric = metric_for(name)
    got = attribution_patching(model, clean, corrupted, metric, components=ALL, method="atp")
    want = reference_atp(name, model, clean, corrupted, metric, ALL)
    for kind in ALL:
        torch.testing.assert_close(got.per_example[kind], want[kind], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,implementation", CASES)
def test_gim_equals_the_gradient_under_gim_rules_by_hand(name, implementation) -> None:
    model = _build(name, implementation)
    clean, corrupted = inputs(name)
    metric = metric_for(name)
    got = attribution_patching(model, clean, corrupted, metric, components=ALL)
    want = reference_atp(name, model, clean, corrupted, metric, ALL, rules=GIMConfig())
    atp = reference_atp(name, model, clean, corrupted, metric, ALL)
    for kind in ALL:
        torch.testing.assert_close(got.per_example[kind], want[kind], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.per_example["residual"], atp["residual"])


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_gim_with_all_rules_off_equals_atp(name) -> None:
    model = _build(name, "sdpa")
    clean, corrupted = inputs(name)
    metric = metric_for(name)
    off = attribution_patching(
        model, clean, corrupted, metric, components=ALL, config=GIMConfig.all_rules_off()
    )
    atp = attribution_patching(model, clean, corrupted, metric, components=ALL, method="atp")
    for kind in ALL:
        torch.testing.assert_close(off.per_example[kind], atp.per_example[kind])


def brute_force_atp_star(q0, k0, v0, q1, k1, v1, grad_z, scaling):
    """AtP* of each head by loops: patch each query row / each key alone, then linearise."""
    batch, heads, tokens, _ = q0.shape
    out = torch.zeros(batch, heads, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            s = q0[b, h] @ k0[b, h].T * scaling
            a = torch.softmax(s, -1)
            grad_a = grad_z[b, h] @ v0[b, h].T
            total = (a.T @ grad_z[b, h] * (v1[b, h] - v0[b, h])).sum()
            for t in range(tokens):
                row = torch.softmax(q1[b, h, t] @ k0[b, h].T * scaling, -1)
                total += (grad_a[t] * (row - a[t])).sum()
            for u in range(tokens):
                s_new = s.clone()
                s_new[:, u] = q0[b, h] @ k1[b, h, u] * scaling
                total += (grad_a * (torch.softmax(s_new, -1) - a)).sum()
            out[b, h] = total
    return out


def test_atp_star_head_scores_equal_brute_force_on_bare_tensors() -> None:
    torch.manual_seed(0)
    shape = (2, 3, 5, 4)
    q0, k0, v0, q1, k1, v1 = (2 * torch.randn(shape, dtype=torch.float64) for _ in range(6))
    grad_z = torch.randn(shape, dtype=torch.float64)
    scaling = 0.5
    output = (torch.softmax(q0 @ k0.transpose(-1, -2) * scaling, -1) @ v0).transpose(1, 2)
    corrupted = atp_star.Recorded(q0, k0, v0, None, scaling, None, False, output)
    clean = atp_star.Recorded(q1, k1, v1, None, scaling, None, False, output)
    got = atp_star.head_scores(clean, corrupted, grad_z.transpose(1, 2), layer=0)
    torch.testing.assert_close(got, brute_force_atp_star(q0, k0, v0, q1, k1, v1, grad_z, scaling))


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_atp_star_keeps_atp_for_mlps_and_residual_and_agrees_across_implementations(name) -> None:
    clean, corrupted = inputs(name)
    metric = metric_for(name)
    results = [
        attribution_patching(_build(name, impl), clean, corrupted, metric, method=method)
        for impl, method in (("sdpa", "atp*"), ("eager", "atp*"), ("sdpa", "atp"))
    ]
    sdpa, eager, atp = results
    torch.testing.assert_close(sdpa.heads, eager.heads, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sdpa.mlps, atp.mlps)
    torch.testing.assert_close(sdpa.residual, atp.residual)
    assert torch.isfinite(sdpa.heads).all() and not torch.allclose(sdpa.heads, atp.heads)


def test_identical_prompts_give_zero_scores() -> None:
    model = _build("llama", "sdpa")
    clean, _ = inputs("llama")
    metric = metric_for("llama")
    for method in ("gim", "atp", "atp*"):
        result = attribution_patching(model, clean, clean, metric, method=method)
        assert all(float(t.abs().max()) == 0.0 for t in result.per_example.values()), method


def test_result_shapes_and_records() -> None:
    model = _build("llama", "sdpa")
    clean, corrupted = inputs("llama")
    result = attribution_patching(model, clean, corrupted, metric_for("llama"), components=ALL)
    assert isinstance(result, CircuitResult)
    assert result.heads.shape == (2, HEADS)
    assert result.mlps.shape == (2,)
    assert result.residual.shape == (3, LENGTH)
    assert result.neurons.shape == (2, 48)
    assert result.per_example["heads"].shape == (3, 2, HEADS)
    assert result.clean_metric.shape == result.corrupted_metric.shape == (3,)
    rows = result.to_records()
    assert len(rows) == 2 * HEADS + 2 + 3 * LENGTH + 2 * 48
    head_row = next(
        r for r in rows if r["component"] == "heads" and r["layer"] == 1 and r["index"] == 2
    )
    assert head_row["score"] == pytest.approx(float(result.heads[1, 2]))
    assert {r["index"] for r in rows if r["component"] == "mlps"} == {None}
    only_heads = attribution_patching(
        model, clean, corrupted, metric_for("llama"), components=("heads",)
    )
    assert only_heads.mlps is None and only_heads.residual is None


def test_token_id_tensors_are_accepted() -> None:
    model = _build("gpt2", "sdpa")
    clean, corrupted = inputs("gpt2")
    metric = metric_for("gpt2")
    ids = attribution_patching(model, clean["input_ids"], corrupted["input_ids"], metric)
    dicts = attribution_patching(
        model, {"input_ids": clean["input_ids"]}, {"input_ids": corrupted["input_ids"]}, metric
    )
    torch.testing.assert_close(ids.heads, dicts.heads)


def test_plot_returns_heatmaps_and_scatter() -> None:
    model = _build("llama", "sdpa")
    clean, corrupted = inputs("llama")
    metric = metric_for("llama")
    gim = attribution_patching(model, clean, corrupted, metric)
    truth = activation_patching(model, clean, corrupted, metric)
    figure = gim.plot()
    assert isinstance(figure, Figure) and len([a for a in figure.axes if a.images]) == 2
    figure = gim.plot(truth, title="GIM vs patching")
    scatters = [a for a in figure.axes if a.get_xlabel() == "gim" and not a.images]
    assert [a.get_title() for a in scatters] == ["heads", "mlps", "residual"]


def test_correlation_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    model = _build("gpt2", "sdpa")
    clean, corrupted = inputs("gpt2")
    metric = metric_for("gpt2")
    gim = attribution_patching(model, clean, corrupted, metric)
    truth = activation_patching(model, clean, corrupted, metric)
    scores = correlation(gim, truth)
    assert set(scores) == {"heads", "mlps", "residual"}
    for kind, values in scores.items():
        x = getattr(gim, kind).reshape(-1).double().numpy()
        y = getattr(truth, kind).reshape(-1).double().numpy()
        assert values["n"] == x.size
        assert values["pearson"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-9)
        assert values["spearman"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-9)


def test_rank_averages_ties() -> None:
    assert rank(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_correlation_of_a_constant_is_nan() -> None:
    flat = CircuitResult("a", {"mlps": torch.ones(1, 3)}, torch.zeros(1), torch.zeros(1))
    other = CircuitResult("b", {"mlps": torch.randn(1, 3)}, torch.zeros(1), torch.zeros(1))
    assert math.isnan(correlation(flat, other)["mlps"]["pearson"])


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "mixtral", "gpt_neox", "phi3", "qwen3"])
def test_components_are_found_by_structure(name) -> None:
    model = _build(name, "sdpa")
    parts = find_components(model)
    names = {id(m): n for n, m in model.named_modules()}
    assert parts.num_layers == 2 and parts.num_heads == HEADS and parts.head_dim == 8
    out_proj = names[id(parts.layers[1].out_proj)]
    mlp = names[id(parts.layers[1].mlp)]
    expected = {
        "llama": ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp"),
        "gpt2": ("transformer.h.1.attn.c_proj", "transformer.h.1.mlp"),
        "bert": (
            "bert.encoder.layer.1.attention.output.dense",
            "bert.encoder.layer.1.output.dense",
        ),
        "mixtral": ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp"),
        "gpt_neox": ("gpt_neox.layers.1.attention.dense", "gpt_neox.layers.1.mlp"),
        "phi3": ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp"),
        "qwen3": ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp"),
    }[name]
    assert (out_proj, mlp) == expected


def test_moe_model_gets_heads_mlps_residual_but_refuses_neurons() -> None:
    model = _build("mixtral", "sdpa")
    clean, corrupted = inputs("llama")
    metric = metric_for("llama")
    result = attribution_patching(model, clean, corrupted, metric)
    assert result.heads.shape == (2, HEADS)
    with pytest.raises(UnsupportedModuleError, match="no linear down projection"):
        attribution_patching(model, clean, corrupted, metric, components=("neurons",))


def test_unknown_structure_is_refused_in_one_line() -> None:
    with pytest.raises(
        UnsupportedModuleError, match=r"no nn\.ModuleList of repeated blocks"
    ) as error:
        find_components(PlainMLPModel())
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(method="lrp"), "method must be one of"),
        (dict(components=("attention",)), "components must be"),
        (dict(method="atp", config=GIMConfig()), "config= applies to method='gim' only"),
        (dict(corrupted=torch.zeros(3, 5, dtype=torch.long)), "pad both to the same length"),
        (dict(metric=lambda logits: logits[:, -1]), "one value per example"),
        (dict(clean="a prompt"), "token-id tensor or a tokenizer output"),
    ],
)
def test_bad_input_gets_a_one_line_error(change, message) -> None:
    model = _build("llama", "sdpa")
    clean, corrupted = inputs("llama")
    args = dict(
        clean=clean["input_ids"], corrupted=corrupted["input_ids"], metric=metric_for("llama")
    )
    kwargs = {k: v for k, v in change.items() if k not in args}
    args.update({k: v for k, v in change.items() if k in args})
    with pytest.raises((ValueError, TypeError), match=message) as error:
        attribution_patching(model, args["clean"], args["corrupted"], args["metric"], **kwargs)
    assert "\n" not in str(error.value)


def test_different_attention_masks_are_refused() -> None:
    model = _build("llama", "sdpa")
    clean, corrupted = inputs("llama")
    corrupted = {**corrupted, "attention_mask": torch.ones_like(corrupted["attention_mask"])}
    with pytest.raises(ValueError, match="attention_mask differ"):
        activation_patching(model, clean, corrupted, metric_for("llama"))


def _state(model: nn.Module) -> tuple:
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )
    configs = tuple(id(getattr(m, "config", None)) for m in model.modules())
    grads = tuple(p.grad is None for p in model.parameters())
    return hooks, configs, grads, model.training


@pytest.mark.parametrize("method", ["gim", "atp", "atp*", "patching"])
def test_model_is_left_as_it_was_also_after_an_error(method) -> None:
    model = _build("llama", "sdpa")
    clean, corrupted = inputs("llama")
    before = _state(model)
    calls = {"n": 0}

    def failing_metric(logits):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("metric failed")
        return metric_for("llama")(logits)

    for metric in (metric_for("llama"), failing_metric):
        try:
            if method == "patching":
                activation_patching(model, clean, corrupted, metric)
            else:
                attribution_patching(model, clean, corrupted, metric, method=method)
        except RuntimeError as error:
            assert "metric failed" in str(error)
        assert _state(model) == before


def test_plot_colours_follow_captum_positive_green_negative_red() -> None:
    model = _build("llama", "sdpa")
    clean, corrupted = inputs("llama")
    figure = attribution_patching(model, clean, corrupted, metric_for("llama")).plot()
    for image in [a.images[0] for a in figure.axes if a.images]:
        low, high = image.norm.vmin, image.norm.vmax
        green, red = image.cmap(image.norm(high)), image.cmap(image.norm(low))
        assert green[1] > 0.4 and green[0] < 0.1 and green[2] < 0.1
        assert red[0] > 0.9 and red[1] < 0.1 and red[2] < 0.1
