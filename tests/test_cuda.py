"""On a CUDA device (skipped without one): GIM there equals GIM on the CPU."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILY_BY_NAME, logits_of, sample_ids

from captum_gim import GIMAttribution

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(
    ("name", "implementation"),
    [("llama", "sdpa"), ("llama", "eager"), ("gemma3", "sdpa"), ("gpt2", "sdpa"), ("bert", "sdpa")],
)
def test_gim_on_cuda_matches_cpu(name, implementation) -> None:
    model = FAMILY_BY_NAME[name].build(implementation)
    embeds = model.get_input_embeddings()(sample_ids(length=40)).detach()
    on_cpu = GIMAttribution(logits_of(model), model).attribute(embeds, target=3)
    model = model.cuda()
    on_cuda = GIMAttribution(logits_of(model), model).attribute(embeds.cuda(), target=3)
    error = (on_cuda.cpu() - on_cpu).norm() / on_cpu.norm()
    assert error < 1e-4, f"relative error {error:.2e}"


def test_bf16_on_cuda_is_close_to_fp32() -> None:
    model = FAMILY_BY_NAME["llama"].build("sdpa").cuda()
    embeds = model.get_input_embeddings()(sample_ids(length=40).cuda()).detach()
    full = GIMAttribution(logits_of(model), model).attribute(embeds, target=3)
    model = model.to(torch.bfloat16)
    half = GIMAttribution(logits_of(model), model).attribute(embeds.bfloat16(), target=3)
    error = (half.float() - full).norm() / full.norm()
    assert torch.isfinite(half).all() and error < 0.1, f"relative error {error:.2e}"
