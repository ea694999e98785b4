"""Attention, by how a module computes it:

- :mod:`~captum_gim.sites.attention.routed`: modules that call transformers'
  AttentionInterface, routed through the GIM attention function;
- :mod:`~captum_gim.sites.attention.traced`: attention computed outside it,
  read from the data flow of its ops during the call;
- :mod:`~captum_gim.sites.attention.multihead`: PyTorch's
  ``nn.MultiheadAttention``, recomputed with the rules.
"""
