r"""MIB-style circuit localization on the bundled models: edge scores from
``gim``, ``eap``, ``eap-ig-inputs``, ``eap-ig-activations`` and ``exact``,
judged by MIB's faithfulness curve (CPR, higher is better; CMD, lower is
better) and, where the true circuit is known, AUROC.

Tasks (attribution prompts and evaluation prompts are disjoint, as in MIB):

- redundant-evidence Llama: two evidence words swapped to the other polarity;
  metric: logit of the clean answer minus the other answer;
- induction Llama: the earlier copy of the answer replaced by an unused symbol;
  metric: logit of the answer minus the replacement;
- IOI-style names Llama and the planted-circuit Llama
  (:mod:`captum_gim.models.circuit_tasks`): the subject replaced by a third
  name; metric: logit of the indirect object minus the subject.

Run by ``python benchmarks/circuits.py`` (section ``circuit-edges`` of
``benchmarks/RESULTS.md``) or alone: ``python benchmarks/circuit_edges.py [--fast]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import results
import torch
from torch import Tensor, nn

from captum_gim.circuits import auroc, edge_attribution_patching, evaluate_circuits

SECTION = "circuit-edges"
METHODS = ("gim", "eap", "eap-ig-inputs", "eap-ig-activations", "exact")
STEPS = 5


@dataclass
class EdgeTask:
    r"""A model, attribution and evaluation prompt pairs, a metric per split."""

    name: str
    model: nn.Module
    attribute: tuple[Any, Any, Callable[[Tensor], Tensor]]
    evaluate: tuple[Any, Any, Callable[[Tensor], Tensor]]
    truth: list[str] | None = None


def _bundled_split(n: int, seed: int) -> tuple[Any, Any, Callable[[Tensor], Tensor]]:
    import circuits

    task = circuits.bundled_task(n, seed=2_000_000 + 100_000 * seed)
    return task.clean, task.corrupted, task.metric


def _induction_split(n: int, seed: int) -> tuple[Any, Any, Callable[[Tensor], Tensor]]:
    import circuits

    task = circuits.induction_task(n, seed=3_000_000 + 100_000 * seed)
    return task.clean, task.corrupted, task.metric


def _names_split(n: int, seed: int) -> tuple[Any, Any, Callable[[Tensor], Tensor]]:
    from captum_gim.models.circuit_tasks import names_prompts

    prompts = names_prompts(n, seed=10_000_000 + seed)
    return prompts.clean, prompts.corrupted, prompts.metric


def tasks(n: int) -> list[EdgeTask]:
    r"""The four bundled models' tasks, ``n`` attribution and ``n`` evaluation prompts."""
    import circuits

    from captum_gim.models import load_model
    from captum_gim.models.circuit_tasks import planted_circuit

    bundled = circuits.bundled_task(n)
    out = [
        EdgeTask(
            "redundant-evidence Llama",
            bundled.model,
            (bundled.clean, bundled.corrupted, bundled.metric),
            _bundled_split(n, 1),
        ),
    ]
    induction = load_model("induction_llama", attn_implementation="sdpa")[0]
    out.append(
        EdgeTask("induction Llama", induction, _induction_split(n, 0), _induction_split(n, 1))
    )
    names = load_model("ioi_llama", attn_implementation="sdpa")[0]
    out.append(EdgeTask("IOI-style names Llama", names, _names_split(n, 0), _names_split(n, 1)))
    planted = load_model("planted_circuit_llama", attn_implementation="sdpa")[0]
    out.append(
        EdgeTask(
            "planted-circuit Llama",
            planted,
            _names_split(n, 2),
            _names_split(n, 3),
            planted_circuit(),
        )
    )
    return out


