"""Test-suite settings (one torch thread: tiny models run faster and reproducibly; Agg
plots) and the fixtures shared by several test files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
matplotlib.use("Agg")
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import sample_ids, shared_model  # noqa: E402 (needs the path above)


@pytest.fixture
def llama() -> torch.nn.Module:
    """The shared tiny Llama (sdpa); a test must leave it as it was."""
    return shared_model("llama", "sdpa")


@pytest.fixture
def embeds(llama: torch.nn.Module) -> torch.Tensor:
    """Input embeddings of ``sample_ids()`` in the tiny Llama."""
    return llama.get_input_embeddings()(sample_ids()).detach()


@pytest.fixture(scope="module")
def bundled():
    """The bundled model and its tokenizer (``captum_gim.models.load_model()``)."""
    from captum_gim.models import load_model

    return load_model()
