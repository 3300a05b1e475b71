"""Native kernels, compiled on first use with the system C compiler: their build, the CPU's choice of path and the
ctypes structures, without importing torch (`mightylm.lite` decodes through them alone).

`ops.linear(x, weight, bias)` is `F.linear` with a fast path for what batch-1 decoding does most: one
float32 row times an input-major weight (see `mightylm/fuse.py`). `ops.gemv_int8`, `gemv_int4` and
`gemv_nf4` do the same for quantized weights (compress/), and `ops.matmul_ggml` for GGUF's blocks with any number of
rows (gguf_blocks.c), returning None where the caller must fall back;
`mighty_decode_block` (through `fuse.NativeDecodeBlock`) runs a whole block for one token, `mighty_decode_blocks`
(`fuse.NativeDecodeStack`) all of a model's blocks in one call, its attention over a float32 or float16 cache in
`attention.c` (a kv head's query heads and a pass's rows together). The fast path is the AVX2
kernel in `gemv.c`, built once into ~/.cache/mightylm (or $MIGHTYLM_CACHE) in about a second; its float32 and
int8 products also have AVX-512 (VNNI) versions, used where the CPU has them (MIGHTYLM_ISA=avx2 forces the
baseline; `mighty env` shows the choice).
Without a compiler, AVX2/FMA or x86-64, or with MIGHTYLM_NO_KERNELS=1, everything goes through
`F.linear` and only speed differs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np

_SOURCES = [Path(__file__).with_name(name) for name in
            ("gemv.c", "gguf_blocks.c", "q4_fields.c", "q5_0_fields.c", "q6_k_fields.c", "sparse24.c", "attention.c",
             "swiglu.c", "rms_norm.c", "cross_entropy.c")]
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


def physical_cores() -> int:
    """Threads for the kernels where torch does not choose them (mightylm.lite): OMP_NUM_THREADS when set, else this
    process's CPUs counted once per physical core (torch's default; hyperthreads share a core's vector units)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return max(1, len(allowed))
    cores, cpu, package = set(), None, "0"
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            cpu = int(value)
        elif key == "physical id":
            package = value
        elif key == "core id" and cpu in allowed:
            cores.add((package, value))
    return max(1, len(cores) or len(allowed))


def _cpu_has_avx2_fma() -> bool:
    return platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= cpu_flags()


