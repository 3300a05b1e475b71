"""Hugging Face directories: config.json + safetensors (one file or shards) + tokenizer files, read and written.
A checkpoint's recorded transforms (Transformer.transforms) travel in the safetensors metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mightylm.checkpoint.assets import refuse_pickle
from mightylm.checkpoint.build import CheckpointError, assign, build, replay
from mightylm.checkpoint.names import (hf_to_ours, ours_to_hf, projection_rows, rename, rename_quantized,
                                       split_fused, split_fused_experts, stack_fused)
from mightylm.config import ConfigError, ModelConfig
from mightylm.model import Transformer
from mightylm.tokenizer import Tokenizer


def load_hf(path: Path, *, dtype=torch.float32, device="cpu"):
    try:
        config = ModelConfig.from_hf(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    files = _safetensors_files(path)
    model = build(config)
    replay(model, _transforms_record(files[0]), files[0])  # e.g. quantized modules, before their tensors go in
    state, names = {}, hf_to_ours(config.arch)
    sizes = projection_rows(config)
    for file in files:
        tensors = (pair for item in _read_safetensors(file).items() for pair in split_fused_experts(*item))
        for name, tensor in (pair for item in tensors for pair in _split_fused(file, config.arch, *item, sizes)):
            ours = rename_quantized(name, names)
            if ours is None:
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # a derived buffer some older checkpoints store
                raise CheckpointError(f"{file}: unexpected tensor {name!r} for a {config.arch} model")
            if ours == "lm_head.weight" and model.head_shares_embedding:
                continue  # tied: the head is the embedding
            state[ours] = (tensor, file, name)
    assign(model, state, dtype, device, source=path)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
    return model, tokenizer


def _split_fused(file: Path, arch: str, name: str, tensor: torch.Tensor, sizes: dict[str, int]):
    try:
        return split_fused(arch, name, tensor, sizes)
    except ValueError as e:  # a stacked tensor whose rows do not fit config.json
        raise CheckpointError(f"{file}: {e}") from None


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index}: lists shard files that are missing: {', '.join(missing)}")
        return files
    for name in ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth"):
        if (path / name).exists():
            refuse_pickle(path / name.replace(".index.json", ""))
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json found")


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot be read as safetensors, truncated or corrupt? ({e})") from None


def _transforms_record(file: Path) -> list[dict]:
    """What was applied to a checkpoint, from its safetensors metadata: `mightylm_transforms`, or the single
    quantization record that files written before the transforms list hold."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot be read as safetensors, truncated or corrupt? ({e})") from None
    try:
        if "mightylm_transforms" in meta:
            return json.loads(meta["mightylm_transforms"])
        if "mightylm_quantization" in meta:
            return [{"kind": "quantize", **json.loads(meta["mightylm_quantization"])}]
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: its transforms metadata is not valid JSON ({e})") from None
    return []


def save(model: Transformer, tokenizer: Tokenizer | None, path: str | os.PathLike) -> Path:
    """Write a Hugging Face directory (config.json, model.safetensors, tokenizer files)."""
    from safetensors.torch import save_file

    if model.applied("gguf_blocks"):
        raise CheckpointError("this model keeps a GGUF file's blocks as stored (loaded with keep_blocks, for "
                              "inference); load the file without it to save, merge or train")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, names = {}, ours_to_hf(model.config.arch)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.head_shares_embedding:
            continue
        hf = rename_quantized(name, names)
        if hf is None:
            raise CheckpointError(f"cannot save {name!r}: it has no Hugging Face name (merge or strip adapters first)")
        tensors[hf] = tensor.detach().contiguous().cpu()
    tensors = stack_fused(model.config.arch, tensors)
    metadata = {"format": "pt"}
    record = model.quantization
    if model.transforms:  # recorded with the tensors, so loading rebuilds the same modules
        metadata["mightylm_transforms"] = json.dumps(model.transforms)
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path / "model.safetensors")
    config = model.config.to_hf()
    config["torch_dtype"] = str(tensors[rename("embed.weight", names)].dtype).removeprefix("torch.")
    if record:
        config["mightylm_quantization"] = {k: v for k, v in record.items() if k != "modules"}
    generation = {}
    if tokenizer is not None:
        tokenizer.save(path)
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        stops = list(tokenizer.stop_token_ids)
        generation = {"bos_token_id": tokenizer.bos_id,
                      "eos_token_id": stops if len(stops) > 1 else (stops[0] if stops else None)}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return path
