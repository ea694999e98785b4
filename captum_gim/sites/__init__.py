"""Where the GIM rules go in a model, and how they are put there.

- :mod:`~captum_gim.sites.discovery`: finds the norms, attention modules and
  gated MLPs of a model (:func:`find_rule_sites`), or names what it cannot reach;
- :mod:`~captum_gim.sites.attention`: routes attention modules through the GIM
  attention function of transformers' AttentionInterface;
- :mod:`~captum_gim.sites.lens`: TransformerLens's norms and gated MLPs, and
  its refused TransformerBridge;
- :mod:`~captum_gim.sites.audit`: accounts, once per model, for every softmax,
  normalization and product of two input-dependent tensors of one forward pass
  (covered by a site, kept exact by design, or refused), and recognises gated
  MLPs by their data flow (:mod:`~captum_gim.sites.traced_gated_mlp`);
- :mod:`~captum_gim.sites.install`: installs one hook per rule and site;
- :mod:`~captum_gim.sites.checks`, :mod:`~captum_gim.sites.compiled` and
  :mod:`~captum_gim.sites.exclusive`: what is checked and set aside around that;
  :mod:`~captum_gim.sites.backward_watch` notices a backward pass through the
  model whose forward pass ran outside the rules.
"""

from captum_gim.sites.discovery import RuleSites, UnsupportedModuleError, find_rule_sites

__all__ = ["RuleSites", "UnsupportedModuleError", "find_rule_sites"]
