"""The forward-pass audit: every softmax, normalization and product, accounted for.

The rule sites of :mod:`~captum_gim.sites.discovery` are found from how a
model is built. The audit checks them against what the model computes: one
forward pass, run once per model on the first call's real inputs (without the
rules), under a thread-local :class:`~torch.overrides.TorchFunctionMode` (the
machinery of :mod:`~captum_gim.sites.attention.traced`) and a module stack
kept by hooks that are removed when it ends. It accounts for:

- every ``softmax`` / ``log_softmax`` and attention function
  (``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward``): an
  attention softmax, read from its data flow (a softmax of a product of two
  activations whose output multiplies a third), must lie in an attention rule
  site; any other softmax (a router, the target's log-probability) keeps its
  exact gradient by design;
- every normalization computation: a functional norm (``F.layer_norm``,
  ``F.rms_norm``, ...) or a product or division of an activation by a
  statistic of one (``mean``, ``var``, ``std``, ``norm``, ``rsqrt``) must lie in
  a frozen-norm site; otherwise it is a norm of unknown form;
- every product of two tensors that both depend on the input: ``q k^T`` and
  ``p v`` inside an attention site, ``act(gate) * up`` inside a gated-MLP site,
  or a gated MLP recognised here by its data flow (``down(act(a(x)) * b(x))``,
  whatever its parts are called, also ``x @ W_gate``), which then gets the
  split (:mod:`~captum_gim.sites.gated_mlp.traced`); the products GIM keeps
  exact by design (GIM_SPEC.md, "Products and softmaxes the rules do not name")
  are listed with their kind (:data:`EXACT_KINDS`); a matrix product of two
  activations that is not softmax attention (linear attention) is refused.

Elementwise self-products of one activation (``x * sigmoid(x)``, GELU's
polynomial) are activation functions, not interactions, and are not listed.
A part is refused only for a rule that is switched on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import weakref
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from captum_gim.config import GIMConfig
from captum_gim.sites.attention.routed import attention_implementation, route_attention
from captum_gim.sites.attention.traced import _is_activation
from captum_gim.sites.discovery import Problem, rule_is_on

F = nn.functional

#: Kinds of products and softmaxes kept exact by design, and why.
EXACT_KINDS: dict[str, str] = {
    "routing weights x expert outputs": (
        "a mixture-of-experts router's weights times its experts' outputs: the rules "
        "name no split there (GIM_SPEC.md), so its exact gradient is kept"
    ),
    "attention output gate": (
        "an attention output times a gate computed from the hidden state "
        "(o * sigmoid(W x)): not one of the rule-3 products, kept exact"
    ),
    "activation gate": (
        "an activation times a gate act(W h) that is not a gated MLP's up branch "
        "(e.g. a per-layer-input gate): not one of the rule-3 products, kept exact"
    ),
    "product of two activations": (
        "an elementwise product the rules do not name: kept exact by design"
    ),
    "outside the model": (
        "computed by the forward function outside the model (part of the target, e.g. a "
        "pooling or a similarity): the rules act on the model's parts only"
    ),
    "softmax outside attention": (
        "a softmax or log-softmax whose output multiplies no value tensor (a router, "
        "the target's log-probability): rule 1 acts on attention softmaxes only"
    ),
}

_SOFTMAXES: dict[Callable[..., Any], str] = {
    torch.softmax: "softmax",
    F.softmax: "softmax",
    Tensor.softmax: "softmax",
    torch.special.softmax: "softmax",
    torch.log_softmax: "log_softmax",
    F.log_softmax: "log_softmax",
    Tensor.log_softmax: "log_softmax",
    torch.special.log_softmax: "log_softmax",
}
_ATTENTION_FUNCTIONS: dict[Callable[..., Any], str] = {
    F.scaled_dot_product_attention: "scaled_dot_product_attention",
    F.multi_head_attention_forward: "multi_head_attention_forward",
}
_NORM_FUNCTIONS: dict[Callable[..., Any], str] = {
    F.layer_norm: "layer_norm",
    F.group_norm: "group_norm",
    F.instance_norm: "instance_norm",
    F.normalize: "normalize",
}
if hasattr(F, "rms_norm"):
    _NORM_FUNCTIONS[F.rms_norm] = "rms_norm"
_STATISTICS = {
    torch.mean,
    Tensor.mean,
    torch.var,
    Tensor.var,
    torch.std,
    Tensor.std,
    torch.var_mean,
    torch.std_mean,
    torch.norm,
    Tensor.norm,
    torch.linalg.vector_norm,
    torch.linalg.norm,
    torch.rsqrt,
    Tensor.rsqrt,
}
_MULTIPLY = {
    torch.mul,
    Tensor.mul,
    Tensor.mul_,
    Tensor.__mul__,
    Tensor.__rmul__,
    Tensor.__imul__,
    torch.multiply,
}
_DIVIDE = {torch.div, Tensor.div, Tensor.div_, Tensor.__truediv__, Tensor.__itruediv__}
_CONTRACTIONS: dict[Callable[..., Any], tuple[tuple[int, str], tuple[int, str]]] = {
    torch.matmul: ((0, "input"), (1, "other")),
    Tensor.matmul: ((0, "input"), (1, "other")),
    Tensor.__matmul__: ((0, "input"), (1, "other")),
    Tensor.__rmatmul__: ((1, "other"), (0, "input")),
    torch.bmm: ((0, "input"), (1, "mat2")),
    torch.mm: ((0, "input"), (1, "mat2")),
    Tensor.bmm: ((0, "input"), (1, "mat2")),
    Tensor.mm: ((0, "input"), (1, "mat2")),
    torch.baddbmm: ((1, "batch1"), (2, "batch2")),
    Tensor.baddbmm: ((1, "batch1"), (2, "batch2")),
    torch.addmm: ((1, "mat1"), (2, "mat2")),
    Tensor.addmm: ((1, "mat1"), (2, "mat2")),
    F.linear: ((0, "input"), (1, "weight")),
}
_NONLINEAR = {
    F.silu,
    F.gelu,
    F.relu,
    F.mish,
    F.elu,
    F.selu,
    F.softplus,
    F.leaky_relu,
    torch.sigmoid,
    Tensor.sigmoid,
    torch.tanh,
    Tensor.tanh,
    torch.relu,
    Tensor.relu,
    F.sigmoid,
    F.tanh,
}
#: Autograd nodes searched between an operand and a statistic, projection or router.
_NEAR = 12
#: Autograd nodes searched between attention scores and their product, or
#: between a value product's operand and its softmax (within one module call).
_ATTENTION_REACH = 64


@dataclass(frozen=True)
class AuditEntry:
    r"""One softmax, normalization or product of the audited forward pass."""

    #: The innermost module computing it (``"<forward>"`` outside the model).
    module: str
    #: Its class name.
    module_class: str
    #: The torch operation, e.g. ``"softmax"`` or ``"mul"``.
    operation: str
    #: What it is: ``"attention"``, ``"norm"``, ``"gated product"``, or a key of
    #: :data:`EXACT_KINDS`, or what was refused.
    kind: str
    #: ``"covered"`` (a rule site applies a rule), ``"exact"`` (kept exact by
    #: design) or ``"refused"``.
    status: str
    #: Why, in words.
    reason: str
    #: The rule that would have to act here (``"norm"``, ``"attention"`` or
    #: ``"mlp"``): a refused entry is reported only while that rule is on.
    rule: str = ""


@dataclass
class Audit:
    r"""What the audited forward pass computes, and how GIM accounts for it."""

    entries: list[AuditEntry] = field(default_factory=list)
    #: Modules recognised as gated MLPs by their data flow (name, module).
    traced_gated_mlps: list[tuple[str, nn.Module]] = field(default_factory=list)
    #: Whether any operation depended on the input (else nothing was audited:
    #: the inputs needed ``requires_grad`` or to pass through an ``nn.Embedding``).
    inputs_seen: bool = True

    def refused(self, config: GIMConfig | None = None) -> list[AuditEntry]:
        r"""
        Args:
            config (GIMConfig, optional): Only parts refused for a rule it
                        switches on. None: every refused part.
                        Default: None

        Returns:
            *list[AuditEntry]*: the refused parts, one entry per module and operation.
        """
        found = [e for e in self.entries if e.status == "refused"]
        if config is not None:
            found = [e for e in found if rule_is_on(e.rule, config)]
        return _unique(found)

    def exact(self) -> list[AuditEntry]:
        r"""
        Returns:
            *list[AuditEntry]*: the products and softmaxes kept exact by design,
            one entry per module, operation and kind.
        """
        return _unique([e for e in self.entries if e.status == "exact"])

    def problems(self) -> list[Problem]:
        r"""
        Returns:
            *list[Problem]*: one per refused part, with the rule it concerns
            (reported only while that rule is on, see
            :func:`~captum_gim.sites.discovery.report_problems`).
        """
        return [
            Problem(e.rule, f"'{e.module}' ({e.module_class}) computes {e.operation}: {e.reason}")
            for e in self.refused()
        ]


def _unique(entries: Iterable[AuditEntry]) -> list[AuditEntry]:
    seen: dict[tuple[str, str, str, str], AuditEntry] = {}
    for entry in entries:
        seen.setdefault((entry.module, entry.operation, entry.kind, entry.status), entry)
    return list(seen.values())


@dataclass(frozen=True)
class _Call:
    """One module call on the audit's module stack."""

    name: str
    module_class: str
    serial: int


