"""Checkpoint names as data: Hugging Face's and llama.cpp's tensor names -> ours, with named placeholders
(`{layer}`; the mixture-of-experts work adds `{expert}`), and the per-key transforms some formats need
(llama.cpp's q/k row permutation). `rename` maps one name through any of these dicts, either way.
"""

from __future__ import annotations

import re

HF_TO_OURS = {
    "model.embed_tokens.weight": "embed.weight",
    "model.layers.{layer}.input_layernorm.weight": "layers.{layer}.attn_norm.weight",
    "model.layers.{layer}.self_attn.q_proj.weight": "layers.{layer}.attn.q_proj.weight",
    "model.layers.{layer}.self_attn.k_proj.weight": "layers.{layer}.attn.k_proj.weight",
    "model.layers.{layer}.self_attn.v_proj.weight": "layers.{layer}.attn.v_proj.weight",
    "model.layers.{layer}.self_attn.q_proj.bias": "layers.{layer}.attn.q_proj.bias",
    "model.layers.{layer}.self_attn.k_proj.bias": "layers.{layer}.attn.k_proj.bias",
    "model.layers.{layer}.self_attn.v_proj.bias": "layers.{layer}.attn.v_proj.bias",
    "model.layers.{layer}.self_attn.o_proj.weight": "layers.{layer}.attn.o_proj.weight",
    "model.layers.{layer}.post_attention_layernorm.weight": "layers.{layer}.mlp_norm.weight",
    "model.layers.{layer}.mlp.gate_proj.weight": "layers.{layer}.mlp.gate_proj.weight",
    "model.layers.{layer}.mlp.up_proj.weight": "layers.{layer}.mlp.up_proj.weight",
    "model.layers.{layer}.mlp.down_proj.weight": "layers.{layer}.mlp.down_proj.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}

OURS_TO_HF = {v: k for k, v in HF_TO_OURS.items()}

GGUF_TO_OURS = {
    "token_embd.weight": "embed.weight",
    "blk.{layer}.attn_norm.weight": "layers.{layer}.attn_norm.weight",
    "blk.{layer}.attn_q.weight": "layers.{layer}.attn.q_proj.weight",
    "blk.{layer}.attn_k.weight": "layers.{layer}.attn.k_proj.weight",
    "blk.{layer}.attn_v.weight": "layers.{layer}.attn.v_proj.weight",
    "blk.{layer}.attn_q.bias": "layers.{layer}.attn.q_proj.bias",
    "blk.{layer}.attn_k.bias": "layers.{layer}.attn.k_proj.bias",
    "blk.{layer}.attn_v.bias": "layers.{layer}.attn.v_proj.bias",
    "blk.{layer}.attn_output.weight": "layers.{layer}.attn.o_proj.weight",
    "blk.{layer}.ffn_norm.weight": "layers.{layer}.mlp_norm.weight",
    "blk.{layer}.ffn_gate.weight": "layers.{layer}.mlp.gate_proj.weight",
    "blk.{layer}.ffn_up.weight": "layers.{layer}.mlp.up_proj.weight",
    "blk.{layer}.ffn_down.weight": "layers.{layer}.mlp.down_proj.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}

_NUMBER = re.compile(r"\.(\d+)(?=\.|$)")  # a numeric path component: a layer or an expert index
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def rename(name: str, mapping: dict[str, str]) -> str | None:
    """Map one checkpoint name through a dict of templates (`{layer}`, `{expert}`, ... for the numeric parts, in
    the order they appear in the source name); None if it has no counterpart."""
    values = _NUMBER.findall(name)
    if not values:
        return mapping.get(name)
    shape = _NUMBER.sub(".{}", name)
    for source, target in mapping.items():
        if _PLACEHOLDER.sub("{}", source) == shape:
            return target.format(**dict(zip(_PLACEHOLDER.findall(source), values)))
    return None


def rename_quantized(name: str, mapping: dict[str, str]) -> str | None:
    """`rename`, plus the scales a quantized layer keeps beside its weight (`...q_proj.weight_scale`)."""
    target = rename(name, mapping)
    if target is None and ".weight_" in name:
        stem, _, extra = name.rpartition(".weight_")
        base = rename(stem + ".weight", mapping)
        target = base and f"{base}_{extra}"
    return target


def unpermute_qk(w, n_heads: int):
    """Undo llama.cpp's q/k row permutation.

    convert_hf_to_gguf.py reorders each head's rows from HF's rotate-half layout (first half,
    second half) to interleaved pairs (GPT-J style) for its RoPE kernel: (nh, 2, hs/2) -> (nh, hs/2, 2).
    """
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


# Per-key transforms of llama.cpp's llama tensors, as data: our name -> (transform, the config field it needs).
GGUF_TENSOR_TRANSFORMS = {
    "layers.{layer}.attn.q_proj.weight": (unpermute_qk, "n_heads"),
    "layers.{layer}.attn.q_proj.bias": (unpermute_qk, "n_heads"),
    "layers.{layer}.attn.k_proj.weight": (unpermute_qk, "n_kv_heads"),
    "layers.{layer}.attn.k_proj.bias": (unpermute_qk, "n_kv_heads"),
}


def tensor_transform(name: str, transforms: dict) -> tuple | None:
    """The (transform, config field) that `transforms` names for our tensor `name`, if any."""
    shape = _NUMBER.sub(".{}", name)
    return next((v for k, v in transforms.items() if _PLACEHOLDER.sub("{}", k) == shape), None)
