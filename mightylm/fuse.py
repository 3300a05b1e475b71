"""Decode layout: fused projections, input-major weights and a native GEMV, as one in-place
inference transform.

Batch-1 decoding is a chain of matrix-vector products, bound by how fast the weights stream
from memory. Measured on SmolLM2-135M's shapes (2 cores, float32, bench/RESULTS.md):

1. Fusion: q/k/v become one (q+k+v, dim) matrix and gate/up one (2*ffn, dim) matrix, so each
   block does 4 products instead of 7.
2. Input-major storage: every weight is kept as the transpose of a contiguous (in, out) tensor.
   PyTorch's GEMV streams that layout faster (~16 vs ~10 GB/s), and it is the layout the native
   kernel in `mightylm/kernels/gemv.c` reads front to back (~25-30 GB/s).
3. One native call per block (`NativeDecodeBlock`, set as `Block.fused_decode`): for one token of
   one sequence the norms, RoPE, cache write, attention over the cache, SiLU and residual adds run
   in C around the same GEMVs, instead of ~25 eager operations whose dispatch cost more than the
   weights' streaming (SmolLM2-135M on a 2-core AMD EPYC with AVX2, bench/native_block.py: float32 1.42x,
   int8 1.64x faster). Anything else
   (prefill, batches, gradients, LLaMA-Adapter) still runs the eager block.
4. LoRA over kept GGUF blocks or 2:4 weights (a generation's `--adapter`, a server's per-request adapters): the
   bases are fused, the LoRA layers stay for the eager path, and the native calls add each row's low-rank terms
   after every projection in C from a table of the adapter's A and scaled B^T (`native_table`).

int8 layers (compress/quantize.py) are fused the same way (stacked rows and scales, one int8
kernel call). Nothing is stored twice: `q_proj.weight`, `k_proj.weight`, `v_proj.weight` (and
gate/up) become views into the fused tensor, so parameter names and `state_dict()` values are unchanged and
in-place updates stay visible to the fused path. The remaining linears become `DecodeLinear`,
which keeps the `weight`/`bias` keys. Footguns: replacing a projection module (e.g. a LoRA
transform) or assigning new weight tensors (`load_state_dict(assign=True)`) after fusing bypasses
or detaches the fused copy; call `unfuse_projections_` first.
"""

from __future__ import annotations

import ctypes
import re
import weakref

import torch
from torch import nn

from mightylm.adapters.lora import LoRALinear
from mightylm.compress.gguf_blocks import GGUFLinear, gguf_linear, widen_
from mightylm.compress.nf4 import NF4_LEVELS, NF4Linear, dequantize_absmax, dequantize_nf4
from mightylm.compress.quantize import Int4Linear, Int8Linear, dequantize_int4
from mightylm.compress.sparse24 import Sparse24Linear, sparse24_linear
from mightylm.kernels import (TILED, BlockArgs, LoraTerm, Projection, common_type, gemv_library,
                              give_back_freed_memory)
from mightylm.kernels.ops import float_rows, gemv_int4, gemv_int8, gemv_nf4, linear
from mightylm.model import MLP, Attention, KVCache, KVRows, RMSNorm, Transformer
from mightylm.moe import MoE


