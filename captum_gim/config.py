"""The seven settings of GIM, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TypedDict


@dataclass(frozen=True)
class GIMConfig:
    r"""
    Settings of the three GIM backward rules (see docs/GIM_SPEC.md).

    Every rule can be switched off on its own: ``temperature=1.0`` (or ``None``)
    gives the exact attention-softmax gradient, ``freeze_norm=False`` the exact
    normalization gradient, and a scale of ``1.0`` the exact gradient of that
    factor of a multiplicative interaction. A scale of ``0.0`` blocks the gradient
    through that factor (e.g. ``q_scale=k_scale=0`` attributes through the values
    only); negative scales are refused.

    Args:
        temperature (float or None, optional): Temperature :math:`T` of the
                    softmax backward rule: the gradient of the attention scores
                    is computed with ``softmax(s / T)`` in place of the forward
                    probabilities. ``None`` means ``1.0``. Must be finite and > 0.
                    Default: 2.0
        freeze_norm (bool, optional): Treat the statistic of every LayerNorm
                    and RMSNorm as a constant in the backward pass.
                    Default: True
        q_scale (float, optional): Gradient scale of the attention queries.
                    Default: 0.25
        k_scale (float, optional): Gradient scale of the attention keys.
                    Default: 0.25
        v_scale (float, optional): Gradient scale of the attention values.
                    Default: 0.5
        gate_scale (float, optional): Gradient scale of the gate branch of
                    gated MLPs (SwiGLU, GeGLU), after the gate projection.
                    Default: 0.5
        up_scale (float, optional): Gradient scale of the up branch of gated
                    MLPs, after the up projection.
                    Default: 0.5

    Examples::

        >>> from captum_gim import GIMConfig
        >>> GIMConfig().temperature
        2.0
        >>> GIMConfig.all_rules_off().freeze_norm
        False
    """

    temperature: float | None = 2.0
    freeze_norm: bool = True
    q_scale: float = 0.25
    k_scale: float = 0.25
    v_scale: float = 0.5
    gate_scale: float = 0.5
    up_scale: float = 0.5

    def __post_init__(self) -> None:
        if self.temperature is not None:
            _check_real("temperature", self.temperature)
            if not self.temperature > 0:
                raise ValueError(
                    f"temperature must be > 0, got {self.temperature}. Use 2.0 (the "
                    "GIM default), or 1.0 / None to switch the softmax rule off."
                )
        if not isinstance(self.freeze_norm, bool):
            raise TypeError(f"freeze_norm must be True or False, got {self.freeze_norm!r}.")
        for name in ("q_scale", "k_scale", "v_scale", "gate_scale", "up_scale"):
            _check_real(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise ValueError(
                    f"{name} must be >= 0, got {getattr(self, name)}: a negative scale "
                    "would flip the sign of that gradient path. Use a value in [0, 1] "
                    "(1.0 switches the rule off, 0.0 blocks the path)."
                )

    @classmethod
    def all_rules_off(cls) -> GIMConfig:
        r"""
        Returns:
            *GIMConfig*: the settings under which GIM equals the plain gradient.
        """
        return cls(
            temperature=None,
            freeze_norm=False,
            q_scale=1.0,
            k_scale=1.0,
            v_scale=1.0,
            gate_scale=1.0,
            up_scale=1.0,
        )

    @classmethod
    def resolve(cls, config: GIMConfig | None, settings: GIMSettings) -> GIMConfig:
        r"""
        Builds the settings of a class that takes both ``config=`` and the
        keyword settings (``**settings``).

        Args:
            config (GIMConfig or None): Settings given as one object, or ``None``.
            settings (dict): The keyword settings the caller passed; a key that
                        is absent keeps its default.

        Returns:
            *GIMConfig*: ``config`` when given (no keyword setting may then be
            passed, even one equal to its default), else the settings built
            from the keywords.
        """
        unknown = sorted(set(settings) - set(SETTING_NAMES))
        if unknown:
            raise TypeError(
                f"Unknown GIM setting(s) {unknown}; the settings are {list(SETTING_NAMES)}."
            )
        if config is None:
            return cls(**settings)
        if not isinstance(config, GIMConfig):
            raise TypeError(f"config must be a GIMConfig, got {type(config).__name__}.")
        if settings:
            raise ValueError(
                f"Both config= and the keyword setting(s) {sorted(settings)} were given. "
                "Pass either config=GIMConfig(...) or the keywords, e.g. "
                "config=dataclasses.replace(config, temperature=3.0)."
            )
        return config

    @property
    def softmax_rule_on(self) -> bool:
        r"""True when the attention softmax gets the tempered backward."""
        return self.temperature is not None and self.temperature != 1.0

    @property
    def attention_rules_on(self) -> bool:
        r"""True when any rule acts inside attention (softmax or q/k/v split)."""
        return self.softmax_rule_on or (self.q_scale, self.k_scale, self.v_scale) != (
            1.0,
            1.0,
            1.0,
        )

    @property
    def any_rule_on(self) -> bool:
        r"""True when any rule changes any gradient (else GIM is InputXGradient)."""
        return self.freeze_norm or self.attention_rules_on or self.mlp_rule_on

    @property
    def mlp_rule_on(self) -> bool:
        r"""True when the gated-MLP split changes any gradient."""
        return (self.gate_scale, self.up_scale) != (1.0, 1.0)


class GIMSettings(TypedDict, total=False):
    r"""
    The keyword settings that :class:`GIMAttribution`, :class:`LayerGIM`,
    :class:`LLMGIMAttribution` and :func:`gim_rules` accept as ``**settings``:
    the fields of :class:`GIMConfig`, each optional.
    """

    temperature: float | None
    freeze_norm: bool
    q_scale: float
    k_scale: float
    v_scale: float
    gate_scale: float
    up_scale: float


#: The names of the seven settings, in :class:`GIMConfig`'s order.
SETTING_NAMES: tuple[str, ...] = tuple(field.name for field in fields(GIMConfig))


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}.")
