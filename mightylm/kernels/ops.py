"""The native kernels as functions of torch tensors: each checks that its inputs suit the kernel and returns None (or
F.linear's result) where they do not, so callers fall back to PyTorch. The kernels themselves, their build and the
ctypes structures are in `mightylm.kernels` (which does not import torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mightylm.kernels import FIELDS, GGML_TYPES, SUPER_BLOCKS, TILED_GEMM, gemv_library


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
                bias: torch.Tensor | None = None, activations: str = "float32") -> torch.Tensor | None:
    """x (..., in) float32 rows @ a GGUF weight of a type in GGML_TYPES (out rows of its bytes) + bias,
    or None where the kernel cannot take it (gguf_blocks.c: one row streams the blocks, several share each block's
    unpacking). `activations` "int8": the blocks are in tiles of 16 rows (compress.gguf_blocks.tile_blocks) and every
    row of x is rounded to 8 bits per block of 32, by itself, and multiplied in integers, as llama.cpp does (not
    float32's result); "int24": the same tiles, every row of x written in 24 bits per block (three int8 limbs:
    float32's rounding, kernels.int24_tiles)."""
    n_in = x.shape[-1]
    if not (float_rows(x) and n_in % (256 if ggml_type in SUPER_BLOCKS or ggml_type == FIELDS[14] else 32) == 0
            and (ggml_type in GGML_TYPES or ggml_type in FIELDS.values())
            and blocks.is_contiguous() and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
            and (lib := gemv_library()) is not None):
        return None
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], out)
    b = bias.data_ptr() if bias is not None else None
    if activations in TILED_GEMM:
        tiled = getattr(lib, TILED_GEMM[activations])
        if tiled(x.data_ptr(), x.numel() // n_in, blocks.data_ptr(), ggml_type, b, y.data_ptr(), n_in, out,
                 torch.get_num_threads()) != 0:
            raise ValueError(f"{activations} activations take tiles of Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q6_K rows ({out} "
                             f"rows of {n_in}, type {ggml_type})")
    elif activations == "float32":
        lib.mighty_gemm_ggml(x.data_ptr(), x.numel() // n_in, blocks.data_ptr(), ggml_type, b, y.data_ptr(), n_in,
                             out, torch.get_num_threads())
    else:
        raise ValueError(f"activations {activations!r}: one of float32, int8, int24")
    return y


# Up to this many looked-up rows (a decoded token, a short prompt) the C lookup serves; more go through torch.
GGML_ROWS = 64


def ggml_rows(blocks: torch.Tensor, ggml_type: int, idx: torch.Tensor, n_in: int) -> torch.Tensor | None:
    """Rows `idx` of a GGUF table (blocks (rows, row bytes) uint8, a type of GGML_TYPES) as float32
    (idx.numel(), n_in), equal to dequantizing them in torch (gguf_blocks.c), or None where the kernel cannot take
    them (many rows, no kernels)."""
    if not (idx.numel() <= GGML_ROWS and n_in % (256 if ggml_type in SUPER_BLOCKS else 32) == 0
            and ggml_type in GGML_TYPES and blocks.is_contiguous()
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


def _trains_natively(*tensors: torch.Tensor) -> bool:
    """Whether training's native kernels (swiglu, rms_norm) take these inputs: a gradient is wanted of one of them,
    all float32 on the CPU, not under autocast or torch.compile, and the kernels built."""
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()
            and gemv_library() is not None)


class _SwiGLU(torch.autograd.Function):
    """silu(g) * u with its backward, each one pass of the native kernel (swiglu.c); keeps g and u for the backward
    (PyTorch's two ops keep silu(g) too)."""

    @staticmethod
    def forward(ctx, gate, up):
        lib = gemv_library()
        gate, up = gate.contiguous(), up.contiguous()
        h = torch.empty_like(gate)
        lib.mighty_swiglu(gate.data_ptr(), up.data_ptr(), h.data_ptr(), gate.numel(), torch.get_num_threads())
        ctx.save_for_backward(gate, up)
        return h

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dh = dh.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        gemv_library().mighty_swiglu_backward(dh.data_ptr(), gate.data_ptr(), up.data_ptr(), dg.data_ptr(),
                                              du.data_ptr(), gate.numel(), torch.get_num_threads())
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for training: through the native kernel, forward and backward one pass each, where a gradient
    is wanted of float32 CPU tensors of one shape (not under autocast or torch.compile); PyTorch's ops elsewhere
    (inference keeps them: its logits are compared with transformers' bit for bit)."""
    if gate.shape == up.shape and _trains_natively(gate, up):
        return _SwiGLU.apply(gate, up)
    return F.silu(gate) * up


class _RMSNorm(torch.autograd.Function):
    """RMSNorm over the last dimension with its backward, each one pass a row of the native kernel (rms_norm.c); keeps
    x and one float a row (1 / rms) for the backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        lib, dim = gemv_library(), x.shape[-1]
        x = x.contiguous()
        y, r = torch.empty_like(x), torch.empty(x.shape[:-1])
        lib.mighty_rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), r.data_ptr(), x.numel() // dim, dim, eps,
                            torch.get_num_threads())
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        dim, dy = x.shape[-1], dy.contiguous()
        dx = torch.empty_like(x)
        dw = torch.empty(dim) if ctx.needs_input_grad[1] else None
        gemv_library().mighty_rms_norm_backward(x.data_ptr(), weight.data_ptr(), r.data_ptr(), dy.data_ptr(),
                                                dx.data_ptr(), None if dw is None else dw.data_ptr(), x.numel() // dim,
                                                dim, torch.get_num_threads())
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (dim,), weight, eps) for training: through the native kernel, forward and backward one pass a row
    each, where a gradient is wanted of float32 CPU tensors (not under autocast or torch.compile); PyTorch's op
    elsewhere (inference keeps it: its logits are compared with transformers' bit for bit)."""
    if weight.shape == x.shape[-1:] and weight.is_contiguous() and x.numel() > 0 and _trains_natively(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def softmax_cross_entropy_(logits: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor | None:
    """In place, the loss's step over a chunk of rows (cross_entropy.c): logits (n, vocab) become scale * (softmax
    (logits) - one_hot(labels)), d loss / d logits of scale * the summed cross-entropy, which is returned (a float32
    scalar). None (nothing written) unless logits are contiguous float32 on the CPU and every label is in range
    (then the caller's PyTorch path runs, with its own error for a bad label)."""
    n, vocab = logits.shape
    if not (logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.is_contiguous()
            and labels.shape == (n,) and not torch.compiler.is_compiling() and (lib := gemv_library()) is not None):
        return None
    labels = labels.to(torch.int64).contiguous()
    if n and (int(labels.min()) < 0 or int(labels.max()) >= vocab):
        return None
    losses = torch.empty(n)
    lib.mighty_softmax_cross_entropy(logits.data_ptr(), n, vocab, labels.data_ptr(), scale, losses.data_ptr(),
                                     torch.get_num_threads())
    return losses.sum()
