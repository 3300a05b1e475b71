"""Native kernels, compiled on first use with the system C compiler, with PyTorch fallbacks.

`linear(x, weight, bias)` is `F.linear` with a fast path for what batch-1 decoding does most: one
float32 row times an input-major weight (see `mightylm/fuse.py`). `gemv_int8`, `gemv_int4` and
`gemv_nf4` do the same for quantized weights (compress/), and `matmul_ggml` for GGUF's blocks with any number of
rows (gguf_blocks.c), returning None where the caller must fall back;
`mighty_decode_block` (through `fuse.NativeDecodeBlock`) runs a whole block for one token, `mighty_decode_blocks`
(`fuse.NativeDecodeStack`) all of a model's blocks in one call. The fast path is the AVX2
kernel in `gemv.c`, built once into ~/.cache/mightylm (or $MIGHTYLM_CACHE) in about a second; its float32 and
int8 products also have AVX-512 (VNNI) versions, used where the CPU has them (MIGHTYLM_ISA=avx2 forces the
baseline; `mighty env` shows the choice).
Without a compiler, AVX2/FMA or x86-64, or with MIGHTYLM_NO_KERNELS=1, everything goes through
`F.linear` and only speed differs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

_SOURCES = [Path(__file__).with_name(name) for name in ("gemv.c", "gguf_blocks.c", "sparse24.c")]
_HEADER = Path(__file__).with_name("kernels.h")
_lib = None
_tried = False


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith(("flags", "Features"))
            for flag in line.partition(":")[2].split()}


def _cpu_has_avx2_fma() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= cpu_flags()


def _build() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler or not _cpu_has_avx2_fma():
        return None
    source = b"".join(path.read_bytes() for path in [*_SOURCES, _HEADER])
    tag = hashlib.sha256(source + compiler.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MIGHTYLM_CACHE", Path.home() / ".cache" / "mightylm"))
    target = cache / f"gemv-{tag}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / target.name
            cmd = [compiler, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", *map(str, _SOURCES), "-o", str(out), "-lm"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                warnings.warn(f"mightylm: could not build the gemv kernel, using PyTorch ({result.stderr[-300:]})")
                return None
            out.replace(target)  # atomic: concurrent builders never see a partial file
    lib = ctypes.CDLL(str(target))
    lib.mighty_gemv.restype = None
    lib.mighty_gemv.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long, ctypes.c_long, ctypes.c_int]
    lib.mighty_gemv_int8.restype = lib.mighty_gemv_nf4.restype = lib.mighty_gemv_int4.restype = None
    lib.mighty_gemv_int4.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_long] * 3 + [ctypes.c_int]
    lib.mighty_gemv_int8.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long, ctypes.c_long, ctypes.c_int]
    lib.mighty_gemv_nf4.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_long] * 3 + [ctypes.c_int]
    lib.mighty_decode_block.restype = None
    lib.mighty_decode_block.argtypes = [ctypes.c_void_p, ctypes.POINTER(BlockArgs)]
    lib.mighty_decode_blocks.restype = None
    lib.mighty_decode_blocks.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_long] * 3 + [
                                         ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_long,
                                         ctypes.c_void_p]
    lib.mighty_gemv_ggml.restype = None
    lib.mighty_gemv_ggml.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_long, ctypes.c_long, ctypes.c_int]
    lib.mighty_gemm_ggml.restype, lib.mighty_gemm_ggml_q8x.restype = None, ctypes.c_int
    lib.mighty_gemm_ggml.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int]
    lib.mighty_gemm_ggml_q8x.argtypes = lib.mighty_gemm_ggml.argtypes
    lib.mighty_exp.restype, lib.mighty_exp.argtypes = None, [ctypes.c_void_p, ctypes.c_long]
    lib.mighty_ggml_rows.restype = ctypes.c_int
    lib.mighty_ggml_rows.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_long,
                                     ctypes.c_long, ctypes.c_void_p]
    lib.mighty_gemm_sparse24.restype = None
    lib.mighty_gemm_sparse24.argtypes = [ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 4 + [
        ctypes.c_long, ctypes.c_long, ctypes.c_int]
    lib.mighty_set_isa.restype, lib.mighty_set_isa.argtypes = None, [ctypes.c_int]
    lib.mighty_isa.restype, lib.mighty_isa.argtypes = ctypes.c_int, []
    lib.mighty_set_isa(ISAS.index(_chosen_isa()))
    return lib


# The kernels' instruction sets, in the order gemv.c numbers them, with the CPU flags each needs.
ISAS = ("avx2", "avx512")
ISA_FLAGS = {"avx2": {"avx2", "fma"}, "avx512": {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}}


def available_isas() -> list[str]:
    """The kernel paths this CPU can run."""
    flags = cpu_flags()
    return [name for name in ISAS if ISA_FLAGS[name] <= flags]


def _chosen_isa() -> str:
    """The widest path the CPU has, or MIGHTYLM_ISA (avx2 | avx512) when set and available."""
    available = available_isas()
    forced = os.environ.get("MIGHTYLM_ISA")
    if forced:
        if forced not in available:
            warnings.warn(f"mightylm: MIGHTYLM_ISA={forced} is not available on this CPU ({', '.join(available)} "
                          "are); using the widest available")
        else:
            return forced
    return available[-1]


def kernel_isa() -> str | None:
    """The instruction set the native kernels use now (None without them)."""
    lib = gemv_library()
    return None if lib is None else ISAS[lib.mighty_isa()]


def set_kernel_isa(name: str) -> None:
    """Use the `name` path from now on (tests compare every path the CPU has against PyTorch)."""
    if name not in available_isas():
        raise ValueError(f"kernel path {name!r} is not available on this CPU; available: {available_isas()}")
    lib = gemv_library()
    if lib is not None:
        lib.mighty_set_isa(ISAS.index(name))


class Projection(ctypes.Structure):
    """gemv.c's mighty_proj: a float32 input-major weight (kind 0), int8 rows with their scales (1), NF4 codes
    with a float absmax per block and the 16 levels (2), int4 codes with a scale and zero per group (3), or GGUF
    Q8_0/Q4_0/Q4_1 blocks or F16/BF16 rows as stored (4; `block` holds the ggml type; 6: the same with one row's
    activations rounded to 8 bits), or 2:4 sparse kept values with their
    positions in `index` (5)."""
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("levels", ctypes.c_void_p), ("block", ctypes.c_long), ("kind", ctypes.c_int),
                ("zero", ctypes.c_void_p), ("index", ctypes.c_void_p)]

    FLOAT32, INT8, NF4, INT4, GGML, SPARSE24, GGML_Q8X = 0, 1, 2, 3, 4, 5, 6


class BlockArgs(ctypes.Structure):
    """gemv.c's mighty_block: one block's weights (a mixture of experts' router and experts when n_experts > 0),
    this layer's cache, the first position being decoded and how many consecutive tokens (rows), or a batch of
    sequences (pads: each row's first slot; row_stride: floats between rows of the cache; tokens: each row's)."""
    _fields_ = [("qkv", Projection), ("o", Projection), ("gate_up", Projection), ("down", Projection),
                ("router", Projection), ("expert_gate_up", ctypes.POINTER(Projection)),
                ("expert_down", ctypes.POINTER(Projection)), ("n_experts", ctypes.c_long), ("top_k", ctypes.c_long),
                ("norm_topk", ctypes.c_int),
                ("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("cos", ctypes.c_void_p),
                ("sin", ctypes.c_void_p)] + [(name, ctypes.c_long) for name in (
                    "dim", "n_heads", "n_kv", "head_dim", "ffn", "max_len", "pos")] + [
                ("eps", ctypes.c_float), ("threads", ctypes.c_int), ("rows", ctypes.c_long),
                ("pads", ctypes.c_void_p), ("row_stride", ctypes.c_long), ("tokens", ctypes.c_long),
                ("lora", ctypes.c_void_p), ("layer", ctypes.c_long)]


class LoraTerm(ctypes.Structure):
    """gemv.c's mighty_lora: y[offset:offset + out] += Bt.T @ (A @ x) for one LoRA pair of a projection (A (rank, in),
    Bt (rank, out), float32, contiguous; Bt is B transposed and scaled). An adapter's table holds TERMS of them per
    projection (q, k, v of the fused qkv; gate, up; o and down one each), PROJECTIONS per block, for every block."""
    _fields_ = [("A", ctypes.c_void_p), ("Bt", ctypes.c_void_p), ("rank", ctypes.c_long), ("offset", ctypes.c_long),
                ("out", ctypes.c_long)]

    TERMS, PROJECTIONS = 3, 4


def gemv_library():
    """The compiled kernel library, or None where it cannot be had."""
    global _lib, _tried
    if not _tried:
        _tried = True
        if os.environ.get("MIGHTYLM_NO_KERNELS") != "1":
            try:
                _lib = _build()
            except OSError as e:
                warnings.warn(f"mightylm: gemv kernel unavailable, using PyTorch ({e})")
    return _lib


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), through the native kernel when x is a single float32 row and
    `weight` (out, in) is stored input-major (weight.t() contiguous) on the CPU, without autograd.

    Under torch.compile the PyTorch path is taken: raw pointers must never be traced (doing so
    corrupted the heap in a test run)."""
    out, n_in = weight.shape
    if (
        x.numel() == n_in
        and weight.stride() == (1, out)
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
        and not torch.compiler.is_compiling()
        and (lib := gemv_library()) is not None
    ):
        x = x.contiguous()
        y = torch.empty(*x.shape[:-1], out)
        threads = torch.get_num_threads()
        scratch = torch.empty((threads - 1) * out) if threads > 1 else y
        lib.mighty_gemv(x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else None,
                        y.data_ptr(), scratch.data_ptr(), n_in, out, threads)
        return y
    return F.linear(x, weight, bias)


