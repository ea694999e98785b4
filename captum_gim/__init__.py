"""captum_gim: GIM (Gradient Interaction Modifications) attributions as a Captum backend.

The public API:

- :class:`GIMAttribution`: attributions to input embeddings.
- :class:`LayerGIM`: attributions to a layer (e.g. the token embeddings).
- :class:`LLMGIMAttribution`: every generated token's attributions in one pass.
- :func:`gim_rules`: the GIM backward rules for any Captum gradient method.
- :class:`GIMConfig`: the seven settings of the rules.
- :func:`attribute_dataset`, :func:`load_results`: GIM over a whole dataset (batched,
  resumable, sharded under torchrun), and its results as a DataFrame.
- :func:`describe`: what GIM does to a model, part by part (rule sites, products
  kept exact by design, refused parts).
- :func:`compare`: GIM and Captum's methods on the same prompt, side by side.
- :func:`logits_forward`: a causal LM's next-token logits as a Captum forward function.
- :func:`register_norm`, :func:`register_gated_mlp`, :func:`unregister`: describe
  norm and gated-MLP classes that GIM cannot recognise by itself.
"""

import sys

from captum_gim.attr.gim import GIMAttribution
from captum_gim.attr.gim_rules import gim_rules
from captum_gim.attr.layer_gim import LayerGIM
from captum_gim.attr.llm import LLMGIMAttribution
from captum_gim.compare import ComparisonResult, compare
from captum_gim.config import GIMConfig
from captum_gim.describe import ModelDescription, describe
from captum_gim.forwards import logits_forward
from captum_gim.sites.discovery import UnsupportedModuleError
from captum_gim.sites.registry import register_gated_mlp, register_norm, unregister

# isort: split
from captum_gim import circuits  # after the names above, which it imports
from captum_gim.datasets import attribute_dataset, load_results

if "inseq" in sys.modules:  # inseq is imported: register "gim" as its attribution method
    import captum_gim.integrations.inseq  # noqa: F401

__version__ = "0.2.0"

__all__ = [
    "ComparisonResult",
    "GIMAttribution",
    "GIMConfig",
    "LLMGIMAttribution",
    "LayerGIM",
    "ModelDescription",
    "UnsupportedModuleError",
    "__version__",
    "attribute_dataset",
    "circuits",
    "compare",
    "describe",
    "gim_rules",
    "load_results",
    "logits_forward",
    "register_gated_mlp",
    "register_norm",
    "unregister",
]