def build_library(include: Path | None = None) -> ctypes.CDLL | None:
    """Compile the kernels (once per source, cached) and load them, or None without a compiler or AVX2/FMA.
    `include`: a header forced in front of every source (`cc -include`): the tests' emulation of AVX-512's
    intrinsics, which runs the AVX-512 paths on a CPU without them."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler or not _cpu_has_avx2_fma():
        return None
    source = b"".join(path.read_bytes() for path in [*_SOURCES, _HEADER, *([include] if include else [])])
    tag = hashlib.sha256(source + compiler.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MIGHTYLM_CACHE", Path.home() / ".cache" / "mightylm"))
    target = cache / f"gemv-{tag}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / target.name
            forced = ["-include", str(include)] if include else []
            cmd = [compiler, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", *forced, *map(str, _SOURCES),
                   "-o", str(out), "-lm"]
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
    lib.mighty_one_region.restype = ctypes.c_int
    lib.mighty_one_region.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_int]
    lib.mighty_gemv_ggml.restype = None
    lib.mighty_gemv_ggml.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_long, ctypes.c_long, ctypes.c_int]
    lib.mighty_gemm_ggml.restype = None
    lib.mighty_gemm_ggml_q8x.restype = lib.mighty_gemm_ggml_int24.restype = ctypes.c_int
    lib.mighty_gemm_ggml.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int]
    lib.mighty_gemm_ggml_q8x.argtypes = lib.mighty_gemm_ggml_int24.argtypes = lib.mighty_gemm_ggml.argtypes
    lib.mighty_q5_0_fields.restype, lib.mighty_q5_0_fields_row_bytes.restype = None, ctypes.c_long
    lib.mighty_q5_0_fields.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_int]
    lib.mighty_q5_0_fields_row_bytes.argtypes = [ctypes.c_long]
    lib.mighty_q6_k_fields.restype, lib.mighty_q6_k_fields_row_bytes.restype = None, ctypes.c_long
    lib.mighty_q6_k_fields.argtypes = lib.mighty_q5_0_fields.argtypes
    lib.mighty_q6_k_fields_row_bytes.argtypes = [ctypes.c_long]
    lib.mighty_q5_0_unfields.restype = lib.mighty_q6_k_unfields.restype = None
    lib.mighty_q5_0_unfields.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
    lib.mighty_q6_k_unfields.argtypes = lib.mighty_q5_0_unfields.argtypes
    lib.mighty_exp.restype, lib.mighty_exp.argtypes = None, [ctypes.c_void_p, ctypes.c_long]
    lib.mighty_ggml_rows.restype = ctypes.c_int
    lib.mighty_ggml_rows.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_long,
                                     ctypes.c_long, ctypes.c_void_p]
    lib.mighty_gemm_ggml_q8x_best.restype = ctypes.c_int
    lib.mighty_gemm_ggml_q8x_best.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_int,
                                              ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_void_p]
    lib.mighty_gemm_sparse24.restype = None
    lib.mighty_gemm_sparse24.argtypes = [ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 4 + [
        ctypes.c_long, ctypes.c_long, ctypes.c_int]
    lib.mighty_attention.restype = None
    lib.mighty_attention.argtypes = [ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 3 + [ctypes.c_int] + [
        ctypes.c_long] * 7 + [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    lib.mighty_swiglu.restype = lib.mighty_swiglu_backward.restype = None
    lib.mighty_swiglu.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long, ctypes.c_int]
    lib.mighty_swiglu_backward.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long, ctypes.c_int]
    lib.mighty_rms_norm.restype = lib.mighty_rms_norm_backward.restype = None
    lib.mighty_rms_norm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long, ctypes.c_long, ctypes.c_float, ctypes.c_int]
    lib.mighty_rms_norm_backward.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_long, ctypes.c_long, ctypes.c_int]
    lib.mighty_softmax_cross_entropy.restype = None
    lib.mighty_softmax_cross_entropy.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p,
                                                 ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
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
    Q8_0/Q4_0/Q4_1 blocks or F16/BF16 rows as stored (4; `block` holds the ggml type), GGUF blocks in tiles of 16
    rows with each row of activations rounded to 8 bits (6) or written in 24 bits (7: float32's rounding; see
    int24_tiles), or 2:4 sparse kept values with their positions in `index` (5)."""
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("levels", ctypes.c_void_p), ("block", ctypes.c_long), ("kind", ctypes.c_int),
                ("zero", ctypes.c_void_p), ("index", ctypes.c_void_p)]

    FLOAT32, INT8, NF4, INT4, GGML, SPARSE24, GGML_Q8X, GGML_INT24 = 0, 1, 2, 3, 4, 5, 6, 7


# the tiles' arithmetics (GGUFLinear.activations, lite's products) -> the kind of product each is to gemv.c, and
# the library's function that multiplies rows of x by weights in tiles in it
TILED = {"int8": Projection.GGML_Q8X, "int24": Projection.GGML_INT24}
TILED_GEMM = {"int8": "mighty_gemm_ggml_q8x", "int24": "mighty_gemm_ggml_int24"}


class BlockArgs(ctypes.Structure):
    """gemv.c's mighty_block: one block's weights (a mixture of experts' router and experts when n_experts > 0),
    this layer's cache, the first position being decoded and how many consecutive tokens (rows), or a batch of
    sequences (pads: each row's first slot; row_stride: values between rows of the cache; tokens: each row's);
    kv_half: the cache holds float16."""
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
                ("lora", ctypes.c_void_p), ("layer", ctypes.c_long), ("kv_half", ctypes.c_int)]