def float_rows(x: torch.Tensor) -> bool:
    """x may go to a native kernel: float32 on the CPU, no gradient wanted, not being compiled."""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)
            and not torch.compiler.is_compiling())


def _single_row(x: torch.Tensor, n_in: int) -> bool:
    return x.numel() == n_in and float_rows(x)


def gemv_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x (..., in) one float32 row @ (int8 weight (out, in) * scale[:, None])^T + bias, or None.
    The kernel rounds x to int16 first (see gemv.c): within 1.5e-5 of max|x| of the float product."""
    out, n_in = weight.shape
    if not (_single_row(x, n_in) and n_in % 32 == 0 and weight.is_contiguous() and scale.dtype == torch.float32
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
            and (lib := gemv_library()) is not None):
        return None
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], out)
    lib.mighty_gemv_int8(x.data_ptr(), weight.data_ptr(), scale.contiguous().data_ptr(),
                         bias.data_ptr() if bias is not None else None, y.data_ptr(), n_in, out, torch.get_num_threads())
    return y


def matmul_ggml(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, out: int,
                bias: torch.Tensor | None = None, int8_activations: bool = False) -> torch.Tensor | None:
    """x (..., in) float32 rows @ a GGUF Q8_0 / Q4_0 / Q4_1 / F16 / BF16 weight (out rows of its bytes) + bias, or
    None where the kernel cannot take it (gguf_blocks.c: one row streams the blocks, several share each block's
    unpacking). `int8_activations`: the blocks are in tiles of 16 rows (compress.gguf_blocks.tile_blocks) and every
    row of x is rounded to 8 bits per block of 32, by itself, and multiplied in integers, as llama.cpp does (not
    float32's result)."""
    n_in = x.shape[-1]
    if not (float_rows(x) and n_in % 32 == 0 and ggml_type in (1, 2, 3, 8, 30)
            and blocks.is_contiguous() and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
            and (lib := gemv_library()) is not None):
        return None
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], out)
    b = bias.data_ptr() if bias is not None else None
    if int8_activations:
        if lib.mighty_gemm_ggml_q8x(x.data_ptr(), x.numel() // n_in, blocks.data_ptr(), ggml_type, b, y.data_ptr(),
                                    n_in, out, torch.get_num_threads()) != 0:
            raise ValueError(f"int8 activations take tiles of Q8_0 / Q4_0 / Q4_1 rows ({out} rows of {n_in}, type "
                             f"{ggml_type})")
    else:
        lib.mighty_gemm_ggml(x.data_ptr(), x.numel() // n_in, blocks.data_ptr(), ggml_type, b, y.data_ptr(), n_in,
                             out, torch.get_num_threads())
    return y


