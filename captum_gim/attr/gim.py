"""GIMAttribution: (inputs - baselines) x the GIM gradient."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
    _is_tuple,
)
from captum._utils.typing import BaselineType, TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr import GradientAttribution
from captum.log import log_usage
from torch import Tensor, nn
from typing_extensions import Unpack

from captum_gim.attr.errors import clear_gradient_errors
from captum_gim.attr.gim_rules import applied_rules
from captum_gim.attr.inputs import check_float_inputs, format_baselines
from captum_gim.attr.targets import check_target_form, checked_forward
from captum_gim.config import GIMConfig, GIMSettings
from captum_gim.sites.checks import resolve_forward_and_model


class GIMAttribution(GradientAttribution):
    r"""
    GIM (Gradient Interaction Modifications; Edin et al., 2025,
    https://arxiv.org/abs/2505.17630) attributes the output of a transformer
    language model to its input embeddings at the cost of one gradient:

        attribution = (inputs - baselines) * GIM gradient

    The GIM gradient is the gradient of the target computed with three
    backward rules that keep self-repair from hiding important components:
    a temperature-adjusted softmax backward in attention, frozen normalization
    statistics, and a gradient split at multiplicative interactions (q/k/v and
    gated MLPs). The forward pass is unchanged. With every rule off
    (:meth:`GIMConfig.all_rules_off`) this is exactly Captum's InputXGradient
    on ``inputs - baselines``.

    The rules are module hooks installed on ``model`` for one ``attribute``
    call and always removed; the model is left exactly as it was, also when the
    forward function, a rule or the backward pass raises (KeyboardInterrupt
    included). The caller's tensors are never modified: gradients are taken
    with respect to detached aliases of the inputs, so their ``requires_grad``,
    ``.grad`` and version counter stay as they were.

    Safe to run at the same time in several threads on different model objects,
    with different settings, next to threads computing plain gradients with
    other models (also of the same class). One model object must not be used by
    two threads at once while GIM runs on it: a second GIM call on it raises
    ``RuntimeError``, and a plain forward pass on it would get the rules.

    Positional arguments mean what they mean in Captum's ``InputXGradient``:
    ``attribute(inputs, target, additional_forward_args)``. ``baselines`` is
    keyword-only, so an ``IntegratedGradients``-style positional baseline
    raises a ``TypeError`` instead of becoming the target. The constructor's
    second argument is ``model`` (``multiply_by_inputs`` is keyword-only; a
    bool passed there raises an error saying so). With every rule off no model
    is needed, and a plain function works as with ``InputXGradient``.

    A ``torch.compile(model)`` wrapper given as ``forward_func`` is unwrapped:
    GIM runs the original module eagerly and the attributions equal those of
    the uncompiled model. Gradient checkpointing works with
    ``use_reentrant=False`` (the transformers default) and gives the same
    attributions; reentrant checkpointing raises a ``RuntimeError`` saying so.
    A model in training mode with active dropout gets a warning (with
    ``strict=True`` or ``False``, never an error): the forward is stochastic,
    and the attributions are the exact GIM attributions of that one
    dropped-out forward (attention recomputations draw the module's own
    dropout mask). Call ``model.eval()`` for reproducible attributions.
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        model: nn.Module | None = None,
        *,
        multiply_by_inputs: bool = True,
        config: GIMConfig | None = None,
        strict: bool = True,
        **settings: Unpack[GIMSettings],
    ) -> None:
        r"""
        Args:
            forward_func (Callable): The forward function of the model or any
                        modification of it, taking input embeddings (e.g. a
                        wrapper calling ``model(inputs_embeds=...)`` and selecting
                        a logit). It must run ``model``.
            model (nn.Module, optional): The transformer that gets the GIM
                        rules. When None, ``forward_func`` itself if it is an
                        ``nn.Module`` (or a bound method of one). A
                        ``torch.compile`` wrapper is accepted only when it is
                        ``forward_func`` itself; otherwise pass the original
                        module and call it in ``forward_func``.
                        Default: None
            multiply_by_inputs (bool, optional): Multiply the GIM gradient by
                        ``inputs - baselines`` (global attribution); with False
                        the GIM gradient alone is returned (local attribution).
                        Default: True
            config (GIMConfig, optional): The seven settings as one object,
                        instead of the keywords.
                        Default: None
            strict (bool, optional): Raise for parts of the model the rules
                        cannot reach; with False they keep exact gradients and a
                        warning names them.
                        Default: True
            **settings: Any of the seven settings of :class:`GIMConfig`
                        (``temperature``, ``freeze_norm``, ``q_scale``,
                        ``k_scale``, ``v_scale``, ``gate_scale``, ``up_scale``)
                        as keywords, with GIMConfig's defaults and meaning.
                        ``temperature=1.0`` (or None), ``freeze_norm=False``
                        and a scale of 1.0 each switch one rule off. Not
                        together with ``config``.
        """
        self.config = GIMConfig.resolve(config, settings)
        forward_func, self.model = resolve_forward_and_model(
            forward_func, model, needed=self.config.any_rule_on
        )
        GradientAttribution.__init__(self, forward_func)
        self.strict = strict
        self._multiply_by_inputs = multiply_by_inputs

    @log_usage()
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: object = None,
        *,
        baselines: BaselineType = None,
    ) -> TensorOrTupleOfTensorsGeneric:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): Input embeddings for which
                        attributions are computed, usually
                        ``batch x tokens x hidden``. If forward_func takes several
                        tensors, a tuple of them. Dimension 0 is the batch.
                        They must be floating point: for token ids, use
                        :class:`LayerGIM` on the embedding layer.
            target (int, tuple, Tensor, or list, optional): Output indices for
                        which gradients are computed, with Captum's usual
                        conventions (a class index for every example, one per
                        example, tuples for outputs with more dimensions, or None
                        when forward_func returns one scalar per example). It is
                        checked against the output right after the forward pass:
                        an index out of range raises ``IndexError``, a target of
                        the wrong form or length ``ValueError``; both are also
                        ``AssertionError``, which Captum raises for targets.
                        Default: None
            additional_forward_args (Any, optional): Further arguments of
                        forward_func after the inputs (e.g. the attention mask);
                        not attributed.
                        Default: None
            baselines (scalar, Tensor, tuple of scalar or Tensor, optional):
                        Keyword-only. Reference inputs ``x'``, as in
                        IntegratedGradients: a
                        number, a tensor of the input's shape or of batch size 1,
                        or a tuple of those for tuple inputs. None means zeros.
                        Default: None

        Returns:
            *Tensor* or *tuple[Tensor, ...]* of **attributions**:
            - **attributions** (*Tensor* or *tuple[Tensor, ...]*):
                        ``(inputs - baselines) * GIM gradient`` (or the GIM
                        gradient alone if ``multiply_by_inputs`` is False), of the
                        same shapes and form as ``inputs``. Sum over the hidden
                        dimension for token scores.

        Examples::

            >>> import torch
            >>> from transformers import LlamaConfig, LlamaForCausalLM
            >>> from captum_gim import GIMAttribution
            >>> model = LlamaForCausalLM(LlamaConfig(
            ...     vocab_size=100, hidden_size=32, intermediate_size=64,
            ...     num_hidden_layers=2, num_attention_heads=4)).eval()
            >>> def last_logits(embeds):
            ...     return model(inputs_embeds=embeds).logits[:, -1]
            >>> gim = GIMAttribution(last_logits, model)
            >>> embeds = model.get_input_embeddings()(torch.tensor([[1, 5, 7, 9]]))
            >>> attributions = gim.attribute(embeds, target=42)
            >>> token_scores = attributions.sum(-1)  # 1 x 4
        """
        check_target_form(target)
        is_inputs_tuple = _is_tuple(inputs)
        inputs_tuple = _format_tensor_into_tuples(inputs)
        check_float_inputs(inputs_tuple)
        baselines_tuple = format_baselines(baselines, inputs_tuple)
        additional_forward_args = _format_additional_forward_args(additional_forward_args)
        # Detached aliases: the caller's tensors (maybe shared with other
        # threads) keep their requires_grad, and in-place writes by forward_func
        # to a leaf that requires grad are refused by autograd.
        aliases = tuple(tensor.detach().requires_grad_() for tensor in inputs_tuple)
        with clear_gradient_errors():
            with contextlib.ExitStack() as rules:
                if self.model is not None:
                    run = functools.partial(
                        self.forward_func, *aliases, *(additional_forward_args or ())
                    )
                    rules.enter_context(applied_rules(self.model, self.config, self.strict, run))
                gradients = self.gradient_func(
                    checked_forward(self.forward_func, target),
                    aliases,
                    target,
                    additional_forward_args,
                )
        attributions = difference_times_gradient(
            inputs_tuple, baselines_tuple, gradients, self.multiplies_by_inputs
        )
        return _format_output(is_inputs_tuple, attributions)

    def attribute_future(self) -> None:
        r"""
        This method is not implemented for GIMAttribution.
        """
        raise NotImplementedError("attribute_future is not implemented for GIMAttribution")

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs


def difference_times_gradient(
    values: tuple[Tensor, ...],
    baselines: tuple[Tensor | int | float, ...],
    gradients: tuple[Tensor, ...],
    multiply: bool,
) -> tuple[Tensor, ...]:
    r"""
    Returns:
        *tuple[Tensor, ...]*: ``(value - baseline) * gradient`` for each tensor,
        or the gradients alone when ``multiply`` is False.
    """
    if not multiply:
        return tuple(gradients)
    return tuple(
        (value - baseline) * gradient
        for value, baseline, gradient in zip(values, baselines, gradients)
    )
