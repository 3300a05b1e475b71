"""LLaMA-Adapter (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with
Zero-init Attention").

Each of the top L blocks gets K learnable adaption prompts P_l (K, dim). The block's own k_proj
and v_proj turn them into K extra keys and values (no RoPE: they have no position). Every query
attends to them with a softmax of its own, separate from the softmax over the real tokens, scaled
by a gate that starts at zero (section 3.2, "zero-init attention"):

    out = softmax(q K^T / sqrt(d)) V  +  g_l * softmax(q K_P^T / sqrt(d)) V_P

so the model is exactly unchanged at the start of training and the prompts fade in as g_l grows.
As in the authors' released code, g_l is one value per head, used through tanh.

How it hooks in: `apply_llama_adapter(model, layers=28, length=10)` adds an `adaption` module to
the attention of each of the top `layers` blocks and wraps `Attention.attend`, the one method the
model exposes for this; everything else is frozen. The extra attention reads only the prompts,
never the KV cache, so cached decoding, padding and batching work unchanged.

How this differs from PEFT's `AdaptionPrompt`: PEFT learns one scalar gate per layer and
multiplies by it directly (no tanh, not per head), and initialises the prompts N(0, 1). Our
files therefore use our own format (PEFT's cannot express a per-head tanh gate):
adapter_config.json with `"peft_type": "MIGHTYLM_LLAMA_ADAPTER"`, `layers`, `length` and the base
model's shape, and adapter_model.safetensors with `layers.{i}.attn.adaption.prompt` (K, dim) and
`layers.{i}.attn.adaption.gate` (1, n_heads, 1, 1).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mightylm.adapters.files import AdapterError, read_adapter

PEFT_TYPE = "MIGHTYLM_LLAMA_ADAPTER"


class AdaptionPrompt(nn.Module):
    """K prompts for one attention layer and their zero-initialised per-head gate."""

    def __init__(self, length: int, dim: int, n_heads: int, init: torch.Tensor):
        super().__init__()
        self.prompt = nn.Parameter(init.detach().clone())  # (K, dim)
        self.gate = nn.Parameter(torch.zeros(1, n_heads, 1, 1, dtype=init.dtype, device=init.device))
        # The multimodal variant (section 3.3): each row's projected global image feature (B, 1, dim), added to
        # every prompt of the layer; set for the length of a forward pass or a generation by multimodal.adapter.
        self.visual: torch.Tensor | None = None

    def forward(self, attn: nn.Module, q: torch.Tensor) -> torch.Tensor:
        """q (B, nh, T, hs) -> the gated prompt attention (B, nh, T, hs) added to the block's own."""
        prompt = self.prompt[None] if self.visual is None else self.prompt[None] + self.visual  # (1|B, K, dim)
        B, K = prompt.shape[:2]
        k = attn.k_proj(prompt).view(B, K, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (1|B, nkv, K, hs)
        v = attn.v_proj(prompt).view(B, K, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        group = attn.n_heads // attn.n_kv_heads  # grouped-query attention: each kv head serves `group` queries
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (1|B, nh, K, hs)
        scores = (q @ k.transpose(2, 3)) / math.sqrt(attn.head_dim)  # (B, nh, T, K)
        weights = self.gate.tanh() * F.softmax(scores.float(), dim=-1).to(q.dtype)
        return weights @ v


def _adapted_attend(attn: nn.Module, q, k, v, mask):
    """Attention.attend plus the gated attention over this layer's adaption prompts."""
    return type(attn).attend(attn, q, k, v, mask) + attn.adaption(attn, q)


def apply_llama_adapter(model: nn.Module, layers: int | None = None, length: int = 10, seed: int = 0) -> list[str]:
    """Add K=`length` adaption prompts to each of the top `layers` blocks (default: all but the bottom two,
    as the paper adapts 30 of LLaMA-7B's 32), and return the adapted module names (`adapters.mark_trainable`
    decides what trains)."""
    n = model.config.n_layers
    layers = max(1, n - 2) if layers is None else layers
    if not 1 <= layers <= n:
        raise AdapterError(f"LLaMA-Adapter layers must be between 1 and the model's {n} blocks, got {layers}")
    if length < 1 or length > 4096:
        raise AdapterError(f"the adaption prompt length must be between 1 and 4096, got {length}")
    # The prompts enter k_proj/v_proj directly, which expect normed hidden states, so they start as
    # N(0, 1) vectors times the layer's attention-norm gain: the scale those projections see (the
    # authors' nn.Embedding init is N(0, 1), LLaMA's norm gains being near 1).
    generator = torch.Generator().manual_seed(seed)
    converted = []
    for i in range(n - layers, n):
        attn = model.layers[i].attn
        if getattr(attn, "adaption", None) is not None:
            continue  # already adapted
        scale = model.layers[i].attn_norm.weight.detach().float().abs().mean()
        init = torch.randn(length, model.config.dim, generator=generator) * scale
        attn.adaption = AdaptionPrompt(length, model.config.dim, attn.n_heads,
                                       init.to(dtype=model.dtype, device=model.device))
        attn.adaption.train(model.training)
        attn.attend = functools.partial(_adapted_attend, attn)  # shadows the class method on this instance
        converted.append(f"layers.{i}.attn")
    model.record_transform("llama_adapter", layers=layers, length=length)
    return converted


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".attn.adaption." in k}


def save_llama_adapter(model: nn.Module, path: str | Path, base_model: str = "") -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state(model).items()}
    if not tensors:
        raise AdapterError("the model has no LLaMA-Adapter prompts to save")
    c = model.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapted = [block.attn.adaption for block in model.layers if getattr(block.attn, "adaption", None) is not None]
    config = {"peft_type": PEFT_TYPE, "base_model_name_or_path": base_model, "layers": len(adapted),
              "length": adapted[0].prompt.shape[0],
              "arch": c.arch, "dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_llama_adapter(model: nn.Module, path: str | Path, cfg: dict | None = None) -> list[str]:
    """Apply a LLaMA-Adapter written by `save_llama_adapter`. Returns the adapted module names."""
    path = Path(path)
    cfg, tensors = read_adapter(path, (PEFT_TYPE,), cfg)
    c = model.config
    mine = {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads}
    theirs = {k: cfg.get(k) for k in mine}
    if theirs != mine:
        base = cfg.get("base_model_name_or_path") or "another base model"
        raise AdapterError(f"{path}: this LLaMA-Adapter was made for {base} ({theirs}); this {c.arch} model has {mine}")
    converted = apply_llama_adapter(model, layers=cfg["layers"], length=cfg["length"])
    state = adapter_state(model)
    if set(tensors) != set(state):
        raise AdapterError(f"{path / 'adapter_model.safetensors'}: expected tensors {sorted(state)[:2]}..., "
                           f"found {sorted(tensors)[:2]}...")
    with torch.no_grad():
        for key, tensor in tensors.items():
            if state[key].shape != tensor.shape:
                raise AdapterError(f"{path}: {key} has shape {tuple(tensor.shape)}, this model needs {tuple(state[key].shape)}")
            state[key].copy_(tensor)
    return converted
