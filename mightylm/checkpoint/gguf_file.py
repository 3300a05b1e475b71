"""The GGUF container, read directly: header, metadata and tensor table parsed from a memory map (the `gguf`
package's reader spends seconds building Python objects for the 100,000 tokenizer strings of a small model),
tensors as zero-copy views of the map (checkpoint/gguf.py dequantizes them with torch).

Layout (llama.cpp's gguf.h, version 2 and 3): "GGUF", u32 version, u64 tensor count, u64 key/value count;
each key/value is a string, a u32 value type and the value (arrays: u32 element type, u64 count, elements);
each tensor is a string name, u32 dims, u64 sizes (fastest-varying first), u32 type, u64 offset into the
data section, which starts at the next multiple of `general.alignment` (32 by default).

No torch here: `mightylm.lite` reads files through this module alone.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

F32, F16, Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 8, 12, 14, 30
# ggml type -> (values per block, bytes per block)
BLOCKS = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q8_0: (32, 34),
          Q4_K: (256, 144), Q6_K: (256, 210)}
TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q8_0: "Q8_0", Q4_K: "Q4_K",
              Q6_K: "Q6_K", BF16: "BF16"}
KEPT = (Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K, F16, BF16)  # kept as stored for the native kernels (GGUFLinear, lite)

# value types of the key/value section: struct format, or None for string (8) and array (9)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
          10: np.uint64, 11: np.int64, 12: np.float64}

_U64 = struct.Struct("<Q")



class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands (bad magic, version, truncated tables)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # as torch orders it: slowest-varying first (GGUF lists them the other way round)
    type: int  # the ggml type id
    data: np.ndarray  # the tensor's bytes (uint8), a view of the file's memory map
    offset: int = 0  # where those bytes begin in the file

    @property
    def type_name(self) -> str:
        if self.type in TYPE_NAMES:
            return TYPE_NAMES[self.type]
        try:
            from gguf import GGMLQuantizationType

            return GGMLQuantizationType(self.type).name
        except (ImportError, ValueError):
            return f"type {self.type}"


class GGUFFile:
    """A GGUF file opened read-only: `meta` (key -> str, int, float, bool or list) and `tensors` (in file order)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                raise GGUFFormatError("empty file") from None
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, OverflowError, MemoryError) as e:
            raise GGUFFormatError(f"truncated or corrupt ({type(e).__name__}: {e})") from None

    def read(self, t: Tensor) -> np.ndarray:
        """A copy of the tensor's bytes (uint8), read from the file rather than through the map: pages touched
        through the map count in this process's resident memory until it is closed, so a copy made from the map
        would hold the weights twice while a model loads (measured on SmolLM2-135M with its blocks kept: a 456 MiB
        peak while loading with copies from the map, 384 MiB reading them this way)."""
        out = np.empty(t.data.nbytes, np.uint8)
        view, done = memoryview(out), 0
        with open(self.path, "rb", buffering=0) as f:
            while done < len(out):
                n = os.preadv(f.fileno(), [view[done:]], t.offset + done)
                if n <= 0:
                    raise GGUFFormatError(f"tensor {t.name!r}: the file ended while reading it")
                done += n
        return out

    def _take(self, fmt: str):
        value = struct.unpack_from(fmt, self._map, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._take("<Q")
        if self._pos + n > len(self._map):
            raise GGUFFormatError(f"a string of {n} bytes at offset {self._pos} runs past the end of the file")
        text = self._map[self._pos:self._pos + n].decode("utf-8", errors="replace")
        self._pos += n
        return text

    def _strings(self, n: int) -> list[str]:
        buf, pos, end, u64, out = self._map, self._pos, len(self._map), _U64.unpack_from, []
        for _ in range(n):
            (size,) = u64(buf, pos)
            pos += 8
            if pos + size > end:
                raise GGUFFormatError(f"a string of {size} bytes at offset {pos} runs past the end of the file")
            out.append(buf[pos:pos + size].decode("utf-8", errors="replace"))
            pos += size
        self._pos = pos
        return out

    def _value(self, kind: int):
        if kind in _SCALARS:
            return self._take(_SCALARS[kind])
        if kind == 8:
            return self._string()
        if kind == 9:
            item, n = self._take("<I"), self._take("<Q")
            if item == 8:  # strings (a tokenizer's 50,000 tokens and merges): a tight loop
                return self._strings(n)
            if item in _NUMPY:  # numbers: one read of the whole array
                size = np.dtype(_NUMPY[item]).itemsize * n
                if self._pos + size > len(self._map):
                    raise GGUFFormatError(f"an array of {n} values at offset {self._pos} runs past the end of the file")
                values = np.frombuffer(self._map, _NUMPY[item], n, self._pos).tolist()
                self._pos += size
                return values
            return [self._value(item) for _ in range(n)]
        raise GGUFFormatError(f"unknown metadata value type {kind} at offset {self._pos}")

    def _parse(self) -> None:
        if self._map[:4] != b"GGUF":
            raise GGUFFormatError(f"starts with {bytes(self._map[:4])!r}, not the GGUF magic")
        self._pos = 4
        self.version = self._take("<I")
        if self.version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {self.version}; this reader knows versions 2 and 3")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        self.meta: dict = {}
        for _ in range(n_kv):
            key = self._string()
            self.meta[key] = self._value(self._take("<I"))
        table = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._take("<Q") for _ in range(self._take("<I"))]
            table.append((name, tuple(reversed(dims)), self._take("<I"), self._take("<Q")))
        align = int(self.meta.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        buffer = np.frombuffer(self._map, np.uint8)
        self.tensors: list[Tensor] = []
        for name, shape, kind, offset in table:
            size = _nbytes(shape, kind)
            begin = start + offset
            if size is not None and begin + size > len(self._map):
                raise GGUFFormatError(f"tensor {name!r} ({size:,} bytes at {begin:,}) runs past the end of the file "
                                      f"({len(self._map):,} bytes): the file is truncated")
            end = begin + size if size is not None else _next_offset(table, offset, start, len(self._map))
            self.tensors.append(Tensor(name, shape, kind, buffer[begin:end], begin))


def _nbytes(shape: tuple[int, ...], kind: int) -> int | None:
    if kind not in BLOCKS:
        try:
            from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

            per_block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ImportError, ValueError, KeyError):
            return None
    else:
        per_block, block_bytes = BLOCKS[kind]
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    return n // per_block * block_bytes


def _next_offset(table, offset: int, start: int, length: int) -> int:
    later = [o for _, _, _, o in table if o > offset]
    return start + min(later) if later else length
