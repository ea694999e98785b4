"""The Captum shells: ``gim_rules``, ``GIMAttribution`` and ``LayerGIM``.

They only combine :mod:`captum_gim.rules` (the mathematics) and
:mod:`captum_gim.sites` (where it goes): install the rules, compute gradients
with Captum's helpers, multiply by ``inputs - baselines``, remove the rules.
"""

from captum_gim.attr.gim import GIMAttribution
from captum_gim.attr.gim_rules import gim_rules
from captum_gim.attr.layer_gim import LayerGIM
from captum_gim.attr.llm import LLMGIMAttribution

__all__ = ["GIMAttribution", "LLMGIMAttribution", "LayerGIM", "gim_rules"]
