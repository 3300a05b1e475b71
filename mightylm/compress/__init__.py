"""Compression: quantization (quantize.py, int8.py, nf4.py, smoothquant.py) as in-place module transforms.

The names every method shares live here, so the method files import them without importing each other.
"""

from torch import nn

from mightylm.errors import MightyError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class QuantizationError(MightyError, ValueError):
    """A quantization request that cannot be carried out; the message says what and why."""


def target_linears(module: nn.Module, targets, error: type[Exception] | None = None) -> dict[str, nn.Linear]:
    """The plain nn.Linear layers under `module` whose leaf name is in `targets`, by name. With `error`, finding none
    raises it, naming the linear layers the module does have."""
    found = {n: m for n, m in module.named_modules() if type(m) is nn.Linear and n.rsplit(".", 1)[-1] in targets}
    if not found and error is not None:
        known = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)})
        raise error(f"no linear layer named {list(targets)}; this model has {known}")
    return found
