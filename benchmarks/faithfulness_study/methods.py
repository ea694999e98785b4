"""The registry of attribution methods compared (GIM, its rules alone, Captum's methods,
random scores) and the run settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from captum._utils.models.linear_model import SkLearnLinearRegression
from captum.attr import (
    DeepLift,
    FeatureAblation,
    GradientShap,
    InputXGradient,
    IntegratedGradients,
    KernelShap,
    Lime,
    Saliency,
)
from torch import Tensor, nn

from captum_gim import GIMAttribution, GIMConfig
from faithfulness_study.tasks import BENCH_DIR, SEED

REFERENCE_METHOD = "InputXGradient"
_RULES_OFF = GIMConfig.all_rules_off()
RULES_ALONE: dict[str, GIMConfig] = {
    "GIM: softmax rule alone (T=2)": replace(_RULES_OFF, temperature=2.0),
    "GIM: norm rule alone": replace(_RULES_OFF, freeze_norm=True),
    "GIM: q/k/v split alone": replace(_RULES_OFF, q_scale=0.25, k_scale=0.25, v_scale=0.5),
    "GIM: gate/up split alone": replace(_RULES_OFF, gate_scale=0.5, up_scale=0.5),
}


# ----------------------------------------------------------------------- settings


@dataclass(frozen=True)
class RunSettings:
    r"""
    Sizes and sampling budgets of one run.

    Args:
        n_bundled (int): Held-out prompts of the bundled model.
        n_minilm (int): Sentence/query pairs for MiniLM (the first ones of the
                    data file).
        n_self_repair (int): Prompts per evidence count in the self-repair study.
        n_samples (int): Perturbation samples of Lime and KernelShap.
        gradshap_samples (int): Samples of GradientShap.
        threads (int): Torch CPU threads.
        warmup (bool): Run every method once, untimed, before timing.
        out_dir (Path): Folder of ``RESULTS.md`` and the figures.
    """

    n_bundled: int = 200
    n_minilm: int = 100
    n_self_repair: int = 200
    n_samples: int = 200
    gradshap_samples: int = 20
    threads: int = 1
    warmup: bool = True
    out_dir: Path = BENCH_DIR


# --fast: enough to exercise every code path in well under a minute; the timings
# of a fast run mean little (no warm-up, two MiniLM examples).
FAST = {"n_bundled": 4, "n_minilm": 2, "n_self_repair": 4, "n_samples": 16,
        "gradshap_samples": 4, "warmup": False}  # fmt: skip


# ------------------------------------------------------------------------ methods

# A method maps (scorer, model, embeddings, baseline embeddings) to one score per
# token, shape (seq,); embeddings and baseline embeddings have shape (1, seq, dim).
AttributeFn = Callable[[nn.Module, nn.Module, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Method:
    r"""
    One attribution method of the benchmark.

    Args:
        name (str): Row name in the tables.
        attribute (AttributeFn): Computes the token scores of one example.
    """

    name: str
    attribute: AttributeFn


def _summed(attributions: Tensor) -> Tensor:
    """Token scores of embedding-level attributions: the sum over the dim."""
    return attributions.detach().sum(dim=-1)[0]


def _grouped(attributions: Tensor) -> Tensor:
    """Token scores of a feature-mask method: the value shared by a token's dims."""
    return attributions.detach()[0, :, 0]


def _token_mask(embeds: Tensor) -> Tensor:
    """Feature mask with one feature per token, of the shape of ``embeds``."""
    seq = embeds.shape[1]
    return torch.arange(seq).view(1, seq, 1).expand_as(embeds)


def gim_method(config: GIMConfig) -> AttributeFn:
    r"""
    GIM with the given settings: input x GIM gradient (zero baseline).

    Args:
        config (GIMConfig): The rules in force.

    Returns:
        AttributeFn: The method.
    """

    def attribute(scorer: nn.Module, model: nn.Module, x: Tensor, _: Tensor) -> Tensor:
        return _summed(GIMAttribution(scorer, model=model, config=config).attribute(x))

    return attribute


def saliency(scorer: nn.Module, model: nn.Module, x: Tensor, _: Tensor) -> Tensor:
    r"""Saliency: the absolute gradient, summed over the embedding dim."""
    return _summed(Saliency(scorer).attribute(x, abs=True))


def input_x_gradient(scorer: nn.Module, model: nn.Module, x: Tensor, _: Tensor) -> Tensor:
    r"""InputXGradient: input x exact gradient (zero baseline)."""
    return _summed(InputXGradient(scorer).attribute(x))


