"""Attribution patching (GIM, AtP, AtP*) and activation patching of heads, MLPs
and residual-stream positions."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from captum_gim import GIMConfig, gim_rules
from captum_gim.circuits import atp_star
from captum_gim.circuits.components import Components, find_components
from captum_gim.circuits.hooks import KINDS, Site, sites_of, tapped
from captum_gim.circuits.result import CircuitResult

Metric = Callable[[Any], Tensor]
METHODS = ("gim", "atp", "atp*")
DEFAULT_COMPONENTS = ("heads", "mlps", "residual")


def attribution_patching(
    model: nn.Module,
    clean_inputs: Tensor | Mapping[str, Tensor],
    corrupted_inputs: Tensor | Mapping[str, Tensor],
    metric: Metric,
    *,
    components: Sequence[str] = DEFAULT_COMPONENTS,
    method: str = "gim",
    config: GIMConfig | None = None,
    run: str = "corrupted",
) -> CircuitResult:
    r"""
    Estimates, for every component, the change of ``metric`` when its clean
    activation is patched into the corrupted run, as
    ``(clean - corrupted) . gradient`` summed over the component's activations,
    with the gradient taken in the corrupted run (``run="corrupted"``, the
    default). With ``run="clean"`` the gradient is taken in the clean run and
    the score is ``(corrupted - clean) . gradient``, the estimated change of
    ``metric`` when the component's corrupted activation is patched into the
    clean run: the convention of EAP, EAP-IG, MIB and of the GIM paper's
    circuit experiments (use it to compare with them; it is also what
    :func:`edge_attribution_patching` uses, whose outgoing edge scores of a
    node sum to this node score). Costs one forward pass on each prompt and
    one backward pass.

    - ``method="gim"``: the gradient is computed under
      :func:`captum_gim.gim_rules` (GIM's attribution patching);
    - ``method="atp"``: the plain gradient (attribution patching, AtP);
    - ``method="atp*"``: AtP with the query/key fix of Kramár et al. (2024) for
      heads (see :mod:`captum_gim.circuits.atp_star`; GradDrop is left out).
      MLP and residual scores are AtP's.

    Components (found by structure, see :func:`find_components`): ``"heads"``
    (the input of each attention output projection, split by head),
    ``"mlps"`` (each MLP output), ``"residual"`` (the input of the first block
    and the output of every block, per position) and ``"neurons"`` (the input
    of each MLP's down projection; on request).

    Args:
        model (nn.Module): A transformers model, e.g. ``LlamaForCausalLM``,
                    ``GPT2LMHeadModel`` or ``BertModel``.
        clean_inputs (Tensor or dict): Token ids (``batch x tokens``) or a
                    tokenizer output with ``input_ids`` and ``attention_mask``
                    (batched, padded).
        corrupted_inputs (Tensor or dict): The same form and shape as
                    ``clean_inputs`` (and the same ``attention_mask``).
        metric (Callable): ``metric(logits) -> Tensor[batch]``, e.g. a logit
                    difference. It receives ``output.logits`` when the model's
                    output has logits, otherwise the output itself (e.g. a
                    ``BaseModelOutput`` with ``last_hidden_state``), always for
                    a batch of the given size.
        components (sequence of str, optional): Any of ``"heads"``,
                    ``"mlps"``, ``"residual"``, ``"neurons"``.
                    Default: ``("heads", "mlps", "residual")``
        method (str, optional): ``"gim"``, ``"atp"`` or ``"atp*"``. Default: ``"gim"``
        config (GIMConfig, optional): The GIM settings (``method="gim"`` only).
                    Default: ``GIMConfig()``
        run (str, optional): The run that carries the gradient,
                    ``"corrupted"`` or ``"clean"`` (the GIM paper's and MIB's).
                    Default: ``"corrupted"``

    Returns:
        *CircuitResult*: ``.heads``, ``.mlps``, ``.residual`` (and ``.neurons``).

    Examples::

        >>> from captum_gim.circuits import attribution_patching
        >>> def logit_diff(logits):
        ...     return logits[:, -1, good] - logits[:, -1, bad]
        >>> result = attribution_patching(model, clean_ids, corrupted_ids, logit_diff)
        >>> result.heads.shape  # layers x heads
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if config is not None and method != "gim":
        raise ValueError(f"config= applies to method='gim' only, got method={method!r}.")
    if run not in ("corrupted", "clean"):
        raise ValueError(f"run must be 'corrupted' or 'clean', got {run!r}.")
    if run == "clean" and method == "atp*":
        raise ValueError("method='atp*' supports run='corrupted' only.")
    kinds = _check_components(components)
    clean, corrupted = _check_inputs(model, clean_inputs, corrupted_inputs)
    if run == "clean":  # record the corrupted run, differentiate the clean one
        clean, corrupted = corrupted, clean
    parts = find_components(model, clean["input_ids"])
    sites = sites_of(parts, kinds)
    batch = clean["input_ids"].shape[0]

    clean_acts: dict[Site, Tensor] = {}
    clean_attention: dict[int, atp_star.Recorded] = {}
    with torch.no_grad(), contextlib.ExitStack() as stack:
        stack.enter_context(tapped(parts, sites, _recorder(clean_acts)))
        if method == "atp*":
            stack.enter_context(atp_star.recording_attention(parts, clean_attention))
        clean_metric = _metric_of(metric, model(**clean), batch)

    taps: dict[Site, tuple[Tensor, Tensor]] = {}
    corrupted_attention: dict[int, atp_star.Recorded] = {}
    head_sites = sites_of(parts, ("heads",)) if method == "atp*" else []
    grad_sites = list(dict.fromkeys([*sites, *head_sites]))
    with torch.enable_grad(), contextlib.ExitStack() as stack:
        if method == "gim":
            rules = gim_rules(model, config=config or GIMConfig(), example_inputs=dict(corrupted))
            stack.enter_context(rules)
        if method == "atp*":
            stack.enter_context(atp_star.recording_attention(parts, corrupted_attention))
        stack.enter_context(tapped(parts, grad_sites, _differentiable(taps)))
        corrupted_metric = _metric_of(metric, model(**corrupted), batch)
        deltas = [taps[site][1] for site in grad_sites]
        grads = torch.autograd.grad(corrupted_metric.sum(), deltas, allow_unused=True)
    grad_of = {
        site: torch.zeros_like(delta) if grad is None else grad
        for site, delta, grad in zip(grad_sites, deltas, grads)
    }

    per_example: dict[str, list[Tensor]] = {kind: [] for kind in kinds}
    for site in sites:
        kind, layer = site
        if kind == "heads" and method == "atp*":
            grad = grad_of[site].reshape(*grad_of[site].shape[:2], parts.num_heads, -1)
            clean_rec, corrupted_rec = (
                atp_star.records_for(store, [layer])[0]
                for store in (clean_attention, corrupted_attention)
            )
            scores = atp_star.head_scores(clean_rec, corrupted_rec, grad, layer)
            per_example[kind].append(scores.to(grad.dtype))
            continue
        difference = clean_acts[site] - taps[site][0]
        per_example[kind].append(_reduce(kind, parts, difference * grad_of[site]))
    if run == "clean":
        clean_metric, corrupted_metric = corrupted_metric, clean_metric
    return CircuitResult(
        method=method,
        per_example=_stack(per_example),
        clean_metric=clean_metric.detach(),
        corrupted_metric=corrupted_metric.detach(),
        seconds=time.perf_counter() - start,
        extra={"run": run},
    )


def activation_patching(
    model: nn.Module,
    clean_inputs: Tensor | Mapping[str, Tensor],
    corrupted_inputs: Tensor | Mapping[str, Tensor],
    metric: Metric,
    *,
    components: Sequence[str] = DEFAULT_COMPONENTS,
    max_batch_size: int = 64,
) -> CircuitResult:
    r"""
    The exact change of ``metric`` when each component's clean activation is
    patched into the corrupted run, one component at a time. Several
    components are patched in one forward pass (each in its own copy of the
    batch), up to ``max_batch_size`` rows per pass.

    The components, inputs and ``metric`` are as for
    :func:`attribution_patching`; a head is patched at every position at once,
    an MLP at every position, a residual-stream entry at one position.

    Args:
        model (nn.Module): A transformers model.
        clean_inputs (Tensor or dict): Token ids or a tokenizer output.
        corrupted_inputs (Tensor or dict): The same form and shape.
        metric (Callable): ``metric(logits) -> Tensor[batch]``.
        components (sequence of str, optional): Any of ``"heads"``,
                    ``"mlps"``, ``"residual"``, ``"neurons"``.
                    Default: ``("heads", "mlps", "residual")``
        max_batch_size (int, optional): Rows per forward pass (at least one
                    copy of the batch). Default: 64

    Returns:
        *CircuitResult*: exact effects, ``metric(patched) - metric(corrupted)``.

    Examples::

        >>> from captum_gim.circuits import activation_patching, correlation
        >>> truth = activation_patching(model, clean_ids, corrupted_ids, logit_diff)
        >>> correlation(result, truth)["heads"]
    """
    start = time.perf_counter()
    kinds = _check_components(components)
    clean, corrupted = _check_inputs(model, clean_inputs, corrupted_inputs)
    parts = find_components(model, clean["input_ids"])
    sites = sites_of(parts, kinds)
    batch, length = clean["input_ids"].shape

    clean_acts: dict[Site, Tensor] = {}
    with torch.no_grad():
        with tapped(parts, sites, _recorder(clean_acts)):
            clean_metric = _metric_of(metric, model(**clean), batch)
        corrupted_metric = _metric_of(metric, model(**corrupted), batch)
        patches = [
            (site, index)
            for site in sites
            for index in range(_count(site[0], parts, clean_acts[site], length))
        ]
        copies = max(1, max_batch_size // batch)
        effects: list[Tensor] = []
        for begin in range(0, len(patches), copies):
            chunk = patches[begin : begin + copies]
            repeated = {k: v.repeat(len(chunk), *[1] * (v.dim() - 1)) for k, v in corrupted.items()}
            with tapped(parts, sites, _patcher(chunk, clean_acts, parts, batch)):
                output = _metric_input(model(**repeated))
            for j in range(len(chunk)):
                part = _slice_batch(output, slice(j * batch, (j + 1) * batch))
                effects.append(_checked(metric(part), batch) - corrupted_metric)

    per_example: dict[str, list[Tensor]] = {kind: [] for kind in kinds}
    position = 0
    for site in sites:
        count = _count(site[0], parts, clean_acts[site], length)
        scores = torch.stack(effects[position : position + count], dim=1)  # batch x count
        position += count
        per_example[site[0]].append(scores[:, 0] if site[0] == "mlps" else scores)
    return CircuitResult(
        method="activation_patching",
        per_example=_stack(per_example),
        clean_metric=clean_metric.detach(),
        corrupted_metric=corrupted_metric.detach(),
        seconds=time.perf_counter() - start,
    )


def _check_components(components: Sequence[str]) -> tuple[str, ...]:
    if isinstance(components, str):
        components = (components,)
    unknown = [c for c in components if c not in KINDS]
    if unknown or not components:
        raise ValueError(
            f"components must be a non-empty subset of {KINDS}, got {tuple(components)!r}."
        )
    return tuple(dict.fromkeys(components))


def _check_inputs(
    model: nn.Module, clean: Tensor | Mapping[str, Tensor], corrupted: Tensor | Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    a, b = (_as_dict(x, name, device) for x, name in ((clean, "clean"), (corrupted, "corrupted")))
    if set(a) != set(b):
        raise ValueError(
            f"clean_inputs has keys {sorted(a)} but corrupted_inputs {sorted(b)}; "
            "tokenize both the same way."
        )
    if a["input_ids"].shape != b["input_ids"].shape:
        raise ValueError(
            f"clean and corrupted input_ids have shapes {tuple(a['input_ids'].shape)} and "
            f"{tuple(b['input_ids'].shape)}; pad both to the same length (positions are patched "
            "one to one)."
        )
    if "attention_mask" in a and not torch.equal(a["attention_mask"], b["attention_mask"]):
        raise ValueError(
            "clean and corrupted attention_mask differ; use prompt pairs with the same "
            "token positions (e.g. corrupt one token by another single token)."
        )
    return a, b


def _as_dict(
    x: Tensor | Mapping[str, Tensor], name: str, device: torch.device
) -> dict[str, Tensor]:
    if isinstance(x, Tensor):
        x = {"input_ids": x}
    elif not isinstance(x, Mapping) or "input_ids" not in x:
        raise TypeError(
            f"{name}_inputs must be a token-id tensor or a tokenizer output with "
            f"'input_ids', got {type(x).__name__}."
        )
    out = {k: v.to(device) for k, v in x.items() if isinstance(v, Tensor)}
    ids = out["input_ids"]
    if ids.dim() == 1:
        out = {k: v[None] for k, v in out.items()}
    elif ids.dim() != 2:
        raise ValueError(f"{name} input_ids must be batch x tokens, got shape {tuple(ids.shape)}.")
    if out["input_ids"].is_floating_point() or out["input_ids"].numel() == 0:
        raise ValueError(f"{name} input_ids must be a non-empty tensor of integer token ids.")
    return out


def _metric_input(output: Any) -> Any:
    logits = getattr(output, "logits", None)
    return output if logits is None else logits


def _checked(value: Any, batch: int) -> Tensor:
    if not isinstance(value, Tensor) or value.shape != (batch,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"metric must return one value per example (shape ({batch},)), got {shape}; "
            "e.g. return logits[:, -1, good] - logits[:, -1, bad]."
        )
    return value


def _metric_of(metric: Metric, output: Any, batch: int) -> Tensor:
    return _checked(metric(_metric_input(output)), batch)


def _slice_batch(value: Any, rows: slice) -> Any:
    if isinstance(value, Tensor):
        return value[rows]
    if isinstance(value, Mapping):
        sliced = {k: _slice_batch(v, rows) for k, v in value.items()}
        try:
            return type(value)(**sliced)
        except TypeError:
            return sliced
    if isinstance(value, tuple):
        return tuple(_slice_batch(v, rows) for v in value)
    return value


def _recorder(store: dict[Site, Tensor]) -> Callable[[Site, Tensor], Tensor]:
    def record(site: Site, activation: Tensor) -> Tensor:
        store[site] = activation.detach()
        return activation

    return record


def _differentiable(store: dict[Site, tuple[Tensor, Tensor]]) -> Callable[[Site, Tensor], Tensor]:
    """Adds a zero leaf to each activation, whose gradient is the activation's."""

    def tap(site: Site, activation: Tensor) -> Tensor:
        delta = torch.zeros_like(activation, requires_grad=True)
        store[site] = (activation.detach(), delta)
        return activation + delta

    return tap


def _count(kind: str, parts: Components, activation: Tensor, length: int) -> int:
    if kind == "heads":
        return parts.num_heads
    if kind == "mlps":
        return 1
    if kind == "residual":
        return length
    return activation.shape[-1]


def _patcher(
    chunk: list[tuple[Site, int]], clean: dict[Site, Tensor], parts: Components, batch: int
) -> Callable[[Site, Tensor], Tensor]:
    def patch(site: Site, activation: Tensor) -> Tensor:
        mine = [(j, index) for j, (s, index) in enumerate(chunk) if s == site]
        if not mine:
            return activation
        patched = activation.clone()
        source = clean[site]
        for j, index in mine:
            rows = slice(j * batch, (j + 1) * batch)
            kind = site[0]
            if kind == "heads":
                view = patched[rows].unflatten(-1, (parts.num_heads, -1))
                view[..., index, :] = source.unflatten(-1, (parts.num_heads, -1))[..., index, :]
            elif kind == "mlps":
                patched[rows] = source
            elif kind == "residual":
                patched[rows, index] = source[:, index]
            else:
                patched[rows, ..., index] = source[..., index]
        return patched

    return patch


def _reduce(kind: str, parts: Components, product: Tensor) -> Tensor:
    if kind == "heads":
        return product.unflatten(-1, (parts.num_heads, -1)).sum((1, 3))
    if kind == "mlps":
        return product.sum((1, 2))
    if kind == "residual":
        return product.sum(2)
    return product.sum(1)


def _stack(per_example: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    return {kind: torch.stack(scores, dim=1).detach() for kind, scores in per_example.items()}
