"""LayerGIM: GIM attributions to a layer's activations (usually the embeddings)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from captum._utils.common import (
    _format_additional_forward_args,
    _format_output,
    _format_tensor_into_tuples,
)
from captum._utils.gradient import compute_layer_gradients_and_eval
from captum._utils.typing import BaselineType, TargetType
from captum.attr import LayerGradientXActivation
from captum.log import log_usage
from torch import Tensor, nn

from captum_gim._checks import (
    check_nonempty_inputs,
    checked_forward,
    clear_gradient_errors,
    format_baselines,
)
from captum_gim._model_checks import resolve_forward_and_model
from captum_gim.attribution import difference_times_gradient
from captum_gim.config import GIMConfig
from captum_gim.rules import gim_rules


class LayerGIM(LayerGradientXActivation):
    r"""
    GIM attributions to the input or output of one layer:

        attribution = (layer activation - layer baselines) * GIM gradient

    where the GIM gradient is taken with respect to the layer's activation
    under the three GIM backward rules (see :class:`GIMAttribution`). With the
    token embedding layer as ``layer``, token ids can be the inputs, and
    ``LayerGIM`` plugs into Captum's ``LLMGradientAttribution``, which accepts
    it as a ``LayerGradientXActivation``.

    The model is left exactly as it was after every call, and the same rules
    for threads, ``torch.compile``, gradient checkpointing and dropout apply as
    for :class:`GIMAttribution`.
    """

    def __init__(
        self,
        forward_func: Callable[..., Tensor],
        layer: nn.Module,
        model: nn.Module | None = None,
        *,
        temperature: float | None = 2.0,
        freeze_norm: bool = True,
        q_scale: float = 0.25,
        k_scale: float = 0.25,
        v_scale: float = 0.5,
        gate_scale: float = 0.5,
        up_scale: float = 0.5,
        multiply_by_inputs: bool = True,
        config: GIMConfig | None = None,
        strict: bool = True,
        device_ids: list[int] | None = None,
    ) -> None:
        r"""
        Args:
            forward_func (Callable): The forward function of the model or any
                        modification of it; often the model itself.
            layer (torch.nn.Module): The layer whose activations are attributed,
                        e.g. ``model.get_input_embeddings()``.
            model (nn.Module, optional): The transformer that gets the GIM rules.
                        When None, ``forward_func`` itself if it is an
                        ``nn.Module`` (or a bound method of one). A
                        ``torch.compile`` wrapper is accepted only when it is
                        ``forward_func`` itself.
                        Default: None
            temperature (float or None, optional): Softmax backward temperature;
                        1.0 or None switches the rule off.
                        Default: 2.0
            freeze_norm (bool, optional): Freeze normalization statistics.
                        Default: True
            q_scale (float, optional): Gradient scale of attention queries.
                        Default: 0.25
            k_scale (float, optional): Gradient scale of attention keys.
                        Default: 0.25
            v_scale (float, optional): Gradient scale of attention values.
                        Default: 0.5
            gate_scale (float, optional): Gradient scale of gated-MLP gates.
                        Default: 0.5
            up_scale (float, optional): Gradient scale of gated-MLP up branches.
                        Default: 0.5
            multiply_by_inputs (bool, optional): Multiply the GIM gradient by
                        ``activation - layer_baselines``; with False the GIM
                        gradient alone is returned.
                        Default: True
            config (GIMConfig, optional): The seven settings as one object.
                        Default: None
            strict (bool, optional): Raise for parts of the model the rules
                        cannot reach; with False they keep exact gradients.
                        Default: True
            device_ids (list[int], optional): Device ids, only for a
                        DataParallel forward_func (as in Captum).
                        Default: None
        """
        forward_func, model = resolve_forward_and_model(forward_func, model)
        LayerGradientXActivation.__init__(
            self,
            forward_func,
            layer,
            device_ids=device_ids,
            multiply_by_inputs=multiply_by_inputs,
        )
        self.model = model
        self.config = GIMConfig.resolve(
            config,
            temperature=temperature,
            freeze_norm=freeze_norm,
            q_scale=q_scale,
            k_scale=k_scale,
            v_scale=v_scale,
            gate_scale=gate_scale,
            up_scale=up_scale,
        )
        self.strict = strict

    @log_usage()
    def attribute(  # type: ignore[override]
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: object = None,
        attribute_to_layer_input: bool = False,
        layer_baselines: BaselineType = None,
        grad_kwargs: dict[str, Any] | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        r"""
        Args:
            inputs (Tensor or tuple[Tensor, ...]): Inputs of forward_func, e.g.
                        token ids ``batch x tokens``. Dimension 0 is the batch.
            target (int, tuple, Tensor, or list, optional): Output indices for
                        which gradients are computed, with Captum's usual
                        conventions; None when forward_func returns one scalar
                        per example. Checked against the output right after the
                        forward pass (``IndexError`` when out of range).
                        Default: None
            additional_forward_args (Any, optional): Further arguments of
                        forward_func after the inputs (e.g. the attention mask).
                        Default: None
            attribute_to_layer_input (bool, optional): Attribute to the layer's
                        input instead of its output.
                        Default: False
            layer_baselines (scalar, Tensor, tuple of scalar or Tensor, optional):
                        Reference activations of the layer, of the activation's
                        shape, of batch size 1, or a number. None means zeros,
                        giving activation x GIM gradient.
                        Default: None
            grad_kwargs (dict[str, Any], optional): Extra keyword arguments for
                        ``torch.autograd.grad``.
                        Default: None

        Returns:
            *Tensor* or *tuple[Tensor, ...]* of **attributions**:
            - **attributions** (*Tensor* or *tuple[Tensor, ...]*):
                        ``(activation - layer_baselines) * GIM gradient`` for each
                        neuron of the layer, of the layer activation's shape
                        (a tuple when the layer has several tensors).

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
        """
        inputs = _format_tensor_into_tuples(inputs)
        check_nonempty_inputs(inputs)
        additional_forward_args = _format_additional_forward_args(additional_forward_args)
        with clear_gradient_errors(), gim_rules(self.model, config=self.config, strict=self.strict):
            layer_gradients, layer_evals = compute_layer_gradients_and_eval(
                checked_forward(self.forward_func, target),
                self.layer,
                inputs,
                target,
                additional_forward_args,
                device_ids=self.device_ids,
                attribute_to_layer_input=attribute_to_layer_input,
                grad_kwargs=grad_kwargs,
            )
        layer_gradients = cast(tuple[Tensor, ...], layer_gradients)
        layer_evals = cast(tuple[Tensor, ...], layer_evals)
        baselines = format_baselines(layer_baselines, layer_evals)
        attributions = difference_times_gradient(
            layer_evals, baselines, layer_gradients, self.multiplies_by_inputs
        )
        return _format_output(len(attributions) > 1, attributions)
