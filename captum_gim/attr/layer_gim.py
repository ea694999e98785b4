"""LayerGIM: GIM attributions to a layer's activations (usually the embeddings)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, cast

from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
)
from captum._utils.gradient import compute_layer_gradients_and_eval
from captum._utils.typing import BaselineType, ModuleOrModuleList, TargetType
from captum.attr import LayerGradientXActivation
from captum.log import log_usage
from torch import Tensor, nn
from typing_extensions import Unpack

from captum_gim.attr.errors import clear_gradient_errors
from captum_gim.attr.gim import difference_times_gradient
from captum_gim.attr.gim_rules import applied_rules
from captum_gim.attr.inputs import check_nonempty_inputs, format_baselines
from captum_gim.attr.targets import checked_forward
from captum_gim.config import GIMConfig, GIMSettings
from captum_gim.sites.checks import resolve_forward_and_model


class LayerGIM(LayerGradientXActivation):
    r"""
    GIM attributions to the input or output of a layer, or of several layers
    from one backward pass:

        attribution = (layer activation - layer baselines) * GIM gradient

    where the GIM gradient is taken with respect to the layer's activation
    under the three GIM backward rules (see :class:`GIMAttribution`). With the
    token embedding layer as ``layer``, token ids can be the inputs, and
    ``LayerGIM`` plugs into Captum's ``LLMGradientAttribution``, which accepts
    it as a ``LayerGradientXActivation``.

    Positional arguments mean what they mean in Captum's
    ``LayerGradientXActivation`` wherever both have them: ``attribute(inputs,
    target, additional_forward_args, attribute_to_layer_input, grad_kwargs)``;
    ``layer_baselines`` is keyword-only. The third argument of the constructor
    is ``model`` (Captum's ``device_ids`` is keyword-only here; a list passed
    there raises an error saying so).

    The model is left exactly as it was after every call, and the same rules
    for threads, ``torch.compile``, gradient checkpointing and dropout apply as
    for :class:`GIMAttribution`.
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        layer: ModuleOrModuleList,
        model: nn.Module | None = None,
        *,
        device_ids: list[int] | None = None,
        multiply_by_inputs: bool = True,
        memory_efficient: bool = False,
        config: GIMConfig | None = None,
        strict: bool = True,
        **settings: Unpack[GIMSettings],
    ) -> None:
        r"""
        Args:
            forward_func (Callable): The forward function of the model or any
                        modification of it; often the model itself.
            layer (torch.nn.Module or list of torch.nn.Module): The layer whose
                        activations are attributed, e.g.
                        ``model.get_input_embeddings()``, or a list of layers:
                        one attribution per layer, from one backward pass.
            model (nn.Module, optional): The transformer that gets the GIM rules.
                        When None, ``forward_func`` itself if it is an
                        ``nn.Module`` (or a bound method of one). A
                        ``torch.compile`` wrapper is accepted only when it is
                        ``forward_func`` itself.
                        Default: None
            device_ids (list[int], optional): Device ids, only for a
                        DataParallel forward_func (as in Captum).
                        Default: None
            multiply_by_inputs (bool, optional): Multiply the GIM gradient by
                        ``activation - layer_baselines``; with False the GIM
                        gradient alone is returned.
                        Default: True
            memory_efficient (bool, optional): Offload the layer activations
                        and gradients to the CPU as they are collected (as in
                        Captum's ``LayerGradientXActivation``).
                        Default: False
            config (GIMConfig, optional): The seven settings as one object.
                        Default: None
            strict (bool, optional): Raise for parts of the model the rules
                        cannot reach; with False they keep exact gradients.
                        Default: True
            **settings: Any of the seven settings of :class:`GIMConfig`
                        (``temperature``, ``freeze_norm``, ``q_scale``,
                        ``k_scale``, ``v_scale``, ``gate_scale``, ``up_scale``)
                        as keywords, with GIMConfig's defaults and meaning. Not
                        together with ``config``.
        """
        self.config = GIMConfig.resolve(config, settings)
        forward_func, model = resolve_forward_and_model(
            forward_func, model, needed=self.config.any_rule_on
        )
        LayerGradientXActivation.__init__(
            self,
            forward_func,
            layer,
            device_ids=device_ids,
            multiply_by_inputs=multiply_by_inputs,
            memory_efficient=memory_efficient,
        )
        self.model = model
        self.strict = strict

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: object = None,
        attribute_to_layer_input: bool = False,
        grad_kwargs: dict[str, Any] | None = None,
        *,
        layer_baselines: BaselineType | list[BaselineType] = None,
    ) -> Tensor | tuple[Tensor, ...] | list[Tensor | tuple[Tensor, ...]]:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): Inputs of forward_func, e.g.
                        token ids ``batch x tokens``. Dimension 0 is the batch.
            target (int, tuple, Tensor, or list, optional): Output indices for
                        which gradients are computed, with Captum's usual
                        conventions; None when forward_func returns one scalar
                        per example. Checked against the output right after the
                        forward pass (``IndexError`` when out of range; also an
                        ``AssertionError``, as Captum's target errors are).
                        Default: None
            additional_forward_args (Any, optional): Further arguments of
                        forward_func after the inputs (e.g. the attention mask).
                        Default: None
            attribute_to_layer_input (bool, optional): Attribute to the layer's
                        input instead of its output.
                        Default: False
            grad_kwargs (dict[str, Any], optional): Extra keyword arguments for
                        ``torch.autograd.grad``.
                        Default: None
            layer_baselines (scalar, Tensor, tuple, or list, optional):
                        Keyword-only. Reference activations of the layer, of the
                        activation's shape, of batch size 1, or a number; a list
                        with one such entry per layer when ``layer`` is a list.
                        None means zeros, giving activation x GIM gradient. They
                        are checked against the activations during the forward
                        pass, before any backward pass.
                        Default: None

        Returns:
            *Tensor*, *tuple[Tensor, ...]* or *list* of **attributions**:
            - **attributions** (*Tensor*, *tuple[Tensor, ...]* or *list*):
                        ``(activation - layer_baselines) * GIM gradient`` for each
                        neuron of the layer, of the layer activation's shape
                        (a tuple when the layer has several tensors); a list with
                        one such entry per layer when ``layer`` is a list.

        Examples::

            >>> import torch
            >>> from transformers import LlamaConfig, LlamaForCausalLM
            >>> from captum_gim import LayerGIM
            >>> model = LlamaForCausalLM(LlamaConfig(
            ...     vocab_size=100, hidden_size=32, intermediate_size=64,
            ...     num_hidden_layers=2, num_attention_heads=4)).eval()
            >>> def last_logits(input_ids):
            ...     return model(input_ids).logits[:, -1]
            >>> gim = LayerGIM(last_logits, model.get_input_embeddings(), model)
            >>> ids = torch.tensor([[1, 5, 7, 9]])
            >>> token_scores = gim.attribute(ids, target=42).sum(-1)  # 1 x 4
            >>> layers = [model.model.layers[0], model.model.layers[1]]
            >>> per_layer = LayerGIM(last_logits, layers, model).attribute(ids, target=42)
        """
        layers = self.layer if isinstance(self.layer, list) else [self.layer]
        baselines_per_layer = _baselines_per_layer(layer_baselines, self.layer)
        inputs = _format_tensor_into_tuples(inputs)
        check_nonempty_inputs(inputs)
        additional_forward_args = _format_additional_forward_args(additional_forward_args)
        with contextlib.ExitStack() as stack:
            stack.enter_context(clear_gradient_errors())
            for layer, baselines in zip(layers, baselines_per_layer):
                check = _baseline_check_hook(baselines, attribute_to_layer_input)
                stack.callback(layer.register_forward_hook(check, with_kwargs=True).remove)
            if self.model is not None:
                run = functools.partial(
                    self.forward_func, *inputs, *(additional_forward_args or ())
                )
                rules = applied_rules(self.model, self.config, self.strict, run, layers)
                stack.enter_context(rules)
            layer_gradients, layer_evals = compute_layer_gradients_and_eval(
                checked_forward(self.forward_func, target),
                self.layer,
                inputs,
                target,
                additional_forward_args,
                device_ids=self.device_ids,
                attribute_to_layer_input=attribute_to_layer_input,
                grad_kwargs=grad_kwargs,
                offload_to_cpu=self._memory_efficient,
            )
        if not isinstance(self.layer, list):
            layer_gradients, layer_evals = [layer_gradients], [layer_evals]
        results = []
        for gradients, evals, baselines in zip(layer_gradients, layer_evals, baselines_per_layer):
            evals = cast(tuple[Tensor, ...], evals)
            attributions = difference_times_gradient(
                evals,
                format_baselines(baselines, evals),
                cast(tuple[Tensor, ...], gradients),
                self.multiplies_by_inputs,
            )
            results.append(_format_output(len(attributions) > 1, attributions))
        return results if isinstance(self.layer, list) else results[0]


def _baselines_per_layer(
    layer_baselines: BaselineType | list[BaselineType], layer: nn.Module | list[nn.Module]
) -> list[BaselineType]:
    if not isinstance(layer, list):
        return [cast(BaselineType, layer_baselines)]
    if layer_baselines is None:
        return [None] * len(layer)
    if not isinstance(layer_baselines, list) or len(layer_baselines) != len(layer):
        raise ValueError(
            f"LayerGIM has {len(layer)} layers, so layer_baselines must be None or a "
            f"list of {len(layer)} baselines (one per layer, each None, a number or a "
            f"tensor), got {type(layer_baselines).__name__}."
        )
    return layer_baselines


def _baseline_check_hook(baselines: BaselineType, to_input: bool) -> Callable[..., None]:
    """A forward hook checking ``baselines`` against the layer's activation,
    so that a bad baseline raises before any backward pass."""

    def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        activation = args if to_input else output
        if baselines is not None:
            format_baselines(baselines, _format_tensor_into_tuples(activation))

    return hook