class LoraTerm(ctypes.Structure):
    """gemv.c's mighty_lora: y[offset:offset + out] += Bt.T @ (A @ x) for one LoRA pair of a projection (A (rank, in),
    Bt (rank, out), float32, contiguous; Bt is B transposed and scaled). An adapter's table holds TERMS of them per
    projection (q, k, v of the fused qkv; gate, up; o and down one each), PROJECTIONS per block, for every block."""
    _fields_ = [("A", ctypes.c_void_p), ("Bt", ctypes.c_void_p), ("rank", ctypes.c_long), ("offset", ctypes.c_long),
                ("out", ctypes.c_long)]

    TERMS, PROJECTIONS = 3, 4


# ggml types gguf_blocks.c multiplies as stored: F16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K, BF16 (K-quants: rows of 256)
GGML_TYPES = (1, 2, 3, 6, 8, 12, 14, 30)
SUPER_BLOCKS = (12, 14)
TILE = 16  # output rows per tile of the int8-activation kernel's layout (gguf_blocks.c)
# ggml Q8_0, Q4_0, Q4_1: (bytes per block of 32, scale bytes before the codes); Q5_0 and Q6_K are tiled by their own
# functions (_tile_q5_0, _tile_q6_k)
_TILED = {8: (34, 2), 2: (18, 2), 3: (20, 4), 6: (22, None), 14: (210, None)}


def int8_layout(kind: int, rows: int) -> str | None:
    """How a GGUF weight of ggml type `kind` with `rows` output rows takes int8 activations (mighty_gemm_ggml_q8x):
    "tiles" (Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q6_K in whole tiles of 16 rows, reordered by tile_rows) or None (it stays in
    float32 arithmetic)."""
    return "tiles" if kind in _TILED and rows % TILE == 0 else None


def int24_tiles(kind: int, rows: int, isa: str | None = None) -> bool:
    """Whether float32 arithmetic on a kept GGUF weight of ggml type `kind` with `rows` output rows runs through the
    int8 tiles with each row of activations written exactly in three int8 limbs of 24 bits per block of 32
    (mighty_gemm_ggml_int24: float32's rounding, within float32 rounding of dequantize-then-float32) on kernel path
    `isa` (default: the current one): Q4_0 and Q4_1 everywhere, Q5_0 and Q8_0 on AVX-512, in whole tiles of 16 rows.
    Three integer rows cost less than converting every code to float and multiplying it: whole tokens 1.27-2.16x
    the float loops' on the Intel Xeon (AVX-512), Q4 1.30-1.61x on its AVX2 path, where Q8_0 was 0.80x
    (bench/RESULTS.md). Q6_K keeps its float layout (its tiles have an AVX2 loop only)."""
    isa = isa or kernel_isa()
    return (isa is not None and rows % TILE == 0
            and (kind in (2, 3) or (kind in (6, 8) and isa == "avx512")))


def float_arithmetic(kind: int | None, rows: list[int], isa: str | None = None) -> str:
    """How float32 arithmetic multiplies kept GGUF blocks of ggml type `kind` (a product stacked from parts of these
    output row counts, each part tiled by itself): "int24" where int24_tiles takes every part, else "fields" where
    float_layout says, else "stored" (the file's blocks as they are). Lite and compress.gguf_blocks.float_layouts_
    follow it."""
    if kind is not None and all(int24_tiles(kind, n, isa) for n in rows):
        return "int24"
    return "fields" if kind is not None and float_layout(kind, isa) else "stored"


def common_type(kinds) -> int | None:
    """The one ggml type a product stacked from parts of these types can be multiplied in without changing a value:
    their type where they agree; Q8_0 where they mix Q8_0 with Q4_0 / Q5_0 (as_q8_0 widens those exactly, as
    llama.cpp's Q4_K_M files mix Q5_0 q/k with a Q8_0 v); else None."""
    kinds = set(kinds)
    if len(kinds) == 1:
        return kinds.pop()
    return 8 if kinds <= {2, 6, 8} else None