# Up to this many looked-up rows (a decoded token, a short prompt) the C lookup serves; more go through torch.
GGML_ROWS = 64


def ggml_rows(blocks: torch.Tensor, ggml_type: int, idx: torch.Tensor, n_in: int) -> torch.Tensor | None:
    """Rows `idx` of a GGUF table (blocks (rows, row bytes) uint8, Q8_0 / Q4_0 / Q4_1 / F16 / BF16) as float32
    (idx.numel(), n_in), equal to dequantizing them in torch (gguf_blocks.c), or None where the kernel cannot take
    them (many rows, no kernels)."""
    if not (idx.numel() <= GGML_ROWS and n_in % 32 == 0 and ggml_type in (1, 2, 3, 8, 30) and blocks.is_contiguous()
            and blocks.device.type == "cpu" and (lib := gemv_library()) is not None):
        return None
    idx = idx.reshape(-1).to(torch.long).contiguous()
    y = torch.empty(idx.numel(), n_in)
    if lib.mighty_ggml_rows(blocks.data_ptr(), blocks.shape[0], ggml_type, idx.data_ptr(), idx.numel(), n_in,
                            y.data_ptr()):
        raise IndexError(f"token id out of range: the table has {blocks.shape[0]} rows")
    return y


def gemv_nf4(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, levels: torch.Tensor, out: int,
             block: int, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x (..., in) one float32 row @ NF4 weight (out, in)^T + bias, or None. `absmax`: float32, one per block."""
    n_in = x.shape[-1]
    if not (_single_row(x, n_in) and n_in % block == 0 and block % 16 == 0 and absmax.dtype == torch.float32
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
            and (lib := gemv_library()) is not None):
        return None
    flat = x.reshape(-1)
    xe, xo = flat[0::2].contiguous(), flat[1::2].contiguous()  # the high and low nibble of each byte
    y = torch.empty(*x.shape[:-1], out)
    lib.mighty_gemv_nf4(xe.data_ptr(), xo.data_ptr(), packed.data_ptr(), absmax.data_ptr(), levels.data_ptr(),
                        bias.data_ptr() if bias is not None else None, y.data_ptr(), n_in, out, block,
                        torch.get_num_threads())
    return y


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, out: int, group: int,
              bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x (..., in) one float32 row @ int4 weight (out, in)^T + bias, or None. scale/zero: (out, in / group)."""
    n_in = x.shape[-1]
    if not (_single_row(x, n_in) and n_in % group == 0 and group % 16 == 0 and scale.dtype == torch.float32
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
            and (lib := gemv_library()) is not None):
        return None
    flat = x.reshape(-1)
    xe, xo = flat[0::2].contiguous(), flat[1::2].contiguous()
    xsum = flat.view(-1, group).sum(dim=1)  # (groups,): the zero points multiply these
    y = torch.empty(*x.shape[:-1], out)
    lib.mighty_gemv_int4(xe.data_ptr(), xo.data_ptr(), packed.data_ptr(), scale.data_ptr(), zero.data_ptr(),
                         xsum.data_ptr(), bias.data_ptr() if bias is not None else None, y.data_ptr(), n_in, out,
                         group, torch.get_num_threads())
    return y


# Up to this many rows the 2:4 kernel reads each weight row once for all of them; more (a long prompt's prefill) go
# through the dense weight and a GEMM.
SPARSE24_ROWS = 32


def gemv_sparse24(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, out: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x (..., in) float32 rows (at most SPARSE24_ROWS) @ a 2:4 sparse weight (out, in)^T + bias, or None.
    values: (out, in / 2) float32, index: (out, in / 8) uint8, as compress/sparse24.py packs them (sparse24.c)."""
    n_in = x.shape[-1]
    rows = x.numel() // max(n_in, 1)
    if not (1 <= rows <= SPARSE24_ROWS and float_rows(x) and n_in % 8 == 0 and values.dtype == torch.float32 and values.is_contiguous()
            and index.is_contiguous() and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
            and (lib := gemv_library()) is not None):
        return None
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], out)
    lib.mighty_gemm_sparse24(x.data_ptr(), rows, values.data_ptr(), index.data_ptr(),
                             bias.data_ptr() if bias is not None else None, y.data_ptr(), n_in, out,
                             torch.get_num_threads())
    return y