class FusedProjection:
    """x -> x @ weight.T + bias over a fused, input-major weight. A plain object, not a module, so
    the fused view is not registered a second time in `state_dict()`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class DecodeLinear(nn.Linear):
    """nn.Linear whose single-row products go through the native GEMV (same keys, same math)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _input_major(weights: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (out_i, in) weights into one (sum out_i, in) tensor backed by (in, sum out_i) storage."""
    return torch.cat([w.detach().t() for w in weights], dim=1).contiguous().t()


def _param(tensor: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=like.requires_grad)


def _fuse(parts: list[nn.Linear]) -> FusedProjection:
    fused = _input_major([p.weight for p in parts])
    bias = torch.cat([p.bias.detach() for p in parts]) if parts[0].bias is not None else None
    start = 0
    for p in parts:
        end = start + p.out_features
        p.weight = _param(fused[start:end], p.weight)
        if bias is not None:
            p.bias = _param(bias[start:end], p.bias)
        start = end
    return FusedProjection(fused, bias)


class FusedInt8Projection:
    """The int8 counterpart of FusedProjection: q/k/v (or gate/up) int8 rows and scales stacked, so one
    kernel call streams all of them. The layers' own `weight`/`weight_scale` become row views of it."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.scale, self.bias = weight, scale, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = gemv_int8(x, self.weight, self.scale, self.bias)
        if y is None:  # several rows: dequantize, then a float GEMM
            y = torch.nn.functional.linear(x, (self.weight.float() * self.scale[:, None]).to(x.dtype), self.bias)
        return y


def _stack_rows(parts: list[nn.Module], names: tuple[str, ...]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Each named tensor of the parts (and their biases) concatenated by rows; the parts' own become row views of the
    result, so nothing is stored twice and state_dict() is unchanged."""
    stacked = [torch.cat([getattr(p, name) for p in parts]) for name in names]
    bias = torch.cat([p.bias.detach() for p in parts]) if parts[0].bias is not None else None
    start = 0
    for p in parts:
        end = start + p.out_features
        for name, tensor in zip(names, stacked):
            setattr(p, name, tensor[start:end])
        if bias is not None:
            p.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return stacked, bias


def _fuse_int8(parts: list[Int8Linear]) -> FusedInt8Projection:
    (weight, scale), bias = _stack_rows(parts, ("weight", "weight_scale"))
    return FusedInt8Projection(weight, scale, bias)


class FusedNF4Projection:
    """The NF4 counterpart: q/k/v (or gate/up) codes and float absmax stacked (the layers' own `weight` codes
    become views of it), one kernel call for all of them. Needs blocks that do not straddle rows
    (in_features % block_size == 0)."""

    def __init__(self, weight: torch.Tensor, absmax: torch.Tensor, bias: torch.Tensor | None, out: int, n_in: int,
                 block: int):
        self.weight, self.absmax, self.bias, self.out, self.n_in, self.block = weight, absmax, bias, out, n_in, block

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = gemv_nf4(x, self.weight, self.absmax, NF4_LEVELS, self.out, self.block, self.bias)
        if y is None:  # several rows: dequantize, then a float GEMM
            w = dequantize_nf4({"weight": self.weight, "weight_absmax": self.absmax}, (self.out, self.n_in), self.block)
            y = torch.nn.functional.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return y


def _nf4_absmax(p: NF4Linear) -> torch.Tensor:
    if p._absmax is None:
        p._absmax = dequantize_absmax(p.state()).contiguous()
    return p._absmax


def _fuse_nf4(parts: list[NF4Linear]) -> FusedNF4Projection:
    weight = torch.cat([p.weight for p in parts])
    absmax = torch.cat([_nf4_absmax(p) for p in parts])
    bias = torch.cat([p.bias.detach() for p in parts]) if parts[0].bias is not None else None
    codes = blocks = rows = 0
    for p in parts:
        n = p.out_features * p.in_features
        p.weight, p._absmax = weight[codes:codes + n // 2], absmax[blocks:blocks + n // p.block_size]
        if bias is not None:
            p.bias = nn.Parameter(bias[rows:rows + p.out_features], requires_grad=False)
        codes, blocks, rows = codes + n // 2, blocks + n // p.block_size, rows + p.out_features
    return FusedNF4Projection(weight, absmax, bias, rows, parts[0].in_features, parts[0].block_size)


class FusedInt4Projection:
    """The int4 counterpart: q/k/v (or gate/up) codes, scales and zeros stacked by rows (the layers' own become
    views of them), one kernel call for all of them."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                 group: int):
        self.weight, self.scale, self.zero, self.bias, self.group = weight, scale, zero, bias, group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.weight.shape[0]
        y = gemv_int4(x, self.weight, self.scale, self.zero, out, self.group, self.bias)
        if y is None:  # several rows: dequantize, then a float GEMM
            w = dequantize_int4(self.weight, self.scale, self.zero, self.group).to(x.dtype)
            y = torch.nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        return y


def _fuse_int4(parts: list[Int4Linear]) -> FusedInt4Projection:
    (weight, scale, zero), bias = _stack_rows(parts, ("weight", "weight_scale", "weight_zero"))
    return FusedInt4Projection(weight, scale, zero, bias, parts[0].group_size)


class FusedGGUFProjection:
    """GGUF blocks of q/k/v (or gate/up) stacked by rows (the layers' own become views), one kernel call."""

    def __init__(self, weight: torch.Tensor, ggml_type: int, bias: torch.Tensor | None, n_in: int,
                 activations: str = "float32"):
        self.weight, self.ggml_type, self.bias, self.n_in = weight, ggml_type, bias, n_in
        self.activations = activations  # as GGUFLinear's

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return gguf_linear(x, self.weight, self.ggml_type, self.n_in, self.bias, self.activations)


def _fuse_gguf(parts: list[GGUFLinear]) -> FusedGGUFProjection:
    kind = common_type(p.ggml_type for p in parts)
    for p in parts:  # mixed Q4_0 / Q5_0 / Q8_0 (llama.cpp's Q4_K_M files): all as Q8_0, the same values
        widen_(p, kind)
    (weight,), bias = _stack_rows(parts, ("weight",))
    return FusedGGUFProjection(weight, parts[0].kernel_type, bias, parts[0].in_features, parts[0].activations)


class FusedSparse24Projection:
    """2:4 sparse q/k/v (or gate/up): kept values and positions stacked by rows (the layers' own become views),
    one kernel call."""

    def __init__(self, values: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None):
        self.values, self.index, self.bias = values, index, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return sparse24_linear(x, self.values, self.index, self.bias)


def _fuse_sparse24(parts: list[Sparse24Linear]) -> FusedSparse24Projection:
    (values, index), bias = _stack_rows(parts, ("values", "index"))
    return FusedSparse24Projection(values, index, bias)


def _plain(module) -> bool:
    """A plain nn.Linear over ordinary tensors (not a tensor subclass such as torchao's quantized weights)."""
    return type(module) is nn.Linear and type(module.weight) in (torch.Tensor, nn.Parameter)


def _fusion(parts: list[nn.Module]):
    """The fused callable for these projections, or None where they are not all plain or all int8."""
    if all(_plain(p) for p in parts):
        return _fuse(parts)
    if all(type(p) is Int8Linear for p in parts):
        return _fuse_int8(parts)
    if all(type(p) is NF4Linear and p.block_size == parts[0].block_size and p.in_features % p.block_size == 0
           and p.block_size % 16 == 0 for p in parts):
        return _fuse_nf4(parts)
    if all(type(p) is Int4Linear and p.group_size == parts[0].group_size and p.group_size % 16 == 0 for p in parts):
        return _fuse_int4(parts)
    if all(type(p) is GGUFLinear and p.activations == parts[0].activations for p in parts) \
            and common_type(p.ggml_type for p in parts) is not None:
        return _fuse_gguf(parts)
    if all(type(p) is Sparse24Linear for p in parts):
        return _fuse_sparse24(parts)
    return None  # wrapped by another technique (LoRA, other quantization): leave them


def _projection(p) -> tuple[Projection, tuple] | None:
    """The native-kernel view of a fused or decode-layout projection (and the tensors it points into),
    or None for any other kind of layer."""
    if p.bias is not None and (p.bias.dtype != torch.float32 or not p.bias.is_contiguous()):
        return None
    if isinstance(p, (FusedProjection, DecodeLinear)) and p.weight.dtype == torch.float32 \
            and p.weight.stride() == (1, p.weight.shape[0]):
        tensors = (p.weight, p.bias)
        return Projection(p.weight.data_ptr(), None, _ptr(p.bias), kind=Projection.FLOAT32), tensors
    if isinstance(p, (FusedInt8Projection, Int8Linear)) and p.weight.is_contiguous() and p.weight.shape[1] % 32 == 0:
        scale = p.scale if isinstance(p, FusedInt8Projection) else p.weight_scale
        if scale.dtype == torch.float32 and scale.is_contiguous():
            return (Projection(p.weight.data_ptr(), scale.data_ptr(), _ptr(p.bias), kind=Projection.INT8),
                    (p.weight, scale, p.bias))
    if isinstance(p, NF4Linear) and p.in_features % p.block_size == 0 and p.block_size % 16 == 0:
        p = FusedNF4Projection(p.weight, _nf4_absmax(p), p.bias, p.out_features, p.in_features, p.block_size)
    if isinstance(p, GGUFLinear):
        p = FusedGGUFProjection(p.weight, p.kernel_type, p.bias, p.in_features, p.activations)
    if isinstance(p, FusedGGUFProjection) and p.weight.is_contiguous():
        kind = TILED.get(p.activations, Projection.GGML)
        return Projection(p.weight.data_ptr(), None, _ptr(p.bias), None, p.ggml_type, kind), (p.weight, p.bias)
    if isinstance(p, Sparse24Linear):
        p = FusedSparse24Projection(p.values, p.index, p.bias)
    if isinstance(p, FusedSparse24Projection) and p.values.is_contiguous() and p.index.is_contiguous() \
            and p.values.shape[1] % 4 == 0:
        return (Projection(p.values.data_ptr(), None, _ptr(p.bias), None, 0, Projection.SPARSE24, None,
                           p.index.data_ptr()), (p.values, p.index, p.bias))
    if isinstance(p, Int4Linear) and p.group_size % 16 == 0:
        p = FusedInt4Projection(p.weight, p.weight_scale, p.weight_zero, p.bias, p.group_size)
    if isinstance(p, FusedInt4Projection) and all(t.is_contiguous() and (t is p.weight or t.dtype == torch.float32)
                                                  for t in (p.weight, p.scale, p.zero)):
        return (Projection(p.weight.data_ptr(), p.scale.data_ptr(), _ptr(p.bias), None, p.group, Projection.INT4,
                           p.zero.data_ptr()), (p.weight, p.scale, p.zero, p.bias))
    if isinstance(p, FusedNF4Projection) and p.weight.is_contiguous():
        levels = NF4_LEVELS  # a module-level constant: it outlives the block
        return (Projection(p.weight.data_ptr(), p.absmax.data_ptr(), _ptr(p.bias), levels.data_ptr(), p.block,
                           Projection.NF4), (p.weight, p.absmax, p.bias, levels))
    return None


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


# Up to this many sequences of a server's batch (one token each) go through the native blocks together, where every
# projection reads its weights once for all rows (GGUF blocks, 2:4).
NATIVE_BATCH = 32

# Up to this many consecutive tokens of one sequence go through the native block together (a speculative
# verification pass, a short prompt's tail); GGUF blocks and 2:4 weights are read once for all of them.
NATIVE_ROWS = 16


class NativeDecodeBlock:
    """Block.fused_decode: one token (or up to NATIVE_ROWS consecutive ones) of one float32 sequence through a whole
    block in one native call
    (`mighty_decode_block` in kernels/gemv.c: norms, RoPE, the cache write, attention over the cache,
    SiLU and residuals in C, the products through the GEMVs). Several tokens go through it only where every
    projection reads its weights once for all of them (GGUF blocks, 2:4); float32, int8, int4 and NF4 would read
    them once per token, slower than the eager block's GEMMs. Returns None, so the block runs eagerly, for
    anything else: batches, padding or a sliding window, gradients, another dtype, an attention adapter applied
    after fusing, a full cache. It points at the weights as laid out when fused (the same footgun as
    the fused projections: unfuse before replacing modules or weight tensors)."""

    def __init__(self, block, config, parts: list[tuple[Projection, tuple]],
                 experts: tuple[tuple[Projection, tuple], list, list] | None = None):
        self.attn = block.attn
        self.lora = None  # as NativeDecodeStack.lora, for this block (the sequence's adapter, one pointer)
        self.adapter = None  # as NativeDecodeStack.adapter
        norms = (block.attn_norm.weight, block.mlp_norm.weight)
        self.keep = [t for _, tensors in parts for t in tensors] + list(norms)  # the pointers stay valid
        (qkv, _), (o, _) = parts[:2]
        shared = (Projection.GGML, Projection.GGML_Q8X, Projection.GGML_INT24,
                  Projection.SPARSE24)  # weights read once for several rows
        self.max_rows = NATIVE_ROWS if experts is None and all(p.kind in shared for p, _ in parts) else 1
        # a server's batch (one token of each of several sequences): the same
        self.batches = experts is None and all(p.kind in shared for p, _ in parts)
        gate_up, down = (parts[2][0], parts[3][0]) if experts is None else (Projection(), Projection())
        self.args = BlockArgs(qkv=qkv, o=o, gate_up=gate_up, down=down, attn_norm=norms[0].data_ptr(),
                              mlp_norm=norms[1].data_ptr(), dim=config.dim, n_heads=config.n_heads,
                              n_kv=config.n_kv_heads, head_dim=config.head_dim, ffn=config.ffn_dim,
                              eps=block.attn_norm.eps)
        if experts is not None:  # a mixture of experts: the router and every expert's two projections
            (router, router_tensors), gate_ups, downs = experts
            arrays = [(Projection * len(gate_ups))(*[p for p, _ in gate_ups]),
                      (Projection * len(downs))(*[p for p, _ in downs])]
            self.keep += [*router_tensors, *(t for _, ts in gate_ups + downs for t in ts), *arrays]
            mlp = block.mlp
            a = self.args
            a.router, a.expert_gate_up, a.expert_down = router, arrays[0], arrays[1]
            a.n_experts, a.top_k, a.norm_topk = len(gate_ups), mlp.top_k, int(mlp.norm_topk_prob)
            a.ffn = config.expert_ffn_dim or config.ffn_dim

    def applies(self, x, cache, start, mask) -> bool:
        """Whether this call can run natively (see the class)."""
        rows = x.shape[1]
        return not (type(cache) is not KVCache or x.shape[0] != 1 or rows > self.max_rows or cache.batch_size != 1
                    or start + rows > cache.max_len or not float_rows(x)
                    or cache.k[self.attn.layer_idx].dtype != torch.float32 or "attend" in self.attn.__dict__
                    or (mask is not None and not (mask.shape[0] == 1 and bool(mask[0, 0, -1].all()))))
        # (a mask whose last row is not all True holds padding or a sliding window: eager)

    def __call__(self, x, cos, sin, cache, start, mask=None):
        lora = _adapter_rows(self.lora, self.adapter, 1)
        if not self.applies(x, cache, start, mask) or (lora is not None and len(lora) != 1):
            return None
        layer = self.attn.layer_idx
        out = x.contiguous().clone()
        cos, sin = cos.contiguous(), sin.contiguous()
        a = self.args
        a.k_cache, a.v_cache = cache.k[layer].data_ptr(), cache.v[layer].data_ptr()
        a.cos, a.sin, a.pos, a.max_len, a.threads = cos.data_ptr(), sin.data_ptr(), start, cache.max_len, \
            torch.get_num_threads()
        a.rows = x.shape[1]
        a.lora, a.layer = (None if lora is None else ctypes.addressof(lora)), layer
        gemv_library().mighty_decode_block(out.data_ptr(), ctypes.byref(a))
        return out


class NativeDecodeStack:
    """Transformer.fused_decode: every block's NativeDecodeBlock in one native call (`mighty_decode_blocks`), set
    by `fuse_projections_` where every block has one. Calling the blocks one by one from Python cost ~35 us each
    (their checks, the arguments' fields, ctypes), a third of a token's time on SmolLM2-135M's Q4_0 file; here the
    checks run once and the C loop does the rest. Returns None (the blocks run one by one, as they would alone)
    where any block would not run natively, or where a block's `fused_decode` was changed since."""

    def __init__(self, blocks: list, natives: list[NativeDecodeBlock]):
        self.blocks, self.natives = blocks, natives
        self.args = (ctypes.POINTER(BlockArgs) * len(natives))(*(ctypes.pointer(n.args) for n in natives))
        self.max_rows = min(n.max_rows for n in natives)
        self.batches = all(n.batches for n in natives)
        # the next pass's LoRA, set by serve.adapters.AdapterBank.set_rows: one pointer per sequence of the batch to
        # its adapter's table of kernels.LoraTerm (None: no adapter), or None where no row has one
        self.lora = None
        # the model's own LoRA (native_table), for every row where `lora` is None: a generation's --adapter
        self.adapter = None
        # (a weak reference to the last cache, its per-layer key and value pointers): a cache serves a whole
        # generation, and its buffers never move
        self._caches = (lambda: None, None, None)

    def _pointers(self, cache):
        if self._caches[0]() is not cache:
            n = len(self.natives)
            self._caches = (weakref.ref(cache), (ctypes.c_void_p * n)(*(cache.k[i].data_ptr() for i in range(n))),
                            (ctypes.c_void_p * n)(*(cache.v[i].data_ptr() for i in range(n))))
        return self._caches[1:]

    def _unchanged(self) -> bool:
        """No block's native call was replaced and no attention adapter was added since the stack was made."""
        return not (any("attend" in n.attn.__dict__ for n in self.natives)
                    or any(b.fused_decode is not n for b, n in zip(self.blocks, self.natives)))

    def __call__(self, x, cos, sin, cache, start, mask=None):
        if type(cache) is KVRows:
            return self._batch(x, cos, sin, cache, start, mask)
        lora = _adapter_rows(self.lora, self.adapter, 1)
        if (x.shape[1] > self.max_rows or not self.natives[0].applies(x, cache, start, mask) or not self._unchanged()
                or len(cache.k) != len(self.natives) or (lora is not None and len(lora) != 1)):
            return None
        out = x.contiguous().clone()
        cos, sin = cos.contiguous(), sin.contiguous()
        keys, values = self._pointers(cache)
        gemv_library().mighty_decode_blocks(out.data_ptr(), self.args, len(self.natives), keys, values,
                                            cos.data_ptr(), sin.data_ptr(), start, cache.max_len, x.shape[1],
                                            torch.get_num_threads(), None, 0, 1, lora)
        return out

    def _batch(self, x, cos, sin, rows, start, mask):
        """A server's decode step: T tokens (one, or a speculative step's verified ones) for each of B sequences in
        rows a..b-1 of a pool (KVRows), left-padded (row r's tokens in slots pad_r .. start + T - 1, each attending
        up to itself). Runs where every projection reads its weights once for all rows (GGUF blocks, also with int8
        activations, each row then rounded as it would be alone; 2:4), B is at most NATIVE_BATCH and T at most
        NATIVE_ROWS; the pads are read off the mask, which must allow exactly those slots (no window). Rows with a
        LoRA adapter add its terms after each projection, in C too (`self.lora`)."""
        pool, (B, T) = rows.pool, x.shape[:2]
        lora = _adapter_rows(self.lora, self.adapter, B)
        if (B > NATIVE_BATCH or T > NATIVE_ROWS or B != rows.b - rows.a or not self.batches
                or (lora is not None and len(lora) != B)
                or type(pool) is not KVCache or len(pool.k) != len(self.natives) or start + T > pool.max_len
                or not all(t.is_contiguous() for t in (pool.k[0], pool.v[0])) or not float_rows(x)
                or pool.k[0].dtype != torch.float32 or not self._unchanged()):
            return None
        if mask is None:
            pads = torch.zeros(B, dtype=torch.long)
        else:
            allowed = mask.reshape(mask.shape[0], -1)
            if allowed.shape != (B, T * (start + T)):
                return None
            allowed = allowed.view(B, T, start + T)
            pads = allowed[:, -1].to(torch.uint8).argmax(-1)  # each row's first slot
            slots, queries = torch.arange(start + T), start + torch.arange(T)[:, None]
            # a row's slots up to each query, and a padding query itself (model._mask)
            expected = (slots >= pads[:, None, None]) & (slots <= queries) | (slots == queries)
            if not torch.equal(allowed, expected):
                return None  # not left padding alone (a window, holes): the blocks one by one
        out = x.contiguous().clone()
        cos = cos.expand(B, *cos.shape[1:]).contiguous()  # (B, 1, T, hs): one row for each token-row
        sin = sin.expand(B, *sin.shape[1:]).contiguous()
        n, stride = len(self.natives), pool.k[0][0].numel()  # floats per row of the pool
        offset = rows.a * stride * 4
        keys = (ctypes.c_void_p * n)(*(pool.k[i].data_ptr() + offset for i in range(n)))
        values = (ctypes.c_void_p * n)(*(pool.v[i].data_ptr() + offset for i in range(n)))
        gemv_library().mighty_decode_blocks(out.data_ptr(), self.args, n, keys, values, cos.data_ptr(), sin.data_ptr(),
                                            start, pool.max_len, B, torch.get_num_threads(), pads.data_ptr(), stride,
                                            T, lora)
        return out


# where each LoRA target of a block goes in the native block (kernels/gemv.c, mighty_lora): (projection, term); the
# fused products put q, k, v (qkv) and gate, up (gate_up) one after another
_NATIVE_TERMS = {"q_proj": (0, 0), "k_proj": (0, 1), "v_proj": (0, 2), "o_proj": (1, 0), "gate_proj": (2, 0),
                 "up_proj": (2, 1), "down_proj": (3, 0)}
_BLOCK_LAYER = re.compile(r"layers\.(\d+)\.(?:attn|mlp)\.(\w+)$")


def _adapter_rows(lora, adapter, n: int):
    """The LoRA pointers of a pass: those set for it (`lora`), else the model's own adapter's table for each of
    its n sequences, else None."""
    if lora is not None or adapter is None:
        return lora
    return (ctypes.c_void_p * n)(*[ctypes.addressof(adapter[0])] * n)


def native_table(model, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """An adapter's LoRA terms for the native blocks: (the ctypes array of kernels.LoraTerm, the tensors it points
    at), from its pairs {module name: (A, scaled B)} in float32; None where a pair is on a layer of a block that the
    native block does not know (its rows then run the blocks eagerly). Pairs outside the blocks (the head) are left
    to the wrapped modules, which run after the blocks either way."""
    c = model.config
    offsets = {"k_proj": c.n_heads * c.head_dim, "v_proj": (c.n_heads + c.n_kv_heads) * c.head_dim,
               "up_proj": c.ffn_dim}  # within the fused output; 0 for the others
    per_block = LoraTerm.PROJECTIONS * LoraTerm.TERMS
    table, keep = (LoraTerm * (len(model.layers) * per_block))(), []
    for name, (A, B) in pairs.items():
        found = _BLOCK_LAYER.search(name)
        if found is None:
            if ".layers." in f".{name}":
                return None
            continue
        layer, leaf = int(found[1]), found[2]
        if leaf not in _NATIVE_TERMS or A.dtype != torch.float32 or layer >= len(model.layers):
            return None
        projection, term = _NATIVE_TERMS[leaf]
        A, Bt = A.contiguous(), B.t().contiguous()
        keep += [A, Bt]
        table[layer * per_block + projection * LoraTerm.TERMS + term] = LoraTerm(
            A.data_ptr(), Bt.data_ptr(), A.shape[0], offsets.get(leaf, 0), Bt.shape[1])
    return table, keep


def _native_block(block, config) -> NativeDecodeBlock | None:
    attn, mlp = block.attn, block.mlp
    if gemv_library() is None or attn.fused_qkv is None:
        return None
    if hasattr(attn, "q_norm") or attn.clip_qkv is not None or config.rotary_dim != config.head_dim:
        return None  # OLMoE's q/k norms and clipping, partial rotary embeddings: not in the native block
    norms_ok = all(type(n) is RMSNorm and n.weight.dtype == torch.float32 and n.weight.is_contiguous()
                   for n in (block.attn_norm, block.mlp_norm))
    if not norms_ok or config.head_dim % 2 or config.n_heads % config.n_kv_heads:
        return None
    parts = [_projection(p) for p in (attn.fused_qkv, attn.o_proj)]
    if isinstance(mlp, MoE):  # the router and the top-k experts in C too (no shared expert; up to 256 experts)
        if mlp.shared_expert is not None or len(mlp.experts) > 256 or type(mlp.gate) is not DecodeLinear \
                or any(e.fused_gate_up is None for e in mlp.experts):
            return None
        experts = (_projection(mlp.gate), [_projection(e.fused_gate_up) for e in mlp.experts],
                   [_projection(e.down_proj) for e in mlp.experts])
        if None in parts or experts[0] is None or None in experts[1] or None in experts[2]:
            return None
        return NativeDecodeBlock(block, config, parts, experts)
    if not isinstance(mlp, MLP) or mlp.fused_gate_up is None:
        return None
    parts += [_projection(p) for p in (mlp.fused_gate_up, mlp.down_proj)]
    if None in parts:
        return None
    return NativeDecodeBlock(block, config, parts)


def _swap_linear(parent: nn.Module, name: str, cls: type[nn.Linear], weight: nn.Parameter) -> None:
    old = getattr(parent, name)
    new = cls(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
    new.weight, new.bias = weight, old.bias
    setattr(parent, name, new)


def _lora_apart(model: Transformer) -> dict[str, LoRALinear]:
    """The blocks' unmerged LoRA layers over kept GGUF blocks or 2:4 weights (a generation's --adapter), each
    replaced by its base layer, so that the layout fuses the bases; `_lora_back` puts them back."""
    found = {name: m for name, m in model.layers.named_modules(prefix="layers")
             if type(m) is LoRALinear and not m.merged and isinstance(m.base_layer, (GGUFLinear, Sparse24Linear))}
    for name, m in found.items():
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, m.base_layer)
    return found


def _lora_back(model: Transformer, found: dict[str, LoRALinear]) -> None:
    """Put the LoRA layers back. The eager blocks call them (the fused q/k/v and gate/up products over their bases
    go), and the native calls add their terms in C (native_table: A and scaled B^T copied now; like the rest of the
    layout, unfuse before changing the adapter's weights), or, where it cannot, the blocks run eagerly."""
    for name, m in found.items():
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, leaf, m)
        if isinstance(owner, Attention) and leaf in ("q_proj", "k_proj", "v_proj"):
            owner.fused_qkv = None
        elif isinstance(owner, MLP) and leaf in ("gate_proj", "up_proj"):
            owner.fused_gate_up = None
    if not found:
        return
    table = native_table(model, {name: (m.lora_A.weight.float(), m.lora_B.weight.float() * m.scaling)
                                 for name, m in found.items()})
    natives = [model.fused_decode] + [block.fused_decode for block in model.layers]
    for native in natives:
        if isinstance(native, (NativeDecodeStack, NativeDecodeBlock)):
            native.adapter = table
    if table is None:  # an adapter the native blocks cannot take: its blocks run eagerly
        model.fused_decode = None
        for block in model.layers:
            block.fused_decode = None


@torch.no_grad()
def fuse_projections_(model: Transformer) -> list[str]:
    """Apply the decode layout in place. Returns the names of what it converted (empty if nothing)."""
    converted, lora = [], _lora_apart(model)
    for name, module in model.named_modules():
        if isinstance(module, Attention) and module.fused_qkv is None:
            module.fused_qkv = _fusion([module.q_proj, module.k_proj, module.v_proj])
            if module.fused_qkv is not None:
                converted.append(f"{name}.qkv")
        elif isinstance(module, MLP) and module.fused_gate_up is None:
            module.fused_gate_up = _fusion([module.gate_proj, module.up_proj])
            if module.fused_gate_up is not None:
                converted.append(f"{name}.gate_up")
                give_back_freed_memory()  # once per block: the peak stays near one copy of the weights
    for parent_name, parent in list(model.named_modules()):
        for name in ("o_proj", "down_proj") + (("gate",) if isinstance(parent, MoE) else ()):  # MoE: the router
            child = getattr(parent, name, None)
            if _plain(child):
                _swap_linear(parent, name, DecodeLinear, _param(_input_major([child.weight]), child.weight))
                converted.append(f"{parent_name}.{name}")
        give_back_freed_memory()
    for i, block in enumerate(model.layers):
        if block.fused_decode is None and (native := _native_block(block, model.config)) is not None:
            block.fused_decode = native
            converted.append(f"layers.{i}.native")
    natives = [block.fused_decode for block in model.layers]
    if model.fused_decode is None and natives and all(isinstance(n, NativeDecodeBlock) for n in natives):
        model.fused_decode = NativeDecodeStack(list(model.layers), natives)
        converted.append("layers.native")
    if _plain(model.lm_head):
        if model.config.tie_embeddings:  # the head is the embedding table: re-lay the table itself
            model.embed.weight = _param(_input_major([model.embed.weight]), model.embed.weight)
            _swap_linear(model, "lm_head", DecodeLinear, model.embed.weight)
        else:
            _swap_linear(model, "lm_head", DecodeLinear, _param(_input_major([model.lm_head.weight]), model.lm_head.weight))
        converted.append("lm_head")
    _lora_back(model, lora)
    give_back_freed_memory()
    return converted


@torch.no_grad()
def unfuse_projections_(model: Transformer) -> list[str]:
    """Undo `fuse_projections_`: plain nn.Linear modules with separate contiguous weights.
    Returns the names of what it converted."""
    converted = []
    if model.fused_decode is not None:
        model.fused_decode = None
        converted.append("layers.native")
    for i, block in enumerate(model.layers):
        if block.fused_decode is not None:
            block.fused_decode = None
            converted.append(f"layers.{i}.native")
    for name, module in list(model.named_modules()):
        if isinstance(module, Attention) and module.fused_qkv is not None:
            module.fused_qkv = None
            converted.append(f"{name}.qkv")
        if isinstance(module, MLP) and module.fused_gate_up is not None:
            module.fused_gate_up = None
            converted.append(f"{name}.gate_up")
        for child_name, child in list(module.named_children()):
            if child is model.lm_head:
                continue  # handled below, with the embedding it may share
            if isinstance(child, nn.Linear) and (type(child) is DecodeLinear or not child.weight.is_contiguous()):
                _swap_linear(module, child_name, nn.Linear, _param(child.weight.contiguous(), child.weight))
                if child.bias is not None:  # q/k/v biases were views into the fused bias
                    getattr(module, child_name).bias = _param(child.bias.clone(), child.bias)
                converted.append(f"{name}.{child_name}" if name else child_name)
    if isinstance(model.embed, nn.Embedding) and not model.embed.weight.is_contiguous():
        model.embed.weight = _param(model.embed.weight.contiguous(), model.embed.weight)
    if type(model.lm_head) is DecodeLinear:
        _swap_linear(model, "lm_head", nn.Linear, model.embed.weight if model.config.tie_embeddings
                     else _param(model.lm_head.weight.contiguous(), model.lm_head.weight))
        converted.append("lm_head")
    model.tie_weights()
    return converted
