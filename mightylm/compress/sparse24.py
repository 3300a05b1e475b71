"""2:4 sparse weights as stored for decoding: `pack_24_(model)` replaces every linear layer whose weights keep at
most 2 of each 4 consecutive inputs (what `prune_(..., pattern=(2, 4))` leaves) by a Sparse24Linear holding only
the kept values and their 2-bit positions (2.25 bytes per weight instead of 4). Up to 32 rows (batch-1 decoding,
a short prompt) go through the native kernel in kernels/sparse24.c, which reads only those; more rebuild the
dense weight for a GEMM. The product equals the masked dense one.

Like the fused decode layout (fuse.py) this is an inference layout, not a checkpoint format: the pruned
checkpoint stays an ordinary dense one (zeros stored) that transformers loads, and `load_for_generation` packs it
when its record says 2:4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mightylm.kernels.ops import gemv_sparse24

_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.int32)


def is_24(weight: torch.Tensor) -> bool:
    """Every group of 4 consecutive inputs of every row holds at most 2 non-zeros."""
    out, n_in = weight.shape
    return n_in % 8 == 0 and bool(((weight != 0).reshape(out, n_in // 4, 4).sum(-1) <= 2).all())


def pack_24(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (out, in / 2) float32, index (out, in / 8) uint8) of a 2:4 weight (out, in). A group with fewer
    than 2 non-zeros keeps zeros at its first free positions."""
    out, n_in = weight.shape
    groups = weight.detach().float().reshape(out, n_in // 4, 4)
    # the two non-zeros of each group (zeros after them), in input order
    order = torch.sort((groups == 0).to(torch.int8), dim=-1, stable=True).indices[..., :2]
    positions = torch.sort(order, dim=-1).values  # (out, groups, 2)
    values = groups.gather(-1, positions).reshape(out, n_in // 2).contiguous()
    codes = positions.reshape(out, n_in // 8, 4).to(torch.int32) << _SHIFTS  # 4 values (2 groups) per byte
    return values, codes.sum(-1).to(torch.uint8).contiguous()


def unpack_24(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The dense weight (out, in) back from `pack_24`'s values and positions."""
    out, half = values.shape
    positions = ((index.to(torch.int32)[..., None] >> _SHIFTS) & 3).reshape(out, half // 2, 2).long()
    dense = torch.zeros(out, half // 2, 4, dtype=values.dtype)
    return dense.scatter_(-1, positions, values.reshape(out, half // 2, 2)).reshape(out, 2 * half)


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T + bias for a 2:4 weight W stored as `pack_24` does: the native kernel for up to 32 rows, else the
    dense weight rebuilt for a GEMM."""
    y = gemv_sparse24(x, values, index, values.shape[0], bias)
    if y is not None:
        return y
    return F.linear(x, unpack_24(values, index).to(x.dtype), None if bias is None else bias.to(x.dtype))


class Sparse24Linear(nn.Module):
    """A linear layer whose weight keeps 2 of every 4 inputs, stored as kept values and their positions."""

    def __init__(self, values: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = values.shape[0], 2 * values.shape[1]
        self.register_buffer("values", values)
        self.register_buffer("index", index)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Sparse24Linear:
        return cls(*pack_24(linear.weight), linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return unpack_24(self.values, self.index).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse24_linear(x, self.values, self.index, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4 sparse"


@torch.no_grad()
def pack_24_(model: nn.Module) -> list[str]:
    """Replace the float32 linear layers a 2:4 `prune` record lists (and that are 2:4) by Sparse24Linear.
    Returns the packed names; a model without a 2:4 record is left alone."""
    record = getattr(model, "applied", lambda kind: None)("prune")
    if not record or record.get("pattern") != "2:4":
        return []
    packed = []
    for name in record["modules"]:
        linear = model.get_submodule(name)
        if type(linear) is nn.Linear and linear.weight.dtype == torch.float32 and is_24(linear.weight):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, Sparse24Linear.from_linear(linear))
            packed.append(name)
    return packed
