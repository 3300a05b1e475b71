"""LoRA adapters as llama.cpp's adapter GGUF (convert_lora_to_gguf.py's layout), written and read: what
`mighty export --format gguf-lora` writes for `llama-cli --lora`, and what `load_adapter` applies from a .gguf
file. Names and the q/k row permutation are those of the model writer (checkpoint/gguf_export.py)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mightylm.adapters.files import AdapterError, base_fingerprint, read_adapter_config, recorded_base
from mightylm.adapters.lora import apply_pairs, lora_scaling, read_lora
from mightylm.checkpoint.build import CheckpointError
from mightylm.checkpoint.gguf import dequantized, gguf_metadata
from mightylm.checkpoint.gguf_export import (GGUF_ARCH, OURS_TO_GGUF, PERMUTED, QK_PERMUTATION, TYPES, ExportReport,
                                             add_tensor, tensor_type, written_gguf)
from mightylm.checkpoint.names import GGUF_TENSOR_TRANSFORMS, GGUF_TO_OURS, permute_qk, rename, tensor_transform

LORA_TYPES = ("f32", "f16", "bf16", "q8_0")  # what llama.cpp's adapter loader takes


@torch.no_grad()
def export_gguf_lora(model, adapter: str | os.PathLike, path: str | os.PathLike, *, kind: str = "f32") -> ExportReport:
    """Write the PEFT-format LoRA adapter in `adapter` (checked against the base `model`) as llama.cpp's adapter
    GGUF: `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha` (llama.cpp scales by alpha / r, so
    an rsLoRA adapter's alpha is written as alpha * sqrt(r)), and per adapted matrix `<name>.lora_a` (r, in) and
    `<name>.lora_b` (out, r) under llama.cpp's tensor names, B's rows permuted like the q/k weights they update."""
    if kind not in LORA_TYPES:
        raise CheckpointError(f"cannot write a LoRA GGUF in {kind!r}; llama.cpp's adapters take: {', '.join(LORA_TYPES)}")
    c, path = model.config, Path(path)
    if c.arch not in GGUF_ARCH:
        raise CheckpointError(f"cannot export adapters of a {c.arch} model to GGUF yet; supported: {', '.join(GGUF_ARCH)}")
    cfg = read_adapter_config(adapter)
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{adapter}: a {cfg.get('peft_type')} adapter; llama.cpp's adapter GGUF holds LoRA only")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{adapter}: trains whole modules ({', '.join(cfg['modules_to_save'])}) beside its low-rank "
                           "pairs; llama.cpp's LoRA GGUF holds only lora_a/lora_b pairs. Merge it instead "
                           "(mighty export --adapter DIR --format gguf)")
    recorded = recorded_base(adapter)
    if recorded and recorded != base_fingerprint(model):
        raise AdapterError(f"{adapter}: trained on another base ({cfg.get('base_model_name_or_path') or 'unnamed'}, "
                           f"fingerprint {recorded}; this model's is {base_fingerprint(model)}); export it with the "
                           "base it was trained on")
    cfg, pairs = read_lora(model, adapter, cfg)
    r = cfg["r"]
    alpha = lora_scaling(cfg) * r  # llama.cpp's scale is alpha / r
    report = ExportReport(path, kind, notes=[f"LoRA rank {r}, alpha {alpha:g} (scale {alpha / r:g}), "
                                             f"{len(pairs)} matrices"])
    with written_gguf(path, GGUF_ARCH[c.arch]) as writer:
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))
        for ours, pair in pairs.items():
            name = rename(ours + ".weight", OURS_TO_GGUF)
            if name is None:
                raise AdapterError(f"{adapter}: adapts {ours}, which has no llama.cpp name")
            b = pair["lora_B"].float()
            per_key = tensor_transform(ours + ".weight", QK_PERMUTATION) if c.arch in PERMUTED else None
            if per_key is not None:
                b = permute_qk(b, getattr(c, per_key[1])).contiguous()
            for suffix, values in (("lora_a", pair["lora_A"].float()), ("lora_b", b)):
                add_tensor(writer, f"{name}.{suffix}", values, tensor_type(name, values, TYPES[kind]), report)
    return report


def read_gguf_lora(model, path: Path) -> tuple[dict, dict[str, dict]]:
    """(PEFT-style config, {our module name: {"lora_A", "lora_B"}}) of llama.cpp's LoRA adapter GGUF at `path`,
    checked against `model`: the inverse of gguf_export.export_gguf_lora (B's q/k rows un-permuted for llama)."""
    file, meta = gguf_metadata(path)
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise AdapterError(f"{path}: not a LoRA adapter GGUF (general.type {meta.get('general.type')!r}, adapter.type "
                           f"{meta.get('adapter.type')!r})")
    c = model.config
    if meta.get("general.architecture") != GGUF_ARCH.get(c.arch):
        raise AdapterError(f"{path}: an adapter for a {meta.get('general.architecture')} model, not this {c.arch} one")
    pairs: dict[str, dict] = {}
    modules = dict(model.named_modules())
    for t in file.tensors:
        name, _, which = t.name.rpartition(".")
        ours = rename(name, GGUF_TO_OURS) if which in ("lora_a", "lora_b") else None
        if ours is None or ours.removesuffix(".weight") not in modules:
            raise AdapterError(f"{path}: tensor {t.name!r} adapts nothing in a {c.arch} model of {c.n_layers} layers")
        values = dequantized(t, path)
        if which == "lora_b" and c.arch in PERMUTED:
            per_key = tensor_transform(ours, GGUF_TENSOR_TRANSFORMS)
            if per_key is not None:
                values = per_key[0](values, getattr(c, per_key[1])).contiguous()
        pairs.setdefault(ours.removesuffix(".weight"), {})["lora_A" if which == "lora_a" else "lora_B"] = values
    if not pairs or any(len(p) != 2 for p in pairs.values()):
        raise AdapterError(f"{path}: lora_a/lora_b tensors do not come in pairs")
    r = next(iter(pairs.values()))["lora_A"].shape[0]
    leaves = sorted({name.rpartition(".")[2] for name in pairs})
    alpha = float(meta.get("adapter.lora.alpha", r))
    return {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": leaves, "use_rslora": False}, pairs


def load_gguf_lora(model, path: str | Path) -> list[str]:
    """Apply llama.cpp's LoRA adapter GGUF at `path` (what `mighty export --format gguf-lora` writes) to `model`,
    unmerged. Returns converted names."""
    cfg, ours = read_gguf_lora(model, Path(path))
    modules = dict(model.named_modules())
    for name, pair in ours.items():
        base = modules[name]
        want = {"lora_A": (cfg["r"], base.in_features), "lora_B": (base.out_features, cfg["r"])}
        bad = [f"{name}.{k} {tuple(v.shape)} (this model needs {want[k]})" for k, v in pair.items()
               if tuple(v.shape) != want[k]]
        if bad:
            raise AdapterError(f"{path}: {bad[0]}: the adapter was made for another base model")
    return apply_pairs(model, cfg, ours, Path(path))
