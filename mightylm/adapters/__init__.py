"""Adapters: parameter-efficient techniques applied as in-place module transforms."""


class AdapterError(ValueError):
    """An adapter that cannot be applied or loaded; the message names the file and what is wrong."""
