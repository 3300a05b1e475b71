"""What a GGUF file says before its weights are read: the opened container, the model's config and its tokenizer
from the metadata. No torch here, so `mightylm.lite` starts without it; `gguf.py` loads the weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mightylm.checkpoint.gguf_file import F16, F32
from mightylm.config import PHI_AXES, ConfigError, ModelConfig
from mightylm.errors import CheckpointError
from mightylm.tokenizer import Tokenizer, TokenizerError, from_gguf_metadata


def gguf_metadata(path: Path):
    """The opened file (its tensors are views of a memory map, not read) and its metadata key/values."""
    from mightylm.checkpoint.gguf_file import GGUFFile, GGUFFormatError

    try:
        file = GGUFFile(path)
    except GGUFFormatError as e:
        raise CheckpointError(f"{path}: cannot be read as GGUF: {e}") from None
    return file, file.meta


def gguf_tokenizer(meta: dict, path: Path) -> Tokenizer:
    try:
        return from_gguf_metadata(meta, str(path))
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None


# llama.cpp's architecture names; a llama file with experts is Mixtral
GGUF_ARCHS = ("llama", "qwen2", "qwen2moe", "olmoe", "phi2", "phi3")


def gguf_config(meta: dict, file, *, source) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise CheckpointError(f"{source}: GGUF architecture {arch!r} is not supported; supported: "
                              f"{', '.join(GGUF_ARCHS)}")

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{source}: GGUF metadata lacks {arch}.{key}")
        return value

    names = {t.name for t in file.tensors}
    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    scaling = None
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in ("linear", "yarn"):
        scaling = {"type": kind, "factor": float(get("rope.scaling.factor"))}
        if kind == "yarn":
            scaling["original_max_position_embeddings"] = int(meta.get(f"{arch}.rope.scaling.original_context_length")
                                                              or get("context_length"))
    elif kind not in (None, "none"):
        raise CheckpointError(f"{source}: RoPE scaling {kind!r} in GGUF is not supported; supported: linear, yarn, "
                              "and llama3's precomputed rope_freqs")
    if "rope_freqs.weight" in names:  # llama.cpp's per-dimension divisors (llama3's factors, precomputed)
        tensor = next(t for t in file.tensors if t.name == "rope_freqs.weight")
        divisors = _values(tensor, source)
        scaling = {"type": "longrope", "short_factor": divisors, "long_factor": divisors, "attention_factor": 1.0,
                   "original_max_position_embeddings": int(get("context_length"))}
    experts = int(meta.get(f"{arch}.expert_count", 0) or 0)
    moe = {}
    if experts:
        moe = dict(n_experts=experts, experts_per_token=int(get("expert_used_count")),
                   expert_ffn_dim=int(meta.get(f"{arch}.expert_feed_forward_length") or 0) or None,
                   shared_expert_ffn_dim=int(meta.get(f"{arch}.expert_shared_feed_forward_length") or 0) or None,
                   # Mixtral (llama.cpp's llama with experts) renormalises; Qwen2-MoE and OLMoE say so when they do
                   norm_topk_prob=bool(meta.get(f"{arch}.expert_weights_norm", arch == "llama")))
    ours = {"llama": "mixtral" if experts else "llama", "qwen2": "qwen2", "qwen2moe": "qwen2_moe", "olmoe": "olmoe",
            "phi2": "phi", "phi3": "phi3"}
    phi = {**PHI_AXES, "head_bias": "output.bias" in names} if arch == "phi2" else {}
    head_dim = int(meta.get(f"{arch}.attention.key_length", dim // n_heads))
    rotary = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    eps = meta.get(f"{arch}.attention.layer_norm_epsilon" if arch == "phi2" else f"{arch}.attention.layer_norm_rms_epsilon")
    if eps is None:
        raise CheckpointError(f"{source}: GGUF metadata lacks the norm epsilon of a {arch} model")
    try:
        return ModelConfig(
            **moe,
            **phi,
            partial_rotary_factor=rotary / head_dim,
            # llama.cpp reads it for phi3; we write it for Mistral-style llama files too (llama.cpp ignores it there)
            sliding_window=int(meta.get(f"{arch}.attention.sliding_window") or 0) or None
            if arch in ("phi3", "llama") else None,
            clip_qkv=meta.get(f"{arch}.attention.clamp_kqv"),
            arch=ours[arch],
            qk_norm=arch == "olmoe",
            vocab_size=int(vocab),
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
            ffn_dim=int(get("feed_forward_length")),
            head_dim=head_dim,
            norm_eps=float(eps),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_embeddings="output.weight" not in names,
            qkv_bias=arch in ("qwen2", "qwen2moe") or "blk.0.attn_q.bias" in names or "blk.0.attn_qkv.bias" in names,
            max_seq_len=int(get("context_length")),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _values(t, source) -> list[float]:
    """A small float tensor's values (llama.cpp writes rope_freqs as F32)."""
    if t.type not in (F32, F16):
        raise CheckpointError(f"{source}: {t.name} is stored as {t.type_name}; llama.cpp writes it as F32")
    return np.frombuffer(t.data, dtype=np.float32 if t.type == F32 else np.float16).astype(np.float32).tolist()