def integrated_gradients(n_steps: int) -> AttributeFn:
    r"""
    IntegratedGradients from the baseline-token embeddings, in one batch.

    Args:
        n_steps (int): Integration steps.

    Returns:
        AttributeFn: The method.
    """

    def attribute(scorer: nn.Module, model: nn.Module, x: Tensor, xb: Tensor) -> Tensor:
        ig = IntegratedGradients(scorer)
        return _summed(ig.attribute(x, xb, n_steps=n_steps, internal_batch_size=n_steps))

    return attribute


def gradient_shap(n_samples: int) -> AttributeFn:
    r"""
    GradientShap with the baseline-token embeddings as the only baseline.

    Args:
        n_samples (int): Random points on the path, evaluated in one batch.

    Returns:
        AttributeFn: The method.
    """

    def attribute(scorer: nn.Module, model: nn.Module, x: Tensor, xb: Tensor) -> Tensor:
        return _summed(GradientShap(scorer).attribute(x, xb, n_samples=n_samples))

    return attribute


def deeplift(scorer: nn.Module, model: nn.Module, x: Tensor, xb: Tensor) -> Tensor:
    r"""DeepLift (rescale rule) from the baseline-token embeddings."""
    return _summed(DeepLift(scorer).attribute(x, xb))


def feature_ablation(scorer: nn.Module, model: nn.Module, x: Tensor, xb: Tensor) -> Tensor:
    r"""Leave one token out: the drop when the token alone is the baseline token."""
    mask = _token_mask(x)
    fa = FeatureAblation(scorer)
    return _grouped(fa.attribute(x, xb, feature_mask=mask, perturbations_per_eval=x.shape[1]))


def lime(n_samples: int) -> AttributeFn:
    r"""
    Lime over tokens (present or baseline token) with an unregularised linear
    surrogate, weighted by Captum's default exponential cosine kernel.

    Args:
        n_samples (int): Perturbed samples.

    Returns:
        AttributeFn: The method.
    """

    def attribute(scorer: nn.Module, model: nn.Module, x: Tensor, xb: Tensor) -> Tensor:
        explainer = Lime(scorer, interpretable_model=SkLearnLinearRegression())
        return _grouped(
            explainer.attribute(
                x,
                xb,
                feature_mask=_token_mask(x),
                n_samples=n_samples,
                perturbations_per_eval=min(n_samples, 50),
            )
        )

    return attribute


def kernel_shap(n_samples: int) -> AttributeFn:
    r"""
    KernelShap over tokens (present or baseline token).

    Args:
        n_samples (int): Perturbed samples.

    Returns:
        AttributeFn: The method.
    """

    def attribute(scorer: nn.Module, model: nn.Module, x: Tensor, xb: Tensor) -> Tensor:
        return _grouped(
            KernelShap(scorer).attribute(
                x,
                xb,
                feature_mask=_token_mask(x),
                n_samples=n_samples,
                perturbations_per_eval=min(n_samples, 50),
            )
        )

    return attribute


def random_scores(seed: int) -> AttributeFn:
    r"""
    Uniform random token scores from one seeded generator.

    Args:
        seed (int): Seed of the generator.

    Returns:
        AttributeFn: The method.
    """
    generator = torch.Generator().manual_seed(seed)

    def attribute(scorer: nn.Module, model: nn.Module, x: Tensor, _: Tensor) -> Tensor:
        return torch.rand(x.shape[1], generator=generator)

    return attribute


def build_methods(settings: RunSettings) -> list[Method]:
    r"""
    Every method of the benchmark, in table order.

    Args:
        settings (RunSettings): Sampling budgets.

    Returns:
        list[Method]: The methods.
    """
    n = settings.n_samples
    gim_rows = [Method("GIM", gim_method(GIMConfig()))]
    gim_rows += [Method(name, gim_method(config)) for name, config in RULES_ALONE.items()]
    return [
        *gim_rows,
        Method("Saliency", saliency),
        Method(REFERENCE_METHOD, input_x_gradient),
        Method("IntegratedGradients (20 steps)", integrated_gradients(20)),
        Method("IntegratedGradients (50 steps)", integrated_gradients(50)),
        Method("GradientShap", gradient_shap(settings.gradshap_samples)),
        Method("DeepLift", deeplift),
        Method("FeatureAblation (leave one out)", feature_ablation),
        Method("Lime", lime(n)),
        Method("KernelShap", kernel_shap(n)),
        Method("Random", random_scores(SEED)),
    ]
