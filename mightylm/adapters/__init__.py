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
    warn_if_other_base(model, cfg, path)
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
        out = save_lora(model, path, base_model)
    elif kinds[0] == "prompt":
        out = save_prompt(model, path, base_model, init_text)
    else:
        out = save_llama_adapter(model, path, base_model)
    from safetensors.torch import load_file, save_file

    weights = Path(out) / "adapter_model.safetensors"  # in its metadata, which PEFT ignores (it warns on new config keys)
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt", BASE_KEY: base_fingerprint(model)})
    return out


BASE_KEY = "mightylm_base_fingerprint"


def base_fingerprint(model) -> str:
    """A short hash of what makes a base model itself: its config and 8 rows of its token embedding (rounded
    to bfloat16, so a float32 and a bfloat16 load of the same weights agree; the embedding is never quantized
    or adapted by our transforms). Two bases of the same shape but other weights differ here."""
    import hashlib

    import torch

    weight = model.embed.weight.detach()
    rows = torch.linspace(0, weight.shape[0] - 1, 8).long()
    digest = hashlib.sha256(json.dumps(model.config.to_hf(), sort_keys=True).encode())
    digest.update(weight[rows].float().cpu().to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def warn_if_other_base(model, cfg: dict, path: str | Path) -> bool:
    """Warn (and return True) when the adapter in `path` records a base other than `model` (in its safetensors
    metadata): shapes alone do not tell, and an adapter on another base applies without an error but means
    nothing."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(Path(path) / "adapter_model.safetensors"), "pt") as f:
            recorded = (f.metadata() or {}).get(BASE_KEY)
    except (OSError, SafetensorError):
        return False  # read_adapter names a missing or broken file
    if not recorded or recorded == base_fingerprint(model):
        return False
    import warnings

    made_for = cfg.get("base_model_name_or_path") or "another model"
    warnings.warn(f"{path}: this adapter was trained on {made_for} (fingerprint {recorded}), and this model's "
                  f"fingerprint is {base_fingerprint(model)}: a different base of the same shape, or the same one in "
                  "another format (quantized GGUF vs float). Its outputs may be meaningless on this model",
                  stacklevel=2)
    return True