def as_q8_0(raw: np.ndarray, kind: int) -> np.ndarray:
    """Q4_0 / Q5_0 / Q8_0 rows (out, row bytes) as Q8_0 rows with the same values: each block's d and its codes
    q - 8 (Q4_0) or q - 16 (Q5_0, its fifth bits included) as int8."""
    if kind == 8:
        return raw
    out = raw.shape[0]
    blocks = raw.reshape(out, -1, _TILED[kind][0])
    packed = blocks[..., -16:]
    q = np.concatenate([packed & 15, packed >> 4], axis=-1).astype(np.int16)  # (out, blocks, 32)
    if kind == 6:
        qh = blocks[..., 2:6].copy().view("<u4")  # (out, blocks, 1): bit j = value j's fifth bit
        q |= (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int16)
    codes = (q - (16 if kind == 6 else 8)).astype(np.int8).view(np.uint8)
    return np.concatenate([blocks[..., :2], codes], axis=-1).reshape(out, -1)


Q4_0_FIELDS, Q4_1_FIELDS, Q5_0_FIELDS, Q6_K_FIELDS = 102, 103, 106, 114  # our layouts (q4_fields.c, q5_0_fields.c,
# q6_k_fields.c), types of their own to the kernels
FIELDS = {2: Q4_0_FIELDS, 3: Q4_1_FIELDS, 6: Q5_0_FIELDS, 14: Q6_K_FIELDS}  # ggml type -> its layout's
_FIELD_UNITS = {6: (22, 32), 14: (210, 256)}  # stored bytes per block, values per block
_Q4_HEADS = {2: 2, 3: 4}  # Q4_0's fp16 d, Q4_1's d and m: bytes before a block's 16 bytes of codes


def float_layout(kind: int, isa: str | None = None) -> bool:
    """Whether kept GGUF blocks of ggml type `kind` that int24_tiles does not take are multiplied in one of our
    layouts (as_fields) for float32 arithmetic on kernel path `isa` (default: the current one): Q6_K everywhere; Q5_0
    on AVX2 (AVX-512's stored loop sets its fifth bits under a mask); Q4_0 and Q4_1 on AVX-512 (the stored loop's
    widening and scalar scale per block cost it ~10 cycles a block on the Intel Xeon; bench/RESULTS.md)."""
    isa = isa or kernel_isa()
    if isa is None:
        return False
    return kind == 14 or (kind == 6 and isa == "avx2") or (kind in _Q4_HEADS and isa == "avx512")


def as_fields(raw: np.ndarray, kind: int) -> np.ndarray:
    """Q4_0, Q4_1, Q5_0 or Q6_K rows (out, row bytes) in our layout for float32 arithmetic (the same values: Q4's the
    same bytes reordered, Q5_0's and Q6_K's ~6 % / ~15 % more bytes), (out, its row bytes), to multiply as type
    FIELDS[kind]; the kernels' threads repack Q5_0 and Q6_K."""
    out, row_bytes = raw.shape
    if kind in _Q4_HEADS:  # each row: the blocks' codes, then their d, then (Q4_1) their m (q4_fields.c)
        head = _Q4_HEADS[kind]
        blocks = raw.reshape(out, -1, head + 16)
        parts = [blocks[..., head:], blocks[..., :2]] + ([blocks[..., 2:4]] if kind == 3 else [])
        return np.concatenate([p.reshape(out, -1) for p in parts], axis=1)
    lib = gemv_library()
    stored, values = _FIELD_UNITS[kind]
    n_in = row_bytes // stored * values
    raw = np.ascontiguousarray(raw)
    repack, row = ((lib.mighty_q5_0_fields, lib.mighty_q5_0_fields_row_bytes) if kind == 6
                   else (lib.mighty_q6_k_fields, lib.mighty_q6_k_fields_row_bytes))
    fields = np.empty((out, row(n_in)), np.uint8)
    repack(raw.ctypes.data, out, n_in, fields.ctypes.data, physical_cores())
    return fields


