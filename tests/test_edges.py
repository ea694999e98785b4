"""Edge attribution patching and circuit evaluation against references written here.

The references name each model's modules by hand, give every downstream input
its own copy of the residual stream in forward hooks (a separate leaf per head
and per q/k/v, run through the model's own norm and projection), and patch one
edge at a time by hand.
"""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from matplotlib.figure import Figure
from tiny_models import FAMILY_BY_NAME
from torch import Tensor, nn

from captum_gim import UnsupportedModuleError, gim_rules
from captum_gim.circuits import (
    CircuitCurve,
    EdgeResult,
    Graph,
    attribution_patching,
    auroc,
    edge_attribution_patching,
    evaluate_circuits,
    prune,
)
from captum_gim.circuits.graph import ungrouped

HEADS, LAYERS, LENGTH = 4, 2, 6


LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma")


def build(name: str, implementation: str = "eager") -> nn.Module:
    extra = {"num_key_value_heads": HEADS} if name in LLAMA_LIKE else {}
    return FAMILY_BY_NAME[name].build(implementation, **extra)


def prompts() -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Three left-padded prompts, corrupted in one or two tokens."""
    generator = torch.Generator().manual_seed(5)
    clean = torch.randint(3, 64, (3, LENGTH), generator=generator)
    corrupted = clean.clone()
    corrupted[:, 3] = torch.randint(3, 64, (3,), generator=generator)
    corrupted[0, 4] = 2
    mask = torch.ones_like(clean)
    mask[1, :2] = 0
    mask[2, :1] = 0
    return (
        {"input_ids": clean, "attention_mask": mask},
        {"input_ids": corrupted, "attention_mask": mask},
    )


def metric(logits: Tensor) -> Tensor:
    return logits[:, -1, 7] - logits[:, -1, 8]


def by_hand(name: str, model: nn.Module) -> dict:
    if name in LLAMA_LIKE:
        blocks = model.model.layers
        return dict(
            blocks=blocks,
            norm1=[b.input_layernorm for b in blocks],
            norm2=[b.post_attention_layernorm for b in blocks],
            qkv=[[b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj] for b in blocks],
            o=[b.self_attn.o_proj for b in blocks],
            mlp=[b.mlp for b in blocks],
            final=model.model.norm,
        )
    if name == "gpt_neox":
        blocks = model.gpt_neox.layers
        return dict(
            blocks=blocks,
            norm1=[b.input_layernorm for b in blocks],
            norm2=[b.post_attention_layernorm for b in blocks],
            qkv=[[b.attention.query_key_value] for b in blocks],
            o=[b.attention.dense for b in blocks],
            mlp=[b.mlp for b in blocks],
            final=model.gpt_neox.final_layer_norm,
        )
    blocks = model.transformer.h
    return dict(
        blocks=blocks,
        norm1=[b.ln_1 for b in blocks],
        norm2=[b.ln_2 for b in blocks],
        qkv=[[b.attn.c_attn] for b in blocks],
        o=[b.attn.c_proj for b in blocks],
        mlp=[b.mlp for b in blocks],
        final=model.transformer.ln_f,
    )


def columns(name: str, letter: int, head: int) -> tuple[int, slice]:
    """(which projection, its output columns) of one head's q, k or v."""
    dim = 8
    if name in LLAMA_LIKE:
        return letter, slice(head * dim, (head + 1) * dim)
    if name == "gpt_neox":  # per head: q, k, v
        start = head * 3 * dim + letter * dim
        return 0, slice(start, start + dim)
    return 0, slice(letter * HEADS * dim + head * dim, letter * HEADS * dim + (head + 1) * dim)


def head_out(name: str, o: nn.Module, z: Tensor, head: int) -> Tensor:
    w = o.weight if name == "gpt2" else o.weight.t()  # (heads*dim) x hidden
    return z[..., head * 8 : (head + 1) * 8] @ w[head * 8 : (head + 1) * 8]


def node_outputs(name: str, model: nn.Module, inputs: dict) -> Tensor:
    """batch x tokens x 11 x hidden: input, a0.h0..h3, m0, a1.h0..h3, m1."""
    parts = by_hand(name, model)
    saved: dict = {}
    handles = [
        parts["blocks"][0].register_forward_pre_hook(
            lambda _, a, k: saved.__setitem__("x", (a[0] if a else k["hidden_states"]).detach()),
            with_kwargs=True,
        )
    ]
    for i in range(LAYERS):
        handles.append(
            parts["o"][i].register_forward_pre_hook(
                lambda _, a, i=i: saved.__setitem__(("z", i), a[0].detach())
            )
        )
        handles.append(
            parts["mlp"][i].register_forward_hook(
                lambda _, __, o, i=i: saved.__setitem__(("m", i), o.detach())
            )
        )
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    nodes = [saved["x"]]
    with torch.no_grad():
        for i in range(LAYERS):
            nodes += [head_out(name, parts["o"][i], saved[("z", i)], h) for h in range(HEADS)]
            nodes.append(saved[("m", i)])
    return torch.stack(nodes, dim=2)