#: Where an operation outside every module of the model is listed.
_OUTSIDE = _Call("<forward>", "function", -1)


@dataclass
class _Softmax:
    node: Any
    calls: tuple[_Call, ...]
    operation: str
    attention: bool
    complete: bool = False


class SiteCoverage:
    r"""Which module names each rule covers, read from every field of a
    :class:`~captum_gim.sites.discovery.RuleSites` (so that sites added by an
    adapter in a field of its own count as coverage): fields whose name
    mentions ``norm`` cover normalizations, ``attention`` attention, and
    ``gated`` or ``mlp`` gated products."""

    def __init__(self, sites: Any) -> None:
        self.norms: set[str] = set()
        self.attentions: set[str] = set()
        self.gated: set[str] = set()
        for item in dataclasses.fields(sites):
            value = getattr(sites, item.name)
            if not isinstance(value, list):
                continue
            names = {n for n in (_site_name(v) for v in value) if n is not None}
            if "norm" in item.name:
                self.norms |= names
            elif "attention" in item.name:
                self.attentions |= names
            elif "gated" in item.name or "mlp" in item.name:
                self.gated |= names

    def covers(self, names: set[str], calls: Sequence[_Call]) -> bool:
        return any(call.name in names for call in calls)


def _site_name(site: Any) -> str | None:
    if isinstance(site, tuple) and site and isinstance(site[0], str):
        return site[0]
    name = getattr(site, "name", None)
    return name if isinstance(name, str) else None


