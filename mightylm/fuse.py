"""Decode layout: fused projections and input-major weights, an in-place inference transform.

Batch-1 decoding is a chain of matrix-vector products, bound by how fast the weights stream
from memory. Two layout changes make PyTorch's CPU kernels stream faster (measured on
SmolLM2-135M's shapes, 2 cores, float32: 46 -> 31 ms per token for the blocks, 11.4 -> 6.3 ms
for the 49152-row LM head):

1. Fusion: q/k/v become one (q+k+v, dim) matrix and gate/up one (2*ffn, dim) matrix, so each
   block does 4 matmuls instead of 7.
2. Input-major storage: every weight is kept as the transpose of a contiguous (in, out) tensor.
   `F.linear(x, W)` then runs as `x @ W_t` over contiguous memory, the faster GEMV path.

Nothing is copied twice: `q_proj.weight`, `k_proj.weight` and `v_proj.weight` become views into
the fused tensor, so parameters, names and `state_dict()` values are unchanged and in-place
updates stay visible to the fused path. Footguns: replacing a projection module (a LoRA
transform) or assigning new weight tensors (`load_state_dict(assign=True)`) after fusing bypasses
or detaches the fused copy; call `unfuse_projections_` first.
"""

from __future__ import annotations

import torch
from torch import nn

from mightylm.model import Attention, MLP, Transformer


def _input_major(weights: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (out_i, in) weights into one (sum out_i, in) tensor backed by (in, sum out_i) storage."""
    return torch.cat([w.detach().t() for w in weights], dim=1).contiguous().t()


def _share(linear: nn.Linear, fused: torch.Tensor, start: int, end: int, bias: torch.Tensor | None = None):
    linear.weight = nn.Parameter(fused[start:end], requires_grad=linear.weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias[start:end], requires_grad=linear.bias.requires_grad)


@torch.no_grad()
def fuse_projections_(model: Transformer) -> list[str]:
    """Fuse q/k/v and gate/up, store every linear weight input-major. Returns what it converted."""
    converted = []
    for name, module in model.named_modules():
        if isinstance(module, Attention) and module.fused_qkv is None:
            parts = [module.q_proj, module.k_proj, module.v_proj]
            if not all(type(p) is nn.Linear for p in parts):
                continue  # already wrapped by another technique: leave it alone
            fused = _input_major([p.weight for p in parts])
            bias = torch.cat([p.bias for p in parts]) if module.q_proj.bias is not None else None
            edges = [0]
            for p in parts:
                edges.append(edges[-1] + p.out_features)
            for p, a, b in zip(parts, edges, edges[1:]):
                _share(p, fused, a, b, bias)
            module.fused_qkv = (fused, bias)
            converted.append(f"{name}.qkv")
        elif isinstance(module, MLP) and module.fused_gate_up is None:
            parts = [module.gate_proj, module.up_proj]
            if not all(type(p) is nn.Linear for p in parts):
                continue
            fused = _input_major([p.weight for p in parts])
            n = module.gate_proj.out_features
            _share(module.gate_proj, fused, 0, n)
            _share(module.up_proj, fused, n, 2 * n)
            module.fused_gate_up = fused
            converted.append(f"{name}.gate_up")
    # The remaining linears (o_proj, down_proj, lm_head) only change layout.
    for name, module in model.named_modules():
        if type(module) is nn.Linear and module.weight.is_contiguous() and module.weight.dim() == 2:
            if module is model.lm_head and model.config.tie_embeddings:
                continue  # handled below, together with the embedding it shares
            module.weight = nn.Parameter(_input_major([module.weight]), requires_grad=module.weight.requires_grad)
            converted.append(name)
    if model.config.tie_embeddings and model.embed.weight.is_contiguous():
        model.embed.weight = nn.Parameter(_input_major([model.embed.weight]), requires_grad=model.embed.weight.requires_grad)
        model.tie_weights()
        converted.append("lm_head(tied)")
    return converted


@torch.no_grad()
def unfuse_projections_(model: Transformer) -> list[str]:
    """Undo `fuse_projections_`: separate contiguous weights, no fused copies."""
    converted = []
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            module.fused_qkv = None
        if isinstance(module, MLP):
            module.fused_gate_up = None
        if type(module) is nn.Linear and not module.weight.is_contiguous():
            module.weight = nn.Parameter(module.weight.contiguous(), requires_grad=module.weight.requires_grad)
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.clone(), requires_grad=module.bias.requires_grad)
            converted.append(name)
    if not model.embed.weight.is_contiguous():
        model.embed.weight = nn.Parameter(model.embed.weight.contiguous(), requires_grad=model.embed.weight.requires_grad)
        model.tie_weights()
    return converted