def real_edges(parallel: bool = False) -> Tensor:
    real = torch.zeros(11, 27, dtype=torch.bool)
    for layer in range(LAYERS):
        real[: 1 + 5 * layer, 13 * layer : 13 * layer + 12] = True
        real[: 1 + 5 * layer + (0 if parallel else 4), 13 * layer + 12] = True
    real[:, 26] = True
    return real


def reference_gradients(name: str, model: nn.Module, inputs: dict) -> Tensor:
    """batch x tokens x 27 x hidden: the gradient at each downstream input's own copy
    of the residual stream (the residual plus a zero leaf of its own, so the copy
    stays connected to the model's graph)."""
    parts = by_hand(name, model)
    leaves: dict = {}
    live: dict = {}
    handles = []
    busy: list = []

    def copy(key, residual: Tensor) -> Tensor:
        leaves[key] = torch.zeros_like(residual, requires_grad=True)
        return residual + leaves[key]

    for i in range(LAYERS):
        handles.append(
            parts["blocks"][i].register_forward_pre_hook(
                lambda _, a, k, i=i: live.__setitem__(("x", i), a[0] if a else k["hidden_states"]),
                with_kwargs=True,
            )
        )
        handles.append(
            parts["norm2"][i].register_forward_pre_hook(
                lambda _, a, i=i: None if busy else live.__setitem__(("mid", i), a[0])
            )
        )
        for p, projection in enumerate(parts["qkv"][i]):

            def replace(module, _, output, i=i, p=p):
                if busy:
                    return None
                new = output.clone()
                busy.append(True)
                for letter in range(3):
                    for head in range(HEADS):
                        which, cols = columns(name, letter, head)
                        if which == p:
                            x = copy(("x", i, letter, head), live[("x", i)])
                            new[..., cols] = module(parts["norm1"][i](x))[..., cols]
                busy.clear()
                return new

            handles.append(projection.register_forward_hook(replace))

        def mlp_input(_, a, i=i):
            busy.append(True)
            y = parts["norm2"][i](copy(("mid", i), live[("mid", i)]))
            busy.clear()
            return (y,)

        handles.append(parts["mlp"][i].register_forward_pre_hook(mlp_input))
    handles.append(parts["final"].register_forward_pre_hook(lambda _, a: (copy(("final",), a[0]),)))
    with torch.enable_grad():
        value = metric(model(**inputs).logits)
        keys = list(leaves)
        grads = torch.autograd.grad(value.sum(), [leaves[k] for k in keys], allow_unused=True)
    for h in handles:
        h.remove()
    g = {k: torch.zeros_like(leaves[k]) if v is None else v for k, v in zip(keys, grads)}
    order = []
    for i in range(LAYERS):
        for letter in range(3):
            order += [g[("x", i, letter, h)] for h in range(HEADS)]
        order.append(g[("mid", i)])
    order.append(g[("final",)])
    return torch.stack(order, dim=2).detach()


def reference_scores(name: str, model: nn.Module, gim: bool) -> Tensor:
    clean, corrupted = prompts()
    delta = node_outputs(name, model, corrupted) - node_outputs(name, model, clean)
    delta = delta * clean["attention_mask"][:, :, None, None]
    if gim:
        with gim_rules(model):
            grads = reference_gradients(name, model, clean)
    else:
        grads = reference_gradients(name, model, clean)
    scores = torch.einsum("btfh,btkh->fk", delta.double(), grads.double()) / 3
    return (scores * real_edges(parallel=name == "gpt_neox")).float()


def relative_error(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm())


