"""Vision transformers with all rules, and Captum's image workflow on them."""

from __future__ import annotations

import importlib.util

import matplotlib
import pytest
import torch
import transformers
from captum.attr import InputXGradient
from captum.attr import visualization as viz
from reference import reference_gradient
from torch import Tensor, nn

from captum_gim import GIMAttribution, GIMConfig

matplotlib.use("Agg")

OFF = GIMConfig.all_rules_off()
VISION = dict(
    image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
    num_attention_heads=2, intermediate_size=24, num_labels=5,
)  # fmt: skip


def _hf_model(config_class: str, model_class: str, implementation: str) -> nn.Module:
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**VISION)
    model = getattr(transformers, model_class)._from_config(
        config, attn_implementation=implementation
    )
    return model.eval()


def _images() -> Tensor:
    return torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _logits(model: nn.Module):  # type: ignore[no-untyped-def]
    def forward(pixel_values: Tensor) -> Tensor:
        return model(pixel_values=pixel_values).logits

    return forward


@pytest.mark.parametrize(
    ("config_class", "model_class"),
    [
        ("ViTConfig", "ViTForImageClassification"),
        ("DeiTConfig", "DeiTForImageClassification"),
    ],
)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_hf_vision_transformers_all_rules(
    config_class: str, model_class: str, implementation: str
) -> None:
    model = _hf_model(config_class, model_class, implementation)
    forward = _logits(model)
    off = GIMAttribution(forward, model, config=OFF).attribute(_images(), 3)
    torch.testing.assert_close(off, InputXGradient(forward).attribute(_images(), 3))
    ours = GIMAttribution(forward, model).attribute(_images(), 3)
    assert ours.shape == _images().shape and torch.isfinite(ours).all()
    assert not torch.allclose(ours, off)
    reference = reference_gradient(model, forward, _images(), 3, GIMConfig()) * _images()
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
    # the eager and sdpa implementations give the same GIM attributions
    other = _hf_model(config_class, model_class, {"eager": "sdpa", "sdpa": "eager"}[implementation])
    again = GIMAttribution(_logits(other), other).attribute(_images(), 3)
    torch.testing.assert_close(ours, again, rtol=1e-4, atol=1e-6)


def test_hf_vit_model_without_head() -> None:
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**VISION)).eval()

    def pooled(pixel_values: Tensor) -> Tensor:
        return model(pixel_values=pixel_values).last_hidden_state[:, 0]

    ours = GIMAttribution(pooled, model).attribute(_images(), 7)
    assert ours.shape == _images().shape and torch.isfinite(ours).all()


def test_captum_image_workflow_visualize_image_attr() -> None:
    model = _hf_model("ViTConfig", "ViTForImageClassification", "sdpa")
    attributions = GIMAttribution(_logits(model), model).attribute(_images(), 1)
    image = _images()[0].permute(1, 2, 0).numpy()
    heat = attributions[0].permute(1, 2, 0).detach().numpy()
    figure, axis = viz.visualize_image_attr(
        heat, image, method="blended_heat_map", sign="all", show_colorbar=True, use_pyplot=False
    )
    assert axis.images and figure.get_axes()


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="torchvision is not installed (PyPI torchvision does not import beside the "
    "pinned torch); run in a venv with torch==2.14.1 torchvision==0.29.1",
)
def test_torchvision_vit_b_16_architecture() -> None:
    from torchvision.models import vit_b_16

    torch.manual_seed(0)
    model = vit_b_16(weights=None, image_size=32, num_classes=4).eval()  # random weights
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    off = GIMAttribution(model, config=OFF).attribute(images, 2)
    torch.testing.assert_close(off, InputXGradient(model).attribute(images, 2))
    ours = GIMAttribution(model).attribute(images, 2)
    assert ours.shape == images.shape and torch.isfinite(ours).all()
    assert not torch.allclose(ours, off)
