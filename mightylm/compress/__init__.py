"""Compression: quantization (quantize.py, int8.py, nf4.py, smoothquant.py) as in-place module transforms.

The names every method shares live here, so the method files import them without importing each other.
"""

from mightylm.errors import MightyError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class QuantizationError(MightyError, ValueError):
    """A quantization request that cannot be carried out; the message says what and why."""
