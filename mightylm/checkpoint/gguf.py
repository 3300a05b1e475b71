"""llama.cpp GGUF files: the config and tokenizer from the metadata (gguf_header.py), tensors dequantized or kept
as stored (gguf_file.py reads the container), names mapped through names.GGUF_TO_OURS and the per-key transforms
of names.GGUF_TENSOR_TRANSFORMS. gguf_export.py writes them."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from mightylm.checkpoint.build import CheckpointError, assign, build
from mightylm.checkpoint.gguf_file import BLOCKS
from mightylm.checkpoint.gguf_header import gguf_config, gguf_metadata, gguf_tokenizer
from mightylm.checkpoint.names import (GGUF_STACKED_EXPERTS, GGUF_TENSOR_TRANSFORMS, GGUF_TO_OURS, projection_rows,
                                       rename, tensor_transform)
from mightylm.compress.gguf_blocks import dequantize_blocks


def load_gguf(path: Path, *, dtype=torch.float32, device="cpu", keep_blocks: bool = False):
    """Load a llama.cpp GGUF file: config and tokenizer from its metadata, tensors dequantized; with
    `keep_blocks`, the projections, the head and the embedding table stored as one of compress.gguf_blocks.KEPT
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


def dequantize(t) -> torch.Tensor:
    """A GGUF tensor's values as float32, shaped `t.shape`: the block formats small models ship in with torch
    (compress/gguf_blocks.py), other types through the `gguf` package's numpy dequantizers."""
    with warnings.catch_warnings():  # torch warns that the map is read-only; every path below copies out of it
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.from_numpy(t.data)
    if t.type in BLOCKS:
        return dequantize_blocks(raw, t.type, t.shape)
    from gguf.quants import dequantize as reference

    return torch.from_numpy(np.ascontiguousarray(reference(t.data, t.type)).astype(np.float32)).reshape(t.shape)


def dequantized(t, path) -> torch.Tensor:
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
        and len(t.shape) == 2 and t.shape[1] % BLOCKS[t.type][0] == 0 and t.shape[1] % 32 == 0


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
