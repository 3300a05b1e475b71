"""Adapters: parameter-efficient techniques applied as in-place module transforms.

    lora.py           LoRA (and rsLoRA): low-rank updates of chosen linear layers
    prompt.py         prompt tuning and P-tuning: virtual tokens through `Transformer.prefix`
    llama_adapter.py  LLaMA-Adapter: gated adaption prompts in the top attention layers

An adapter directory holds adapter_config.json + adapter_model.safetensors (PEFT's layout;
`peft_type` says which technique). `load_adapter` applies any of them, `save_adapter` writes
whichever the model carries.
"""

from __future__ import annotations

import json
from pathlib import Path

from mightylm.errors import MightyError


class AdapterError(MightyError, ValueError):
    """An adapter that cannot be applied or loaded; the message names the file and what is wrong."""


def read_adapter(path: str | Path, peft_types: tuple[str, ...], cfg: dict | None = None) -> tuple[dict, dict]:
    """(config, tensors) of an adapter directory, with errors naming the file that is missing or broken."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg = cfg if cfg is not None else read_adapter_config(path)
    if cfg.get("peft_type") not in peft_types:
        raise AdapterError(f"{path / 'adapter_config.json'}: peft_type {cfg.get('peft_type')!r} is not "
                           f"{' or '.join(peft_types)}")
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.exists():
        raise AdapterError(f"{weights_file}: not found; an adapter directory needs adapter_config.json and "
                           "adapter_model.safetensors")
    try:
        return cfg, load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{weights_file}: cannot be read as safetensors, truncated or corrupt? ({e})") from None


def read_adapter_config(path: str | Path) -> dict:
    config_file = Path(path) / "adapter_config.json"
    if not config_file.exists():
        raise AdapterError(f"{config_file}: not found; an adapter directory needs adapter_config.json and "
                           "adapter_model.safetensors")
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{config_file}: not valid JSON (line {e.lineno}): {e.msg}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{config_file}: expected a JSON object")
    return cfg


def load_adapter(model, path: str | Path) -> str:
    """Apply the adapter in `path` (LoRA, prompt tuning, P-tuning or LLaMA-Adapter), unmerged; returns
    a one-line description of what was applied."""
    from mightylm.adapters.llama_adapter import PEFT_TYPE as LLAMA_ADAPTER, load_llama_adapter
    from mightylm.adapters.lora import load_lora
    from mightylm.adapters.prompt import load_prompt

    cfg = read_adapter_config(path)
    kind = cfg.get("peft_type")
    if kind == "LORA":
        return f"LoRA on {len(load_lora(model, path, cfg))} layers"
    if kind in ("PROMPT_TUNING", "P_TUNING"):
        return f"{kind.lower().replace('_', ' ')}: {load_prompt(model, path, cfg)} virtual tokens"
    if kind == LLAMA_ADAPTER:
        return f"LLaMA-Adapter on {len(load_llama_adapter(model, path, cfg))} layers"
    raise AdapterError(f"{Path(path) / 'adapter_config.json'}: peft_type {kind!r} is not one mightylm applies "
                       f"(LORA, PROMPT_TUNING, P_TUNING, {LLAMA_ADAPTER})")


def save_adapter(model, path: str | Path, base_model: str = "", init_text: str | None = None) -> Path:
    """Write whichever adapter the model carries (exactly one kind) to `path`."""
    from mightylm.adapters.llama_adapter import adapter_state, save_llama_adapter
    from mightylm.adapters.lora import lora_modules, save_lora
    from mightylm.adapters.prompt import save_prompt

    kinds = [k for k, present in (("lora", bool(lora_modules(model))), ("prompt", model.prefix is not None),
                                  ("llama_adapter", bool(adapter_state(model)))) if present]
    if len(kinds) != 1:
        raise AdapterError(f"save_adapter needs exactly one kind of adapter on the model, found {kinds or 'none'}")
    if kinds[0] == "lora":
        return save_lora(model, path, base_model)
    if kinds[0] == "prompt":
        return save_prompt(model, path, base_model, init_text)
    return save_llama_adapter(model, path, base_model)