class _AuditTrace(TorchFunctionMode):
    """Records the softmaxes, normalizations and products of one forward pass."""

    def __init__(self, coverage: SiteCoverage, calls: list[_Call]) -> None:
        super().__init__()
        self.coverage = coverage
        self.calls = calls
        self.entries: list[AuditEntry] = []
        self.activation_memo: dict[int, tuple[Any, bool]] = {}
        #: q k^T candidates: node -> module calls.
        self.contractions: dict[int, tuple[Any, tuple[_Call, ...]]] = {}
        self.softmaxes: dict[int, _Softmax] = {}
        #: statistic node -> the module calls computing it.
        self.statistics: dict[int, tuple[_Call, ...]] = {}
        self.nonlinear: set[int] = set()
        #: projection node -> (its input's key, the node).
        self.projections: dict[int, tuple[int, Any]] = {}
        self.attention_outputs: set[int] = set()
        self.routers: set[int] = set()
        #: gated products waiting for their down projection: node -> call of the product.
        self.pending_gated: dict[int, _Call] = {}
        self.gated_calls: dict[str, _Call] = {}
        self.keep: list[Any] = []
        #: How many operands computed from the input were seen.
        self.dependent = 0

    # ------------------------------------------------------------------ dispatch

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        try:
            self._record(func, args, kwargs, output)
        except Exception as error:  # never breaks the forward; never skipped silently
            name = getattr(func, "__name__", str(func))
            reason = f"the audit could not read this operation ({type(error).__name__}: {error})"
            self._entry(name, "unreadable", "refused", reason)
        return output

    def _record(
        self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], output: Any
    ) -> None:
        if func in _SOFTMAXES:
            self._softmax(_SOFTMAXES[func], args, kwargs, output)
        elif func in _ATTENTION_FUNCTIONS:
            self._attention_function(_ATTENTION_FUNCTIONS[func], args, output)
        elif func in _NORM_FUNCTIONS:
            x = args[0] if args else kwargs.get("input")
            if self._depends(x):
                self._norm(_NORM_FUNCTIONS[func])
        elif func in _STATISTICS:
            x = args[0] if args else kwargs.get("input")
            if self._depends(x):
                for node in _nodes(output):
                    self.statistics[id(node)] = self._here()
                    self.keep.append(node)
        elif func in _MULTIPLY or func in _DIVIDE:
            self._elementwise(func, args, kwargs, output)
        elif func in _NONLINEAR:
            self._mark(self.nonlinear, output)
        elif func is torch.topk or func is Tensor.topk:
            self._mark(self.routers, output)
        elif func in _CONTRACTIONS or func is torch.einsum:
            self._contraction(func, args, kwargs, output)

    def _mark(self, nodes: set[int], output: Any) -> None:
        for node in _nodes(output):
            nodes.add(id(node))
            self.keep.append(node)

    # ------------------------------------------------------------------ helpers

    def _depends(self, x: Any) -> bool:
        """True for a tensor computed from the input (not from parameters alone)."""
        found = depends_on_input(x, self.activation_memo)
        self.dependent += found
        return found

    def _here(self) -> tuple[_Call, ...]:
        return tuple(self.calls)

    def _entry(
        self,
        operation: str,
        kind: str,
        status: str,
        reason: str,
        rule: str = "",
        call: _Call | None = None,
    ) -> None:
        top = call or (self.calls[-1] if self.calls else _OUTSIDE)
        self.entries.append(
            AuditEntry(top.name, top.module_class, operation, kind, status, reason, rule)
        )

    def _within_call(self, calls: tuple[_Call, ...]) -> bool:
        """True when ``calls`` ran inside the current innermost module call."""
        return not self.calls or self.calls[-1] in calls

    def _in_finished_norm(self, calls: tuple[_Call, ...]) -> bool:
        """True when ``calls`` ran inside a frozen-norm site's call that has returned:
        its statistic belongs to that (covered) norm, and a later product of the
        norm's output (a gate on it, e.g. ``norm(x) * sigmoid(W norm(x))``) is not a
        normalization."""
        return any(c.name in self.coverage.norms and c not in self.calls for c in calls)

    # ------------------------------------------------------------------ events

    def _softmax(
        self, operation: str, args: Sequence[Any], kwargs: dict[str, Any], output: Any
    ) -> None:
        scores = args[0] if args else kwargs.get("input")
        if not isinstance(scores, Tensor) or not self._depends(scores):
            return
        if not isinstance(output, Tensor):
            return
        candidates = {k for k, (_, calls) in self.contractions.items() if self._within_call(calls)}
        attention = reach(scores.grad_fn, candidates, _ATTENTION_REACH) is not None
        softmax = _Softmax(output.grad_fn, self._here(), operation, attention)
        if output.grad_fn is not None:
            self.softmaxes[id(output.grad_fn)] = softmax
            self.keep.append(output.grad_fn)
            if not attention:
                self.routers.add(id(output.grad_fn))

    def _attention_function(self, operation: str, args: Sequence[Any], output: Any) -> None:
        if not any(self._depends(x) for x in args[:3]):
            return
        self._attention(operation)
        first = output[0] if isinstance(output, tuple) else output
        self._mark(self.attention_outputs, first)

    def _attention(self, operation: str) -> None:
        if not self.calls:
            self._exact(operation, "outside the model")
        elif self.coverage.covers(self.coverage.attentions, self.calls):
            self._entry(operation, "attention", "covered", "rule 1 and the q/k/v split")
        else:
            self._entry(
                operation,
                "attention",
                "refused",
                "softmax attention outside every attention rule site, so rules 1 and 3 "
                "would not reach it",
                "attention",
            )

    def _norm(self, operation: str) -> None:
        if not self.calls:
            self._exact(operation, "outside the model")
        elif self.coverage.covers(self.coverage.norms, self.calls):
            self._entry(operation, "norm", "covered", "frozen norm (rule 2)")
        else:
            self._entry(
                operation,
                "norm",
                "refused",
                "a normalization (an activation divided by a statistic of one) outside "
                "every norm the rules recognise, so rule 2 would not freeze it; if it is a "
                "norm layer, describe its class with captum_gim.register_norm",
                "norm",
            )

    def _contraction(
        self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], output: Any
    ) -> None:
        x, operands = projection_input(func, args, kwargs, self.activation_memo)
        if operands is None or not isinstance(output, Tensor) or output.grad_fn is None:
            return
        if x is not None:
            self.projections[id(output.grad_fn)] = (_key(x), output.grad_fn)
            self.keep.append(output.grad_fn)
            self._confirm_gated(x)
            return
        if not all(self._depends(operand) for operand in operands):
            return
        for operand in operands:
            softmax = self._pending_softmax(operand)
            if softmax is not None:
                softmax.complete = True
                self._attention("softmax(q k^T) v")
                self._mark(self.attention_outputs, output)
                return
        self.contractions[id(output.grad_fn)] = (output.grad_fn, self._here())

    def _pending_softmax(self, operand: Any) -> _Softmax | None:
        if not isinstance(operand, Tensor):
            return None
        candidates = {
            key
            for key, s in self.softmaxes.items()
            if s.attention and not s.complete and self._within_call(s.calls)
        }
        found = reach(operand.grad_fn, candidates, _ATTENTION_REACH)
        return None if found is None else self.softmaxes[found]

    def _elementwise(
        self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], output: Any
    ) -> None:
        if len(args) < 2 or not isinstance(output, Tensor):
            return
        first, second = args[0], args[1]
        if not (self._depends(first) and self._depends(second)):
            return
        operation = "div" if func in _DIVIDE else "mul"
        statistics = {
            k
            for k, calls in self.statistics.items()
            if self._within_call(calls) and not self._in_finished_norm(calls)
        }
        stop = self.projections.keys()
        near_statistic = reach(second.grad_fn, statistics, _NEAR, stop) is not None
        if func in _MULTIPLY:
            near_statistic |= reach(first.grad_fn, statistics, _NEAR, stop) is not None
        if near_statistic:
            self._norm(operation)
            return
        if func in _DIVIDE:
            return
        routers = [reach(x.grad_fn, self.routers, _NEAR, stop) is not None for x in (first, second)]
        if any(routers):
            self._exact(operation, "routing weights x expert outputs")
            return
        if self.coverage.covers(self.coverage.gated, self.calls):
            self._entry(operation, "gated product", "covered", "rule 3's gate/up split")
            return
        if _self_product(first, second, self.projections):
            return
        self._product(operation, first, second, output)

    def _product(self, operation: str, first: Tensor, second: Tensor, output: Tensor) -> None:
        calls = self.calls
        gated = self._gated_pattern(first, second)
        if gated and calls and output.grad_fn is not None:
            self.pending_gated[id(output.grad_fn)] = calls[-1]
            self.keep.append(output.grad_fn)
            return
        stop = self.projections.keys()
        outputs = [reach(x.grad_fn, self.attention_outputs, _NEAR, stop) for x in (first, second)]
        if any(found is not None for found in outputs):
            self._exact(operation, "attention output gate")
            return
        gates = [reach(x.grad_fn, self.nonlinear, 2) is not None for x in (first, second)]
        self._exact(operation, "activation gate" if any(gates) else "product of two activations")

    def _exact(self, operation: str, kind: str, call: _Call | None = None) -> None:
        self._entry(operation, kind, "exact", EXACT_KINDS[kind], call=call)

    def _gated_pattern(self, first: Tensor, second: Tensor) -> bool:
        return gated_factors(first, second, self.projections, self.nonlinear) is not None

    def _confirm_gated(self, x: Tensor) -> None:
        if not self.pending_gated:
            return
        found = reach(x.grad_fn, set(self.pending_gated), _NEAR)
        if found is None:
            return
        call = self.pending_gated.pop(found)
        self.gated_calls.setdefault(call.name, call)
        reason = "rule 3's gate/up split (recognised by data flow)"
        self._entry("mul", "gated product", "covered", reason, call=call)

    def finish(self) -> None:
        for call in self.pending_gated.values():
            self._exact("mul", "activation gate", call=call)
        for softmax in self.softmaxes.values():
            if softmax.attention and softmax.complete:
                continue
            top = softmax.calls[-1] if softmax.calls else _OUTSIDE
            kind = "softmax outside attention"
            self.entries.append(
                AuditEntry(
                    top.name, top.module_class, softmax.operation, kind, "exact", EXACT_KINDS[kind]
                )
            )
        for _, calls in self.contractions.values():
            if calls and self.coverage.covers(self.coverage.attentions, calls):
                continue
            if not calls:
                self._exact("matmul", "outside the model")
                continue
            top = calls[-1]
            self.entries.append(
                AuditEntry(
                    top.name,
                    top.module_class,
                    "matmul",
                    "token mixer",
                    "refused",
                    "a matrix product of two activations that is not softmax attention "
                    "(linear attention, a state-space mixer, input-dependent mixing "
                    "coefficients): GIM's rules define nothing for it",
                    "attention",
                )
            )


