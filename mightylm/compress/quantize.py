"""Weight quantization as an in-place module transform: `quantize_(model, method, targets)`.

Methods (bits per weight include the scales):
- nf4   4-bit NormalFloat, block-wise absmax, double quantization (see compress/nf4.py); the
        frozen base of QLoRA. 4.127 bits.
- int8  weight-only, symmetric, one float32 scale per output channel: w = q * s,
        q in [-127, 127]. 8 + 32/in bits.
- int4  weight-only, asymmetric, group-wise (group 32-128 along the input): w = (q - 8) * s + z,
        q in [0, 15], one float32 scale and one float32 zero per group (gpt-fast's scheme, the
        layout PyTorch's packed int4 kernels take). 4 + 64/group bits.
- smoothquant  W8A8 after migrating activation outliers into the weights (compress/smoothquant.py).

Each quantized module keeps the layer's `weight` key (now the integer codes) beside its scales.
One row at a time (decoding) goes through AVX2 GEMV kernels of our own that read the packed codes
(mightylm/kernels); several rows (prefill, training) dequantize once and use a float GEMM.
PyTorch's packed CPU ops (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) were measured
and not used: on the project's 2-core AMD EPYC they ran 4-16x slower than either path (bench/RESULTS.md).
What was applied is stored with the checkpoint (`quantization_record`) and rebuilt on load, never
guessed from a file name. The embedding table and the LM head stay in float by default; with
"lm_head" among the targets the head is quantized too, and where it was tied to the embedding it
becomes its own quantized copy (the table stays float for lookups; the copy is read every token,
the table is not, so decoding reads far fewer bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mightylm.compress import DEFAULT_TARGETS, QuantizationError, target_linears
from mightylm.compress.int8 import Int8Linear, int8_absmax
from mightylm.compress.nf4 import NF4Linear, _FrozenLinear
from mightylm.compress.smoothquant import W8A8Linear
from mightylm.kernels.ops import gemv_int4

__all__ = ["DEFAULT_TARGETS", "METHODS", "QUANTIZED", "Int4Linear", "Method", "Int8Linear", "QuantizationError",
           "build_quantized_", "dequantize_", "int8_absmax", "model_bytes", "quantize_", "quantize_like_"]



_BYTE_TO_CODES = torch.stack([torch.arange(256) >> 4, torch.arange(256) & 0xF], dim=1).float()  # byte -> its 2 codes


def dequantize_int4(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 (out, in) from int4 codes (out, in / 2, two per byte) and their (out, in / group) scales and zeros."""
    out = weight.shape[0]
    q = _BYTE_TO_CODES[weight.long()].view(out, -1, group_size)  # (out, groups, g)
    return ((q - 8) * scale[..., None] + zero[..., None]).view(out, -1)


class Int4Linear(nn.Module):
    """Weight-only int4, asymmetric, one (scale, zero) per group of `group_size` inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, group_size: int = 64,
                 device=None):
        super().__init__()
        if in_features % group_size:
            raise QuantizationError(f"int4 group size {group_size} does not divide the layer's {in_features} inputs")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        # codes, two per byte (first in the high nibble), (out, in / 2); scales and zeros (out, groups)
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, in_features // group_size, device=device))
        self.register_buffer("weight_zero", torch.empty(out_features, in_features // group_size, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = 64) -> Int4Linear:
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size,
                  device="meta")
        w = linear.weight.detach().float().view(linear.out_features, -1, group_size)  # (out, groups, g)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = (hi - lo).clamp(min=1e-12) / 15
        zero = lo + 8 * scale  # w = (q - 8) * scale + zero, so q = 0 is lo and q = 15 is hi
        q = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).view(linear.out_features, -1)
        new.weight = (q[:, ::2] << 4) | q[:, 1::2]
        new.weight_scale, new.weight_zero = scale, zero
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return new

    def codes(self) -> torch.Tensor:
        return torch.stack([self.weight >> 4, self.weight & 0xF], dim=-1).view(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.weight, self.weight_scale, self.weight_zero, self.group_size).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenLinear.apply(x, self)
        if x.numel() == self.in_features:  # one row (decoding): the native kernel reads the 4-bit codes
            y = gemv_int4(x, self.weight, self.weight_scale, self.weight_zero, self.out_features, self.group_size,
                          self.bias)
            if y is not None:
                return y
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


QUANTIZED = (NF4Linear, Int8Linear, Int4Linear)


@dataclass(frozen=True)
class Method:
    """One quantization method, beside its module class: its settings (each with its allowed values, the first
    the default; None allows any number from 0 to 1), which of them its module is built with, and whether it
    converts a float layer alone or needs calibration data first (SmoothQuant). `quantize_`, loading
    (`build_quantized_`), the CLI and the checks all read METHODS: a new format is one entry here."""

    name: str
    module: type
    options: dict
    built_with: tuple[str, ...] = ()
    weight_only: bool = True

    def check(self, params: dict) -> dict:
        """The settings, checked and with defaults filled in; a QuantizationError names what is wrong."""
        unknown = set(params) - set(self.options)
        if unknown:
            raise QuantizationError(f"{self.name} takes no option(s) {sorted(unknown)}; it takes "
                                    f"{sorted(self.options) or 'none'}")
        out = {}
        for key, allowed in self.options.items():
            value = params.get(key, allowed[0] if allowed else None)
            if allowed is None:
                if value is not None and not 0 <= value <= 1:
                    raise QuantizationError(f"{self.name} {key} must be from 0 to 1, got {value}")
            elif value not in allowed:
                names = [str(v) for v in sorted(allowed, key=str if isinstance(allowed[0], bool) else float)]
                raise QuantizationError(f"{self.name} {key.replace('_', ' ')} must be {', '.join(names[:-1])} or "
                                        f"{names[-1]}, got {value}")
            out[key] = value
        return out

    def empty(self, linear: nn.Module, params: dict) -> nn.Module:
        """An empty quantized module (meta device) shaped like `linear`, for a checkpoint's tensors."""
        kwargs = {k: params[k] for k in self.built_with if k in params}
        return self.module(linear.in_features, linear.out_features, linear.bias is not None, **kwargs, device="meta")