@pytest.mark.parametrize(
    "name, implementation",
    [("llama", "eager"), ("llama", "sdpa"), ("gpt2", "eager"), ("gpt2", "sdpa")]
    + [(name, "eager") for name in (*LLAMA_LIKE[1:], "gpt_neox")],
)
@pytest.mark.parametrize("method", ["eap", "gim"])
def test_edge_scores_equal_per_input_copies_reference(
    name: str, implementation: str, method: str
) -> None:
    model = build(name, implementation)
    clean, corrupted = prompts()
    result = edge_attribution_patching(
        model, clean, corrupted, metric, method=method, per_example=True
    )
    assert result.per_example is not None and result.per_example.shape == (3, 11, 27)
    assert torch.allclose(result.per_example.mean(0), result.scores)
    assert result.upstream[:2] == ["input", "a0.h0"] and result.downstream[-1] == "logits"
    assert result.downstream[4] == "a0.h0<k>"
    assert torch.equal(result.mask, real_edges(parallel=name == "gpt_neox"))
    expected = reference_scores(name, model, gim=method == "gim")
    assert relative_error(result.scores, expected) <= 1e-5


def test_gim_edge_scores_differ_from_eap() -> None:
    model = build("llama")
    clean, corrupted = prompts()
    eap = edge_attribution_patching(model, clean, corrupted, metric, method="eap")
    gim = edge_attribution_patching(model, clean, corrupted, metric, method="gim")
    assert relative_error(gim.scores, eap.scores) > 1e-2


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["eap", "gim"])
def test_outgoing_edge_scores_sum_to_node_scores(name: str, method: str) -> None:
    model = build(name)
    clean, corrupted = prompts()
    edges = edge_attribution_patching(model, clean, corrupted, metric, method=method, level="node")
    nodes = attribution_patching(
        model, clean, corrupted, metric, method="atp" if method == "eap" else "gim", run="clean"
    )
    assert edges.node_scores is not None
    expected = [nodes.residual[0].sum()]
    for layer in range(LAYERS):
        expected += [*nodes.heads[layer], nodes.mlps[layer]]
    expected_t = torch.stack(expected)
    assert torch.allclose(edges.scores.sum(1), expected_t, atol=1e-5, rtol=1e-4)
    assert torch.allclose(edges.node_scores, expected_t, atol=1e-5, rtol=1e-4)


def test_neuron_scores_sum_to_node_scores() -> None:
    model = build("gpt2")
    clean, corrupted = prompts()
    edges = edge_attribution_patching(model, clean, corrupted, metric, method="eap", level="neuron")
    assert edges.neuron_scores is not None and edges.neuron_scores.shape == (11, 32)
    assert torch.allclose(edges.neuron_scores.sum(1), edges.node_scores, atol=1e-5, rtol=1e-4)


def brute_force_edge(name: str, model: nn.Module, u: int, d: int, source: Tensor) -> Tensor:
    """metric(clean run with edge u -> d cut) - metric(clean), by hand."""
    parts = by_hand(name, model)
    clean, _ = prompts()
    base = node_outputs(name, model, clean)
    change = source[:, :, u] - base[:, :, u]
    layer, within = divmod(d, 13)
    saved: dict = {}
    handles = []
    if d == 26:
        handles.append(parts["final"].register_forward_pre_hook(lambda _, a: (a[0] + change,)))
    elif within == 12:
        norm2 = parts["norm2"][layer]
        handles.append(
            norm2.register_forward_pre_hook(
                lambda _, a: None if "mid" in saved else saved.update(mid=a[0])
            )
        )
        handles.append(
            parts["mlp"][layer].register_forward_pre_hook(
                lambda _, a: (norm2(saved["mid"] + change),)
            )
        )
    else:
        letter, head = divmod(within, HEADS)
        which, cols = columns(name, letter, head)
        block = parts["blocks"][layer]
        handles.append(
            block.register_forward_pre_hook(
                lambda _, a, k: saved.__setitem__("x", a[0] if a else k["hidden_states"]),
                with_kwargs=True,
            )
        )

        def replace(module, _, output):
            if saved.get("busy"):
                return None
            saved["busy"] = True
            new = output.clone()
            new[..., cols] = module(parts["norm1"][layer](saved["x"] + change))[..., cols]
            saved["busy"] = False
            return new

        handles.append(parts["qkv"][layer][which].register_forward_hook(replace))
    with torch.no_grad():
        patched = metric(model(**clean).logits)
    for h in handles:
        h.remove()
    with torch.no_grad():
        return (patched - metric(model(**clean).logits)).mean()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_exact_equals_brute_force_edge_patching(name: str) -> None:
    model = build(name)
    clean, corrupted = prompts()
    exact = edge_attribution_patching(model, clean, corrupted, metric, method="exact")
    source = node_outputs(name, model, corrupted)
    generator = torch.Generator().manual_seed(0)
    edges = real_edges().nonzero()
    for u, d in edges[torch.randperm(len(edges), generator=generator)[:25]].tolist():
        expected = brute_force_edge(name, model, u, d, source)
        assert math.isclose(float(exact.scores[u, d]), float(expected), rel_tol=1e-4, abs_tol=1e-5)