def gated_factors(
    first: Tensor, second: Tensor, projections: dict[int, tuple[int, Any]], nonlinear: set[int]
) -> tuple[int, int] | None:
    r"""
    Reads ``first * second`` as a gated MLP's product ``act(a(x)) * b(x)``.

    Args:
        first (Tensor): The first factor.
        second (Tensor): The second factor.
        projections (dict): Projection nodes (a product of one activation with
                    parameters) of the forward pass, each with its input's key.
        nonlinear (set[int]): The nodes of activation functions.

    Returns:
        *tuple[int, int] or None*: the positions (0 or 1) of the gate and the
        up factor, or None when the factors are not two different projections
        of one input, one of them through an activation.
    """
    found = [reach(x.grad_fn, projections.keys(), _NEAR) for x in (first, second)]
    if found[0] is None or found[1] is None or found[0] == found[1]:
        return None
    if len({projections[node][0] for node in found if node is not None}) != 1:
        return None
    through = [reach(x.grad_fn, nonlinear, 4) is not None for x in (first, second)]
    if not any(through):
        return None
    return (0, 1) if through[0] else (1, 0)


def depends_on_input(x: Any, memo: dict[int, tuple[Any, bool]] | None = None) -> bool:
    r"""
    Returns:
        *bool*: True for a tensor computed from the input (it requires grad and
        is not a parameter or computed from parameters alone).
    """
    if not isinstance(x, Tensor) or not x.requires_grad:
        return False
    if x.grad_fn is None:
        return not isinstance(x, nn.Parameter)
    if memo is None:
        return _is_activation(x)
    key = id(x.grad_fn)
    found = memo.get(key)
    if found is None:
        found = (x.grad_fn, _is_activation(x))
        memo[key] = found
    return found[1]


