"""int8 primitives: symmetric absmax codes and the weight-only int8 linear layer. Shared by quantize.py
(weight-only int8) and smoothquant.py (W8A8), which import them from here, not from each other."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mightylm.compress.nf4 import _FrozenLinear
from mightylm.kernels.ops import gemv_int8


def int8_absmax(t: torch.Tensor, per_row: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of a 2-D tensor: t ~ q * scale, with one scale per row (shape (rows, 1)) or
    one for the whole tensor (shape (1, 1)); q in [-127, 127]."""
    t = t.float()
    amax = t.abs().amax(dim=1, keepdim=True) if per_row else t.abs().amax().reshape(1, 1)
    scale = amax.clamp(min=1e-12) / 127
    return (t / scale).round().clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """Weight-only int8 with one scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return take_int8_weights(cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta"),
                                 linear)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenLinear.apply(x, self)
        if x.numel() == self.in_features and (y := gemv_int8(x, self.weight, self.weight_scale, self.bias)) is not None:
            return y  # one row (decoding): the native kernel streams the int8 weight once
        # Several rows (prefill, training): dequantize once, then a float GEMM. On this CPU that is
        # 16x faster than PyTorch's _weight_int8pack_mm at 32 rows (2-core AMD EPYC, bench/RESULTS.md).
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


@torch.no_grad()
def take_int8_weights(new: nn.Module, linear: nn.Linear) -> nn.Module:
    """Fill `new` (an int8 layer on the meta device) from a float layer: int8 `weight` (out, in), one
    `weight_scale` per output channel (out,), and the bias, frozen. Weight-only int8 and W8A8 share it."""
    q, scale = int8_absmax(linear.weight.detach())
    new.weight, new.weight_scale = q, scale.squeeze(1)
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return new
