r"""
Run GIM and Captum's attribution methods on the same prompt and compare them.

:func:`compare` explains one target of a model with GIM and with any Captum methods
(classes or ready instances): a causal LM's next token, a sequence classifier's label,
or a sentence encoder's cosine similarity with a query. It returns a
:class:`ComparisonResult`: one score per token and method (the attribution summed over
the hidden dimension), the wall time of each method, a text table, a list-of-dicts
table (or a pandas ``DataFrame``) and a side-by-side token heatmap.

The methods share the forward function of the task, from :mod:`captum_gim.forwards`.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from captum._utils.typing import TargetType
from captum.attr import Attribution, LayerAttribution, NeuronAttribution
from torch import Tensor, nn

from captum_gim.attr.gim import GIMAttribution
from captum_gim.attr.targets import per_example_targets
from captum_gim.baselines import baseline_embeddings, resolve_baseline
from captum_gim.config import GIMConfig
from captum_gim.forwards import label_index, logits_forward, task_forward
from captum_gim.scores import resolve_score
from captum_gim.text import format_table, readable_tokens

if TYPE_CHECKING:
    import pandas
    from matplotlib.figure import Figure
    from transformers import PreTrainedModel

__all__ = ["ComparisonResult", "compare", "logits_forward"]

#: An attribution method for :func:`compare`: a Captum class or a ready instance.
MethodLike = type[Attribution] | Attribution

GIM_NAME = "GIM"


@dataclass(frozen=True)
class ComparisonResult:
    r"""
    Token attributions of several methods for the same inputs and target.

    Attributes:
        tokens (list[list[str]]): The tokens of each example (padding included).
        scores (dict[str, Tensor]): For each method, in the order run, the token scores
                    ``batch x tokens``: the attributions summed over the hidden
                    dimension.
        attributions (dict[str, Tensor]): For each method, the full attributions
                    ``batch x tokens x hidden``.
        seconds (dict[str, float]): Wall time of each method (building it and one
                    ``attribute`` call), in seconds.
        target (list[int or None]): The explained token id or label index of each
                    example (None for a similarity).
        attention_mask (Tensor): ``batch x tokens``, 1 for real tokens; padded
                    positions are left out of tables and plots.
    """

    tokens: list[list[str]]
    scores: dict[str, Tensor]
    attributions: dict[str, Tensor]
    seconds: dict[str, float]
    target: list[int | None]
    attention_mask: Tensor

    @property
    def methods(self) -> list[str]:
        r"""
        Returns:
            *list[str]*: The method names, in the order they were run.
        """
        return list(self.scores)

    def _positions(self, example: int) -> list[int]:
        if not -len(self.tokens) <= example < len(self.tokens):
            raise IndexError(
                f"example {example} is out of range for a batch of {len(self.tokens)}."
            )
        return [int(i) for i in self.attention_mask[example].nonzero().flatten()]

    def to_records(self) -> list[dict[str, Any]]:
        r"""
        The scores as a tidy table: one row per method, example and (non-padding)
        token.

        Returns:
            *list[dict[str, Any]]*:
            - **records**: Dicts with the keys ``method``, ``example``, ``position``,
              ``token``, ``score`` (float), ``target`` (token id, label index or
              None) and ``seconds``
              (the method's wall time).

        Examples::

            >>> rows = result.to_records()
            >>> gim_rows = [r for r in rows if r["method"] == "GIM"]
        """
        records = []
        for method, scores in self.scores.items():
            for example, tokens in enumerate(self.tokens):
                for position in self._positions(example):
                    records.append(
                        {
                            "method": method,
                            "example": example,
                            "position": position,
                            "token": tokens[position],
                            "score": float(scores[example, position]),
                            "target": self.target[example],
                            "seconds": self.seconds[method],
                        }
                    )
        return records

    def to_pandas(self) -> pandas.DataFrame:
        r"""
        The tidy table of :meth:`to_records` as a pandas ``DataFrame``. pandas is
        optional and imported only here.

        Returns:
            *pandas.DataFrame*:
            - **table**: One row per method, example and token.

        Raises:
            ImportError: If pandas is not installed.

        Examples::

            >>> table = result.to_pandas()
            >>> table.pivot(index="position", columns="method", values="score")
        """
        try:
            import pandas
        except ImportError as error:
            raise ImportError(
                "ComparisonResult.to_pandas needs pandas, which is not installed; "
                "install it with `pip install pandas`, or use to_records() for a "
                "list of dicts."
            ) from error
        return pandas.DataFrame.from_records(self.to_records())

    def table(self, example: int = 0, digits: int = 4) -> str:
        r"""
        A plain-text table of one example: one row per token, one column per method,
        and a last row with each method's wall time.

        Args:
            example (int, optional): Index of the example in the batch.
                        Default: 0
            digits (int, optional): Digits after the decimal point.
                        Default: 4

        Returns:
            *str*:
            - **table**: The table, without a trailing newline.

        Examples::

            >>> print(result.table())
        """
        positions = self._positions(example)
        tokens = self.tokens[example]
        rows: list[list[object]] = [
            [position, tokens[position]]
            + [float(s[example, position]) for s in self.scores.values()]
            for position in positions
        ]
        rows.append(["", "seconds", *self.seconds.values()])
        return format_table(["#", "token", *self.methods], rows, digits)

    def plot(
        self,
        example: int = 0,
        *,
        normalize: bool = True,
        title: str | None = None,
        **kwargs: Any,
    ) -> Figure:
        r"""
        Draws the example's tokens once per method, coloured by their scores, with
        :func:`captum_gim.visualization.plot_methods_side_by_side`.

        Args:
            example (int, optional): Index of the example in the batch.
                        Default: 0
            normalize (bool, optional): Scale each method's scores by their largest
                        absolute value, so methods of different scales compare.
                        Default: True
            title (str, optional): Title of the figure.
                        Default: None
            **kwargs (Any): Further keyword arguments of
                        ``plot_methods_side_by_side`` (``cmap``, ``wrap_width``,
                        ``fontsize``).

        Returns:
            *Figure*:
            - **figure**: The figure, not shown; save it with
              :func:`captum_gim.visualization.save_figure`.

        Examples::

            >>> from captum_gim.visualization import save_figure
            >>> save_figure(result.plot(title="GIM vs Captum"), "compare.png")
        """
        from captum_gim.visualization import plot_methods_side_by_side

        positions = self._positions(example)
        tokens = [self.tokens[example][p] for p in positions]
        rows = {m: s[example, positions] for m, s in self.scores.items()}
        return plot_methods_side_by_side(tokens, rows, normalize=normalize, title=title, **kwargs)


def compare(
    model: PreTrainedModel,
    tokens: Any,
    input_ids: Tensor,
    target: TargetType | str = None,
    methods: Mapping[str, MethodLike] | Sequence[MethodLike] | None = None,
    *,
    task: str = "generate",
    query_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    gim: bool | GIMConfig = True,
    log_probs: bool | None = None,
    layer: nn.Module | None = None,
    attribute_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    score: str | None = None,
    baselines: str | int | Tensor | None = None,
) -> ComparisonResult:
    r"""
    Explains a model's output with GIM and with Captum's attribution methods, on the
    same inputs and target, and collects one score per token and method and each
    method's wall time.

    Every method explains the same forward function of the ``task``, with the same
    ``target``: for ``"generate"`` :func:`captum_gim.forwards.logits_forward` (the logits
    of the last token, or of the last non-padding token of each row; the target is a
    token id), for ``"classify"`` :func:`captum_gim.forwards.classifier_forward` (a
    sequence classifier's class logits; the target is a label index or name), for
    ``"similarity"`` :func:`captum_gim.forwards.similarity_forward` (the cosine
    similarity of each row's mean-pooled embedding with that of ``query_ids``; no
    target). A method given as a class is built by ``compare``: a layer method
    (e.g. ``LayerIntegratedGradients``, ``LayerGradientXActivation``) on ``layer`` with
    the token ids as inputs, any other method (e.g. ``Saliency``, ``InputXGradient``,
    ``IntegratedGradients``, ``DeepLift``) on the input embeddings. A method given as an
    instance is used as it is, so it must take the same inputs: build it on the task's
    forward function, e.g. ``logits_forward(model)``; this is how to pass wrappers such
    as ``NoiseTunnel``.
    ``attribute`` gets the inputs, ``target``, ``additional_forward_args=
    (attention_mask,)`` when a mask is given, ``baselines`` when given and the method
    takes them (see below), and the method's ``attribute_kwargs``.

    Args:
        model (nn.Module): A causal language model (a transformers
                    ``...ForCausalLM``, or any module taking ``input_ids`` or
                    ``inputs_embeds`` and ``attention_mask``), a sequence classifier
                    (``task="classify"``) or an encoder (``task="similarity"``).
        tokens (tokenizer, Sequence[str], Sequence[Sequence[str]] or None): How to
                    label the tokens: a tokenizer (anything with
                    ``convert_ids_to_tokens``; tokens are then shown as text, see
                    :func:`captum_gim.text.readable_tokens`), the token strings of a
                    single example,
                    one list of them per example, or None for the ids as strings.
        input_ids (Tensor): Token ids, ``tokens`` or ``batch x tokens``.
        target (int, str, Tensor, list or None, optional): The explained token id
                    or label index, one for all examples or one per example, as in
                    Captum; for ``"classify"`` also a label name. None explains the
                    greedy next token or the predicted label of each example; it must
                    be None for ``"similarity"``.
                    Default: None
        methods (Mapping[str, class or Attribution] or Sequence, optional): The Captum
                    methods to run, by name; a sequence is named by class names. None
                    runs ``Saliency``, ``InputXGradient`` and ``IntegratedGradients``.
                    Default: None
        task (str, optional): ``"generate"``, ``"classify"`` or ``"similarity"``.
                    Default: ``"generate"``
        query_ids (Tensor, optional): For ``"similarity"``: the query's token ids.
                    Default: None
        attention_mask (Tensor, optional): ``batch x tokens``, 1 for real tokens and 0
                    for padding.
                    Default: None
        gim (bool or GIMConfig, optional): Run GIM first, as the method ``"GIM"``;
                    a :class:`GIMConfig` sets its rules, False leaves it out.
                    Default: True
        log_probs (bool, optional): Deprecated spelling of ``score="log-prob"``
                    (a ``DeprecationWarning``; removed in the next release).
                    Default: None
        layer (nn.Module, optional): The layer of the layer methods. None means
                    ``model.get_input_embeddings()``.
                    Default: None
        attribute_kwargs (Mapping[str, Mapping[str, Any]], optional): Extra keyword
                    arguments of ``attribute`` by method name, e.g.
                    ``{"IntegratedGradients": {"n_steps": 32}}``.
                    Default: None
        score (str, optional): Explain the ``"logit"`` or the ``"log-prob"`` of the
                    target token or label (not for ``"similarity"``).
                    Default: ``"logit"``
        baselines (str, int or Tensor, optional): The baseline of GIM and of every
                    method on the input embeddings whose ``attribute`` takes
                    ``baselines`` (``IntegratedGradients``, ``GradientShap``,
                    ``DeepLift``, ...): ``"zero"``, ``"mask"``, ``"pad"``, a token or
                    token id (``tokens`` must then be the tokenizer; special tokens
                    keep their embeddings, see :mod:`captum_gim.baselines`), or
                    baseline embeddings ``batch x tokens x hidden``. None keeps each
                    method's own default (zero for GIM). Layer methods keep theirs;
                    pass them in ``attribute_kwargs``.
                    Default: None

    Returns:
        *ComparisonResult*:
        - **result**: Scores, attributions and wall time of each method; see
          :meth:`ComparisonResult.table`, :meth:`ComparisonResult.to_records`,
          :meth:`ComparisonResult.to_pandas` and :meth:`ComparisonResult.plot`.

    Examples::

        >>> from captum.attr import InputXGradient, LayerIntegratedGradients, Saliency
        >>> from captum_gim.compare import compare
        >>> from captum_gim.models import load_model
        >>> model, tokenizer = load_model()
        >>> ids = tokenizer("the good movie ?", return_tensors="pt").input_ids
        >>> result = compare(model, tokenizer, ids, methods={
        ...     "Saliency": Saliency,
        ...     "InputXGradient": InputXGradient,
        ...     "LayerIG": LayerIntegratedGradients,
        ... })
        >>> print(result.table())
        >>> figure = result.plot()
    """
    input_ids = _as_batch(input_ids)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but input_ids has shape "
            f"{tuple(input_ids.shape)}; pass one mask value per token."
        )
    token_rows = _token_strings(tokens, input_ids)
    layer = model.get_input_embeddings() if layer is None else layer
    if task == "similarity" and (score is not None or log_probs is not None):
        raise ValueError("score does not apply to task='similarity' (a cosine similarity).")
    score = resolve_score(score, log_probs=log_probs, where="compare")
    forward = task_forward(model, task, score=score, query_ids=query_ids)
    extra_args = None if attention_mask is None else (attention_mask,)
    targets: list[int | None]
    if task == "similarity":
        if target is not None:
            raise ValueError(
                "task='similarity' explains one similarity per example and takes no "
                "target; pass the query as query_ids."
            )
        targets = [None] * input_ids.shape[0]
    else:
        if isinstance(target, str) and task == "classify":
            target = label_index(model, target)
        if target is None:
            with torch.no_grad():
                target = forward(input_ids, attention_mask).argmax(dim=-1)
        targets = list(_target_list(cast(TargetType, target), input_ids.shape[0]))
    runs = _named_methods(methods)
    if gim is not False:
        if GIM_NAME in runs:
            raise ValueError(
                f"The method name {GIM_NAME!r} is reserved for GIM, which compare runs "
                "itself; name your method differently, or pass gim=False."
            )
        config = gim if isinstance(gim, GIMConfig) else None
        runs = {GIM_NAME: GIMAttribution(forward, model, config=config), **runs}
    kwargs = dict(attribute_kwargs or {})
    unknown = sorted(set(kwargs) - set(runs))
    if unknown:
        raise ValueError(
            f"attribute_kwargs names {unknown}, which are not among the methods {list(runs)}."
        )
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
    base = _baseline_embeddings(model, tokens, input_ids, baselines, embeds, task)
    embeds.requires_grad_()  # a leaf that every method differentiates, without warnings
    attributions, seconds = {}, {}
    for name, method in runs.items():
        start = time.perf_counter()
        built = _build(name, method, forward, model, layer)
        layered = isinstance(built, LayerAttribution)
        inputs = input_ids if layered else embeds
        method_kwargs = dict(kwargs.get(name, {}))
        if base is not None and not layered and _takes_baselines(built):
            method_kwargs.setdefault("baselines", base)
        result = built.attribute(
            inputs,
            target=target,
            additional_forward_args=extra_args,
            **method_kwargs,
        )
        seconds[name] = time.perf_counter() - start
        attributions[name] = _single_tensor(name, result).detach()
    return ComparisonResult(
        tokens=token_rows,
        scores={name: a.sum(dim=-1) for name, a in attributions.items()},
        attributions=attributions,
        seconds=seconds,
        target=targets,
        attention_mask=mask,
    )


def _baseline_embeddings(
    model: nn.Module,
    tokens: Any,
    input_ids: Tensor,
    baselines: str | int | Tensor | None,
    embeds: Tensor,
    task: str,
) -> Tensor | None:
    if baselines is None:
        return None
    if isinstance(baselines, Tensor):
        if baselines.shape != embeds.shape:
            raise ValueError(
                f"baselines has shape {tuple(baselines.shape)} but the input embeddings "
                f"have shape {tuple(embeds.shape)}; pass one baseline embedding per token."
            )
        return baselines.to(embeds)
    if not hasattr(tokens, "convert_ids_to_tokens"):
        raise TypeError(
            f"baselines={baselines!r} names a token, so compare needs the tokenizer as "
            "tokens; or pass baseline embeddings as a tensor."
        )
    baseline = resolve_baseline(tokens, baselines, task)
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    return baseline_embeddings(embedding, tokens, input_ids, baseline)


def _takes_baselines(method: Attribution) -> bool:
    return "baselines" in inspect.signature(method.attribute).parameters


def _as_batch(input_ids: Tensor) -> Tensor:
    if not isinstance(input_ids, Tensor) or input_ids.is_floating_point():
        raise TypeError(
            "input_ids must be an integer tensor of token ids, e.g. "
            "tokenizer(text, return_tensors='pt').input_ids."
        )
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(
            f"input_ids must be tokens or batch x tokens with at least one token, got "
            f"shape {tuple(input_ids.shape)}."
        )
    return input_ids


def _named_methods(
    methods: Mapping[str, MethodLike] | Sequence[MethodLike] | None,
) -> dict[str, MethodLike]:
    if methods is None:
        from captum.attr import InputXGradient, IntegratedGradients, Saliency

        methods = [Saliency, InputXGradient, IntegratedGradients]
    if isinstance(methods, Mapping):
        named = dict(methods)
    else:
        named = {}
        for method in methods:
            name = method.__name__ if isinstance(method, type) else type(method).__name__
            if name in named:
                raise ValueError(f"Two methods are named {name!r}; pass a dict to name them apart.")
            named[name] = method
    for name, method in named.items():
        _check_method(name, method)
    return named


def _check_method(name: str, method: object) -> None:
    if isinstance(method, Attribution):
        return
    if not (isinstance(method, type) and issubclass(method, Attribution)):
        raise TypeError(
            f"Method {name!r} is {method!r}; pass a Captum attribution class "
            "(e.g. Saliency) or an instance of one."
        )
    if issubclass(method, NeuronAttribution):
        raise TypeError(
            f"Method {name!r} is a neuron attribution ({method.__name__}), which "
            "explains a hidden neuron, not the target token; compare cannot run it."
        )


def _build(
    name: str,
    method: MethodLike,
    forward: Callable[..., Tensor],
    model: nn.Module,
    layer: nn.Module,
) -> Attribution:
    """An instance of ``method``, built on ``forward`` (and ``layer``) if a class."""
    if isinstance(method, Attribution):
        return method
    extra = {"model": model} if "model" in inspect.signature(method).parameters else {}
    args = (forward, layer) if issubclass(method, LayerAttribution) else (forward,)
    try:
        return method(*args, **extra)
    except (TypeError, AttributeError) as error:
        call = f"{method.__name__}(forward_func{', layer' if len(args) == 2 else ''})"
        raise TypeError(
            f"compare could not build method {name!r} as {call}: {error}. Build it "
            "yourself on logits_forward(model) and pass the instance."
        ) from error


def _single_tensor(name: str, attributions: Tensor | tuple[Tensor, ...]) -> Tensor:
    if isinstance(attributions, tuple):
        if len(attributions) != 1:
            raise ValueError(
                f"Method {name!r} returned {len(attributions)} attribution tensors; "
                "compare needs one (attributions to one input or layer)."
            )
        attributions = attributions[0]
    if attributions.dim() != 3:
        raise ValueError(
            f"Method {name!r} returned attributions of shape "
            f"{tuple(attributions.shape)}; compare needs batch x tokens x hidden."
        )
    return attributions


def _token_strings(tokens: Any, input_ids: Tensor) -> list[list[str]]:
    ids = input_ids.tolist()
    if tokens is None:
        return [[str(i) for i in row] for row in ids]
    if hasattr(tokens, "convert_ids_to_tokens"):
        return [readable_tokens(tokens, row) for row in ids]
    if isinstance(tokens, str):
        raise TypeError("tokens must be a tokenizer or a sequence of token strings, not one str.")
    tokens = list(tokens)
    rows = [tokens] if tokens and isinstance(tokens[0], str) else tokens
    rows = [[str(t) for t in row] for row in rows]
    if [len(r) for r in rows] != [len(r) for r in ids]:
        raise ValueError(
            f"tokens has lengths {[len(r) for r in rows]} but input_ids has "
            f"{[len(r) for r in ids]}; pass one token string per id."
        )
    return rows


def _target_list(target: TargetType, batch: int) -> list[int]:
    targets = per_example_targets(target, batch)
    if not all(isinstance(entry, int) for entry in targets):
        raise TypeError(
            f"compare explains a token id; target must be an int, a list of ints or "
            f"a tensor of them, got {target!r}."
        )
    return cast(list[int], targets)