def projection_input(
    func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], memo: dict[int, Any]
) -> tuple[Tensor | None, tuple[Any, Any] | None]:
    r"""
    Returns:
        *tuple*: for a matrix product, the operand computed from the input when
        it is the only one (a projection ``x @ W``), and both operands; ``(None,
        None)`` for other calls.
    """
    operands = _contraction_operands(func, args, kwargs)
    if operands is None:
        return None, None
    active = [depends_on_input(x, memo) for x in operands]
    if active.count(True) == 1:
        x = operands[0] if active[0] else operands[1]
        return x, operands
    return None, operands


def _contraction_operands(
    func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[Any, Any] | None:
    if func is torch.einsum:
        if len(args) != 3 or not isinstance(args[0], str):
            return None
        return args[1], args[2]
    slots = _CONTRACTIONS.get(func)
    if slots is None:
        return None
    values = []
    for position, keyword in slots:
        if position < len(args):
            values.append(args[position])
        elif keyword in kwargs:
            values.append(kwargs[keyword])
        else:
            return None
    return values[0], values[1]


def _nodes(output: Any) -> list[Any]:
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    return [t.grad_fn for t in outputs if isinstance(t, Tensor) and t.grad_fn is not None]


def _key(x: Tensor) -> int:
    return id(x.grad_fn) if x.grad_fn is not None else id(x)


def reach(
    start: Any, targets: Collection[int], limit: int, stop: Collection[int] | None = None
) -> int | None:
    r"""The first node of ``targets`` within ``limit`` autograd nodes of
    ``start``, not searching beyond the nodes of ``stop``."""
    if start is None or not targets:
        return None
    queue, seen = [start], {id(start)}
    for node in queue:
        if id(node) in targets:
            return id(node)
        if len(queue) > limit:
            return None
        if stop is not None and node is not start and id(node) in stop:
            continue
        for parent, _ in node.next_functions:
            if parent is not None and id(parent) not in seen:
                seen.add(id(parent))
                queue.append(parent)
    return None


def _self_product(first: Tensor, second: Tensor, projections: dict[int, Any]) -> bool:
    """True when both factors are elementwise functions of one activation
    (``x * sigmoid(x)``): a common node within a few steps, not beyond a projection."""
    return bool(_local(first.grad_fn, projections) & _local(second.grad_fn, projections))


def _local(start: Any, projections: dict[int, Any], limit: int = 8) -> set[int]:
    if start is None:
        return set()
    queue, seen = [start], {id(start)}
    for node in queue:
        if len(queue) > limit or id(node) in projections:
            continue
        for parent, _ in node.next_functions:
            if parent is not None and id(parent) not in seen and not _is_leaf_node(parent):
                seen.add(id(parent))
                queue.append(parent)
    return seen


def _is_leaf_node(node: Any) -> bool:
    return type(node).__name__ == "AccumulateGrad"


def run_audit(
    model: nn.Module, sites: Any, run: Callable[[], object], seeds: Sequence[nn.Module] = ()
) -> Audit:
    r"""
    Runs one forward pass of ``model`` (without the rules) and accounts for
    every softmax, normalization and product of two input-dependent tensors.

    Args:
        model (nn.Module): The model whose parts are audited.
        sites (RuleSites): Its rule sites.
        run (Callable): Runs the forward pass (e.g. the forward function on the
                    first call's inputs); its result is discarded. Tensors that
                    require grad, and the outputs of every ``nn.Embedding`` and
                    of ``seeds``, count as the input.
        seeds (Sequence[nn.Module], optional): Modules whose outputs are the
                    attributed activations (LayerGIM's layers).
                    Default: ()

    Returns:
        *Audit*: every operation found, and how GIM accounts for it.
    """
    calls: list[_Call] = []
    counter = [0]
    handles = []

    def enter(name: str, module: nn.Module) -> Callable[..., None]:
        label = name or "<model>"
        cls = type(module).__name__

        def hook(*_: Any) -> None:
            counter[0] += 1
            calls.append(_Call(label, cls, counter[0]))

        return hook

    def leave(*_: Any) -> None:
        if calls:
            calls.pop()

    def input_output(_: nn.Module, __: Any, output: Any) -> Any:
        first = output[0] if isinstance(output, tuple) and output else output
        if not isinstance(first, Tensor) or not first.is_floating_point():
            return None
        if depends_on_input(first):
            return None
        # A clone, not the leaf itself: the model may write to it in place.
        first = first.detach().requires_grad_().clone()
        return (first, *output[1:]) if isinstance(output, tuple) else first

    thread = threading.get_ident()
    trace = _AuditTrace(SiteCoverage(sites), calls)
    routed = contextlib.ExitStack()
    # PyTorch's flex_attention has no backward on the CPU and refuses inputs that
    # require grad: such sites run as under the rules (flex's own output as the
    # forward value, the checked eager recomputation for the gradient, which the
    # audit never takes).
    for _, module in getattr(sites, "attentions", ()):
        if attention_implementation(module) == "flex_attention":
            routed.enter_context(route_attention(module, GIMConfig()))
    try:
        for name, module in model.named_modules():
            handles.append(
                module.register_forward_pre_hook(_this_thread(thread, enter(name, module)))
            )
            handles.append(
                module.register_forward_hook(_this_thread(thread, leave), always_call=True)
            )
            if isinstance(module, nn.Embedding) or any(module is seed for seed in seeds):
                handles.append(module.register_forward_hook(input_output))
        # The random state is restored, so that dropout in the real call draws
        # the masks it would draw without the audit.
        cuda = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
        with torch.random.fork_rng(devices=cuda), torch.enable_grad(), trace:
            run()
    finally:
        for handle in handles:
            handle.remove()
        routed.close()
    trace.finish()
    modules = dict(model.named_modules())
    gated = [
        (name, modules["" if name == "<model>" else name])
        for name in trace.gated_calls
        if ("" if name == "<model>" else name) in modules
    ]
    return Audit(trace.entries, gated, inputs_seen=trace.dependent > 0)


def _this_thread(thread: int, hook: Callable[..., None]) -> Callable[..., None]:
    def wrapped(*args: Any) -> None:
        if threading.get_ident() == thread:
            hook(*args)

    return wrapped


#: model -> (the ``problems`` list of the sites it was audited with, the audit).
_audits: weakref.WeakKeyDictionary[nn.Module, tuple[list[Problem], Audit]] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


def cached_audit(model: nn.Module, sites: Any) -> Audit | None:
    r"""
    Returns:
        *Audit or None*: the audit of ``model`` made with these rule sites (the
        cached sites, whatever their ``strict``: a new walk of the model
        invalidates it), or None.
    """
    with _lock:
        found = _audits.get(model)
    if found is None or found[0] is not sites.problems:
        return None
    return found[1]


def store_audit(model: nn.Module, sites: Any, audit: Audit) -> None:
    r"""Keeps ``audit`` for ``model`` while ``sites`` are its cached rule sites
    (not for a model that is itself one of its audited gated MLPs, which the
    weak cache would keep alive)."""
    if any(module is model for _, module in audit.traced_gated_mlps):
        return
    with _lock:
        _audits[model] = (sites.problems, audit)


def clear_audits() -> None:
    r"""Forgets every audit (the next call of each model audits it again)."""
    with _lock:
        _audits.clear()
