"""Rules 1 and 3 inside attention computed with plain torch ops.

Families that predate transformers' AttentionInterface (Bloom, Falcon, GPT-Neo,
MPT, XGLM, OpenAI GPT, ...) compute ``softmax(q k^T) v`` in their attention
module's own forward, with ``matmul``, ``bmm``, ``baddbmm``, ``einsum`` or
``@``, a softmax, or ``F.scaled_dot_product_attention``. For one attribution,
each such module gets a :class:`~torch.overrides.TorchFunctionMode` that is
entered by a forward pre-hook and left by a forward hook that always runs. Torch
function modes are thread-local, so other threads, and this thread outside the
module, are untouched. Inside, the mode reads the attention from its data flow:

1. a product of two activations (neither a parameter nor constant): its row
   operand is ``q`` and its column operand ``k``;
2. a softmax over the last dimension whose input is computed from that product:
   it gets the tempered backward of rule 1;
3. a product one of whose operands is computed from that softmax's output: the
   other operand is ``v``.

When the three are found, ``q``, ``k`` and ``v`` get the gradient scales of
rule 3 at these products, which equals scaling them at their projections since
everything between (head reshapes, rotary embeddings, repeated key/value heads)
is linear. ``F.scaled_dot_product_attention`` is attention by definition and
gets both rules directly. Every op still runs exactly as the model called it,
so the forward is bitwise unchanged. The rules' parameters are only read in the
backward pass, and they are settled when the module's forward returns: a
forward whose data flow is not this pattern (a product that feeds no softmax, a
softmax fed by none, no softmax at all) raises :class:`UnsupportedModuleError`
naming the module before any gradient exists; with ``strict=False`` a warning
names it and its ops keep their exact gradients.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from captum_gim.config import GIMConfig
from captum_gim.rules import (
    Lazy,
    lazy_scale_gradient,
    rule_dtype,
    scale_gradient,
    tempered_attention_backward,
    tempered_softmax_backward,
)
from captum_gim.sites.errors import UnsupportedModuleError
from captum_gim.sites.tracing import trace_each_call

F = nn.functional
# Each product's row and column operands: (position, keyword).
_MATMUL_OPERANDS = ((0, "input"), (1, "other"))
_MM_OPERANDS = ((0, "input"), (1, "mat2"))
_ADDED_OPERANDS = ((1, "batch1"), (2, "batch2"))
_PRODUCTS: dict[Callable[..., Any], tuple[tuple[int, str], tuple[int, str]]] = {
    torch.matmul: _MATMUL_OPERANDS,
    Tensor.matmul: _MATMUL_OPERANDS,
    Tensor.__matmul__: _MATMUL_OPERANDS,
    Tensor.__rmatmul__: ((1, "other"), (0, "input")),
    torch.bmm: _MM_OPERANDS,
    torch.mm: _MM_OPERANDS,
    Tensor.bmm: _MM_OPERANDS,
    Tensor.mm: _MM_OPERANDS,
    torch.baddbmm: _ADDED_OPERANDS,
    Tensor.baddbmm: _ADDED_OPERANDS,
}
_SOFTMAXES = {torch.softmax, F.softmax, Tensor.softmax}
#: How many autograd nodes the data-flow search visits between two ops.
_SEARCH_LIMIT = 256
#: How many autograd nodes may lie between a tensor computed from parameters
#: alone and those parameters.
_PARAMETER_SEARCH_LIMIT = 16
#: How many autograd nodes behind ``q`` and ``k`` count as computing them.
_SOURCE_NODES = 8


class _LazyTemperedSoftmax(torch.autograd.Function):
    """The model's own softmax call; rule 1's backward with a settled ``T``."""

    @staticmethod
    def forward(
        ctx: Any, scores: Tensor, call: Callable[[Tensor], Tensor], temperature: Lazy
    ) -> Tensor:
        ctx.save_for_backward(scores)
        ctx.temperature = temperature
        return call(scores)

    @staticmethod
    def backward(ctx: Any, grad_probs: Tensor) -> tuple[Tensor, None, None]:
        (scores,) = ctx.saved_tensors
        dtype = rule_dtype(scores)
        grad = tempered_softmax_backward(
            scores.to(dtype), grad_probs.to(dtype), ctx.temperature.get()
        )
        return grad.to(scores.dtype), None, None


class _TemperedScaledDotProduct(torch.autograd.Function):
    """The model's own ``F.scaled_dot_product_attention`` call; rule 1's backward."""

    @staticmethod
    def forward(
        ctx: Any,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        call: Callable[[Tensor, Tensor, Tensor], Tensor],
        mask: Tensor | None,
        scaling: float,
        causal: bool,
        temperature: float,
    ) -> Tensor:
        ctx.save_for_backward(query, key, value, mask)
        ctx.scaling, ctx.causal, ctx.temperature = scaling, causal, temperature
        return call(query, key, value)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        query, key, value, mask = ctx.saved_tensors
        grads = tempered_attention_backward(
            query,
            key,
            value,
            mask,
            grad_output,
            scaling=ctx.scaling,
            causal=ctx.causal,
            temperature=ctx.temperature,
        )
        return (*grads, None, None, None, None, None)


@dataclass
class _Product:
    """A product of two activations, waiting to be read as ``q k^T``."""

    node: Any
    #: The autograd nodes that compute ``q`` and ``k`` (up to their projections).
    sources: frozenset[int] = frozenset()
    q_scale: Lazy = field(default_factory=Lazy)
    k_scale: Lazy = field(default_factory=Lazy)


@dataclass
class _Softmax:
    """A softmax of the scores of ``product``, waiting for its ``v``."""

    node: Any
    product: _Product
    temperature: Lazy = field(default_factory=Lazy)
    complete: bool = False


class _AttentionTrace(TorchFunctionMode):
    """Finds ``softmax(q k^T) v`` in one forward call of one attention module."""

    def __init__(self, config: GIMConfig) -> None:
        super().__init__()
        self.config = config
        self.products: list[_Product] = []
        self.softmaxes: list[_Softmax] = []
        self.problems: list[str] = []
        self.attentions = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._scaled_dot_product(func, args, kwargs)
        if func in _SOFTMAXES:
            return self._softmax(func, args, kwargs)
        operands = _Operands.of(func, args, kwargs)
        if operands is None or not all(_is_activation(x) for x in operands.values):
            return func(*args, **kwargs)
        return self._product(func, operands)

    def _product(self, func: Callable[..., Any], operands: _Operands) -> Any:
        rows, columns = operands.values
        for value_slot, probs in ((1, rows), (0, columns)):
            softmax = self._pending_softmax(probs)
            if softmax is not None:
                operands.replace(value_slot, lambda v: scale_gradient(v, self.config.v_scale))
                self._complete(softmax)
                return func(*operands.args, **operands.kwargs)
        product = _Product(node=None, sources=_sources(rows) | _sources(columns))
        operands.replace(0, lambda q: lazy_scale_gradient(q, product.q_scale))
        operands.replace(1, lambda k: lazy_scale_gradient(k, product.k_scale))
        output = func(*operands.args, **operands.kwargs)
        product.node = output.grad_fn
        self.products.append(product)
        return output

    def _softmax(
        self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> Any:
        scores = args[0] if args else kwargs.get("input")
        if not isinstance(scores, Tensor) or not _is_activation(scores):
            return func(*args, **kwargs)
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        product = self._source_product(scores)
        if product is None or dim not in (-1, scores.ndim - 1):
            self.problems.append(
                f"a softmax over dimension {dim} not computed from a product q k^T"
            )
            return func(*args, **kwargs)
        if _reach(scores.grad_fn, product.sources, avoid=product.node) is not None:
            self.problems.append(
                "q or k also enter the attention scores outside q k^T (as DeBERTa's "
                "relative-position terms do), so rule 3's scales of q and k at their "
                "projections cannot be applied at the product"
            )
        softmax = _Softmax(node=None, product=product)
        rest = tuple(args[1:])

        def call(x: Tensor) -> Tensor:
            return func(x, *rest, **{k: v for k, v in kwargs.items() if k != "input"})

        if self.config.softmax_rule_on:
            probs = _LazyTemperedSoftmax.apply(scores, call, softmax.temperature)
        else:
            softmax.temperature.value = 1.0
            probs = call(scores)
        softmax.node = probs.grad_fn
        self.softmaxes.append(softmax)
        return probs

    def _scaled_dot_product(
        self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> Any:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        bound = {**dict(zip(names, args)), **kwargs}
        query, key, value = (bound.pop(name) for name in names[:3])
        mask = bound.get("attn_mask")
        self.attentions += 1
        if bound.get("dropout_p", 0.0) or not set(bound) <= set(names[3:]) | {"enable_gqa"}:
            self.problems.append(
                "F.scaled_dot_product_attention with keywords the tempered backward does "
                f"not implement: {sorted(k for k, v in bound.items() if v)}"
            )
            return func(query, key, value, **bound)
        query = scale_gradient(query, self.config.q_scale)
        key = scale_gradient(key, self.config.k_scale)
        value = scale_gradient(value, self.config.v_scale)

        def call(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return func(q, k, v, **bound)

        if not self.config.softmax_rule_on:
            return call(query, key, value)
        scaling = bound.get("scale") or query.shape[-1] ** -0.5
        causal = bool(bound.get("is_causal", False))
        temperature = float(self.config.temperature)  # type: ignore[arg-type]
        return _TemperedScaledDotProduct.apply(
            query, key, value, call, mask, scaling, causal, temperature
        )

    def _source_product(self, scores: Tensor) -> _Product | None:
        nodes = {id(p.node): p for p in self.products if p.node is not None}
        found = _reach(scores.grad_fn, nodes.keys())
        return None if found is None else nodes[found]

    def _pending_softmax(self, operand: Any) -> _Softmax | None:
        if not self.softmaxes or not isinstance(operand, Tensor):
            return None
        nodes = {id(s.node): s for s in self.softmaxes if s.node is not None}
        found = _reach(operand.grad_fn, nodes.keys())
        return None if found is None else nodes[found]

    def _complete(self, softmax: _Softmax) -> None:
        if not softmax.complete:
            self.attentions += 1
        softmax.complete = True
        product = softmax.product
        product.q_scale.value = self.config.q_scale
        product.k_scale.value = self.config.k_scale
        if softmax.temperature.value is None:
            softmax.temperature.value = float(self.config.temperature or 1.0)

    def settle(self) -> list[str]:
        """Settles every rule parameter; returns what did not form an attention."""
        problems = list(self.problems)
        complete = {id(s.product) for s in self.softmaxes if s.complete}
        for product in self.products:
            if id(product) not in complete:
                problems.append("a product of two activations that feeds no attention softmax")
            for scale in (product.q_scale, product.k_scale):
                if scale.value is None:
                    scale.value = 1.0
        for softmax in self.softmaxes:
            if not softmax.complete:
                problems.append("an attention softmax whose output multiplies no value tensor")
                softmax.temperature.value = 1.0
        if self.attentions == 0 and not problems:
            problems.append("no softmax attention is computed (no q k^T, softmax, v products)")
        return sorted(set(problems))


def _is_activation(x: Any) -> bool:
    """A tensor the gradient flows through that is not computed from parameters
    alone (``weight.T`` in a hand-written linear layer is not an activation)."""
    if not isinstance(x, Tensor) or not x.requires_grad or x.grad_fn is None:
        return False
    queue, seen = [x.grad_fn], {id(x.grad_fn)}
    for node in queue:
        if len(queue) > _PARAMETER_SEARCH_LIMIT:
            return True
        parents = [parent for parent, _ in node.next_functions if parent is not None]
        if not parents and not isinstance(getattr(node, "variable", None), nn.Parameter):
            return True
        for parent in parents:
            if id(parent) not in seen:
                seen.add(id(parent))
                queue.append(parent)
    return False


class _Operands:
    """The row and column operands of one product call, and its arguments."""

    def __init__(self, args: Sequence[Any], kwargs: dict[str, Any], slots: Sequence[Any]) -> None:
        self.args, self.kwargs = list(args), dict(kwargs)
        self.slots = list(slots)

    @classmethod
    def of(
        cls, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> _Operands | None:
        if func is torch.einsum:
            operands = [a for a in args[1:]] if args and isinstance(args[0], str) else []
            positions = _einsum_positions(args[0]) if len(operands) == 2 else None
            return None if positions is None else cls(args, kwargs, positions)
        slots = _PRODUCTS.get(func)
        if slots is None:
            return None
        found: list[int | str] = []
        for position, keyword in slots:
            if position < len(args):
                found.append(position)
            elif keyword in kwargs:
                found.append(keyword)
            else:
                return None
        return cls(args, kwargs, found)

    @property
    def values(self) -> tuple[Any, Any]:
        first, second = (self._get(slot) for slot in self.slots)
        return first, second

    def replace(self, index: int, wrap: Callable[[Tensor], Tensor]) -> None:
        slot = self.slots[index]
        if isinstance(slot, int):
            self.args[slot] = wrap(self.args[slot])
        else:
            self.kwargs[slot] = wrap(self.kwargs[slot])

    def _get(self, slot: int | str) -> Any:
        return self.args[slot] if isinstance(slot, int) else self.kwargs[slot]


def _einsum_positions(equation: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*(\w+)\s*,\s*(\w+)\s*->\s*(\w+)\s*", equation)
    if match is None or len(match.group(3)) < 2:
        return None
    first, second, output = match.groups()
    row, column = output[-2], output[-1]
    if row in first and column in second and row not in second and column not in first:
        return 1, 2
    if row in second and column in first and row not in first and column not in second:
        return 2, 1
    return None


def _sources(operand: Tensor) -> frozenset[int]:
    """The ids of the first :data:`_SOURCE_NODES` autograd nodes that compute
    ``operand`` (its reshapes, scalings and rotary embedding, up to its projection)."""
    queue: list[Any] = [operand.grad_fn]
    seen = {id(operand.grad_fn)}
    for node in queue:
        if len(queue) >= _SOURCE_NODES:
            break
        for parent, _ in node.next_functions:
            if parent is not None and id(parent) not in seen:
                seen.add(id(parent))
                queue.append(parent)
    return frozenset(seen)


def _reach(start: Any, targets: Any, avoid: Any = None) -> int | None:
    """The id of the first node of ``targets`` that the autograd graph from
    ``start`` leads to within :data:`_SEARCH_LIMIT` nodes, not through ``avoid``."""
    if start is None or not targets:
        return None
    queue, seen = [start], {id(start)}
    for node in queue:
        if id(node) in targets:
            return id(node)
        if len(queue) > _SEARCH_LIMIT:
            return None
        if node is avoid:
            continue
        for parent, _ in node.next_functions:
            if parent is not None and id(parent) not in seen:
                seen.add(id(parent))
                queue.append(parent)
    return None


def install_traced_attention(
    stack: contextlib.ExitStack,
    name: str,
    module: nn.Module,
    config: GIMConfig,
    strict: bool,
) -> None:
    r"""
    Installs, for the block that ``stack`` closes, the attention trace on one
    module whose forward computes attention with plain torch ops.

    Args:
        stack (contextlib.ExitStack): Owns the hooks' removal and leaves a trace
                    that an exception left open.
        name (str): The module's name in the model, for messages.
        module (nn.Module): The attention module.
        config (GIMConfig): The rule settings.
        strict (bool): Raise for a forward whose attention is not recognised;
                    with ``False`` warn and keep its exact gradients.
    """

    def settle(trace: _AttentionTrace, output: Any) -> None:
        problems = trace.settle()
        if problems and output is not None:  # None: the forward raised
            _report(name, module, problems, strict)

    trace_each_call(stack, module, lambda: _AttentionTrace(config), settle)


def _report(name: str, module: nn.Module, problems: list[str], strict: bool) -> None:
    label = f"'{name}' ({type(module).__name__})"
    if strict:
        raise UnsupportedModuleError(
            f"{label} computes attention outside transformers' AttentionInterface, and "
            f"its forward does not read as softmax(q k^T) v: {'; '.join(problems)}. GIM "
            "refuses rather than return a wrong gradient; pass strict=False to keep "
            "this module's exact gradients."
        )
    warnings.warn(
        f"GIM rules skip {label} (exact gradients there): {'; '.join(problems)}",
        stacklevel=2,
    )


@contextlib.contextmanager
def traced(module: nn.Module, config: GIMConfig, strict: bool = True) -> Iterator[None]:
    r"""
    The attention trace of :func:`install_traced_attention` on one module, as a
    context manager (for tests and single modules).

    Args:
        module (nn.Module): The attention module.
        config (GIMConfig): The rule settings.
        strict (bool, optional): See :func:`install_traced_attention`.
                    Default: True
    """
    with contextlib.ExitStack() as stack:
        install_traced_attention(stack, type(module).__name__, module, config, strict)
        yield