def test_zero_intervention_exact_uses_zero_outputs() -> None:
    model = build("gpt2")
    clean, corrupted = prompts()
    exact = edge_attribution_patching(
        model, clean, corrupted, metric, method="exact", intervention="zero"
    )
    source = torch.zeros_like(node_outputs("gpt2", model, clean))
    for u, d in [(0, 26), (3, 17), (5, 26), (1, 12 + 13)]:
        expected = brute_force_edge("gpt2", model, u, d, source)
        assert math.isclose(float(exact.scores[u, d]), float(expected), rel_tol=1e-4, abs_tol=1e-5)


def test_eap_matches_exact_to_first_order() -> None:
    """Scaling the corruption down, EAP's estimate approaches the exact effect."""
    model = build("llama")
    clean, corrupted = prompts()
    exact = edge_attribution_patching(
        model, clean, corrupted, metric, method="exact", intervention="zero"
    )
    eap = edge_attribution_patching(
        model, clean, corrupted, metric, method="eap", intervention="zero"
    )
    mask = real_edges()
    r = torch.corrcoef(torch.stack([exact.scores[mask], eap.scores[mask]]))[0, 1]
    assert r > 0.3


@pytest.mark.parametrize("method", ["eap-ig-inputs", "eap-ig-activations"])
def test_ig_methods_give_finite_scores_on_real_edges_only(method: str) -> None:
    model = build("gpt2")
    clean, corrupted = prompts()
    result = edge_attribution_patching(model, clean, corrupted, metric, method=method, steps=3)
    assert result.scores.shape == (11, 27)
    assert torch.isfinite(result.scores).all()
    assert float(result.scores.abs().sum()) > 0
    assert torch.equal(result.scores != 0, (result.scores != 0) & real_edges())


def test_eap_ig_activations_one_step_averages_runs_with_one_group_frozen() -> None:
    """With steps=1 each run replaces one group's output (input, a layer's attention,
    a layer's MLP) by its clean value as a constant; the gradients are averaged."""
    model = build("gpt2")
    clean, corrupted = prompts()
    ig = edge_attribution_patching(
        model, clean, corrupted, metric, method="eap-ig-activations", steps=1
    )
    parts = by_hand("gpt2", model)
    delta = node_outputs("gpt2", model, corrupted) - node_outputs("gpt2", model, clean)
    delta = delta * clean["attention_mask"][:, :, None, None]
    frozen = [None]
    for layer in range(LAYERS):
        frozen += [parts["o"][layer], parts["mlp"][layer]]
    total = torch.zeros(11, 27, dtype=torch.float64)
    for module in frozen:
        handle = (
            None
            if module is None
            else module.register_forward_hook(lambda _, __, out: out.detach())
        )
        try:
            grads = reference_gradients("gpt2", model, clean)
        finally:
            if handle is not None:
                handle.remove()
        total += torch.einsum("btfh,btkh->fk", delta.double(), grads.double()) / 3
    expected = (total / len(frozen) * real_edges()).float()
    assert relative_error(ig.scores, expected) <= 1e-5


def test_eap_ig_inputs_one_step_is_gradient_at_corrupted_embeddings() -> None:
    model = build("gpt2")
    clean, corrupted = prompts()
    ig = edge_attribution_patching(model, clean, corrupted, metric, method="eap-ig-inputs", steps=1)
    # By hand: the gradients of a run whose embeddings are the corrupted ones.
    parts = by_hand("gpt2", model)
    delta = node_outputs("gpt2", model, corrupted) - node_outputs("gpt2", model, clean)
    delta = delta * clean["attention_mask"][:, :, None, None]
    corrupted_x = node_outputs("gpt2", model, corrupted)[:, :, 0]
    handle = parts["blocks"][0].register_forward_pre_hook(
        lambda _, a, k: (
            ((corrupted_x, *a[1:]), k) if a else (a, {**k, "hidden_states": corrupted_x})
        ),
        with_kwargs=True,
    )
    try:
        grads = reference_gradients("gpt2", model, clean)
    finally:
        handle.remove()
    expected = torch.einsum("btfh,btkh->fk", delta, grads) / 3 * real_edges()
    assert relative_error(ig.scores, expected) <= 1e-5


