"""mightylm: small, efficient language models, from loading to serving.

The names below are re-exported lazily (PEP 562): `import mightylm.model` loads torch and the model
alone, not tokenizers or safetensors; `mightylm.load` imports the checkpoint code on first use.
"""

from importlib import import_module

_EXPORTS = {"CheckpointError": "mightylm.checkpoint", "load": "mightylm.checkpoint", "save": "mightylm.checkpoint",
            "ModelConfig": "mightylm.config", "KVCache": "mightylm.model", "Transformer": "mightylm.model",
            "Tokenizer": "mightylm.tokenizer", "MightyError": "mightylm.errors"}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value  # found once, then an ordinary attribute
        return value
    raise AttributeError(f"module 'mightylm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
