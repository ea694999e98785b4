"""Bridges to other interpretability libraries, each importable on its own.

- :mod:`~captum_gim.integrations.inseq`: ``"gim"`` as an inseq attribution method.
"""
