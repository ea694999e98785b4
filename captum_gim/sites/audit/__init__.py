"""What the rule sites may have missed:

- :mod:`~captum_gim.sites.audit.forward`: accounts, once per model, for every
  softmax, normalization and product of two input-dependent tensors of one
  forward pass (covered by a site, kept exact by design, or refused);
- :mod:`~captum_gim.sites.audit.backward`: notices a backward pass through the
  model whose forward pass ran outside the rules.
"""
