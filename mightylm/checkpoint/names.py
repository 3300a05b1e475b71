"""Checkpoint names as data: Hugging Face's and llama.cpp's tensor names -> ours, with named placeholders
(`{layer}`, `{expert}`), and the per-key transforms some formats need (llama.cpp's q/k row permutation).
`rename` maps one name through any of these dicts, either way; `hf_to_ours(arch)` / `ours_to_hf(arch)` are the
maps of one family (Mixtral names its experts differently from Qwen2-MoE and OLMoE).
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
    # mixture of experts as Qwen2-MoE and OLMoE name it (and OLMoE's q/k norms)
    "model.layers.{layer}.mlp.gate.weight": "layers.{layer}.mlp.gate.weight",
    "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight": "layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
    "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight": "layers.{layer}.mlp.experts.{expert}.up_proj.weight",
    "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight": "layers.{layer}.mlp.experts.{expert}.down_proj.weight",
    "model.layers.{layer}.mlp.shared_expert.gate_proj.weight": "layers.{layer}.mlp.shared_expert.gate_proj.weight",
    "model.layers.{layer}.mlp.shared_expert.up_proj.weight": "layers.{layer}.mlp.shared_expert.up_proj.weight",
    "model.layers.{layer}.mlp.shared_expert.down_proj.weight": "layers.{layer}.mlp.shared_expert.down_proj.weight",
    "model.layers.{layer}.mlp.shared_expert_gate.weight": "layers.{layer}.mlp.shared_expert_gate.weight",
    "model.layers.{layer}.self_attn.q_norm.weight": "layers.{layer}.attn.q_norm.weight",
    "model.layers.{layer}.self_attn.k_norm.weight": "layers.{layer}.attn.k_norm.weight",
}

# Mixtral's own names for the same tensors (w1 = gate, w3 = up, w2 = down)
MIXTRAL_HF_TO_OURS = {
    "model.layers.{layer}.block_sparse_moe.gate.weight": "layers.{layer}.mlp.gate.weight",
    "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight": "layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
    "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight": "layers.{layer}.mlp.experts.{expert}.up_proj.weight",
    "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight": "layers.{layer}.mlp.experts.{expert}.down_proj.weight",
}

# Phi-1.5 / Phi-2's names (LayerNorms with biases, `dense` for o_proj, `fc1` / `fc2` for its GELU MLP)
PHI_HF_TO_OURS = {
    "model.layers.{layer}.input_layernorm.bias": "layers.{layer}.attn_norm.bias",
    "model.layers.{layer}.self_attn.dense.weight": "layers.{layer}.attn.o_proj.weight",
    "model.layers.{layer}.self_attn.dense.bias": "layers.{layer}.attn.o_proj.bias",
    "model.layers.{layer}.mlp.fc1.weight": "layers.{layer}.mlp.up_proj.weight",
    "model.layers.{layer}.mlp.fc1.bias": "layers.{layer}.mlp.up_proj.bias",
    "model.layers.{layer}.mlp.fc2.weight": "layers.{layer}.mlp.down_proj.weight",
    "model.layers.{layer}.mlp.fc2.bias": "layers.{layer}.mlp.down_proj.bias",
    "model.final_layernorm.weight": "norm.weight",
    "model.final_layernorm.bias": "norm.bias",
    "lm_head.bias": "lm_head.bias",
}

FAMILY_HF_TO_OURS = {"mixtral": MIXTRAL_HF_TO_OURS, "phi": PHI_HF_TO_OURS}

# A family's own leaf names for our modules, so that techniques targeting layers by name (LoRA) take the names the
# family's users know: Phi-2's dense/fc1/fc2, Phi-3's fused qkv_proj/gate_up_proj (which we keep as separate
# layers), Mixtral's w1/w3/w2.
LEAF_ALIASES = {
    "phi": {"dense": ("o_proj",), "fc1": ("up_proj",), "fc2": ("down_proj",)},
    "phi3": {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
    "mixtral": {"w1": ("gate_proj",), "w3": ("up_proj",), "w2": ("down_proj",)},
}


def our_leaves(arch: str, names) -> tuple[str, ...]:
    """Leaf names with the `arch` family's aliases (LEAF_ALIASES) replaced by ours."""
    aliases = LEAF_ALIASES.get(arch, {})
    return tuple(dict.fromkeys(ours for name in names for ours in aliases.get(name, (name,))))

OURS_TO_HF = {v: k for k, v in HF_TO_OURS.items()}


def hf_to_ours(arch: str) -> dict[str, str]:
    """HF name -> ours for the `arch` family (its own names first, then the shared ones)."""
    return {**FAMILY_HF_TO_OURS.get(arch, {}), **HF_TO_OURS}


def ours_to_hf(arch: str) -> dict[str, str]:
    """Ours -> the HF name the `arch` family's transformers class loads."""
    return {**OURS_TO_HF, **{v: k for k, v in FAMILY_HF_TO_OURS.get(arch, {}).items()}}


