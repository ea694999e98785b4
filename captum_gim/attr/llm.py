"""LLMGIMAttribution: GIM attributions of every generated token from one pass."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from captum.attr import LLMAttributionResult, LLMGradientAttribution, TextTokenInput
from captum.attr._core.llm_attr import _convert_ids_to_pretty_tokens
from captum.attr._utils.interpretable_input import InterpretableInput
from torch import Tensor, nn
from typing_extensions import Unpack

from captum_gim.attr.gim_rules import gim_rules
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
        n_prompt, n_target = prompt.shape[1], target_tokens.numel()
        ids = torch.cat([prompt, target_tokens[:-1].unsqueeze(0).to(prompt)], dim=1)
        captured: list[Tensor] = []

        def capture(_: nn.Module, __: tuple[Any, ...], output: Tensor) -> Tensor:
            activation = output.detach().requires_grad_()
            captured.append(activation)
            return activation

        embeddings = self.model.get_input_embeddings()  # type: ignore[operator]
        handle = embeddings.register_forward_hook(capture)
        rows = []
        try:
            with torch.enable_grad(), gim_rules(self.model, config=self.config, strict=self.strict):
                logits = self.model(ids, logits_to_keep=n_target).logits[0]
                scores = logits if self.score == "logit" else torch.log_softmax(logits, -1)
                positions = torch.arange(n_target, device=ids.device)
                scores = scores[positions, target_tokens]
                (activation,) = captured
                values = activation.detach()[0, :n_prompt]
                if baselines is not None:
                    if baselines.shape[-2:] != values.shape:
                        raise ValueError(
                            f"baselines has shape {tuple(baselines.shape)}; pass the "
                            f"embeddings of a baseline prompt, 1 x {n_prompt} x "
                            f"{values.shape[-1]}."
                        )
                    values = values - baselines.reshape(values.shape).to(values)
                for k in progress(range(n_target)):
                    (gradient,) = torch.autograd.grad(
                        scores[k], activation, retain_graph=k < n_target - 1
                    )
                    rows.append((gradient[0, :n_prompt] * values).sum(-1))
        finally:
            handle.remove()
        return torch.stack(rows)