def test_model_left_as_it_was() -> None:
    model = build("llama")
    clean, corrupted = prompts()
    with torch.no_grad():
        before = model(**clean).logits
    for method in ("gim", "eap-ig-activations", "exact"):
        edge_attribution_patching(model, clean, corrupted, metric, method=method, steps=2)
    result = edge_attribution_patching(model, clean, corrupted, metric)
    evaluate_circuits(model, result, clean, corrupted, metric)
    with torch.no_grad():
        assert torch.equal(model(**clean).logits, before)
        assert torch.equal(result.clean_metric, metric(before))  # hooks leave the forward as is
    assert all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        for m in model.modules()
    )


# ------------------------------------------------------------------- evaluation


def test_faithfulness_is_one_with_every_edge_and_zero_with_none() -> None:
    model = build("llama")
    clean, corrupted = prompts()
    edges = edge_attribution_patching(model, clean, corrupted, metric, method="eap")
    curve = evaluate_circuits(model, edges, clean, corrupted, metric, percentages=(0, 30, 100))
    assert curve.faithfulness[0] == 0.0
    assert curve.faithfulness[-1] == 1.0
    assert curve.edge_counts[0] == 0 and curve.edge_counts[-1] == int(real_edges().sum())
    with torch.no_grad():
        assert math.isclose(
            curve.full_metric, float(metric(model(**clean).logits).mean()), rel_tol=1e-5
        )
        assert math.isclose(
            curve.empty_metric, float(metric(model(**corrupted).logits).mean()), rel_tol=1e-4
        )


def test_node_level_circuits_keep_every_outgoing_edge_of_the_top_nodes() -> None:
    model = build("gpt2")
    clean, corrupted = prompts()
    edges = edge_attribution_patching(model, clean, corrupted, metric, level="node")
    curve = evaluate_circuits(
        model, edges, clean, corrupted, metric, percentages=(0, 50, 100), level="node"
    )
    assert curve.faithfulness[0] == 0.0 and curve.faithfulness[-1] == 1.0
    top = torch.argsort(edges.node_scores.abs(), descending=True, stable=True)[:5]
    circuit = torch.zeros_like(edges.mask)
    circuit[top] = True
    expected = prune(Graph(2, 4), circuit & edges.mask)
    assert curve.edge_counts[1] == int(expected.sum())
    with pytest.raises(ValueError, match="needs node scores"):
        evaluate_circuits(
            model, EdgeResult(**{**edges.__dict__, "node_scores": None}), clean, corrupted,
            metric, level="node",
        )  # fmt: skip


def test_circuit_with_one_edge_cut_equals_exact_score() -> None:
    model = build("gpt2")
    clean, corrupted = prompts()
    exact = edge_attribution_patching(model, clean, corrupted, metric, method="exact")
    # A circuit of every edge but the lowest-scored one: its metric is clean + that edge's score.
    scores = exact.scores.abs().masked_fill(~exact.mask, torch.inf)
    u, d = divmod(int(scores.argmin()), scores.shape[1])
    tiny = exact.scores.clone()
    tiny[u, d] = 0.0
    n = int(exact.mask.sum())
    curve = evaluate_circuits(
        model,
        EdgeResult(**{**exact.__dict__, "scores": tiny}),
        clean,
        corrupted,
        metric,
        percentages=(100 * (n - 1) / n + 1e-9, 100),
    )
    assert math.isclose(
        curve.metric[0] - curve.full_metric, float(exact.scores[u, d]), rel_tol=1e-4, abs_tol=1e-6
    )


def test_cpr_and_cmd_follow_mib_definitions() -> None:
    percentages = (0.1, 1.0, 10.0, 100.0)
    faithfulness = [0.2, 0.5, 1.3, 1.0]
    curve = CircuitCurve(percentages, [0, 0, 0, 0], faithfulness, faithfulness, 1.0, 0.0)
    # MIB: x in fractions of edges, trapezoids; CPR over f, CMD over |1 - f|.
    cpr = 0.009 * (0.2 + 0.5) / 2 + 0.09 * (0.5 + 1.3) / 2 + 0.9 * (1.3 + 1.0) / 2
    cmd = 0.009 * (0.8 + 0.5) / 2 + 0.09 * (0.5 + 0.3) / 2 + 0.9 * (0.3 + 0.0) / 2
    assert math.isclose(curve.cpr, cpr, rel_tol=1e-12)
    assert math.isclose(curve.cmd, cmd, rel_tol=1e-12)
    assert isinstance(curve.plot(), Figure)


