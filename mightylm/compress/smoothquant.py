"""SmoothQuant (Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models") and the W8A8 linear layer it prepares for.

LLM activations have a few input channels with values 10-100x larger than the rest, so one int8
scale per token (or per tensor) spends its range on them and the other channels round to zero.
Weights have no such outliers. SmoothQuant moves the difficulty from activations to weights with
a per-channel factor (section 4, equation 4):

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha),     X' = X diag(s)^-1,   W' = diag(s) W

which leaves X W unchanged. max|X_j| comes from a few calibration batches; alpha = 0.5 balances
the two (section 4: "a sweet spot" for most models). The division by s is folded into the RMSNorm
gain that produces X, so inference costs nothing extra. Here that covers the inputs of q/k/v
(after `attn_norm`) and gate/up (after `mlp_norm`), as the authors' Llama code does; o_proj and
down_proj are quantized without smoothing.

W8A8: weights int8 per output channel (static), activations int8 per token or per tensor
(dynamic: scale = max|x| / 127 at run time), an exact int8 x int8 -> int32 product (computed
with float32 GEMMs over chunks small enough to be exact), then rescaled.
"""

from __future__ import annotations

import torch
from torch import nn

from mightylm.compress import DEFAULT_TARGETS, QuantizationError, target_linears
from mightylm.compress.int8 import int8_absmax, take_int8_weights


class W8A8Linear(nn.Module):
    """int8 weights (per output channel) x int8 activations (per token or per tensor)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, per_token: bool = True,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.per_token = in_features, out_features, per_token
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, per_token: bool = True) -> W8A8Linear:
        return take_int8_weights(cls(linear.in_features, linear.out_features, linear.bias is not None,
                                     per_token=per_token, device="meta"), linear)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, x_scale = int8_absmax(x.reshape(-1, self.in_features), per_row=self.per_token)  # (M, K), (M|1, 1)
        acc = _int8_matmul(xq, self.weight)  # (M, N) int32 sums of int8 products
        y = acc.float() * x_scale * self.weight_scale[None, :]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, per_token={self.per_token}"


def _int8_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a (M, K) int8 @ w (N, K)^T int8 -> (M, N) int32, exactly.

    Float32 GEMMs over chunks of at most 1024 inputs: every partial sum is an integer of magnitude
    <= 1024 * 127^2 < 2^24, which float32 holds exactly, and the chunks are summed as int32. On the
    project's 2-core AMD EPYC that is much faster than torch._int_mm (9 ms for one 576 x 1536 row, bench/RESULTS.md)."""
    out = None
    for k in range(0, a.shape[1], 1024):
        part = (a[:, k:k + 1024].float() @ w[:, k:k + 1024].float().t()).to(torch.int32)
        out = part if out is None else out + part
    return out


@torch.no_grad()
def activation_maxima(model: nn.Module, batches, targets=DEFAULT_TARGETS) -> dict[str, torch.Tensor]:
    """max |x_j| per input channel j of every targeted linear layer, over the calibration `batches`
    (an iterable of (B, T) token-id tensors)."""
    maxima, hooks = {}, []

    def record(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            hooks.append(m.register_forward_pre_hook(record(name)))
    try:
        n = 0
        for idx in batches:
            model(idx)
            n += 1
    finally:
        for h in hooks:
            h.remove()
    if n == 0:
        raise QuantizationError("no calibration batches: SmoothQuant needs some text to measure activations on")
    return maxima


@torch.no_grad()
def smooth_(model: nn.Module, maxima: dict[str, torch.Tensor], alpha: float = 0.5) -> int:
    """Migrate activation outliers into the weights (equation 4), folding 1/s into the norms.
    The model's float outputs are unchanged. Returns the number of smoothed groups."""
    if not 0 <= alpha <= 1:
        raise QuantizationError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    groups = 0
    for i, block in enumerate(model.layers):
        for norm, linears, first in ((block.attn_norm, [block.attn.q_proj, block.attn.k_proj, block.attn.v_proj], "attn.q_proj"),
                                     (block.mlp_norm, [block.mlp.gate_proj, block.mlp.up_proj], "mlp.gate_proj")):
            key = f"layers.{i}.{first}"
            if key not in maxima:
                continue
            x_max = maxima[key].clamp(min=1e-5)
            w_max = torch.cat([m.weight.abs() for m in linears], dim=0).amax(dim=0).float().clamp(min=1e-5)
            s = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)  # (in,)
            norm.weight.div_(s.to(norm.weight.dtype))
            for m in linears:
                m.weight.mul_(s.to(m.weight.dtype)[None, :])
            groups += 1
    return groups


def smooth_quantize_(model: nn.Module, batches, alpha: float = 0.5, per_token: bool = True,
                     targets=DEFAULT_TARGETS, smooth: bool = True) -> list[str]:
    """Calibrate on `batches`, smooth (unless smooth=False: plain W8A8), then replace the targeted
    linear layers by W8A8Linear. Returns the converted names."""
    if model.quantization:
        raise QuantizationError(f"the model is already quantized ({model.quantization['method']}); "
                                "quantize the float model instead")
    if smooth:
        smooth_(model, activation_maxima(model, batches, targets), alpha)
    names = sorted(target_linears(model, targets))
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, W8A8Linear.from_linear(model.get_submodule(name), per_token))
    model.record_transform("quantize", method="smoothquant", alpha=alpha if smooth else None, per_token=per_token,
                           modules=names)
    return names
