"""Gated MLPs (``down(act(gate(x)) * up(x))``):

- :mod:`~captum_gim.sites.gated_mlp.recognition`: recognised by their parts;
- :mod:`~captum_gim.sites.gated_mlp.hooks`: the split of the product applied to
  a recognised one, and checked on every call;
- :mod:`~captum_gim.sites.gated_mlp.traced`: the split applied to the gated
  MLPs that the audit recognises by their data flow.
"""
