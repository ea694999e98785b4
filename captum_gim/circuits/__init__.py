r"""
Circuits: which attention heads, MLPs and residual-stream positions carry a
behaviour.

- :func:`attribution_patching`: one forward pass per prompt and one backward
  pass estimate every component's effect, with GIM gradients (``"gim"``), plain
  gradients (``"atp"``) or AtP* (``"atp*"``).
- :func:`activation_patching`: the exact effects, one component at a time.
- :func:`correlation`: Pearson and Spearman per component type, to score an
  estimate against activation patching.
- :func:`edge_attribution_patching`: scores of the edges of MIB's circuit
  graph (EAP, GIM, EAP-IG, exact), gradient on the clean run.
- :func:`evaluate_circuits`: MIB's faithfulness curve of the top-edge circuits,
  CPR and CMD; :func:`auroc` against a known circuit.

Examples::

    >>> from captum_gim.circuits import activation_patching, attribution_patching, correlation
    >>> gim = attribution_patching(model, clean_ids, corrupted_ids, metric)
    >>> truth = activation_patching(model, clean_ids, corrupted_ids, metric)
    >>> correlation(gim, truth)
"""

from captum_gim.circuits.components import Components, Layer, find_components
from captum_gim.circuits.edge_result import EdgeResult
from captum_gim.circuits.edges import edge_attribution_patching
from captum_gim.circuits.evaluation import CircuitCurve, auroc, evaluate_circuits, prune
from captum_gim.circuits.graph import Graph
from captum_gim.circuits.patching import activation_patching, attribution_patching
from captum_gim.circuits.result import CircuitResult, correlation

__all__ = [
    "CircuitCurve",
    "CircuitResult",
    "Components",
    "EdgeResult",
    "Graph",
    "Layer",
    "activation_patching",
    "attribution_patching",
    "auroc",
    "correlation",
    "edge_attribution_patching",
    "evaluate_circuits",
    "find_components",
    "prune",
]
