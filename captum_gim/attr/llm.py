"""LLMGIMAttribution: GIM attributions of every generated token from one pass."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from captum.attr import LLMAttributionResult, LLMGradientAttribution, TextTokenInput
from captum.attr._core.llm_attr import _convert_ids_to_pretty_tokens
from captum.attr._utils.interpretable_input import InterpretableInput
from torch import Tensor, nn
from typing_extensions import Unpack

from captum_gim.attr.gim_rules import applied_rules
from captum_gim.attr.layer_gim import LayerGIM
from captum_gim.attr.targets import check_text_target
from captum_gim.config import GIMConfig, GIMSettings
from captum_gim.scores import resolve_score


class LLMGIMAttribution(LLMGradientAttribution):
    r"""
    GIM attributions of a whole target sequence (or generation) to the prompt
    tokens, with Captum's ``LLMGradientAttribution`` interface and result.

    Captum's ``LLMGradientAttribution(LayerGIM(...))`` runs one forward and one
    backward pass per target token, and installs the rules each time. Here one
    teacher-forced forward pass over prompt + target gives every target token's
    score, as causal attention makes the score of token ``k`` depend only on the
    tokens before it; the rules are installed once, and one backward pass per
    target token through the retained graph gives its gradient. The results
    equal the token-by-token ones (up to float rounding).

    Why not one batched backward pass: ``torch.autograd.grad(...,
    is_grads_batched=True)`` runs the backward under PyTorch's legacy vmap,
    which the blockwise attention backward of rule 1 does not support (it
    accumulates batched gradients into unbatched buffers), and where it does
    run (eager attention) it was no faster than separate backward passes.
    Repeating the teacher-forced sequence along the batch (one forward and
    one backward pass over ``N`` copies) costs ``N`` forward passes and was
    up to 2x slower on MiniLM-sized models.

    Attributions are ``embedding x GIM gradient`` summed over the embedding
    dimension, as ``LLMGradientAttribution(LayerGIM(...))`` computes them.

    Args:
        model (nn.Module): A transformers causal language model (with
                    ``get_input_embeddings`` and ``generate``).
        tokenizer: Its tokenizer.
        config (GIMConfig, optional): The seven settings as one object.
                    Default: None
        strict (bool, optional): Raise for parts of the model the rules cannot
                    reach; with False they keep exact gradients (a warning).
                    Default: True
        score (str, optional): What is attributed for each target token:
                    ``"logit"`` (its logit, as in the GIM paper) or
                    ``"log-prob"`` (its log-probability, Captum's choice in
                    ``LLMGradientAttribution``). The old spelling ``"log_prob"``
                    still works for one release, with a ``DeprecationWarning``.
                    Default: ``"logit"``
        **settings: Any of the seven settings of :class:`GIMConfig` as
                    keywords. Not together with ``config``.

    Examples::

        >>> from captum.attr import TextTokenInput
        >>> from captum_gim import LLMGIMAttribution
        >>> from captum_gim.models import load_model
        >>> model, tokenizer = load_model()
        >>> llm_gim = LLMGIMAttribution(model, tokenizer)
        >>> inp = TextTokenInput("a b c", tokenizer)
        >>> result = llm_gim.attribute(inp, target=" d e")
        >>> result.token_attr.shape  # target tokens x prompt tokens
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        config: GIMConfig | None = None,
        strict: bool = True,
        score: str = "logit",
        **settings: Unpack[GIMSettings],
    ) -> None:
        score = resolve_score(score, where="LLMGIMAttribution")
        if not hasattr(model, "get_input_embeddings"):
            raise TypeError(
                f"LLMGIMAttribution needs a transformers causal LM with "
                f"get_input_embeddings(), got {type(model).__name__}."
            )
        self.config = GIMConfig.resolve(config, settings)
        self.strict = strict
        self.score = score
        embeddings = model.get_input_embeddings()  # type: ignore[operator]
        layer_gim = LayerGIM(model, embeddings, model, config=self.config, strict=strict)
        super().__init__(layer_gim, tokenizer)

    def attribute(  # type: ignore[override]
        self,
        inp: InterpretableInput | list[InterpretableInput],
        target: str | Tensor | list[str | Tensor] | None = None,
        gen_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> LLMAttributionResult | list[LLMAttributionResult]:
        r"""
        Args:
            inp (TextTokenInput or list): The prompt, as Captum's
                        ``TextTokenInput`` (its ``skip_tokens`` are left out of
                        the result, as in Captum), or a list of prompts: one
                        result per prompt (each prompt is one forward pass and
                        one backward pass per target token).
            target (str, Tensor, list or None, optional): The target text, or
                        its token ids (1-D); None generates it with
                        ``model.generate(**gen_args)``. A list with one target
                        per prompt when ``inp`` is a list. A text with a word
                        the tokenizer does not know (that would be its
                        ``unk_token``) raises a ``TargetError`` naming the word.
                        Default: None
            gen_args (dict, optional): Arguments of ``generate`` when target is
                        None (Captum's defaults when None).
                        Default: None
            **kwargs: Not supported (the token-by-token path of
                        :meth:`attribute_token_by_token` takes LayerGIM's).

        Returns:
            *LLMAttributionResult* (or a list of them): ``token_attr`` of shape
            ``target tokens x prompt tokens``, ``seq_attr`` its sum over the
            target tokens, and the tokens, ready for ``plot_token_attr`` and
            ``plot_seq_attr``.
        """
        if kwargs:
            raise TypeError(
                f"LLMGIMAttribution.attribute got unsupported arguments "
                f"{sorted(kwargs)}; use attribute_token_by_token for LayerGIM's arguments."
            )
        if isinstance(inp, list):
            targets = target if isinstance(target, list) else [target] * len(inp)
            if len(targets) != len(inp):
                raise ValueError(
                    f"{len(inp)} prompts but {len(targets)} targets; pass one target per prompt."
                )
            return [self._attribute_one(i, t, gen_args) for i, t in zip(inp, targets)]
        if isinstance(target, list):
            raise TypeError("A list of targets needs a list of prompts (one target per prompt).")
        return self._attribute_one(inp, target, gen_args)

    def attribute_token_by_token(
        self,
        inp: InterpretableInput,
        target: str | Tensor | None = None,
        gen_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> LLMAttributionResult:
        r"""
        The same attributions computed as Captum's
        ``LLMGradientAttribution(LayerGIM(...))`` computes them: one forward and
        one backward pass per target token (slow; a reference). Only with
        ``score="log-prob"``, Captum's score. Arguments as for :meth:`attribute`;
        ``kwargs`` go to ``LayerGIM.attribute``.
        """
        if self.score != "log-prob":
            raise ValueError(
                "attribute_token_by_token computes Captum's log-probability score only; "
                "build LLMGIMAttribution(..., score='log-prob')."
            )
        if isinstance(target, str):
            check_text_target(self.tokenizer, target)
        return super().attribute(inp, target, gen_args, **kwargs)

    def _attribute_one(
        self,
        inp: InterpretableInput,
        target: str | Tensor | None,
        gen_args: dict[str, Any] | None,
    ) -> LLMAttributionResult:
        if not isinstance(inp, TextTokenInput):
            raise TypeError(
                f"LLMGIMAttribution attributes to tokens and takes a TextTokenInput, got "
                f"{type(inp).__name__}; build one with TextTokenInput(text, tokenizer)."
            )
        if isinstance(target, str):
            check_text_target(self.tokenizer, target)
        target_tokens = self._get_target_tokens(inp, target, gen_args=gen_args)
        target_tokens = target_tokens.reshape(-1).to(self.device)
        prompt = self._format_model_input(inp.to_model_input())["input_ids"]
        token_attr = self.token_attributions(prompt, target_tokens)
        if inp.itp_mask is not None:
            token_attr = token_attr[:, inp.itp_mask[0].to(token_attr.device)]
        return LLMAttributionResult(
            seq_attr=token_attr.sum(0),
            token_attr=token_attr,
            input_tokens=inp.values,
            output_tokens=_convert_ids_to_pretty_tokens(target_tokens, self.tokenizer),
        )

    def token_attributions(
        self,
        prompt: Tensor,
        target_tokens: Tensor,
        progress: Callable[[range], Iterable[int]] = iter,
        *,
        baselines: Tensor | None = None,
    ) -> Tensor:
        r"""
        The attributions of every target token's score to every prompt token,
        from token ids (what :meth:`attribute` computes before it drops
        ``skip_tokens``): one teacher-forced forward pass over prompt + target
        and one backward pass per target token through the retained graph.

        Args:
            prompt (Tensor): The prompt's token ids, ``1 x prompt tokens``.
            target_tokens (Tensor): The target token ids, 1-D (at least one).
            progress (Callable, optional): Wraps the range of target tokens,
                        e.g. a progress bar such as ``tqdm``.
                        Default: ``iter``
            baselines (Tensor, optional): The embeddings of a baseline prompt,
                        ``1 x prompt tokens x hidden``: attributions are then
                        ``(embedding - baseline) x GIM gradient``. None is the
                        zero baseline.
                        Default: None

        Returns:
            *Tensor*: ``target tokens x prompt tokens`` (on the model's device).

        Examples::

            >>> gim = LLMGIMAttribution(model, tokenizer)
            >>> prompt = torch.tensor([tokenizer("a b c").input_ids])
            >>> scores = gim.token_attributions(prompt, torch.tensor([7, 8]))  # 2 x 4
        """
        target_tokens = target_tokens.reshape(-1)
        if target_tokens.numel() == 0:
            raise ValueError("The target is empty; pass at least one target token.")
        attributions, _ = self.batch_token_attributions(
            [prompt[0]],
            [target_tokens],
            progress=progress,
            baselines=None if baselines is None else [baselines],
        )
        return attributions[0]

    def batch_token_attributions(
        self,
        prompts: Sequence[Tensor],
        targets: Sequence[Tensor],
        progress: Callable[[range], Iterable[int]] = iter,
        pad_token_id: int = 0,
        baselines: Sequence[Tensor] | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        r"""
        :meth:`token_attributions` of several prompts at once: one teacher-forced
        forward pass over the prompts + targets, padded on the right with an
        attention mask, and one backward pass per target position (the longest
        target's length). Right padding keeps every real token at the position it
        has alone, and causal attention keeps it from seeing the padding, so each
        result equals that prompt's :meth:`token_attributions` (up to float
        rounding). Rows of the same length are not padded and get no mask.

        Args:
            prompts (Sequence[Tensor]): Each prompt's token ids, 1-D.
            targets (Sequence[Tensor]): Each prompt's target token ids, 1-D (at
                        least one each).
            progress (Callable, optional): Wraps the range of target positions.
                        Default: ``iter``
            pad_token_id (int, optional): The id written into padded positions
                        (masked out, so any id of the vocabulary).
                        Default: 0
            baselines (Sequence[Tensor], optional): Each prompt's baseline
                        embeddings, ``prompt tokens x hidden`` (or with a batch
                        dimension of 1): attributions are then ``(embedding -
                        baseline) x GIM gradient``. None is the zero baseline.
                        Default: None

        Returns:
            *tuple[list[Tensor], list[Tensor]]*:
            - **attributions**: For each prompt, ``target tokens x prompt tokens``
              (on the model's device).
            - **scores**: For each prompt, the explained score (logit or
              log-probability) of each target token, without gradient.
        """
        if len(prompts) != len(targets) or not prompts:
            raise ValueError(
                f"{len(prompts)} prompts but {len(targets)} targets; pass one target per prompt."
            )
        if baselines is not None and len(baselines) != len(prompts):
            raise ValueError(
                f"{len(prompts)} prompts but {len(baselines)} baselines; pass one per prompt."
            )
        targets = [t.reshape(-1) for t in targets]
        if any(t.numel() == 0 for t in targets):
            raise ValueError("The target is empty; pass at least one target token.")
        rows_in = [torch.cat([p.reshape(-1), t[:-1].to(p)]) for p, t in zip(prompts, targets)]
        n_prompts = [p.numel() for p in prompts]
        n_targets = [t.numel() for t in targets]
        length = max(r.numel() for r in rows_in)
        device = prompts[0].device
        ids = torch.full(
            (len(rows_in), length), pad_token_id, dtype=prompts[0].dtype, device=device
        )
        mask = torch.zeros_like(ids)
        for b, row in enumerate(rows_in):
            ids[b, : row.numel()] = row
            mask[b, : row.numel()] = 1
        keep = length - min(n_prompts) + 1  # from the earliest scored position to the end
        # position of target k of row b among the kept logits
        positions = [
            torch.arange(n_targets[b], device=device) + n_prompts[b] - 1 - (length - keep)
            for b in range(len(rows_in))
        ]
        captured: list[Tensor] = []

        def capture(_: nn.Module, __: tuple[Any, ...], output: Tensor) -> Tensor:
            activation = output.detach().requires_grad_()
            captured.append(activation)
            return activation

        embeddings = self.model.get_input_embeddings()  # type: ignore[operator]
        handle = embeddings.register_forward_hook(capture)
        padded = bool((mask == 0).any())
        rows: list[list[Tensor]] = [[] for _ in rows_in]
        run = functools.partial(
            self.model, ids, attention_mask=mask if padded else None, logits_to_keep=keep
        )  # the audit's forward pass (first call for this model only)
        try:
            with torch.enable_grad(), applied_rules(self.model, self.config, self.strict, run):
                captured.clear()  # what the audit's forward pass captured
                logits = self.model(
                    ids, attention_mask=mask if padded else None, logits_to_keep=keep
                ).logits
                scores = logits if self.score == "logit" else torch.log_softmax(logits, -1)
                picked = [
                    scores[b, positions[b], targets[b].to(device)] for b in range(len(rows_in))
                ]
                (activation,) = captured
                values = [activation.detach()[b, :n] for b, n in enumerate(n_prompts)]
                if baselines is not None:
                    values = [v - _baseline(base, v) for v, base in zip(values, baselines)]
                for k in progress(range(max(n_targets))):
                    active = [b for b in range(len(rows_in)) if n_targets[b] > k]
                    total = torch.stack([picked[b][k] for b in active]).sum()
                    (gradient,) = torch.autograd.grad(
                        total, activation, retain_graph=k < max(n_targets) - 1
                    )
                    for b in active:
                        rows[b].append((gradient[b, : n_prompts[b]] * values[b]).sum(-1))
        finally:
            handle.remove()
        return [torch.stack(r) for r in rows], [p.detach() for p in picked]


def _baseline(baselines: Tensor, values: Tensor) -> Tensor:
    """One prompt's baseline embeddings, checked against its embeddings."""
    if baselines.shape[-2:] != values.shape or baselines.numel() != values.numel():
        raise ValueError(
            f"baselines has shape {tuple(baselines.shape)}; pass the embeddings of a "
            f"baseline prompt, 1 x {values.shape[0]} x {values.shape[-1]}."
        )
    return baselines.reshape(values.shape).to(values)