def test_prune_drops_edges_that_cannot_reach_the_logits() -> None:
    graph = Graph(num_layers=2, num_heads=1)
    # nodes: input 0, a0.h0 1, m0 2, a1.h0 3, m1 4; inputs: a0<q,k,v> 0-2, m0 3, a1<q,k,v> 4-6, m1 7, logits 8
    circuit = torch.zeros(5, 9, dtype=torch.bool)
    circuit[0, 0] = True  # input -> a0.h0<q>
    circuit[1, 8] = True  # a0.h0 -> logits: kept (a0.h0 has an incoming edge)
    circuit[0, 3] = True  # input -> m0, but m0 writes nowhere: dropped
    circuit[2, 7] = True  # m0 -> m1, m0 has input but m1 does not reach the logits: dropped
    kept = prune(graph, circuit)
    expected = torch.zeros_like(circuit)
    expected[0, 0] = expected[1, 8] = True
    assert torch.equal(kept, expected)


def test_auroc_ranks_true_edges() -> None:
    scores = torch.tensor([[3.0, -2.0, 0.5, 0.1]])
    truth = torch.tensor([[True, True, False, False]])
    assert auroc(scores, truth) == 1.0
    assert auroc(-scores, torch.tensor([[False, False, True, True]])) == 0.0
    assert auroc(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), truth) == 0.5


def test_mib_json_round_trip(tmp_path) -> None:
    model = build("gpt2")
    clean, corrupted = prompts()
    edges = edge_attribution_patching(model, clean, corrupted, metric, level="node")
    data = edges.to_mib(tmp_path / "graph.json", top_n=10)
    assert set(data) == {"cfg", "nodes", "edges"}
    assert data["cfg"] == {"n_layers": 2, "n_heads": 4, "parallel_attn_mlp": False, "d_model": 32}
    assert "a0.h1->a1.h2<k>" in data["edges"] and "m1->logits" in data["edges"]
    assert len(data["edges"]) == int(real_edges().sum())
    assert sum(e["in_graph"] for e in data["edges"].values()) <= 10
    back = EdgeResult.from_mib(tmp_path / "graph.json")
    assert torch.allclose(back.scores, edges.scores)
    assert json.loads((tmp_path / "graph.json").read_text())["nodes"]["logits"]["in_graph"]
    assert back.top(3) == edges.top(3)
    assert auroc(edges, [name for name, _ in edges.top(5)]) == 1.0


def test_plot_draws_top_edges() -> None:
    model = build("llama")
    clean, corrupted = prompts()
    edges = edge_attribution_patching(model, clean, corrupted, metric)
    assert isinstance(edges.plot(k=8), Figure)


def test_parallel_blocks_have_no_edges_from_a_layers_heads_to_its_mlp() -> None:
    model = FAMILY_BY_NAME["gpt_neox"].build("eager")
    clean, corrupted = prompts()
    edges = edge_attribution_patching(model, clean, corrupted, metric, method="eap")
    assert edges.config["parallel_attn_mlp"]
    assert not edges.mask[1:5, 12].any() and edges.mask[0, 12]
    nodes = attribution_patching(model, clean, corrupted, metric, method="atp", run="clean")
    assert torch.allclose(edges.scores.sum(1)[1:5], nodes.heads[0], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------- errors


@pytest.mark.parametrize("method", ["eap", "gim"])
def test_grouped_query_attention_is_scored_on_an_ungrouped_copy(method: str) -> None:
    model = FAMILY_BY_NAME["llama"].build("eager")  # 2 key/value heads for 4 query heads
    clean, corrupted = prompts()
    with torch.no_grad():
        before = model(**clean).logits
        copy = ungrouped(model)
        assert torch.allclose(copy(**clean).logits, before, atol=1e-5)
    assert model.model.layers[0].self_attn.k_proj.out_features == 16
    edges = edge_attribution_patching(model, clean, corrupted, metric, method=method)
    nodes = attribution_patching(
        model, clean, corrupted, metric, method="atp" if method == "eap" else "gim", run="clean"
    )
    sums = edges.scores.sum(1)
    assert torch.allclose(sums[1:5], nodes.heads[0], atol=1e-5, rtol=1e-4)
    assert torch.allclose(sums[6:10], nodes.heads[1], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert torch.equal(model(**clean).logits, before)


@pytest.mark.parametrize("method", ["eap", "gim"])
def test_grouped_query_scores_equal_the_reference_on_ungrouped_heads(method: str) -> None:
    model = FAMILY_BY_NAME["llama"].build("eager")  # 2 key/value heads for 4 query heads
    clean, corrupted = prompts()
    edges = edge_attribution_patching(model, clean, corrupted, metric, method=method)
    expected = reference_scores("llama", ungrouped(model), gim=method == "gim")
    assert relative_error(edges.scores, expected) <= 1e-5


def test_refuses_sublayer_output_norms() -> None:
    model = FAMILY_BY_NAME["gemma2"].build("eager")
    clean, corrupted = prompts()
    with pytest.raises(UnsupportedModuleError, match="not the sum of the node outputs"):
        edge_attribution_patching(model, clean, corrupted, metric)


def test_refuses_post_norm_models() -> None:
    model = FAMILY_BY_NAME["bert"].build("eager")
    clean, corrupted = prompts()
    with pytest.raises(UnsupportedModuleError, match=r"post-norm|sum of the node outputs"):
        edge_attribution_patching(model, clean, corrupted, lambda out: out.logits[:, 1, 7])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "atp"}, "method must be one of"),
        ({"intervention": "resample"}, "intervention must be one of"),
        ({"level": "head"}, "level must be one of"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"method": "eap-ig-inputs", "intervention": "mean"}, "needs intervention='patching'"),
    ],
)
def test_bad_options_fail_fast(kwargs: dict, message: str) -> None:
    model = build("gpt2")
    clean, corrupted = prompts()
    with pytest.raises(ValueError, match=message):
        edge_attribution_patching(model, clean, corrupted, metric, **kwargs)


