"""Structured pruning (Minitron: Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation"): whole FFN neurons, attention head groups, embedding channels and blocks are removed, so the result
is a smaller config, an ordinary checkpoint that transformers loads and that decodes faster, not a masked one.

Importance is measured on calibration text with one forward pass of the unpruned model (section 2.2, activation
based):
- an FFN neuron: the mean |activation| entering down_proj (silu(gate) * up) over the calibration tokens;
- a head group: the query heads that share one key/value head (GQA keeps them together, so the pruned model is
  still GQA with the same group size): the sum of their attention outputs' L2 norms (the input of o_proj);
- an embedding channel: the mean |value| of that channel at the output of every norm (each block's norms and the
  final one), summed;
- a block (depth): its influence, 1 - cos(input, output) averaged over tokens (Men et al. 2024, "ShortGPT"): the
  blocks that change the residual stream least go first.
Neurons and head groups are ranked per layer, and every layer keeps the same number (one config for all layers).
The widths kept are rounded to multiples of 32 where that is possible (GGUF blocks and our kernels like them), and
the hidden size to a multiple of the heads kept (transformers refuses a config without it).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from mightylm.compress.prune import PruningError


@dataclasses.dataclass
class Importance:
    """What the calibration pass measured, per layer of the unpruned model."""

    neurons: list[torch.Tensor]  # (ffn_dim,) per layer
    groups: list[torch.Tensor]  # (n_kv_heads,) per layer
    channels: torch.Tensor  # (dim,)
    influence: torch.Tensor  # (n_layers,)


def check_structured(model: nn.Module) -> None:
    c = model.config
    if c.n_experts or c.mlp_act != "swiglu" or c.norm != "rms" or c.qk_norm or model.prefix_len or model.quantization:
        raise PruningError(f"structured pruning takes a dense float Llama / Mistral / Qwen2-style model (SwiGLU, "
                           f"RMSNorm, no adapters); this one is {c.arch}"
                           f"{' with experts' if c.n_experts else ''}{' quantized' if model.quantization else ''}")


@torch.no_grad()
def measure(model: nn.Module, batches: list[torch.Tensor]) -> Importance:
    """One forward pass per calibration window with hooks that add up each unit's activation."""
    check_structured(model)
    c = model.config
    neurons = [torch.zeros(c.ffn_dim) for _ in range(c.n_layers)]
    groups = [torch.zeros(c.n_kv_heads) for _ in range(c.n_layers)]
    channels = torch.zeros(c.dim)
    influence = torch.zeros(c.n_layers)
    tokens = 0
    hooks = []

    def on_down(i):
        def hook(module, args):
            neurons[i].add_(args[0].detach().abs().float().reshape(-1, c.ffn_dim).sum(0))
        return hook

    def on_o(i):
        def hook(module, args):
            heads = args[0].detach().float().reshape(-1, c.n_kv_heads, c.n_heads // c.n_kv_heads, c.head_dim)
            groups[i].add_(heads.norm(dim=-1).sum(dim=(0, 2)))
        return hook

    def on_norm(module, args, out):
        channels.add_(out.detach().abs().float().reshape(-1, c.dim).sum(0))

    def on_block(i):
        def hook(module, args, out):
            x, y = args[0].detach().float(), out.detach().float()
            influence[i] += (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum()
        return hook

    for i, block in enumerate(model.layers):
        hooks += [block.mlp.down_proj.register_forward_pre_hook(on_down(i)),
                  block.attn.o_proj.register_forward_pre_hook(on_o(i)), block.register_forward_hook(on_block(i)),
                  block.attn_norm.register_forward_hook(on_norm), block.mlp_norm.register_forward_hook(on_norm)]
    hooks.append(model.norm.register_forward_hook(on_norm))
    try:
        for idx in batches:
            model(idx)
            tokens += idx.numel()
    finally:
        for h in hooks:
            h.remove()
    if tokens == 0:
        raise PruningError("no calibration windows: structured pruning ranks units by their activations on text")
    return Importance([n / tokens for n in neurons], [g / tokens for g in groups], channels / tokens, influence / tokens)


def _kept_width(total: int, fraction: float, multiple: int = 1) -> int:
    """About total * fraction, a multiple of `multiple` (transformers wants the hidden size a multiple of the
    heads), and of 32 too where such a width exists; all of it at fraction 1."""
    if fraction == 1:
        return total
    for step in (math.lcm(multiple, 32), multiple):
        choices = range(step, total + 1, step)
        if choices:
            return min(choices, key=lambda k: (abs(k - total * fraction), k))
    raise PruningError(f"cannot keep a width of {total} that is a multiple of {multiple}")


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k highest scores, in their original order (so kept units keep their relative layout)."""
    return torch.sort(torch.topk(score, k, sorted=False).indices).values


@torch.no_grad()
def prune_structured(model: nn.Module, importance: Importance, *, ffn: float = 1.0, heads: float = 1.0,
                     dim: float = 1.0, layers: int | None = None) -> nn.Module:
    """A new, smaller model: `ffn`, `heads` (groups) and `dim` are the fractions of FFN neurons, key/value head
    groups and embedding channels kept; `layers` the number of blocks kept (default all). The input is not
    changed. The new model records what was removed."""
    from mightylm.model import Transformer

    check_structured(model)
    c = model.config
    for name, value in (("ffn", ffn), ("heads", heads), ("dim", dim)):
        if not 0 < value <= 1:
            raise PruningError(f"--{name} is the fraction kept: above 0, at most 1; got {value}")
    layers = c.n_layers if layers is None else layers
    if not 1 <= layers <= c.n_layers:
        raise PruningError(f"--layers is the number of blocks kept: 1 to {c.n_layers}; got {layers}")
    keep_blocks = _top(importance.influence, layers).tolist()
    n_ffn = _kept_width(c.ffn_dim, ffn)
    n_kv = max(1, round(c.n_kv_heads * heads))
    group = c.n_heads // c.n_kv_heads
    n_dim = _kept_width(c.dim, dim, multiple=n_kv * group)
    channels = _top(importance.channels, n_dim)
    config = dataclasses.replace(c, n_layers=layers, ffn_dim=n_ffn, n_kv_heads=n_kv, n_heads=n_kv * group, dim=n_dim,
                                 head_dim=c.head_dim)
    small = Transformer(config).to(model.embed.weight.dtype)
    small.embed.weight.copy_(model.embed.weight[:, channels])
    small.norm.weight.copy_(model.norm.weight[channels])
    if not config.tie_embeddings:
        small.lm_head.weight.copy_(model.lm_head.weight[:, channels])
    if model.lm_head.bias is not None:
        small.lm_head.bias.copy_(model.lm_head.bias)
    for new_i, old_i in enumerate(keep_blocks):
        old, new = model.layers[old_i], small.layers[new_i]
        kv = _top(importance.groups[old_i], n_kv)
        q_rows = _head_rows(torch.cat([torch.arange(g * group, (g + 1) * group) for g in kv.tolist()]), c.head_dim)
        kv_rows = _head_rows(kv, c.head_dim)
        neurons = _top(importance.neurons[old_i], n_ffn)
        new.attn_norm.weight.copy_(old.attn_norm.weight[channels])
        new.mlp_norm.weight.copy_(old.mlp_norm.weight[channels])
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            _copy(getattr(new.attn, name), getattr(old.attn, name), rows, channels)
        _copy(new.attn.o_proj, old.attn.o_proj, channels, q_rows)
        _copy(new.mlp.gate_proj, old.mlp.gate_proj, neurons, channels)
        _copy(new.mlp.up_proj, old.mlp.up_proj, neurons, channels)
        _copy(new.mlp.down_proj, old.mlp.down_proj, channels, neurons)
    small.transforms = [t for t in model.transforms if t["kind"] != "prune"]  # masks do not survive re-indexing
    small.record_transform("structured_prune", ffn=ffn, heads=heads, dim=dim, layers=layers,
                           kept_blocks=keep_blocks, before={"dim": c.dim, "n_layers": c.n_layers,
                                                            "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
                                                            "ffn_dim": c.ffn_dim})
    return small.eval()


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The projection rows of the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)


def _copy(new: nn.Linear, old: nn.Linear, rows: torch.Tensor, cols: torch.Tensor) -> None:
    new.weight.copy_(old.weight[rows][:, cols])
    if old.bias is not None:
        new.bias.copy_(old.bias[rows])
