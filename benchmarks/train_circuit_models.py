r"""Trains the two small circuit models shipped in ``captum_gim/models``:

- ``ioi_llama``: the names task of :mod:`captum_gim.models.circuit_tasks`
  (``<bos> A B f S f ?`` -> the name that is not the subject; counterfactual
  prompts replace the subject by a third name), trained normally;
- ``planted_circuit_llama``: the same task, trained so that only two heads,
  ``a1.h0`` and ``a1.h1``, carry it (in the spirit of InterpBench's
  interchange-intervention training): every step runs the batch with the
  output of every other head and MLP replaced by its output on the
  counterfactual prompt (the subject replaced by a third name), and only that
  run is trained, so the two heads must carry the task alone (the other nodes
  get no gradient and keep their small random initial weights). The true circuit is every edge
  of MIB's graph into those heads' key and value inputs from the input, and
  from those heads to the logits (see :func:`circuit_edges`). It is verified by
  exact patching: the circuit alone, every other edge patched to the
  counterfactual, keeps the faithfulness printed at the end (written to
  ``task.json``).

Two layers, four heads, hidden size 64; trained in a few minutes on one CPU core.

Usage::

    python benchmarks/train_circuit_models.py             # writes both bundled folders
    python benchmarks/train_circuit_models.py --out /tmp/circuits
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from word_models import two_layer_llama, word_tokenizer

from captum_gim.models.circuit_tasks import NAMES, SPECIALS, names_prompts, vocabulary

SEED = 0
HEADS = 4
CIRCUIT_HEADS = ((1, 0), (1, 1))
MODELS = Path(__file__).resolve().parents[1] / "captum_gim" / "models"


def build_tokenizer() -> PreTrainedTokenizerFast:
    r"""Whitespace word-level tokenizer that prepends ``<bos>`` and pads on the left."""
    return word_tokenizer(vocabulary())


def build_model(seed: int) -> LlamaForCausalLM:
    r"""A freshly initialised two-layer Llama (seeded)."""
    return two_layer_llama(vocabulary(), seed, HEADS)


def _ablation_hooks(model: LlamaForCausalLM, store: dict[str, Tensor], record: bool) -> list[Any]:
    """Records (record=True) or replaces every non-circuit head and MLP output."""
    handles = []
    dim = model.config.hidden_size // HEADS
    for layer, block in enumerate(model.model.layers):
        keep = [h for (at, h) in CIRCUIT_HEADS if at == layer]

        def heads(_: Any, args: tuple[Tensor, ...], layer: int = layer, keep: list = keep) -> Any:
            key = f"z{layer}"
            if record:
                store[key] = args[0].detach()
                return None
            z = store[key].clone()
            for h in keep:
                z[..., h * dim : (h + 1) * dim] = args[0][..., h * dim : (h + 1) * dim]
            return (z,)

        def mlp(_: Any, __: Any, output: Tensor, layer: int = layer) -> Any:
            key = f"m{layer}"
            if record:
                store[key] = output.detach()
                return None
            return store[key]

        handles.append(block.self_attn.o_proj.register_forward_pre_hook(heads))
        handles.append(block.mlp.register_forward_hook(mlp))
    return handles


def _last_logits(model: LlamaForCausalLM, ids: Tensor) -> Tensor:
    return model(ids).logits[:, -1]


def train(steps: int, batch: int, lr: float, planted: bool) -> LlamaForCausalLM:
    r"""Trains on the answer at the last position (and, planted, the ablated run)."""
    model = build_model(SEED + int(planted)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    ce = torch.nn.functional.cross_entropy
    for step in range(steps):
        prompts = names_prompts(batch, seed=SEED * 1_000 + step)
        logits = _last_logits(model, prompts.clean)
        loss = ce(logits, prompts.answer)
        if planted:
            store: dict[str, Tensor] = {}
            other = prompts.corrupted  # the subject replaced by a third name
            handles = _ablation_hooks(model, store, record=True)
            with torch.no_grad():
                _last_logits(model, other)
            for handle in handles:
                handle.remove()
            handles = _ablation_hooks(model, store, record=False)
            ablated = _last_logits(model, prompts.clean)
            for handle in handles:
                handle.remove()
            # Only the run with every other node resampled is trained: the circuit must
            # carry the task alone, and the other nodes' outputs are noise to it.
            loss = ce(ablated, prompts.answer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    return model.eval()


def accuracy(model: LlamaForCausalLM, n: int = 1000) -> float:
    r"""Share of held-out prompts answered with the indirect object."""
    prompts = names_prompts(n, seed=1_000_000)
    with torch.no_grad():
        return float(
            (_last_logits(model, prompts.clean).argmax(-1) == prompts.answer).float().mean()
        )


def circuit_edges() -> list[str]:
    r"""The planted circuit as MIB edge names: the key and value inputs of the two
    heads (from the input) and their outputs to the logits. Their query inputs and
    ``input->logits`` are left out: they read the last position, which the
    counterfactual never changes, so no method can see them (their exact scores
    are 0)."""
    edges = [f"input->a{at}.h{h}<{c}>" for at, h in CIRCUIT_HEADS for c in "kv"]
    return edges + [f"a{at}.h{h}->logits" for at, h in CIRCUIT_HEADS]


def circuit_faithfulness(model: LlamaForCausalLM, n: int = 200) -> float:
    r"""Faithfulness of the planted circuit with every other edge patched (exact)."""
    from captum_gim.circuits import EdgeResult, evaluate_circuits
    from captum_gim.circuits.graph import find_edge_sites

    prompts = names_prompts(n, seed=2_000_000)
    sites = find_edge_sites(model, prompts.clean)
    graph = sites.graph
    edges = EdgeResult(
        method="planted",
        upstream=graph.upstream,
        downstream=graph.downstream,
        scores=torch.zeros(graph.n_upstream, graph.n_downstream),
        mask=graph.real_edges(),
        config=graph.to_config(model.config.hidden_size),
    )
    truth = edges.mask_of(circuit_edges())
    edges.scores = truth.float()
    fraction = 100 * int(truth.sum()) / int(edges.mask.sum()) + 1e-9
    curve = evaluate_circuits(
        model, edges, prompts.clean, prompts.corrupted, prompts.metric, percentages=(fraction, 100)
    )
    return float(curve.faithfulness[0])


def save(model: LlamaForCausalLM, out: Path, task: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer().save_pretrained(out)
    (out / "task.json").write_text(json.dumps(task, indent=1) + "\n")
    for p in out.iterdir():
        p.chmod(0o644)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=MODELS)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--only", choices=("ioi_llama", "planted_circuit_llama"), default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = {"task": "names", "names": NAMES, "specials": list(SPECIALS)}
    for name, planted in (("ioi_llama", False), ("planted_circuit_llama", True)):
        if args.only not in (None, name):
            continue
        start = time.perf_counter()
        model = train(args.steps, args.batch_size, args.lr, planted)
        task: dict[str, Any] = {**base, "accuracy": accuracy(model)}
        if planted:
            task["circuit_edges"] = circuit_edges()
            task["circuit_faithfulness"] = circuit_faithfulness(model)
        print(f"{name}: trained in {time.perf_counter() - start:.1f}s; {task}")
        save(model, args.out / name, task)


if __name__ == "__main__":
    main()
