"""Writing GGUF files that llama.cpp (and Ollama, LM Studio) run: a model with its tokenizer and chat template
(adapters/gguf.py writes a LoRA adapter as llama.cpp's adapter GGUF with the helpers here). The inverse of gguf.py's reader, through the same name map
(names.GGUF_TO_OURS) and the inverse of its per-key transform (llama.cpp's q/k row permutation for llama-type
RoPE); the container itself is written with the `gguf` package's GGUFWriter, the blocks by our own quantizers
(compress/gguf_blocks.quantize_blocks, byte for byte what gguf's numpy quantizers write).

Which tensor gets which type, as llama.cpp's converter does: norms, biases and other vectors, the MoE router
(`ffn_gate_inp`) and `rope_freqs` stay F32; every other matrix takes the asked type, or F16 when its rows are
not a multiple of the 32-value blocks. A model whose layers are quantized our way (int8, int4, NF4, 2:4, kept
GGUF blocks) is dequantized first and re-quantized, and the report says so with the error that adds.

A file is written under a temporary name beside the target and renamed into place when complete.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mightylm.checkpoint.build import CheckpointError
from mightylm.checkpoint.names import (GGUF_STACKED_EXPERTS, GGUF_TENSOR_TRANSFORMS, GGUF_TO_OURS, permute_qk,
                                       rename, tensor_transform)
from mightylm.compress.gguf_blocks import (BF16, F16, F32, Q4_0, Q4_1, Q8_0, TYPE_NAMES, dequantize_blocks,
                                          quantize_blocks)

TYPES = {"f32": F32, "f16": F16, "bf16": BF16, "q8_0": Q8_0, "q4_0": Q4_0, "q4_1": Q4_1}
FILE_TYPES = {F32: 0, F16: 1, Q4_0: 2, Q4_1: 3, Q8_0: 7, BF16: 32}  # llama.cpp's LLAMA_FTYPE_* (general.file_type)
# our arch -> llama.cpp's (Mistral and Mixtral are llama.cpp's "llama", with experts for Mixtral)
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen2_moe": "qwen2moe",
             "olmoe": "olmoe"}
PERMUTED = ("llama", "mistral", "mixtral")  # llama-type RoPE: q/k rows interleaved for llama.cpp's kernel
OURS_TO_GGUF = {v: k for k, v in GGUF_TO_OURS.items()}
STACKED = {v: k for k, v in GGUF_STACKED_EXPERTS.items()}  # our per-expert name -> llama.cpp's stacked name
HEAD = ("token_embd.weight", "output.weight")
KEEP_F32 = (".ffn_gate_inp.weight", "rope_freqs.weight")


@dataclass
class ExportReport:
    path: Path
    type: str
    tensors: dict[str, int] = field(default_factory=dict)  # ggml type name -> count
    requantized: list[str] = field(default_factory=list)  # modules that were quantized our way before
    weight_error: float | None = None  # relative RMS of (written - source) over the matrices written in a block type
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        size = self.path.stat().st_size / 2**20
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.tensors.items()))
        lines = [f"wrote {self.path} ({size:.1f} MiB): {kinds}"]
        if self.weight_error is not None:
            lines.append(f"quantization to {self.type}: relative RMS error of the written matrices {self.weight_error:.2e}")
        if self.requantized:
            lines.append(f"{len(self.requantized)} layers were quantized our way ({self.requantized[0]}, ...): written "
                         f"from their dequantized weights, so the {self.type} error above adds to theirs")
        return "\n".join(lines + self.notes)


def check_exportable(model, kind: str) -> None:
    """Refuse, before any work, what we cannot write: an architecture, a type, a model carrying adapters."""
    if kind not in TYPES:
        raise CheckpointError(f"cannot write GGUF type {kind!r}; writable: {', '.join(TYPES)}")
    arch = model.config.arch
    if arch not in GGUF_ARCH:
        raise CheckpointError(f"cannot export a {arch} model to GGUF yet; supported: {', '.join(GGUF_ARCH)}")
    kinds = [k for k in ("lora", "prompt", "llama_adapter") if model.applied(k)]
    if kinds:
        raise CheckpointError(f"the model carries a {kinds[0]} adapter; merge a LoRA adapter first (mighty export "
                              "--adapter DIR merges it), or export the adapter itself with --format gguf-lora")


@torch.no_grad()
def export_gguf(model, tokenizer, path: str | os.PathLike, *, kind: str = "f16", head_kind: str | None = None,
                name: str = "") -> ExportReport:
    """Write `model` (and `tokenizer`'s vocabulary and chat template) as a GGUF file at `path` in type `kind`; the
    token embedding and the head in `head_kind` (default: q8_0 for the 4-bit types, as llama.cpp's quantizer keeps
    them at higher precision and small models ship them, else `kind`)."""
    from mightylm.tokenizer import TokenizerError, gguf_vocab

    head_kind = head_kind or ("q8_0" if kind in ("q4_0", "q4_1") else kind)
    check_exportable(model, kind)
    check_exportable(model, head_kind)
    config, path = model.config, Path(path)
    qtype, head_qtype = TYPES[kind], TYPES[head_kind]
    report = ExportReport(path, kind)
    arch = GGUF_ARCH[config.arch]
    meta = _model_metadata(model, arch, qtype, name or path.stem)
    if tokenizer is not None:
        try:
            vocab, pre = gguf_vocab(tokenizer, config.vocab_size)
        except TokenizerError as e:
            raise CheckpointError(f"cannot write the tokenizer: {e}") from None
        meta.update(vocab)
        report.notes.append(f"pre-tokenizer: {pre}")
        if vocab["tokenizer.ggml.pre"] == "default":
            report.notes.append("warning: llama.cpp does not know this tokenizer's pre-tokenizer; it will split text "
                                "with its default rules, which may give other tokens than ours")
    else:
        report.notes.append("warning: no tokenizer: llama.cpp cannot run a GGUF file without one")
    if config.sliding_window and config.sliding_window < config.max_seq_len and arch == "llama":
        report.notes.append(f"warning: llama.cpp's llama architecture has no sliding window; past "
                            f"{config.sliding_window} tokens it attends to the whole context (we do not)")
    tensors, report.requantized = _float_tensors(model)
    err, ref = 0.0, 0.0
    with written_gguf(path, arch) as writer:
        for key, value in meta.items():
            _add(writer, key, value)
        for gguf_name, values in _gguf_tensors(model, tensors):
            t = tensor_type(gguf_name, values, head_qtype if gguf_name in HEAD else qtype)
            data = add_tensor(writer, gguf_name, values, t, report)
            if t in (Q8_0, Q4_0, Q4_1):
                err += (dequantize_blocks(data, t, values.shape) - values).pow(2).sum().item()
                ref += values.pow(2).sum().item()
    report.weight_error = (err / ref) ** 0.5 if ref else None
    return report


@contextmanager
def written_gguf(path: Path, arch: str):
    """A GGUFWriter for `arch` onto a temporary name beside `path`: when the block completes, the header, the
    metadata and the tensors are written and the file renamed to `path`; on an error (or an interruption) the
    temporary file is removed and `path` is as it was."""
    import gguf

    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def add_tensor(writer, name: str, values: torch.Tensor, kind: int, report: ExportReport) -> torch.Tensor:
    """Quantize `values` (float32, any rank; blocks along the last axis) to ggml type `kind`, add them to the file
    under `name` and count them in the report; returns the stored bytes, (rows, row bytes)."""
    import gguf

    data = quantize_blocks(values.reshape(-1, values.shape[-1]), kind)
    writer.add_tensor(name, data.view(*values.shape[:-1], -1).numpy(), raw_dtype=gguf.GGMLQuantizationType(kind))
    report.tensors[TYPE_NAMES[kind]] = report.tensors.get(TYPE_NAMES[kind], 0) + 1
    return data


def _add(writer, key: str, value) -> None:
    """One metadata key with the GGUF value type llama.cpp expects of it (counts u32, ids u32, floats f32)."""
    import gguf

    V = gguf.GGUFValueType
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif key == "tokenizer.ggml.token_type":
        writer.add_key_value(key, value, V.ARRAY, V.INT32)
    elif key == "tokenizer.ggml.scores":
        writer.add_key_value(key, value, V.ARRAY, V.FLOAT32)
    else:
        writer.add_array(key, value)


def _model_metadata(model, arch: str, qtype: int, name: str) -> dict:
    c = model.config
    meta = {"general.name": name, "general.file_type": FILE_TYPES[qtype],
            "general.quantization_version": 2,
            f"{arch}.context_length": c.max_seq_len, f"{arch}.embedding_length": c.dim,
            f"{arch}.block_count": c.n_layers, f"{arch}.feed_forward_length": c.ffn_dim,
            f"{arch}.attention.head_count": c.n_heads, f"{arch}.attention.head_count_kv": c.n_kv_heads,
            f"{arch}.attention.layer_norm_rms_epsilon": float(c.norm_eps), f"{arch}.rope.freq_base": float(c.rope_theta),
            f"{arch}.rope.dimension_count": c.rotary_dim, f"{arch}.vocab_size": c.vocab_size}
    if c.head_dim != c.dim // c.n_heads:
        meta[f"{arch}.attention.key_length"] = meta[f"{arch}.attention.value_length"] = c.head_dim
    if c.sliding_window:  # our reader takes it back; llama.cpp's llama architecture ignores it (see the warning)
        meta[f"{arch}.attention.sliding_window"] = c.sliding_window
    if c.clip_qkv:
        meta[f"{arch}.attention.clamp_kqv"] = float(c.clip_qkv)
    if c.n_experts:
        if c.decoder_sparse_step != 1 or c.mlp_only_layers:
            raise CheckpointError("llama.cpp's mixture-of-experts files have experts in every layer; this model has dense "
                                  "layers among them (decoder_sparse_step / mlp_only_layers), which GGUF cannot say")
        meta[f"{arch}.expert_count"] = c.n_experts
        meta[f"{arch}.expert_used_count"] = c.experts_per_token
        meta[f"{arch}.expert_weights_norm"] = bool(c.norm_topk_prob)
        if c.expert_ffn_dim:
            meta[f"{arch}.expert_feed_forward_length"] = c.expert_ffn_dim
        if c.shared_expert_ffn_dim:
            meta[f"{arch}.expert_shared_feed_forward_length"] = c.shared_expert_ffn_dim
    scaling = c.rope_scaling or {}
    kind = scaling.get("type")
    if kind in ("linear", "yarn"):
        meta[f"{arch}.rope.scaling.type"] = kind
        meta[f"{arch}.rope.scaling.factor"] = float(scaling["factor"])
        if kind == "yarn":
            meta[f"{arch}.rope.scaling.original_context_length"] = int(scaling["original_max_position_embeddings"])
    elif kind not in (None, "llama3") and not (kind == "longrope" and scaling["short_factor"] == scaling["long_factor"]
                                               and scaling.get("attention_factor") == 1.0):
        raise CheckpointError(f"RoPE scaling {kind!r} has no GGUF form llama.cpp reads; exportable: none, linear, yarn, "
                              "llama3 (as rope_freqs); set another with --rope_scaling or none")
    return meta


def _float_tensors(model) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our float32 tensors by state-dict name (quantized layers dequantized), and the names of those layers."""
    modules = dict(model.named_modules())
    out, dequantized = {}, []
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        m = modules.get(owner)
        if leaf == "weight" and hasattr(m, "dequantize") and not isinstance(m, nn.Linear):
            out[name] = m.dequantize().float()
            dequantized.append(owner)
        elif leaf in ("weight", "bias") and t.is_floating_point():
            out[name] = t.detach().float()
    if model.head_shares_embedding or model.config.tie_embeddings:
        out.pop("lm_head.weight", None)
        dequantized = [d for d in dequantized if d != "lm_head"]
    return out, dequantized


def _gguf_tensors(model, tensors: dict[str, torch.Tensor]):
    """(llama.cpp name, float32 values) in the order llama.cpp's converter writes them: experts stacked per layer,
    q/k rows permuted for llama-type RoPE, llama3's frequency divisors as rope_freqs."""
    c = model.config
    scaling = c.rope_scaling or {}
    if scaling.get("type") in ("llama3", "longrope"):
        import dataclasses

        from mightylm.model import rope_frequencies

        plain = rope_frequencies(dataclasses.replace(c, rope_scaling=None))[0]
        yield "rope_freqs.weight", plain / rope_frequencies(c, c.max_seq_len)[0]
    stacks: dict[str, list] = {}
    for ours, values in tensors.items():
        stacked = rename(ours, {k.replace("{expert}", "{e}"): v for k, v in STACKED.items()})
        if stacked is not None:
            stacks.setdefault(stacked, []).append((int(ours.split(".experts.")[1].split(".")[0]), values))
            if len(stacks[stacked]) == c.n_experts:
                yield stacked, torch.stack([v for _, v in sorted(stacks.pop(stacked), key=lambda p: p[0])])
            continue
        name = rename(ours, OURS_TO_GGUF)
        if name is None:
            raise CheckpointError(f"cannot export {ours!r}: it has no llama.cpp name")
        if ours.endswith("shared_expert_gate.weight"):
            values = values.reshape(-1)  # llama.cpp keeps the shared expert's gate as a vector
        per_key = tensor_transform(ours, QK_PERMUTATION) if c.arch in PERMUTED else None
        if per_key is not None:
            values = permute_qk(values, getattr(c, per_key[1])).contiguous()
        yield name, values
    if stacks:
        raise CheckpointError(f"incomplete experts: {sorted(stacks)}")


# The reader's per-key table (names.GGUF_TENSOR_TRANSFORMS: unpermute_qk) with the permutation the writer applies
QK_PERMUTATION = {name: (permute_qk, field) for name, (_, field) in GGUF_TENSOR_TRANSFORMS.items()}


def tensor_type(name: str, values: torch.Tensor, qtype: int) -> int:
    if values.dim() < 2 or name.endswith(KEEP_F32) or name.endswith("_norm.weight"):
        return F32
    if qtype in (Q8_0, Q4_0, Q4_1) and values.shape[-1] % 32:
        return F16
    return qtype

