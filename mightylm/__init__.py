"""mightylm: small, efficient language models, from loading to serving."""

from mightylm.checkpoint import CheckpointError, load, save
from mightylm.config import ModelConfig
from mightylm.model import KVCache, Transformer
from mightylm.tokenizer import Tokenizer

__all__ = ["CheckpointError", "KVCache", "ModelConfig", "Tokenizer", "Transformer", "load", "save"]
__version__ = "0.1.0"
