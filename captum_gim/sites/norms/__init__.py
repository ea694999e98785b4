"""Normalization layers: recognising a norm's form by probing it
(:mod:`~captum_gim.sites.norms.recognition`) and the frozen-norm rule's hook,
with its check of the recomputed output (:mod:`~captum_gim.sites.norms.hooks`)."""