def test_attribution_patching_run_clean_swaps_the_runs() -> None:
    model = build("gpt2")
    clean, corrupted = prompts()
    forward = attribution_patching(model, corrupted, clean, metric, method="atp")
    backward = attribution_patching(model, clean, corrupted, metric, method="atp", run="clean")
    assert torch.allclose(forward.heads, backward.heads)
    assert torch.equal(backward.clean_metric, forward.corrupted_metric)
    with pytest.raises(ValueError, match="run must be"):
        attribution_patching(model, clean, corrupted, metric, run="both")


# ------------------------------------------------------------- TransformerLens


def lens_model():
    lens = pytest.importorskip("transformer_lens")
    config = lens.HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=16, d_head=8, n_heads=HEADS, d_mlp=48, d_vocab=64,
        act_fn="gelu", normalization_type="LN", seed=0, initializer_range=0.2,
    )  # fmt: skip
    return lens.HookedTransformer(config).eval()


def lens_reference(model, gim: bool) -> Tensor:
    """delta . gradient with TL's own backward hooks on its per-head input copies."""
    clean, corrupted = prompts()
    for flag in ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in"):
        setattr(model.cfg, flag, True)
    model.setup()
    outputs = ["hook_embed"]
    for layer in range(LAYERS):
        outputs += [f"blocks.{layer}.attn.hook_result", f"blocks.{layer}.hook_mlp_out"]

    def nodes(inputs):
        _, cache = model.run_with_cache(
            inputs["input_ids"], attention_mask=inputs["attention_mask"]
        )
        parts = [cache["hook_embed"][:, :, None]]
        for layer in range(LAYERS):
            parts += [cache[outputs[1 + 2 * layer]], cache[outputs[2 + 2 * layer]][:, :, None]]
        return torch.cat(parts, dim=2)

    delta = (nodes(corrupted) - nodes(clean)) * clean["attention_mask"][:, :, None, None]
    grads: dict = {}
    inputs_ = []
    for layer in range(LAYERS):
        inputs_ += [f"blocks.{layer}.hook_{c}_input" for c in "qkv"] + [
            f"blocks.{layer}.hook_mlp_in"
        ]
    inputs_.append(f"blocks.{LAYERS - 1}.hook_resid_post")
    for name in inputs_:
        model.add_hook(name, lambda g, hook: grads.__setitem__(hook.name, g.detach()), dir="bwd")
    context = gim_rules(model) if gim else contextlib.nullcontext()
    with context:
        metric(model(clean["input_ids"], attention_mask=clean["attention_mask"])).sum().backward()
    model.reset_hooks()
    model.zero_grad()
    for flag in ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in"):
        setattr(model.cfg, flag, False)
    model.setup()
    columns_ = []
    for layer in range(LAYERS):
        columns_ += [grads[f"blocks.{layer}.hook_{c}_input"] for c in "qkv"]
        columns_.append(grads[f"blocks.{layer}.hook_mlp_in"][:, :, None])
    columns_.append(grads[f"blocks.{LAYERS - 1}.hook_resid_post"][:, :, None])
    g = torch.cat(columns_, dim=2)
    return torch.einsum("btfh,btkh->fk", delta, g) / 3 * real_edges()


