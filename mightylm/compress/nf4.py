"""NF4: 4-bit NormalFloat weights with block-wise absmax and double quantization (Dettmers et al.
2023, "QLoRA: Efficient Finetuning of Quantized LLMs", section 3).

A weight is flattened and cut into blocks of 64. Each block is divided by its largest magnitude
(its absmax) and every value is replaced by the index of the nearest of the 16 NF4 levels: the
quantiles of N(0, 1) rescaled to [-1, 1], asymmetric so that 0 is exact (appendix E). Two codes
share a byte, the first in the high nibble (bitsandbytes' layout).

Double quantization (section 3, "Double Quantization") then quantizes the float32 absmax values
themselves: their mean is subtracted, and they are stored as 8-bit codes of bitsandbytes'
signed "dynamic" map with one float32 scale per block of 256. Bits per parameter: 4 + 32/64 = 4.5
without it, 4 + 8/64 + 32/(64*256) = 4.127 with it.

Dequantization is element for element the same as `bitsandbytes.functional.dequantize_4bit`
(a test): the same tables, the same float32 arithmetic in the same order. Quantization gives the
same 4-bit codes; the 8-bit absmax codes can differ from bitsandbytes' CPU library where a value
is within 1e-5 (of the [-1, 1] range) of the midpoint between two codes: it sometimes takes the
farther one, we always take the nearest (about 1 block in 500 here).

`NF4Linear` keeps the packed codes under the module's `weight` key (plus `weight_absmax`, and with
double quantization `weight_absmax_scale` and `weight_absmax_offset`). Its forward dequantizes
the weight for the matmul and again in backward, so no full-precision copy outlives a layer's
call: that is what lets QLoRA train LoRA adapters over a 4-bit base.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mightylm.kernels.ops import gemv_nf4

# The 16 NF4 levels (QLoRA appendix E), as float32 values; index 7 is exactly 0.
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

ABSMAX_BLOCK = 256  # block size of the second quantization (QLoRA section 3)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (Dettmers 2016): 256 sorted float32 values in [-1, 1],
    a sign, a run of zero bits that sets the exponent (10^-6 .. 10^0), then linear fraction steps."""
    values = []
    for i in range(7):  # exponent 10^(i-6); 2^i fraction steps at each
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(values, dtype=torch.float32).sort().values


def _nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for each value of x (levels sorted ascending)."""
    return torch.bucketize(x, (levels[:-1] + levels[1:]) / 2)


def _blockwise(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten, cut into blocks: (values scaled to [-1, 1], float32 absmax per block). A short last block is padded."""
    flat = x.reshape(-1).float()
    pad = -flat.numel() % block
    blocks = F.pad(flat, (0, pad)).view(-1, block)  # (n_blocks, block)
    absmax = blocks.abs().max(dim=1).values
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    return scaled.reshape(-1)[:flat.numel()], absmax


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """NF4 codes (uint8, two per byte) and the absmax state of `weight`, as named tensors."""
    scaled, absmax = _blockwise(weight, block_size)
    codes = _nearest(scaled, NF4_LEVELS.to(weight.device)).to(torch.uint8)
    codes = F.pad(codes, (0, codes.numel() % 2), value=7)  # an odd count: pad with the code of 0.0, as bitsandbytes
    state = {"weight": (codes[::2] << 4) | codes[1::2]}  # (numel / 2,)
    if not double_quant:
        state["weight_absmax"] = absmax
        return state
    offset = absmax.mean()
    scaled2, scale2 = _blockwise(absmax - offset, ABSMAX_BLOCK)
    state["weight_absmax"] = _nearest(scaled2, dynamic_map().to(weight.device)).to(torch.uint8)
    state["weight_absmax_scale"] = scale2
    state["weight_absmax_offset"] = offset.reshape(1)
    return state


def dequantize_absmax(state: dict[str, torch.Tensor]) -> torch.Tensor:
    absmax = state["weight_absmax"]
    if "weight_absmax_scale" not in state:
        return absmax
    n = absmax.numel()
    codes = dynamic_map().to(absmax.device)[absmax.long()]
    codes = F.pad(codes, (0, -n % ABSMAX_BLOCK)).view(-1, ABSMAX_BLOCK)
    return (codes * state["weight_absmax_scale"][:, None]).reshape(-1)[:n] + state["weight_absmax_offset"]


def dequantize_nf4(state: dict[str, torch.Tensor], shape: tuple[int, ...], block_size: int = 64,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    packed = state["weight"]
    codes = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)  # (numel [+1],)
    n = 1
    for d in shape:
        n *= d
    values = NF4_LEVELS.to(packed.device)[codes.long()][:n]
    absmax = dequantize_absmax(state)
    values = F.pad(values, (0, -n % block_size)).view(-1, block_size) * absmax[:, None]
    return values.reshape(-1)[:n].view(shape).to(dtype)


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T + b with W rebuilt from its quantized form in forward and again in backward, so
    autograd never keeps a full-precision W alive. W and b are frozen: only x gets a gradient."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return F.linear(x, module.dequantize(x.dtype), module.bias)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.module.dequantize(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as NF4 (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, block_size: int = 64,
                 double_quant: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.double_quant = block_size, double_quant
        n = in_features * out_features
        blocks = -(-n // block_size)
        self.register_buffer("weight", torch.empty((n + 1) // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("weight_absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("weight_absmax_scale", torch.empty(-(-blocks // ABSMAX_BLOCK), device=device))
            self.register_buffer("weight_absmax_offset", torch.empty(1, device=device))
        else:
            self.register_buffer("weight_absmax", torch.empty(blocks, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self._absmax = None  # float32 absmax for the decode kernel, computed on first use

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True) -> NF4Linear:
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, block_size=block_size,
                  double_quant=double_quant, device="meta")
        for name, tensor in quantize_nf4(w, block_size, double_quant).items():
            setattr(new, name, tensor)
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return new

    def state(self) -> dict[str, torch.Tensor]:
        return {name: buf for name, buf in self.named_buffers(recurse=False)}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_nf4(self.state(), (self.out_features, self.in_features), self.block_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenLinear.apply(x, self)
        if x.numel() == self.in_features:  # one row (decoding): the native kernel reads the 4-bit codes directly
            if self._absmax is None:
                self._absmax = dequantize_absmax(self.state()).contiguous()
            y = gemv_nf4(x, self.weight, self._absmax, NF4_LEVELS, self.out_features, self.block_size, self.bias)
            if y is not None:
                return y
        return F.linear(x, self.dequantize(x.dtype), self.bias.to(x.dtype) if self.bias is not None else None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}, "
                f"double_quant={self.double_quant}")


def nf4_bits_per_param(block_size: int = 64, double_quant: bool = True) -> float:
    """Storage per weight: 4 bits of code plus the share of the block's absmax."""
    if double_quant:
        return 4 + 8 / block_size + 32 / (block_size * ABSMAX_BLOCK)
    return 4 + 32 / block_size
