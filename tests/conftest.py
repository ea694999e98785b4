"""Test-suite settings: one torch thread (tiny models run faster and reproducibly), Agg plots."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
matplotlib.use("Agg")
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))
