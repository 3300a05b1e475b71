"""GGUF's block formats (ggml-common.h) as torch code: dequantizers, quantizers for the writer (byte for byte what
the `gguf` package's numpy quantizers write), and `GGUFLinear`, a frozen linear layer that keeps a GGUF file's
Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q4_K / Q6_K blocks (and F16 / BF16 rows) exactly as stored (loading with
keep_blocks=True), multiplied by a native kernel that reads the blocks (kernels/gguf_blocks.c), and dequantized
where the kernel cannot serve (other dtypes, gradients to the input, many rows).

Each format is rows of blocks with float16 scales:
    Q8_0  d, 32 x int8 q                       w = d * q
    Q4_0  d, 16 bytes of nibbles               w = d * (q - 8)      (low nibbles are values 0-15, high 16-31)
    Q4_1  d, m, 16 bytes of nibbles            w = d * q + m
    Q5_0  d, 4 bytes of fifth bits, nibbles    w = d * (q - 16)     (bit j of the uint32: value j's fifth bit)
    Q4_K  d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles   w = d scale q - dmin min  (256 values)
    Q6_K  128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales, d   w = d * scale * (q - 32)  (256 values)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mightylm.checkpoint.gguf_file import BF16, BLOCKS, F16, F32, KEPT, Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0, TYPE_NAMES
from mightylm.kernels import (FIELDS, TILE, as_fields, as_q8_0, float_arithmetic, from_fields, int8_layout,
                              kernel_isa, tile_rows, untile_rows)
from mightylm.kernels.ops import ggml_rows, matmul_ggml


_LAYOUT_OF = {layout: kind for kind, layout in FIELDS.items()}  # our float layouts' types -> the stored type


def dequantize_blocks(raw: torch.Tensor, kind: int, shape) -> torch.Tensor:
    """float32 values, shaped `shape`, of `raw` (uint8, the stored bytes) in ggml type `kind` (one of BLOCKS), or in
    one of our float layouts (a value of kernels.FIELDS: read back to the stored blocks first)."""
    if kind in _LAYOUT_OF:
        kind = _LAYOUT_OF[kind]
        raw = torch.from_numpy(from_fields(raw.contiguous().numpy(), kind, shape[-1]))
    if kind == F32:
        out = raw.view(torch.float32).clone()
    elif kind == F16:
        out = raw.view(torch.float16).float()
    elif kind == BF16:
        out = raw.view(torch.bfloat16).float()
    elif kind in (Q8_0, Q4_0, Q4_1, Q5_0):
        out = _dequantize_32(raw.reshape(-1), kind)
    elif kind == Q6_K:
        out = _dequantize_q6_k(raw.reshape(-1))
    elif kind == Q4_K:  # (d scale) q - dmin min per sub-block of 32, in float32: the gguf package's arithmetic
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        out = torch.from_numpy(dequantize(raw.reshape(-1, 144).cpu().numpy(), GGMLQuantizationType.Q4_K))
    else:
        raise NotImplementedError(f"ggml type {kind}")
    return out.reshape(shape)


WRITABLE = (F32, F16, BF16, Q8_0, Q4_0, Q4_1)  # the types quantize_blocks writes
# Rows quantized per step: the temporaries of one step stay ~100 MB even for a 150k-token embedding table.
_ROWS_PER_STEP = 4096


@torch.no_grad()
def quantize_blocks(values: torch.Tensor, kind: int) -> torch.Tensor:
    """The stored bytes, (rows, row bytes) uint8, of `values` (rows, n) in ggml type `kind` (one of WRITABLE).

    Block formats take rows whose length is a multiple of 32. The arithmetic is float32 in the order of
    gguf.quants (and ggml-quants.c's reference quantizers), so the bytes are the same:
        Q8_0  d = max|x| / 127, q = round-half-away(x / d)
        Q4_0  d = (the x of largest |x|) / -8, q = min(15, trunc(x / d + 8.5))     (x = d * (q - 8))
        Q4_1  d = (max - min) / 15, m = min, q = min(15, trunc((x - m) / d + 0.5))  (x = d * q + m)
    where "/ d" is a product with 1 / d (0 when d is 0), and d and m are stored as float16.
    """
    values = values.detach().to("cpu", torch.float32)
    rows, n = values.shape
    if kind == F32:
        return values.contiguous().view(torch.uint8).view(rows, -1).clone()
    if kind in (F16, BF16):
        return values.to(torch.float16 if kind == F16 else torch.bfloat16).view(torch.uint8).view(rows, -1)
    if kind not in (Q8_0, Q4_0, Q4_1):
        raise ValueError(f"cannot write ggml type {TYPE_NAMES.get(kind, kind)}; writable: "
                         f"{', '.join(TYPE_NAMES[t] for t in WRITABLE)}")
    if n % 32:
        raise ValueError(f"{TYPE_NAMES[kind]} stores rows in blocks of 32 values; these rows have {n}")
    out = torch.empty(rows, n // 32 * BLOCKS[kind][1], dtype=torch.uint8)
    for start in range(0, rows, _ROWS_PER_STEP):
        chunk = values[start:start + _ROWS_PER_STEP]
        out[start:start + len(chunk)] = _quantize_32(chunk.reshape(-1, 32), kind).view(len(chunk), -1)
    return out


def _quantize_32(x: torch.Tensor, kind: int) -> torch.Tensor:
    """(blocks, 32) float32 -> (blocks, block bytes) uint8."""
    def inverse(d):
        return torch.where(d == 0, torch.zeros_like(d), 1 / d)

    def f16_bytes(t):
        return t.to(torch.float16).view(torch.uint8)  # (blocks, 2)

    if kind == Q8_0:
        d = x.abs().amax(dim=1, keepdim=True) / 127
        scaled = x * inverse(d)
        a = scaled.abs()  # roundf: half away from zero (a - floor(a) is exact in float32)
        q = torch.copysign(a.floor() + (a - a.floor() >= 0.5).float(), scaled)
        return torch.cat([f16_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=1)
    if kind == Q4_0:
        largest = x.gather(1, x.abs().argmax(dim=1, keepdim=True))  # signed; the first on ties, as numpy's argmax
        d = largest / -8
        q = (x * inverse(d) + 8.5).trunc().clamp(0, 15).to(torch.uint8)
        head = f16_bytes(d)
    else:
        low, high = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
        d = (high - low) / 15
        q = ((x - low) * inverse(d) + 0.5).trunc().clamp(0, 15).to(torch.uint8)
        head = torch.cat([f16_bytes(d), f16_bytes(low)], dim=1)
    return torch.cat([head, q[:, :16] | (q[:, 16:] << 4)], dim=1)  # value j low nibble, j + 16 high


def stored_rows(kind: str, rows: int, columns: int, ggml_type: int, device=None) -> torch.Tensor:
    """An empty (rows, row bytes) uint8 tensor for `rows` rows of `columns` values stored in `ggml_type` (one of
    KEPT; columns a multiple of 32, the kernels' block, and of 256 for Q6_K's super-blocks)."""
    if ggml_type not in KEPT or columns % 32 or columns % BLOCKS[ggml_type][0]:
        raise ValueError(f"{kind} keeps {[TYPE_NAMES[t] for t in KEPT]} with rows a multiple of 32 values (Q4_K, Q6_K: "
                         f"256), got type {ggml_type} and {columns} values")
    per_block, block_bytes = BLOCKS[ggml_type]
    return torch.empty(rows, columns // per_block * block_bytes, dtype=torch.uint8, device=device)


class GGUFLinear(nn.Module):
    """A frozen linear layer holding a GGUF tensor's blocks as stored: `weight` is (out, row bytes) uint8 (in / 32
    blocks, or in 16-bit values for F16 / BF16), `ggml_type` says which format."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, ggml_type: int = Q8_0,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.ggml_type = in_features, out_features, ggml_type
        self.register_buffer("weight", stored_rows("GGUFLinear", out_features, in_features, ggml_type, device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        # how rows of x enter the product: "float32"; or, `weight` reordered into tiles, "int8" (int8_activations_)
        # or "int24" (float_layouts_: float32's rounding in the tiles)
        self.activations = "float32"
        self.float_layout = False  # set by float_layouts_, which also repacks `weight` (kernels.as_fields)

    @property
    def int8_activations(self) -> bool:
        return self.activations == "int8"

    @property
    def kernel_type(self) -> int:
        """The type the kernels read `weight` as: ggml_type, or its layout's (float_layouts_)."""
        return FIELDS[self.ggml_type] if self.float_layout else self.ggml_type

    def stored(self) -> torch.Tensor:
        """The blocks as the file stores them (out, row bytes), whatever layout `weight` is in."""
        if self.activations != "float32":
            return untile_blocks(self.weight, self.ggml_type)
        if self.float_layout:
            return torch.from_numpy(from_fields(self.weight.contiguous().numpy(), self.ggml_type, self.in_features))
        return self.weight

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_blocks(self.stored(), self.ggml_type, (self.out_features, self.in_features)).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gguf_linear(x, self.weight, self.kernel_type, self.in_features, self.bias, self.activations)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={TYPE_NAMES[self.ggml_type]}"


class GGUFEmbedding(nn.Module):
    """A frozen token embedding holding a GGUF table's blocks as stored: `blocks` (vocab, row bytes) uint8; a lookup
    dequantizes only the rows it reads. A head tied to the table reads the same bytes (a GGUFLinear sharing the
    tensor), so a small model keeps one packed copy rather than a float32 table beside it (113 MB for
    SmolLM2-135M's Q8_0 table). It has no float `weight`: code asks the model for its `dtype` and `device`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, ggml_type: int, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.ggml_type = num_embeddings, embedding_dim, ggml_type
        self.register_buffer("blocks", stored_rows("GGUFEmbedding", num_embeddings, embedding_dim, ggml_type, device))
        self.dtype = torch.float32  # what lookups return (the model's activations)

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = ggml_rows(self.blocks, self.ggml_type, idx, self.embedding_dim)  # a few rows: one C call
        if x is None:
            rows = self.blocks[idx.reshape(-1)]
            x = dequantize_blocks(rows, self.ggml_type, (rows.shape[0], self.embedding_dim))
        return x.to(self.dtype).reshape(*idx.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={TYPE_NAMES[self.ggml_type]}"


def tile_blocks(raw: torch.Tensor, kind: int) -> torch.Tensor:
    """kernels.tile_rows on a tensor: Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q6_K rows (out, row bytes) in the int8-activation
    kernel's tiles of 16 rows (the same bytes, raw's shape); untile_blocks inverts it."""
    return torch.from_numpy(tile_rows(raw.contiguous().numpy(), kind))


def untile_blocks(tiles: torch.Tensor, kind: int) -> torch.Tensor:
    """The stored rows back from tile_blocks' layout."""
    if kind in (Q5_0, Q6_K):
        return torch.from_numpy(untile_rows(tiles.contiguous().numpy(), kind))
    out, row_bytes = tiles.shape
    g, bytes_ = out // TILE, BLOCKS[kind][1]
    nb, head = row_bytes // bytes_, 4 if kind == Q4_1 else 2
    t = tiles.reshape(g, nb, TILE * bytes_)
    heads = t[..., :TILE * head].reshape(g, nb, head // 2, TILE, 2).permute(0, 3, 1, 2, 4).reshape(out, nb, head)
    steps = t[..., TILE * head:]
    if kind == Q8_0:
        codes = steps.reshape(g, nb, 8, TILE, 4) ^ 0x80
    else:
        chunks = steps.reshape(g, nb, 4, TILE, 4)
        codes = torch.cat([chunks & 15, chunks >> 4], dim=2)  # steps 0-3, then 4-7
    codes = codes.permute(0, 3, 1, 2, 4).reshape(out, nb, 32)
    if kind != Q8_0:
        codes = codes[..., :16] | (codes[..., 16:] << 4)
    return torch.cat([heads, codes], dim=-1).reshape(out, row_bytes)


def widen_(m: GGUFLinear, kind: int) -> None:
    """m's blocks as `kind` with the same values (kernels.common_type: Q4_0 / Q5_0 as Q8_0), in m's layout (tiles stay
    tiles), so that it can be stacked with parts of that type."""
    if m.ggml_type == kind:
        return
    if kind != Q8_0:
        raise ValueError(f"{TYPE_NAMES[m.ggml_type]} blocks widen to Q8_0 only, not {TYPE_NAMES.get(kind, kind)}")
    wide = as_q8_0(m.stored().contiguous().numpy(), m.ggml_type)
    m.weight = torch.from_numpy(tile_rows(wide, kind) if m.activations != "float32" else wide)
    m.ggml_type, m.float_layout = kind, False


def _tables_before_fusing(model: nn.Module, transform: str) -> set[int]:
    """The storages of the model's GGUF embedding tables (a head tied to one keeps reading its stored rows), after
    checking that `transform` comes before fuse_projections_ (the decode layout copies the modules' settings)."""
    if any(getattr(m, "fused_qkv", None) is not None or getattr(m, "fused_decode", None) is not None
           for m in model.modules()):
        raise ValueError(f"{transform} goes before fuse_projections_: the decode layout copies the modules' "
                         "settings (undo it with unfuse_projections_ first)")
    return {m.blocks.untyped_storage().data_ptr() for m in model.modules() if isinstance(m, GGUFEmbedding)}


def int8_activations_(model: nn.Module) -> list[str]:
    """llama.cpp's arithmetic for the kept Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q6_K blocks: every row of every product (a
    decoded token, a prompt's tokens, a speculative step's drafts, a server's batch) rounds its input to 8 bits per
    block of 32 (scale max|x| / 127), each row by itself, and multiplies in integers (kernels/gguf_blocks.c), 16
    weight rows at a time: faster than float32 for one row and much faster for several. The layers' blocks are
    reordered in place into the kernel's tiles (tile_blocks: the same bytes; `dequantize` reads them back), so
    layers whose output count is not a multiple of 16 keep float32 (Q4_K too: it has no tiles); a head tied to the
    embedding table gets its own tiled copy. Q6_K layers take the same rounding of x (integer dots per group of 16
    weighted by the groups' int8 scales, as llama.cpp's Q6_K x Q8_K dot does with x rounded per 256). Logits move
    by the activations' rounding, and greedy text can part from the float32 model's where its top two tokens are
    close (llama.cpp's does too). Apply before `fuse_projections_` (the fused copies are made from the modules).
    Returns the modules changed."""
    tables = _tables_before_fusing(model, "int8_activations_")
    changed = []
    for name, m in model.named_modules():
        if not isinstance(m, GGUFLinear) or m.int8_activations:
            continue
        if int8_layout(m.ggml_type, m.out_features) == "tiles":
            if m.activations == "float32":
                _tile_(m, tables)
            m.activations = "int8"
            changed.append(name)
    if changed:
        model.record_transform("int8_activations", modules=changed)
    return changed


def _tile_(m: GGUFLinear, tables: set[int]) -> None:
    """m's stored blocks reordered into tiles (the same bytes)."""
    if m.float_layout:  # tiles are made from the stored blocks
        m.weight, m.float_layout = m.stored(), False
    tiles = tile_blocks(m.weight, m.ggml_type)
    if m.weight.untyped_storage().data_ptr() in tables:
        m.weight = tiles  # a tied head: the table's lookups keep reading the stored rows
    else:
        m.weight.copy_(tiles)  # in place: one weight's copy at a time at the peak of loading


def float_layouts_(model: nn.Module) -> list[str]:
    """Kept blocks laid out for float32 arithmetic as lite multiplies them: in the int8 tiles with each row of x
    written in 24 bits or in our layouts, as kernels.float_arithmetic says ("int24": Q4_0 / Q4_1, Q5_0 / Q8_0 on
    AVX-512: float32's rounding, faster than converting every code to float; a head tied to the embedding table gets
    a tiled copy; "fields": Q6_K, Q5_0 on AVX2, kernels/q5_0_fields.c, q6_k_fields.c; not for a tied head, whose
    lookups read the stored rows). The same values: `stored` and `dequantize` read them back. Not
    for layers under int8_activations_. Apply before `fuse_projections_`. Returns the modules changed."""
    tables = _tables_before_fusing(model, "float_layouts_")
    isa = kernel_isa()  # None without the kernels: nothing to lay out for
    changed = []
    for name, m in model.named_modules():
        if (isa is None or not isinstance(m, GGUFLinear) or m.activations != "float32" or m.float_layout
                or m.weight.device.type != "cpu"):
            continue
        way = float_arithmetic(m.ggml_type, [m.out_features], isa)
        if way == "int24":
            _tile_(m, tables)
            m.activations = "int24"
        elif way == "fields" and m.weight.untyped_storage().data_ptr() not in tables:
            m.weight = torch.from_numpy(as_fields(m.weight.contiguous().numpy(), m.ggml_type))
            m.float_layout = True
        else:
            continue
        changed.append(name)
    if changed:
        model.record_transform("float_layouts", modules=changed)
    return changed


# Up to this many rows the kernel (each block unpacked once per 8 rows) is at least as fast as dequantizing the
# whole weight for a float GEMM. Measured on SmolLM2-135M's Q4_1 gate_proj (1536 x 576), AVX-512, 2 threads:
# 32 rows 0.70 against 1.75 ms, 128 rows 2.82 against 2.78 ms, 512 rows 15.7 against 5.8 ms.
KERNEL_ROWS = 128


def gguf_linear(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, n_in: int,
                bias: torch.Tensor | None = None, activations: str = "float32") -> torch.Tensor:
    """F.linear(x, dequantized blocks, bias): through the block kernel where it serves, else dequantized.
    `activations` "int8": the blocks are in tiles and every row is rounded to 8 bits per block first (see
    int8_activations_), through the kernel for any number of rows; "int24": in tiles, each row in 24 bits
    (float_layouts_), through the kernel up to KERNEL_ROWS rows as the other layouts."""
    out = blocks.shape[0]
    if activations == "int8" or x.numel() <= KERNEL_ROWS * n_in:
        y = matmul_ggml(x, blocks, ggml_type, out, bias, activations)
        if y is not None:
            return y
    raw = untile_blocks(blocks, ggml_type) if activations != "float32" else blocks
    w = dequantize_blocks(raw, ggml_type, (out, n_in)).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def _dequantize_32(raw: torch.Tensor, kind: int) -> torch.Tensor:
    per_block, block_bytes = BLOCKS[kind]
    blocks = raw.view(-1, block_bytes)  # (n_blocks, bytes)
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # (n, 1)
    # in place where possible: the embedding table of a small model is ~110 MB as float32, and the peak of a
    # cold start is this step
    if kind == Q8_0:
        return blocks[:, 2:].contiguous().view(torch.int8).float().mul_(d).flatten()
    packed = blocks[:, block_bytes - 16:]  # (n, 16): value j in the low nibble of byte j, value j + 16 in the high
    q = torch.cat([packed & 0xF, packed >> 4], dim=1)  # (n, 32)
    if kind == Q5_0:  # bit j of the uint32 after d: value j's fifth bit
        qh = blocks[:, 2:6].contiguous().view(torch.int32)  # (n, 1)
        bits = (qh >> torch.arange(32, dtype=torch.int32)) & 1
        return (q.to(torch.int32) | bits << 4).float().sub_(16).mul_(d).flatten()
    q = q.float()
    if kind == Q4_0:
        return q.sub_(8).mul_(d).flatten()
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()
    return q.mul_(d).add_(m).flatten()


def _dequantize_q6_k(raw: torch.Tensor) -> torch.Tensor:
    """Q6_K: 256 values in 16 groups of 16, each group with an int8 scale, all times one float16 d
    (dequantize_row_q6_K in ggml-quants.c)."""
    blocks = raw.view(-1, 210)
    n = blocks.shape[0]
    ql, qh = blocks[:, :128].view(n, 2, 64), blocks[:, 128:192].view(n, 2, 32)  # two halves of 128 values
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float().view(n, 2, 8)
    d = blocks[:, 208:210].contiguous().view(torch.float16).float().view(n, 1, 1)
    # within a half: values l, l+32, l+64, l+96 (l < 32) take ql[l] low, ql[l+32] low, ql[l] high, ql[l+32] high
    # nibbles, and 2 bits each from qh[l] (bits 0-1, 2-3, 4-5, 6-7)
    lo = torch.stack([ql[..., :32] & 0xF, ql[..., 32:] & 0xF, ql[..., :32] >> 4, ql[..., 32:] >> 4], dim=2)
    hi = torch.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2)  # (n, 2, 4, 32)
    q = (lo.to(torch.int16) | (hi.to(torch.int16) << 4)) - 32  # (n, 2, 4, 32)
    scale = scales.view(n, 2, 4, 2).repeat_interleave(16, dim=3)  # group of 16: (n, 2, 4, 32)
    return (d.unsqueeze(-1) * scale * q.float()).flatten()
