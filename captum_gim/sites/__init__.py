"""Where the GIM rules go in a model, and how they are put there.

One folder per part, each with its recognition, its hook and that hook's
per-call check:

- :mod:`~captum_gim.sites.norms`: normalization layers, probed for their form;
- :mod:`~captum_gim.sites.attention`: attention routed through transformers'
  AttentionInterface, traced from its ops, or PyTorch's ``nn.MultiheadAttention``;
- :mod:`~captum_gim.sites.gated_mlp`: gated MLPs, recognised by their parts or
  by their data flow;
- :mod:`~captum_gim.sites.audit`: accounts, once per model, for every softmax,
  normalization and product of two input-dependent tensors of one forward pass,
  and notices a backward pass whose forward pass ran outside the rules;
- :mod:`~captum_gim.sites.adapters`: TransformerLens's norms and gated MLPs,
  and its refused TransformerBridge.

Model-wide, here: :mod:`~captum_gim.sites.discovery` finds the sites of a
model (:func:`find_rule_sites`) or names what it cannot reach;
:mod:`~captum_gim.sites.registry` registers what probing cannot settle;
:mod:`~captum_gim.sites.cache` keeps the sites found per model;
:mod:`~captum_gim.sites.install` installs one hook per rule and site;
:mod:`~captum_gim.sites.checks`, :mod:`~captum_gim.sites.compiled` and
:mod:`~captum_gim.sites.exclusive`: what is checked and set aside around that.
"""

from captum_gim.sites.discovery import RuleSites, UnsupportedModuleError, find_rule_sites

__all__ = ["RuleSites", "UnsupportedModuleError", "find_rule_sites"]