METHODS = {m.name: m for m in (
    Method("nf4", NF4Linear, {"block_size": (64, 32, 128, 256, 512, 1024, 2048, 4096), "double_quant": (True, False)},
           built_with=("block_size", "double_quant")),
    Method("int8", Int8Linear, {}),
    Method("int4", Int4Linear, {"group_size": (64, 32, 128, 256)}, built_with=("group_size",)),
    Method("smoothquant", W8A8Linear, {"alpha": None, "per_token": (True, False)}, built_with=("per_token",),
           weight_only=False),
)}


def _check(method: str, params: dict) -> dict:
    if method not in METHODS:
        raise QuantizationError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method].check(params)


def quantize_(model: nn.Module, method: str, targets=DEFAULT_TARGETS, **params) -> list[str]:
    """Replace every linear layer whose leaf name is in `targets` by its `method` counterpart, in place.
    Returns the converted names. Refuses a model that is already quantized."""
    params = _check(method, params)
    if not METHODS[method].weight_only:
        raise QuantizationError(f"{method} needs calibration data: use compress.smoothquant.smooth_quantize_")
    if model.quantization:
        raise QuantizationError(f"the model is already quantized ({model.quantization['method']}); "
                                "quantize the float model instead")
    linears = target_linears(model, targets, QuantizationError)
    if method == "int4":  # check every layer before converting any
        g = params.get("group_size", 64)
        bad = [n for n, m in linears.items() if m.in_features % g]
        if bad:
            raise QuantizationError(f"int4 group size {g} does not divide the inputs of {bad[0]} "
                                    f"({linears[bad[0]].in_features}); pick 32, 64 or 128 that does")
    build = METHODS[method].module.from_linear
    for name, linear in linears.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, build(linear, **params))
    model.record_transform("quantize", method=method, **params, modules=sorted(linears))
    return sorted(linears)


def _record_params(record: dict) -> dict:
    """The method's settings in a quantization record (everything but the kind, the method and the modules)."""
    return {k: v for k, v in record.items() if k not in ("kind", "method", "modules")}


def quantize_like_(model: nn.Module, record: dict) -> list[str]:
    """Quantize a float model as `record` (a model's `quantization`) describes: the same method, settings
    and kinds of layers. How a QLoRA adapter rebuilds its base, and how a merge re-quantizes."""
    targets = tuple({name.rsplit(".", 1)[-1] for name in record["modules"]})
    return quantize_(model, record["method"], targets=targets, **_record_params(record))


def build_quantized_(model: nn.Module, record: dict) -> None:
    """Put empty quantized modules where `record` (a checkpoint's quantization record) says, so that
    the stored tensors can be assigned into them. Works on the meta device."""
    method = record["method"]
    params = _check(method, _record_params(record))
    for name in record["modules"]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                METHODS[method].empty(model.get_submodule(name), params))
    model.forget_transform("quantize")
    model.record_transform("quantize", **{k: v for k, v in record.items() if k != "kind"})


@torch.no_grad()
def dequantize_(model: nn.Module) -> list[str]:
    """Replace every quantized linear layer by a float nn.Linear holding its dequantized weight."""
    names = []
    for name, m in list(model.named_modules()):
        if hasattr(m, "dequantize") and not isinstance(m, nn.Linear):
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            dense.weight = nn.Parameter(m.dequantize(), requires_grad=False)
            if m.bias is not None:
                dense.bias = nn.Parameter(m.bias.detach().float(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, dense)
            names.append(name)
    model.forget_transform("quantize")
    return names


def model_bytes(model: nn.Module) -> int:
    """Bytes of parameters and persistent buffers (a tied head counted once)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    while tensors:
        t = tensors.pop()
        if hasattr(t, "__tensor_flatten__"):  # a tensor subclass (e.g. torchao's): count its inner tensors
            tensors += [getattr(t, name) for name in t.__tensor_flatten__()[0]]
            continue
        if t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