# Families that store several projections as one tensor (rows stacked in this order): Phi-3's qkv_proj and
# gate_up_proj. Loading splits them into the per-projection names above; saving stacks them again.
FUSED_HF = {
    "phi3": {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")},
}


def fused_parts(arch: str, module: str, sizes: dict[str, int]) -> list[tuple[str, int]] | None:
    """[(per-projection HF module name, rows)] of a module `arch` stores stacked (FUSED_HF), or None; `sizes`
    gives each part's rows by its leaf name (q_proj, k_proj, ...)."""
    for fused, parts in FUSED_HF.get(arch, {}).items():
        if module.endswith(f".{fused}"):
            prefix = module[: -len(fused)]
            return [(f"{prefix}{p}", sizes[p.rpartition(".")[2]]) for p in parts]
    return None


def split_fused(arch: str, name: str, tensor, sizes: dict[str, int]):
    """[(per-projection HF name, rows)] of a stacked tensor of `arch` (FUSED_HF), or [(name, tensor)] for any
    other."""
    parts = fused_parts(arch, name.removesuffix(".weight"), sizes) if name.endswith(".weight") else None
    if parts is None:
        return [(name, tensor)]
    rows = [n for _, n in parts]
    if sum(rows) != tensor.shape[0]:
        raise ValueError(f"{name}: {tensor.shape[0]} rows, expected {' + '.join(map(str, rows))}")
    # copies, not views of one tensor: an in-place update of one part (LOMO) must not touch the others
    return [(f"{p}.weight", t.clone()) for (p, _), t in zip(parts, tensor.split(rows))]


def projection_rows(config) -> dict[str, int]:
    """Each projection's output rows by leaf name, for splitting stacked tensors."""
    c = config
    return {"q_proj": c.n_heads * c.head_dim, "k_proj": c.n_kv_heads * c.head_dim,
            "v_proj": c.n_kv_heads * c.head_dim, "gate_proj": c.ffn_dim, "up_proj": c.ffn_dim}


def stack_fused(arch: str, tensors: dict) -> dict:
    """The inverse of split_fused over a whole state dict of HF names (ordered as the model's)."""
    import torch

    for fused, parts in FUSED_HF.get(arch, {}).items():
        for name in [n for n in tensors if n.endswith(f".{parts[0]}.weight")]:
            prefix = name[: -len(f"{parts[0]}.weight")]
            pieces = [tensors.pop(f"{prefix}{p}.weight") for p in parts]
            tensors[f"{prefix}{fused}.weight"] = torch.cat(pieces).contiguous()
    return tensors


_FUSED_EXPERTS = re.compile(r"^(.*\.(?:mlp|block_sparse_moe)\.experts)\.(gate_up_proj|down_proj)$")


def split_fused_experts(name: str, tensor):
    """transformers 5 keeps a layer's experts as 3-D parameters (`experts.gate_up_proj` (E, 2 I, dim) and
    `experts.down_proj` (E, dim, I)); a checkpoint saved that way is split here into the per-expert tensors
    (`experts.{e}.gate_proj.weight`, ...) every other layout uses. Other names pass through unchanged."""
    match = _FUSED_EXPERTS.match(name)
    if match is None:
        return [(name, tensor)]
    prefix, kind = match.groups()
    if kind == "down_proj":  # copies, not views (see split_fused)
        return [(f"{prefix}.{e}.down_proj.weight", tensor[e].clone()) for e in range(tensor.shape[0])]
    gate, up = tensor.chunk(2, dim=1)
    return [pair for e in range(tensor.shape[0])
            for pair in ((f"{prefix}.{e}.gate_proj.weight", gate[e].clone()),
                         (f"{prefix}.{e}.up_proj.weight", up[e].clone()))]

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
    # mixture of experts: the router, Qwen2-MoE's shared expert, OLMoE's q/k norms (the experts themselves come
    # stacked, `ffn_{gate,up,down}_exps`, and are split by GGUF_STACKED_EXPERTS)
    "blk.{layer}.ffn_gate_inp.weight": "layers.{layer}.mlp.gate.weight",
    "blk.{layer}.ffn_gate_shexp.weight": "layers.{layer}.mlp.shared_expert.gate_proj.weight",
    "blk.{layer}.ffn_up_shexp.weight": "layers.{layer}.mlp.shared_expert.up_proj.weight",
    "blk.{layer}.ffn_down_shexp.weight": "layers.{layer}.mlp.shared_expert.down_proj.weight",
    "blk.{layer}.ffn_gate_inp_shexp.weight": "layers.{layer}.mlp.shared_expert_gate.weight",
    # Phi-2's biases (its LayerNorms, output projection, GELU MLP and head)
    "blk.{layer}.attn_norm.bias": "layers.{layer}.attn_norm.bias",
    "blk.{layer}.attn_output.bias": "layers.{layer}.attn.o_proj.bias",
    "blk.{layer}.ffn_up.bias": "layers.{layer}.mlp.up_proj.bias",
    "blk.{layer}.ffn_down.bias": "layers.{layer}.mlp.down_proj.bias",
    "output_norm.bias": "norm.bias",
    "output.bias": "lm_head.bias",
    "blk.{layer}.attn_q_norm.weight": "layers.{layer}.attn.q_norm.weight",
    "blk.{layer}.attn_k_norm.weight": "layers.{layer}.attn.k_norm.weight",
}

# llama.cpp stacks a layer's experts into one 3-D tensor each: GGUF name -> our per-expert name ({expert} is the
# index along the first axis)
GGUF_STACKED_EXPERTS = {
    "blk.{layer}.ffn_gate_exps.weight": "layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
    "blk.{layer}.ffn_up_exps.weight": "layers.{layer}.mlp.experts.{expert}.up_proj.weight",
    "blk.{layer}.ffn_down_exps.weight": "layers.{layer}.mlp.experts.{expert}.down_proj.weight",
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


def permute_qk(w, n_heads: int):
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py): each head's rows from rotate-half order (first
    half, second half) to interleaved pairs, (nh, 2, hs/2) -> (nh, hs/2, 2); `unpermute_qk` undoes it."""
    shape = w.shape
    return w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


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
