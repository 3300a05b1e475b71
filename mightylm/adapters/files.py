"""Adapter directories: PEFT's layout (adapter_config.json + adapter_model.safetensors), read with errors
that name the file, and the fingerprint of the base an adapter was trained on. Every adapter kind reads
its files through here; this module imports no adapter kind, so they import it without a cycle."""

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


BASE_KEY = "mightylm_base_fingerprint"


def base_fingerprint(model) -> str:
    """A short hash of what makes a base model itself: its config and 8 rows of its token embedding (rounded
    to bfloat16, so a float32 and a bfloat16 load of the same weights agree; the embedding is never quantized
    or adapted by our transforms). Two bases of the same shape but other weights differ here."""
    import hashlib

    import torch

    rows = torch.linspace(0, model.config.vocab_size - 1, 8).long()
    digest = hashlib.sha256(json.dumps(model.config.to_hf(), sort_keys=True).encode())
    with torch.no_grad():  # (a lookup: the table may be kept as GGUF blocks)
        values = model.embed(rows.to(model.device))
    digest.update(values.float().cpu().to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def recorded_base(path: str | Path) -> str | None:
    """The fingerprint of the base the adapter in `path` was trained on, if its safetensors metadata records one
    (None also for a missing or broken file: read_adapter names those)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(Path(path) / "adapter_model.safetensors"), "pt") as f:
            return (f.metadata() or {}).get(BASE_KEY)
    except (OSError, SafetensorError):
        return None


def warn_if_other_base(model, cfg: dict, path: str | Path) -> bool:
    """Warn (and return True) when the adapter in `path` records a base other than `model` (in its safetensors
    metadata): shapes alone do not tell, and an adapter on another base applies without an error but means
    nothing."""
    recorded = recorded_base(path)
    if not recorded or recorded == base_fingerprint(model):
        return False
    import warnings

    made_for = cfg.get("base_model_name_or_path") or "another model"
    warnings.warn(f"{path}: this adapter was trained on {made_for} (fingerprint {recorded}), and this model's "
                  f"fingerprint is {base_fingerprint(model)}: a different base of the same shape, or the same one in "
                  "another format (quantized GGUF vs float). Its outputs may be meaningless on this model",
                  stacklevel=2)
    return True


def stamp_base(model, path: str | Path) -> None:
    """Record `model`'s fingerprint in the adapter's safetensors metadata (PEFT ignores the metadata; it warns on
    config keys it does not know)."""
    from safetensors.torch import load_file, save_file

    weights = Path(path) / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt", BASE_KEY: base_fingerprint(model)})
