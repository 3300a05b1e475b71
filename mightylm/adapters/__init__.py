"""Adapters: parameter-efficient techniques applied as in-place module transforms.

    lora.py           LoRA (and rsLoRA): low-rank updates of chosen linear layers
    prompt.py         prompt tuning and P-tuning: virtual tokens through `Transformer.prefix`
    llama_adapter.py  LLaMA-Adapter: gated adaption prompts in the top attention layers
    files.py          adapter directories (PEFT's layout), errors, the base's fingerprint

An adapter directory holds adapter_config.json + adapter_model.safetensors (PEFT's layout;
`peft_type` says which technique). `KINDS` is the one list of adapter kinds: `load_adapter` applies
any of them, `save_adapter` writes whichever the model carries, and the server asks it which kinds it
can serve per request.

The `apply_*` transforms only add their modules; which parameters train is decided once, after the last
transform, by `mark_trainable` (every adapter's parameters, nothing of the base), so that transforms compose
(LoRA and a soft prompt train together). `train.fit` calls it for a model that carries adapters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mightylm.adapters import llama_adapter, lora, prompt
from mightylm.adapters.files import (BASE_KEY, AdapterError, base_fingerprint, read_adapter, read_adapter_config,
                                     stamp_base, warn_if_other_base)

__all__ = ["BASE_KEY", "KINDS", "AdapterError", "AdapterKind", "base_fingerprint", "kind_of", "load_adapter", "mark_trainable",
           "read_adapter", "read_adapter_config", "save_adapter", "warn_if_other_base"]


@dataclass(frozen=True)
class AdapterKind:
    """One adapter technique: the PEFT types its files carry, how it is loaded onto a model (returning a
    description), saved from one, recognised on one, and whether the server can serve it per request
    (mixed with other adapters in one batch) or only applied to the base."""

    name: str
    peft_types: tuple[str, ...]
    load: Callable  # (model, path, cfg) -> str
    save: Callable  # (model, path, base_model, init_text) -> Path
    present: Callable  # (model) -> bool
    per_request: bool
    parameters: Callable  # (model) -> list of the kind's parameters: what trains


def _soft_prompts(model) -> list:
    """The soft prompts in a model, found by type (so also inside a wrapper)."""
    return [m for m in model.modules() if isinstance(m, prompt.SoftPrompt)]


KINDS = (
    AdapterKind("lora", ("LORA",), lambda m, p, c: f"LoRA on {len(lora.load_lora(m, p, c))} layers",
                lambda m, p, base, text: lora.save_lora(m, p, base), lambda m: bool(lora.lora_modules(m)), True,
                lambda m: [p for module in lora.lora_modules(m).values() for p in (module.lora_A.weight, module.lora_B.weight)]),
    AdapterKind("prompt", tuple(sorted(set(prompt.PEFT_TYPES.values()))),
                lambda m, p, c: f"{c['peft_type'].lower().replace('_', ' ')}: {prompt.load_prompt(m, p, c)} virtual tokens",
                prompt.save_prompt, lambda m: bool(_soft_prompts(m)), True,
                lambda m: [p for module in _soft_prompts(m) for p in module.parameters()]),
    AdapterKind("llama_adapter", (llama_adapter.PEFT_TYPE,),
                lambda m, p, c: f"LLaMA-Adapter on {len(llama_adapter.load_llama_adapter(m, p, c))} layers",
                lambda m, p, base, text: llama_adapter.save_llama_adapter(m, p, base),
                lambda m: bool(llama_adapter.adapter_state(m)), False,
                lambda m: [p for n, p in m.named_parameters() if ".attn.adaption." in n]),
)


def kind_of(cfg: dict, path: str | Path) -> AdapterKind:
    """The kind whose files these are (by `peft_type`), or an AdapterError naming the file and the known types."""
    for kind in KINDS:
        if cfg.get("peft_type") in kind.peft_types:
            return kind
    known = ", ".join(t for k in KINDS for t in k.peft_types)
    raise AdapterError(f"{Path(path) / 'adapter_config.json'}: peft_type {cfg.get('peft_type')!r} is not one mightylm "
                       f"applies ({known})")


def present(model) -> list[AdapterKind]:
    """The kinds of adapter the model carries."""
    return [kind for kind in KINDS if kind.present(model)]


def mark_trainable(model) -> int:
    """Train exactly the parameters of the adapters the model carries (all kinds together), and those a wrapper
    names with `trains_with_adapters()` (the memory of rmt.RecurrentMemory), and freeze the rest; returns how many
    values train. Call it once, after the last transform."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = {id(p): p for kind in present(model) for p in kind.parameters(model)}
    for module in model.modules():  # wrappers whose own parameters train with the adapters (rmt: the memory)
        if hasattr(module, "trains_with_adapters"):
            trainable.update({id(p): p for p in module.trains_with_adapters()})
    for p in trainable.values():
        p.requires_grad_(True)
    return sum(p.numel() for p in trainable.values())


def load_adapter(model, path: str | Path) -> str:
    """Apply the adapter in `path` (any of KINDS), unmerged, and mark what trains; returns a one-line description
    of what was applied. A `.gguf` file is llama.cpp's LoRA adapter GGUF (`mighty export --format gguf-lora`)."""
    if Path(path).suffix == ".gguf" and Path(path).is_file():
        from mightylm.adapters.gguf import load_gguf_lora

        what = f"LoRA on {len(load_gguf_lora(model, path))} layers (llama.cpp's adapter GGUF)"
        mark_trainable(model)
        return what
    cfg = read_adapter_config(path)
    warn_if_other_base(model, cfg, path)
    what = kind_of(cfg, path).load(model, path, cfg)
    mark_trainable(model)
    return what


def save_adapter(model, path: str | Path, base_model: str = "", init_text: str | None = None) -> Path:
    """Write whichever adapter the model carries (exactly one kind) to `path`, with its base's fingerprint."""
    kinds = present(model)
    if len(kinds) != 1:
        raise AdapterError(f"save_adapter needs exactly one kind of adapter on the model, found "
                           f"{[k.name for k in kinds] or 'none'}")
    out = kinds[0].save(model, path, base_model, init_text)
    stamp_base(model, out)
    return out
