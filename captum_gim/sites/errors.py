"""The error raised for a part of a model that a GIM rule should reach but cannot."""


class UnsupportedModuleError(TypeError):
    r"""A part of the model that a GIM rule should reach but cannot."""