def test_transformer_lens_eap_equals_its_own_hook_points() -> None:
    model = lens_model()
    clean, corrupted = prompts()
    edges = edge_attribution_patching(model, clean, corrupted, metric, method="eap")
    assert not model.cfg.use_split_qkv_input  # settings restored
    assert relative_error(edges.scores, lens_reference(model, gim=False)) <= 1e-5
    exact = edge_attribution_patching(model, clean, corrupted, metric, method="exact")
    curve = evaluate_circuits(model, exact, clean, corrupted, metric, percentages=(0, 100))
    assert curve.faithfulness == [0.0, 1.0]


def test_transformer_lens_gim_equals_its_own_hook_points() -> None:
    model = lens_model()
    clean, corrupted = prompts()
    edges = edge_attribution_patching(model, clean, corrupted, metric, method="gim")
    assert relative_error(edges.scores, lens_reference(model, gim=True)) <= 1e-5


# ------------------------------------------------------------ layer experiment


def test_layer_position_scores_are_centred_activation_times_gradient() -> None:
    from captum_gim.circuits.layers import position_scores

    model = build("llama")
    ids = torch.randint(3, 64, (2, LENGTH), generator=torch.Generator().manual_seed(2))
    answers = torch.tensor([7, 9])
    scores = position_scores(model, ids, answers, layer=1, method="atp")
    saved = {}

    def hook(_, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
        saved["x"] = x
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    handle = model.model.layers[1].register_forward_pre_hook(hook, with_kwargs=True)
    logits = model(input_ids=ids).logits[:, -1]
    handle.remove()
    logits[torch.arange(2), answers].sum().backward()
    x = saved["x"]
    expected = ((x - x.mean(1, keepdim=True)) * x.grad).sum(-1)
    assert torch.allclose(scores, expected, atol=1e-6)


def test_layer_faithfulness_through_metrics() -> None:
    from captum_gim.metrics import layer_faithfulness

    model = build("gpt2")
    ids = torch.randint(3, 64, (2, LENGTH), generator=torch.Generator().manual_seed(2))
    rows = layer_faithfulness(model, ids, torch.tensor([7, 9]), steps=3)
    assert [r.method for r in rows] == ["gim", "atp", "ig"]
    assert all(len(r.comprehensiveness) == LAYERS and len(r.sufficiency) == LAYERS for r in rows)
    assert all(math.isfinite(v) for r in rows for v in r.comprehensiveness + r.sufficiency)


# -------------------------------------------------------------- bundled models


def test_bundled_names_models_solve_the_task_and_the_planted_circuit_suffices() -> None:
    from captum_gim.models import available_models, load_model
    from captum_gim.models.circuit_tasks import names_prompts, planted_circuit

    assert {"ioi_llama", "planted_circuit_llama"} <= set(available_models())
    prompts = names_prompts(32, seed=99)
    for name in ("ioi_llama", "planted_circuit_llama"):
        model, _ = load_model(name)
        with torch.no_grad():
            assert bool((prompts.metric(model(prompts.clean).logits) > 0).all())
    truth = planted_circuit()
    edges = edge_attribution_patching(
        model, prompts.clean, prompts.corrupted, prompts.metric, method="eap"
    )
    circuit = EdgeResult(**{**edges.__dict__, "scores": edges.mask_of(truth).float()})
    share = 100 * len(truth) / int(edges.mask.sum()) + 1e-9
    curve = evaluate_circuits(
        model, circuit, prompts.clean, prompts.corrupted, prompts.metric, percentages=(share,)
    )
    assert curve.edge_counts == [len(truth)] and curve.faithfulness[0] > 0.9


def test_mean_intervention_uses_the_mean_output_over_real_positions() -> None:
    model = build("gpt2")
    clean, corrupted = prompts()
    exact = edge_attribution_patching(
        model, clean, corrupted, metric, method="exact", intervention="mean"
    )
    nodes = node_outputs("gpt2", model, clean)
    weights = clean["attention_mask"][:, :, None, None].float()
    mean = (nodes * weights).sum((0, 1)) / weights.sum((0, 1))
    source = mean.expand_as(nodes)
    for u, d in [(0, 26), (2, 14), (5, 25)]:
        expected = brute_force_edge("gpt2", model, u, d, source)
        assert math.isclose(float(exact.scores[u, d]), float(expected), rel_tol=1e-4, abs_tol=1e-5)
    eap = edge_attribution_patching(model, clean, corrupted, metric, intervention="mean")
    assert eap.scores.abs().sum() > 0
