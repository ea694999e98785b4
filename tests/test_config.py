"""GIMConfig: defaults, validation and the config-or-keywords rule."""

from __future__ import annotations

import math

import pytest

from captum_gim import GIMConfig


def test_defaults_are_the_spec_defaults() -> None:
    config = GIMConfig()
    assert (config.temperature, config.freeze_norm) == (2.0, True)
    assert (config.q_scale, config.k_scale, config.v_scale) == (0.25, 0.25, 0.5)
    assert (config.gate_scale, config.up_scale) == (0.5, 0.5)
    assert config.softmax_rule_on and config.attention_rules_on and config.mlp_rule_on


def test_all_rules_off_switches_every_rule_off() -> None:
    config = GIMConfig.all_rules_off()
    assert not (config.softmax_rule_on or config.attention_rules_on or config.mlp_rule_on)
    assert not config.freeze_norm
    assert not GIMConfig(temperature=1.0).softmax_rule_on


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf])
def test_bad_temperature_is_refused(temperature) -> None:
    with pytest.raises(ValueError, match="temperature"):
        GIMConfig(temperature=temperature)


@pytest.mark.parametrize("name", ["q_scale", "k_scale", "v_scale", "gate_scale", "up_scale"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_scales_are_refused(name, value) -> None:
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        GIMConfig(**{name: value})


def test_non_numbers_are_refused() -> None:
    with pytest.raises(TypeError, match="q_scale must be a real number"):
        GIMConfig(q_scale="0.25")
    with pytest.raises(TypeError, match="freeze_norm"):
        GIMConfig(freeze_norm=1)


def test_config_and_any_keyword_together_are_refused() -> None:
    config = GIMConfig(temperature=3.0)
    assert GIMConfig.resolve(config, {}) is config
    assert GIMConfig.resolve(None, {"q_scale": 1.0}) == GIMConfig(q_scale=1.0)
    # A keyword equal to its default is still a keyword: it is never silently ignored.
    with pytest.raises(ValueError, match=r"\['temperature'\]"):
        GIMConfig.resolve(config, {"temperature": 2.0})
    with pytest.raises(ValueError, match=r"\['q_scale'\]"):
        GIMConfig.resolve(config, {"q_scale": 1.0})


def test_unknown_setting_is_refused_with_the_valid_names() -> None:
    with pytest.raises(TypeError, match=r"Unknown GIM setting.*'temprature'.*'temperature'"):
        GIMConfig.resolve(None, {"temprature": 2.0})  # type: ignore[typeddict-unknown-key]


def test_keyword_settings_are_the_config_fields() -> None:
    from dataclasses import fields

    from captum_gim.config import SETTING_NAMES, GIMSettings

    assert tuple(GIMSettings.__annotations__) == SETTING_NAMES
    assert SETTING_NAMES == tuple(f.name for f in fields(GIMConfig))


@pytest.mark.parametrize("name", ["q_scale", "k_scale", "v_scale", "gate_scale", "up_scale"])
def test_negative_scales_are_refused_and_zero_blocks_the_path(name) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be >= 0, got -0.5.*0.0 blocks"):
        GIMConfig(**{name: -0.5})
    assert getattr(GIMConfig(**{name: 0.0}), name) == 0.0
