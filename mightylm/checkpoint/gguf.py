"""llama.cpp GGUF files: the config and tokenizer from the metadata, tensors dequantized (gguf_file.py reads
the container), names mapped through names.GGUF_TO_OURS and the per-key transforms of names.GGUF_TENSOR_TRANSFORMS.
The GGUF export work adds the writer beside the reader here."""

from __future__ import annotations

from pathlib import Path

import torch

from mightylm.checkpoint.build import CheckpointError, assign, build
from mightylm.checkpoint.names import (GGUF_STACKED_EXPERTS, GGUF_TENSOR_TRANSFORMS, GGUF_TO_OURS, projection_rows,
                                       rename, tensor_transform)
from mightylm.config import PHI_AXES, ConfigError, ModelConfig
from mightylm.tokenizer import Tokenizer, TokenizerError, from_gguf_metadata


def load_gguf(path: Path, *, dtype=torch.float32, device="cpu", keep_blocks: bool = False):
    """Load a llama.cpp GGUF file: config and tokenizer from its metadata, tensors dequantized; with
    `keep_blocks`, the projections, the head and the embedding table stored as Q8_0 / Q4_0 / Q4_1 / F16 / BF16
    stay as stored (compress/gguf_blocks.GGUFLinear, GGUFEmbedding); a head tied to the table reads its bytes."""
    file, meta = gguf_metadata(path)
    config = gguf_config(meta, file, source=path)
    model = build(config)
    state, kept = {}, []
    for t in file.tensors:
        ours = rename(t.name, GGUF_TO_OURS)
        fused = _fused_parts(t.name, config)
        if fused:  # q/k/v in one tensor (phi2, phi3), gate and up in one (phi3): split by rows
            whole = dequantized(t, path)
            for (name, rows), part in zip(fused, whole.split([rows for _, rows in fused])):
                state[name] = (part.clone(), path, t.name)  # copies: parts must not share storage
            continue
        if ours is None and rename(t.name, {k: k for k in GGUF_STACKED_EXPERTS}) is not None:
            stacked = dequantized(t, path)  # (experts, out, in)
            for e in range(stacked.shape[0]):
                state[rename(t.name.replace(".ffn_", f".{e}.ffn_", 1), _per_expert())] = (stacked[e].clone(), path,
                                                                                          t.name)
            continue
        if ours is None:
            if t.name == "rope_freqs.weight":
                continue  # llama.cpp's precomputed llama3 factors: in the config already (gguf_config)
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a {config.arch} model")
        if keep_blocks and ours == "embed.weight" and _keepable("lm_head.weight", t):
            model.embed = _embedding_module(t)  # token lookups read the blocks
            ours, tensor = "embed.blocks", _stored(file, t)
            kept.append("embed")
            if config.tie_embeddings:  # the head is the table: the same bytes
                model.lm_head = _blocks_module(model.lm_head, t)
                state["lm_head.weight"] = (tensor, path, t.name)
                kept.append("lm_head")
        elif keep_blocks and _keepable(ours, t):
            tensor = _kept_blocks(model, ours, file, t)
            kept.append(ours.removesuffix(".weight"))
        else:
            tensor = dequantized(t, path)
        if ours.endswith("shared_expert_gate.weight"):
            tensor = tensor.reshape(1, -1)  # llama.cpp stores the shared expert's gate as a vector
        per_key = tensor_transform(ours, GGUF_TENSOR_TRANSFORMS) if config.arch in ("llama", "mixtral") else None
        if per_key is not None:  # llama.cpp's llama q/k rows are permuted for its RoPE kernel
            transform, field = per_key
            tensor = transform(tensor, getattr(config, field)).contiguous()
        state[ours] = (tensor, path, t.name)
    assign(model, state, dtype, device, source=path)
    if kept:
        model.record_transform("gguf_blocks", modules=kept)
    return model, gguf_tokenizer(meta, path)


def dequantized(t, path) -> torch.Tensor:
    from mightylm.checkpoint.gguf_file import dequantize

    try:
        return dequantize(t)
    except NotImplementedError:
        raise CheckpointError(f"{path}: tensor {t.name!r} uses {t.type_name}, which we cannot dequantize") from None


def _fused_parts(name: str, config) -> list[tuple[str, int]]:
    """[(our name, rows)] of a GGUF tensor that stacks several of our projections, else []."""
    layer, _, rest = name.removeprefix("blk.").partition(".")
    if not name.startswith("blk.") or not layer.isdigit():
        return []
    rows, prefix = projection_rows(config), f"layers.{layer}."
    if rest in ("attn_qkv.weight", "attn_qkv.bias"):
        kind = rest.rpartition(".")[2]
        return [(f"{prefix}attn.{p}.{kind}", rows[p]) for p in ("q_proj", "k_proj", "v_proj")]
    if rest == "ffn_up.weight" and config.arch == "phi3":  # llama.cpp keeps Phi-3's gate_up_proj whole as ffn_up
        return [(f"{prefix}mlp.{p}.weight", rows[p]) for p in ("gate_proj", "up_proj")]
    return []


def _per_expert() -> dict[str, str]:
    """GGUF_STACKED_EXPERTS with the expert index as a path component (blk.L.E.ffn_gate_exps.weight), so that
    `rename` fills {layer} and {expert} from one name."""
    return {k.replace(".ffn_", ".{expert}.ffn_", 1): v for k, v in GGUF_STACKED_EXPERTS.items()}


def _keepable(ours: str, t) -> bool:
    from mightylm.compress import DEFAULT_TARGETS
    from mightylm.compress.gguf_blocks import KEPT

    leaf = ours.removesuffix(".weight").rpartition(".")[2]
    return ours.endswith(".weight") and leaf in (*DEFAULT_TARGETS, "lm_head") and t.type in KEPT \
        and len(t.shape) == 2 and t.shape[1] % 32 == 0


def _kept_blocks(model, ours: str, file, t) -> torch.Tensor:
    """Put a GGUFLinear (meta) where the projection `ours` is and return its stored blocks, (out, row bytes)."""
    name = ours.removesuffix(".weight")
    parent, _, child = name.rpartition(".")
    parent = model.get_submodule(parent) if parent else model
    setattr(parent, child, _blocks_module(getattr(parent, child), t))
    return _stored(file, t)


def _embedding_module(t):
    from mightylm.compress.gguf_blocks import GGUFEmbedding

    return GGUFEmbedding(t.shape[0], t.shape[1], ggml_type=t.type, device="meta")


def _blocks_module(old, t):
    from mightylm.compress.gguf_blocks import GGUFLinear

    return GGUFLinear(t.shape[1], t.shape[0], old.bias is not None, ggml_type=t.type, device="meta")


def _stored(file, t) -> torch.Tensor:
    """The tensor's blocks as stored, (rows, row bytes), read from the file (not through its map)."""
    return torch.from_numpy(file.read(t)).view(t.shape[0], -1)


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
        divisors = dequantized(tensor, source).flatten().tolist()
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