def from_fields(fields: np.ndarray, kind: int, n_in: int) -> np.ndarray:
    """as_fields' rows back to stored rows (out, row bytes)."""
    if kind in _Q4_HEADS:
        out, nb = fields.shape[0], n_in // 32
        codes, scales = fields[:, :16 * nb].reshape(out, nb, 16), fields[:, 16 * nb:].reshape(out, -1, nb, 2)
        return np.concatenate([*(scales[:, i] for i in range(scales.shape[1])), codes], axis=-1).reshape(out, -1)
    lib = gemv_library()
    stored, values = _FIELD_UNITS[kind]
    fields = np.ascontiguousarray(fields)
    raw = np.empty((fields.shape[0], n_in // values * stored), np.uint8)
    (lib.mighty_q5_0_unfields if kind == 6 else lib.mighty_q6_k_unfields)(fields.ctypes.data, fields.shape[0], n_in,
                                                                           raw.ctypes.data)
    return raw


_TILE_CHUNK = 4096  # rows tiled at once (whole tiles)


def tile_rows(raw: np.ndarray, kind: int) -> np.ndarray:
    """Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q6_K rows (out, row bytes) uint8 reordered into the tiles of 16 rows the
    int8-activation kernel reads (gguf_blocks.c): per group of 16 rows and block, the 16 d (and 16 m), then the
    codes with lane l of step s holding row l's values 4 s .. 4 s + 3 (Q4: steps s and s + 4 in one byte's low and
    high nibbles; Q8_0: q + 128 as an unsigned byte; Q5_0, Q6_K: see _tile_q5_0, _tile_q6_k). The same number of
    bytes, shaped as raw; out must be a multiple of 16. (compress.gguf_blocks.tile_blocks calls this on tensors;
    untile_blocks inverts it, through untile_rows for Q5_0 and Q6_K.)"""
    out, row_bytes = raw.shape
    if kind not in _TILED or out % TILE:
        raise ValueError(f"tiles take Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q6_K rows in groups of {TILE}; got ggml type "
                         f"{kind} with {out} rows")
    if out > _TILE_CHUNK:  # a large table (a 150k-token head) a band of rows at a time: small temporaries
        tiles = np.empty_like(raw)
        for i in range(0, out, _TILE_CHUNK):
            tiles[i:i + _TILE_CHUNK] = tile_rows(raw[i:i + _TILE_CHUNK], kind)
        return tiles
    if kind == 14:
        return _tile_q6_k(raw)
    if kind == 6:
        return _tile_q5_0(raw)
    block_bytes, head = _TILED[kind]
    blocks = raw.reshape(out, -1, block_bytes)
    g, nb = out // TILE, blocks.shape[1]
    heads = blocks[..., :head].reshape(g, TILE, nb, -1, 2).transpose(0, 2, 3, 1, 4).reshape(g, nb, -1)  # [16 d][16 m]
    codes = blocks[..., 2:] ^ 0x80 if kind == 8 else blocks[..., head:]  # Q8_0: q + 128 as an unsigned byte
    # Q4: byte 4 s + j holds value 4 s + j (low nibble) and value 16 + 4 s + j (high): already step s's and s + 4's
    return np.concatenate([heads, _lanes(codes, g)], axis=-1).reshape(out, row_bytes)


def _lanes(codes: np.ndarray, g: int) -> np.ndarray:
    """Codes (out, blocks, 4 k) uint8 -> (g, blocks, k, 16 rows, 4): each row's 4-byte groups interleaved by row,
    moved as uint32 (a transpose of 4-byte elements, several times faster than of bytes)."""
    out, nb, width = codes.shape
    words = np.ascontiguousarray(codes).view("<u4").reshape(g, TILE, nb, width // 4)
    return np.ascontiguousarray(words.transpose(0, 2, 3, 1)).view(np.uint8).reshape(g, nb, -1)


def q6_k_codes(blocks: np.ndarray) -> np.ndarray:
    """Q6_K super-blocks (..., 210) uint8 -> their 6-bit codes q (..., 256) in value order (0..63; w = d scale (q -
    32)). Value 32 p + l (p < 8, half h = p / 4, quarter j = p % 4): low 4 bits in ql[64 h + 32 (j & 1) + l] >> 4 (j /
    2), high 2 in qh[32 h + l] >> 2 j (ggml-common.h's block_q6_K)."""
    ql = blocks[..., :128].reshape(*blocks.shape[:-1], 2, 2, 32)  # (h, j & 1, l)
    qh = blocks[..., 128:192].reshape(*blocks.shape[:-1], 2, 1, 32)  # (h, -, l)
    low = np.stack([ql[..., 0, :] & 15, ql[..., 1, :] & 15, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], axis=-2)
    high = np.concatenate([(qh >> 2 * j) & 3 for j in range(4)], axis=-2)
    return (low | high << 4).reshape(*blocks.shape[:-1], 256)


def _tile_q6_k(raw: np.ndarray) -> np.ndarray:
    """Q6_K in tiles of 16 rows: per group of 16 rows and super-block (16 x 210 bytes), the 16 fp16 d, the int8 scales
    as [16 groups of 16 values][16 rows], then per block of 32 values 384 bytes: 4 chunks of 64 with step s's low
    nibbles (lane l: row l's values 4 s .. 4 s + 3) in the low half of each byte and step s + 4's in the high half,
    then 2 chunks of 64 with the high 2 bits of steps m, m + 2, m + 4, m + 6 at bits 0-1, 2-3, 4-5, 6-7."""
    out, row_bytes = raw.shape
    g, supers = out // TILE, row_bytes // 210
    blocks = raw.reshape(g, TILE, supers, 210)
    q = q6_k_codes(blocks).reshape(g, TILE, supers, 8, 8, 4).transpose(0, 2, 3, 4, 1, 5)  # (g, S, block, step, lane, 4)
    low, high = q & 15, q >> 4
    nibbles = low[:, :, :, :4] | low[:, :, :, 4:] << 4  # (g, S, block, 4, lane, 4)
    highs = np.stack([sum(high[:, :, :, m + 2 * j] << 2 * j for j in range(4)) for m in range(2)], axis=3)
    d = blocks[..., 208:].transpose(0, 2, 1, 3).reshape(g, supers, 32)
    scales = blocks[..., 192:208].transpose(0, 2, 3, 1).reshape(g, supers, 256)  # [group][row]
    body = np.concatenate([nibbles.reshape(g, supers, 8, 256), highs.reshape(g, supers, 8, 128)], axis=-1)
    return np.concatenate([d, scales, body.reshape(g, supers, -1)], axis=-1).reshape(out, row_bytes)


def _tile_q5_0(raw: np.ndarray) -> np.ndarray:
    """Q5_0 in tiles of 16 rows: per group of 16 rows and block (16 x 22 bytes), the 16 fp16 d, then 64 bytes of fifth
    bits (half h's 32 bytes at 32 h: byte 4 l + j holds, in bit s, the fifth bit of row 8 h + l's value 4 s + j), then
    the low nibbles as Q4_0's tiles hold them (4 chunks of 64: steps s and s + 4 in each byte's low and high half)."""
    out, row_bytes = raw.shape
    g, nb = out // TILE, row_bytes // 22
    blocks = raw.reshape(g, TILE, nb, 22)
    qh = np.ascontiguousarray(blocks[..., 2:6]).view("<u4")[..., 0]  # (g, 16, nb): bit v = value v's fifth bit
    word = np.zeros_like(qh)  # byte j of row l's lane: bit s = the fifth bit of value 4 s + j
    for j in range(4):
        for step in range(8):
            word |= ((qh >> (4 * step + j)) & 1) << (8 * j + step)
    fifth = np.ascontiguousarray(word.transpose(0, 2, 1)).view(np.uint8).reshape(g, nb, 64)
    d = blocks[..., :2].transpose(0, 2, 1, 3).reshape(g, nb, 32)
    return np.concatenate([d, fifth, _lanes(blocks[..., 6:].reshape(out, nb, 16), g)], axis=-1).reshape(out, row_bytes)


def untile_rows(tiles: np.ndarray, kind: int) -> np.ndarray:
    """The stored Q5_0 or Q6_K rows back from tile_rows' layout (compress.gguf_blocks.untile_blocks calls this)."""
    return _untile_q5_0(tiles) if kind == 6 else _untile_q6_k(tiles)


def _untile_q5_0(tiles: np.ndarray) -> np.ndarray:
    out, row_bytes = tiles.shape
    g, nb = out // TILE, row_bytes // 22
    t = tiles.reshape(g, nb, TILE * 22)
    d = t[..., :32].reshape(g, nb, TILE, 2).transpose(0, 2, 1, 3)
    fifth = t[..., 32:96].reshape(g, nb, TILE, 4, 1)  # (g, nb, row, j): bit s = value 4 s + j
    high = np.unpackbits(fifth, axis=-1, bitorder="little")  # (g, nb, row, j, s)
    high = high.transpose(0, 2, 1, 4, 3).reshape(g, TILE, nb, 32)  # value 4 s + j
    chunks = t[..., 96:].reshape(g, nb, 4, TILE, 4)
    low = np.concatenate([chunks & 15, chunks >> 4], axis=2).transpose(0, 3, 1, 2, 4).reshape(g, TILE, nb, 32)
    packed = low[..., :16] | low[..., 16:] << 4
    qh = np.packbits(high, axis=-1, bitorder="little")  # (g, 16, nb, 4): the uint32's bytes
    return np.concatenate([d, qh, packed], axis=-1).reshape(out, row_bytes)


def _untile_q6_k(tiles: np.ndarray) -> np.ndarray:
    out, row_bytes = tiles.shape
    g, supers = out // TILE, row_bytes // 210
    t = tiles.reshape(g, supers, TILE * 210)
    d = t[..., :32].reshape(g, supers, TILE, 2).transpose(0, 2, 1, 3)
    scales = t[..., 32:288].reshape(g, supers, 16, TILE).transpose(0, 3, 1, 2)
    body = t[..., 288:].reshape(g, supers, 8, 384)
    nibbles = body[..., :256].reshape(g, supers, 8, 4, TILE, 4)
    highs = body[..., 256:].reshape(g, supers, 8, 2, TILE, 4)
    low = np.concatenate([nibbles & 15, nibbles >> 4], axis=3)  # (g, S, block, step, lane, 4)
    high = np.stack([highs[:, :, :, s % 2] >> 2 * (s // 2) & 3 for s in range(8)], axis=3)
    q = (low | high << 4).transpose(0, 4, 1, 2, 3, 5).reshape(g, TILE, supers, 2, 4, 32)  # (.., h, j, l)
    ql = np.concatenate([q[..., 0, :] & 15 | (q[..., 2, :] & 15) << 4, q[..., 1, :] & 15 | (q[..., 3, :] & 15) << 4],
                        axis=-1)  # (g, 16, S, h, 64)
    qh = sum((q[..., j, :] >> 4) << 2 * j for j in range(4)).astype(np.uint8)  # (g, 16, S, h, 32)
    parts = [ql.reshape(g, TILE, supers, 128), qh.reshape(g, TILE, supers, 64), scales, d]
    return np.concatenate(parts, axis=-1).reshape(out, row_bytes)


def give_back_freed_memory() -> None:
    """Return the memory glibc's heap holds free to the OS (malloc_trim; nothing elsewhere). Re-laid weights free
    their old copies, but glibc keeps freed chunks of a few MB, so without this a model would hold both copies' worth
    of resident memory (SmolLM2-135M through torch: 1017 MiB resident after fusing, 765 MiB with it)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (musl, macOS): nothing to do
        return None


def gemv_library():
    """The compiled kernel library, or None where it cannot be had."""
    global _lib, _tried
    if not _tried:
        _tried = True
        if os.environ.get("MIGHTYLM_NO_KERNELS") != "1":
            try:
                _lib = build_library()
            except OSError as e:
                warnings.warn(f"mightylm: gemv kernel unavailable, using PyTorch ({e})")
    return _lib