def run(task: EdgeTask) -> list[dict[str, Any]]:
    r"""Scores and evaluates every method on one task."""
    rows = []
    clean, corrupted, metric = task.attribute
    e_clean, e_corrupted, e_metric = task.evaluate
    for method in METHODS:
        start = time.perf_counter()
        edges = edge_attribution_patching(
            task.model, clean, corrupted, metric, method=method, steps=STEPS, max_batch_size=512
        )
        seconds = time.perf_counter() - start
        curve = evaluate_circuits(
            task.model, edges, e_clean, e_corrupted, e_metric, max_batch_size=512
        )
        rows.append(
            {
                "task": task.name,
                "method": method,
                "cpr": curve.cpr,
                "cmd": curve.cmd,
                "auroc": None if task.truth is None else auroc(edges, task.truth),
                "seconds": seconds,
                "edges": int(edges.mask.sum()),
                "curve": curve,
            }
        )
        print(f"  {task.name} {method}: CPR {curve.cpr:.3f} CMD {curve.cmd:.3f}", flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    r"""The markdown table of all rows."""
    lines = [
        "| model | method | CPR (higher better) | CMD (lower better) | AUROC | scoring time (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        a = "" if r["auroc"] is None else f"{r['auroc']:.3f}"
        lines.append(
            f"| {r['task']} | {r['method']} | {r['cpr']:.3f} | {r['cmd']:.3f} | {a} | "
            f"{r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def notes(rows: list[dict[str, Any]]) -> str:
    r"""Plain-language notes: where GIM's CPR/CMD beat EAP's and EAP-IG's, and where not."""
    out = []
    wins = 0
    for name in dict.fromkeys(r["task"] for r in rows):
        mine = {r["method"]: r for r in rows if r["task"] == name}
        gim = mine["gim"]
        rivals = {m: mine[m] for m in ("eap", "eap-ig-inputs", "eap-ig-activations")}
        cpr_rival = max(rivals, key=lambda m: rivals[m]["cpr"])
        cmd_rival = min(rivals, key=lambda m: rivals[m]["cmd"])
        cpr_ok = gim["cpr"] >= rivals[cpr_rival]["cpr"]
        cmd_ok = gim["cmd"] <= rivals[cmd_rival]["cmd"]
        wins += cpr_ok and cmd_ok
        parts = [
            f"CPR {gim['cpr']:.3f} {'>=' if cpr_ok else '<'} {cpr_rival}'s "
            f"{rivals[cpr_rival]['cpr']:.3f}",
            f"CMD {gim['cmd']:.3f} {'<=' if cmd_ok else '>'} {cmd_rival}'s "
            f"{rivals[cmd_rival]['cmd']:.3f}",
        ]
        verdict = "meets the target" if cpr_ok and cmd_ok else "misses the target"
        line = (
            f"- {name}: GIM {verdict} ({'; '.join(parts)}; exact patching CPR "
            f"{mine['exact']['cpr']:.3f}, CMD {mine['exact']['cmd']:.3f})."
        )
        if any(f > 1 for r in mine.values() for f in r["curve"].faithfulness):
            line += (
                " Some circuits here are more faithful than the full model (faithfulness > 1), "
                "which CPR rewards and CMD penalises; CMD is the fairer measure here."
            )
        if gim["auroc"] is not None:
            best = max(mine.values(), key=lambda r: r["auroc"])
            line += f" AUROC: GIM {gim['auroc']:.3f}, best {best['method']} {best['auroc']:.3f}."
        out.append(line)
    head = (
        f"Target (GIM's CPR at least EAP's and both EAP-IG's, and its CMD at most theirs, on "
        f"at least two bundled models): met on {wins} of {len(out)} models. Scoring times are "
        "on a CPU shared with other jobs, so they are rough."
    )
    return "\n".join([head, "", *out])


def section(rows: list[dict[str, Any]], n: int, minutes: float) -> str:
    r"""The RESULTS.md section."""
    body = (
        "## Circuits: edges on MIB's graph (CPR, CMD, AUROC)\n\n"
        "`python benchmarks/circuits.py` (or `benchmarks/circuit_edges.py`). Edges of MIB's "
        "graph (input, heads, MLPs -> q/k/v inputs of later heads, later MLPs, logits) scored "
        f"on {n} prompt pairs with the gradient on the clean run (EAP-IG with {STEPS} steps), "
        f"then circuits of the top 0.1 .. 100 % edges (absolute scores, pruned as MIB prunes) "
        f"evaluated on {n} other pairs with every other edge patched to the counterfactual: "
        "faithfulness `(m(circuit) - m(empty)) / (m(full) - m(empty))`, CPR = area under it, "
        "CMD = area between it and 1 (MIB's definitions, linear x in fractions of edges). "
        "AUROC: edge scores against the planted circuit. `exact` patches one edge at a time "
        "(the reference, not a competitor). Scoring time excludes the evaluation.\n\n"
        f"{table(rows)}\n\n{notes(rows)}\n\n"
        f"Machine: {results.machine_description(shared=True)}. The run took {minutes:.1f} minutes."
    )
    return results.section(SECTION, body)


LAYER_SECTION = "circuit-layers"


def layer_section(n: int) -> str:
    r"""The GIM paper's layer experiment on the bundled models with a one-token answer."""
    import circuits

    from captum_gim.circuits.layers import LAYER_METHODS
    from captum_gim.metrics import layer_faithfulness
    from captum_gim.models import load_model
    from captum_gim.models.circuit_tasks import names_prompts

    cases = []
    bundled = circuits.bundled_task(n)
    ids, mask = bundled.clean["input_ids"], bundled.clean["attention_mask"]
    full = mask.bool().all(1)  # the experiment runs unpadded prompts
    rows = torch.arange(len(ids))
    with torch.no_grad():
        answers = bundled.model(input_ids=ids).logits[rows, -1].argmax(-1)
    cases.append(("redundant-evidence Llama", bundled.model, ids[full], answers[full]))
    prompts = names_prompts(n, seed=20_000_000)
    for name, title in (
        ("ioi_llama", "IOI-style names Llama"),
        ("induction_llama", "induction Llama"),
    ):
        model = load_model(name, attn_implementation="sdpa")[0]
        if name == "ioi_llama":
            cases.append((title, model, prompts.clean, prompts.answer))
        else:
            task = circuits.induction_task(n, seed=20_000_000)
            with torch.no_grad():
                top = model(**task.clean).logits[:, -1].argmax(-1)
            cases.append((title, model, task.clean["input_ids"], top))
    lines = [
        "| model | layer | " + " | ".join(f"{m} comp. / suff." for m in LAYER_METHODS) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in LAYER_METHODS) + " |",
    ]
    for title, model, ids, answers in cases:
        start = time.perf_counter()
        found = layer_faithfulness(model, ids, answers, steps=50)
        for layer in range(len(found[0].comprehensiveness)):
            cells = " | ".join(
                f"{r.comprehensiveness[layer]:.3f} / {r.sufficiency[layer]:.3f}" for r in found
            )
            lines.append(f"| {title} | {layer} | {cells} |")
        print(f"  layers {title}: {time.perf_counter() - start:.0f}s", flush=True)
    body = (
        "## Circuits: the GIM paper's layer experiment\n\n"
        "`captum_gim.metrics.layer_faithfulness` (run by `python benchmarks/circuits.py`): "
        "for each layer, the residual-stream positions the block reads are scored by "
        "`(x - sequence mean) . gradient of the answer logit` (AtP: plain gradient; GIM: under "
        "the rules; IG: 50 points from x to the mean), then replaced by the sequence mean at "
        "that layer, top first (comprehensiveness, normalised AOPC over up to 50 positions, "
        "higher is better) or keeping only the top ones (sufficiency, 50..99 % replaced, lower "
        "is better); first and last positions are never replaced (the authors' "
        "`evaluate_layers.py`). AtP* is not included. Answer: the model's top token at the "
        f"last position (names task: the indirect object); up to {n} unpadded prompts.\n\n"
        + "\n".join(lines)
    )
    return results.section(LAYER_SECTION, body)


def main(argv: list[str] | None = None, out: Path | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="a few examples, temporary output")
    parser.add_argument("--out", type=Path, default=None, help="RESULTS.md to write")
    args = parser.parse_args(argv)
    n = 4 if args.fast else 64
    path = (
        out
        or args.out
        or (Path(tempfile.mkdtemp()) / "RESULTS.md" if args.fast else results.RESULTS_FILE)
    )
    start = time.perf_counter()
    rows = [row for task in tasks(n) for row in run(task)]
    text = section(rows, n, (time.perf_counter() - start) / 60)
    print(text)
    results.write_section(path, text)
    layers = layer_section(n)
    print(layers)
    results.write_section(path, layers)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
