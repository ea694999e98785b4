"""GIM as an `inseq <https://github.com/inseq-team/inseq>`_ attribution method.

inseq finds its attribution methods among the subclasses of its registries,
so defining :class:`GIMInseqAttribution` registers ``"gim"``: importing this
module is the registration (``import captum_gim`` imports it when inseq has
already been imported). The seven GIM settings, ``config`` and ``strict`` go
through ``inseq.load_model(..., **kwargs)`` like any method's arguments.

Examples::

    >>> import inseq
    >>> import captum_gim.integrations.inseq  # registers "gim"
    >>> model = inseq.load_model(hf_model, "gim", tokenizer=tokenizer, temperature=2.0)
    >>> out = model.attribute("The capital of France is", attributed_fn="logit")
"""

from __future__ import annotations

import dataclasses
from typing import Any

from inseq.attr.feat import GradientAttributionRegistry

from captum_gim.attr.gim import GIMAttribution
from captum_gim.config import GIMConfig

_SETTINGS = tuple(field.name for field in dataclasses.fields(GIMConfig))


class GIMInseqAttribution(GradientAttributionRegistry):
    r"""
    GIM (Gradient Interaction Modifications) in inseq: the gradient of the
    attributed function with the three GIM rules, times the input embeddings;
    :class:`~captum_gim.GIMAttribution` on inseq's forward function, with the
    rules placed on the Hugging Face model inseq wraps.

    Args:
        attribution_model (inseq.models.AttributionModel): The model inseq
                    attributes (passed by inseq).
        multiply_by_inputs (bool, optional): Multiply the gradient by the input
                    embeddings (False: the GIM gradient alone).
                    Default: True
        config (GIMConfig, optional): The settings, instead of keywords.
                    Default: None
        strict (bool, optional): Refuse a model part the rules cannot reach
                    (False: warn, and keep its exact gradients).
                    Default: True
        **kwargs: The GIM settings (``temperature``, ``freeze_norm``,
                    ``q_scale``, ``k_scale``, ``v_scale``, ``gate_scale``,
                    ``up_scale``); the rest goes to inseq's hook.
    """

    method_name = "gim"

    def __init__(
        self,
        attribution_model: Any,
        multiply_by_inputs: bool = True,
        config: GIMConfig | None = None,
        strict: bool = True,
        **kwargs: Any,
    ) -> None:
        settings = {name: kwargs.pop(name) for name in _SETTINGS if name in kwargs}
        super().__init__(attribution_model, **kwargs)
        self.method = GIMAttribution(
            self.attribution_model,
            attribution_model.model,
            multiply_by_inputs=multiply_by_inputs,
            config=config,
            strict=strict,
            **settings,
        )
