"""Libraries that build models their own way:
:mod:`~captum_gim.sites.adapters.lens` reads TransformerLens's norms and gated
MLPs, and refuses its TransformerBridge."""
