"""Decoding a GGUF file without PyTorch: the native kernels over numpy arrays, for a fast cold start.

`import torch` alone takes 2-3 s and ~220 MiB on the project's machines, more than the whole of llama.cpp's start on
the embedded model (0.3 s, 160 MiB). When every block of a GGUF file runs in the native kernels (its projections
kept as Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q6_K / F16 / BF16 blocks: what `load_for_generation` turns into
fuse.NativeDecodeStack), the model needs nothing from torch to decode, and `mighty generate` takes this path (its
`--engine auto`):

    the weights   the file's blocks read into numpy arrays, q/k/v and gate/up stacked by rows as fuse.py stacks
                  them (llama's q/k rows un-permuted as checkpoint/gguf.py does); Q4_0 / Q4_1 products (and
                  Q5_0 / Q8_0 ones on AVX-512) in the int8 tiles with activations in 24 bits (kernels.int24_tiles:
                  float32's rounding), Q6_K ones and Q5_0 ones on AVX2 in our float layouts (kernels.float_layout;
                  q5_0_fields.c, q6_k_fields.c); copies made at load, faster than the stored blocks' loops
    a pass        token rows looked up in C (mighty_ggml_rows), every block in one call (mighty_decode_blocks, the
                  same call fuse.NativeDecodeStack makes; with every product in the tiles, in one OpenMP region, the
                  threads sharing each step), the final RMSNorm in numpy, the head through
                  mighty_gemm_ggml; a prompt goes through in passes of NATIVE_ROWS tokens
    the cache     a (1, n_kv, max_len, hd) float32 buffer per layer, as model.KVCache lays it out
    sampling      streaming.Sampling's rule (temperature, then top-k, then top-p; greedy is the argmax) in numpy

Greedy tokens equal the torch path's and logits agree within float32 rounding (the RoPE table and the final norm
are numpy's arithmetic, not torch's; tests/test_lite.py). A seed gives its own random stream, not torch's: the same
seed samples the same text on this path, and other text than `--engine torch` does. `int8_activations` tiles the
Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q6_K products as the torch path's option does (llama.cpp's arithmetic):
the same integers, but rounding activations to 8 bits can turn the RoPE tables' last-bit differences into
different roundings, so greedy text can part from the torch path's at near-ties (as both do from llama.cpp's).
Prompt lookup's speculative decoding runs here too (`speculative_tokens`, lookup.Lookup's drafts, the exact rule in
numpy). Anything else (another architecture or dtype, LoRA, draft models, RoPE scaling) loads through torch;
`unsupported` says why a file cannot come here.
"""

from __future__ import annotations

import ctypes
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from mightylm.checkpoint import CheckpointError, gguf_config, gguf_metadata, gguf_tokenizer, resolve
from mightylm.checkpoint.gguf_file import KEPT, TYPE_NAMES
from mightylm.checkpoint.names import unpermute_qk
from mightylm.draft_width import PassCost, Widths
from mightylm.errors import UsageError
from mightylm.kernels import (FIELDS, TILED, TILED_GEMM, BlockArgs, Projection, as_fields, as_q8_0, common_type,
                              float_arithmetic, gemv_library, give_back_freed_memory, int8_layout, physical_cores,
                              tile_rows)
from mightylm.streaming import Sampling, cached_prefix

NATIVE_ROWS = 16  # tokens of a prompt per pass, as fuse.NATIVE_ROWS: each projection reads its blocks once for them
KV_CACHES = ("float32", "float16")  # the cache's value types (LiteModel kv_cache)
_PARTS = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",), "gate_up": ("ffn_gate", "ffn_up"),
          "down": ("ffn_down",)}  # a block's products, from llama.cpp's tensor names, as the native block takes them


def unsupported(config, names: dict, library) -> str | None:
    """Why this file cannot decode here (a sentence), or None. `names`: the file's tensors by name."""
    if library is None:
        return "the native kernels are not available on this machine"
    if config.arch not in ("llama", "qwen2") or config.n_experts:
        return f"a {config.arch} model is decoded through torch"
    if config.rope_scaling or config.sliding_window or config.rotary_dim != config.head_dim or config.head_dim % 2:
        return "RoPE scaling, partial rotary embeddings and sliding windows are decoded through torch"
    if config.n_heads % config.n_kv_heads or config.dim % 32 or config.ffn_dim % 32:
        return "the native block takes grouped heads and widths in blocks of 32"
    head = "token_embd.weight" if config.tie_embeddings else "output.weight"
    for name in ("token_embd.weight", head):
        if name not in names or names[name].type not in KEPT:
            return f"{name} is {names[name].type_name if name in names else 'missing'}"
    for i in range(config.n_layers):
        for part in _PARTS.values():
            tensors = [names[f"blk.{i}.{p}.weight"] for p in part if f"blk.{i}.{p}.weight" in names]
            types = {t.type for t in tensors}
            if not types <= set(KEPT) or common_type(types) is None:
                kept = ", ".join(TYPE_NAMES[t] for t in KEPT)
                found = ", ".join(sorted({t.type_name for t in tensors}))
                return (f"block {i}'s {'/'.join(part)} are {found}; "
                        f"the native block takes one kept type ({kept}; Q4_0 / Q5_0 widen to Q8_0) per product")
    return None


class LiteModel:
    """A GGUF file's model as the native kernels read it: `forward(ids, cache, start)` -> the logits after the last
    of `ids`. Build with `load_lite`. `int8_activations`: the Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q6_K products (and the
    head) take their rows rounded to 8 bits per block, over weights in tiles of 16 rows, as the torch path's
    compress.gguf_blocks.int8_activations_ sets them up (llama.cpp's arithmetic). `kv_cache`: float32, or float16 (half
    the cache's memory and the bytes its attention reads, keys and values rounded to float16 as llama.cpp's default
    cache does)."""

    def __init__(self, path: Path, file, config, library, int8_activations: bool = False,
                 kv_cache: str = "float32"):
        if kv_cache not in KV_CACHES:
            raise UsageError(f"kv cache {kv_cache!r}: one of {', '.join(KV_CACHES)}")
        self.path, self.config, self.lib, self.kv_cache = path, config, library, kv_cache
        self.threads = physical_cores()
        self.pass_cost = PassCost()  # seconds of a pass by its rows, as speculative_tokens times them
        tensors = {t.name: t for t in file.tensors}

        def tensor(name: str):
            if name not in tensors:  # a file the metadata calls this model but which lacks a tensor of it
                raise CheckpointError(f"{path}: missing tensor {name!r} for a {config.arch} model")
            return tensors[name]

        def rows(name: str) -> np.ndarray:  # a tensor's stored rows, (rows, row bytes): a copy, to be reshaped
            t = tensor(name)
            return file.read(t).reshape(t.shape[0], -1)

        def stored(name: str) -> np.ndarray:  # the same, read in place: a read-only view of the file's memory map
            t = tensor(name)  # (the map stays open while the model lives: the file object keeps it)
            return t.data.reshape(t.shape[0], -1)

        def floats(name: str) -> np.ndarray:
            return file.read(tensor(name)).view(np.float32)

        c = config
        self.keep = []  # every array a pointer below points into

        def projection(names: list[str], permute: list[int | None]) -> Projection:
            weights = [tensor(f"{n}.weight") for n in names]
            kinds = [t.type for t in weights]
            kind = common_type(kinds)  # mixed Q4_0 / Q5_0 / Q8_0 parts: all as Q8_0, the same values
            layout = _arithmetic(int8_activations, kind, [t.shape[0] for t in weights])
            if len(names) == 1 and permute == [None] and layout == "stored":
                weight = stored(f"{names[0]}.weight")  # multiplied as stored: read in place, no copy
            else:
                parts = [rows(f"{n}.weight") for n in names]
                parts = [part if k == kind else as_q8_0(part, k) for part, k in zip(parts, kinds)]
                if c.arch == "llama":  # llama.cpp permutes llama's q/k rows for its RoPE kernel (names.unpermute_qk)
                    parts = [p if heads is None else unpermute_qk(p, heads) for p, heads in zip(parts, permute)]
                weight = np.ascontiguousarray(np.concatenate(parts)) if len(parts) > 1 else parts[0]
                if layout in TILED:  # tiles of each part's rows, one after another: the tiles of the stacked rows
                    weight = tile_rows(weight, kind)
                elif layout == "fields":
                    weight, kind = as_fields(weight, kind), FIELDS[kind]
            bias = None
            if f"{names[0]}.bias" in tensors:
                bias = np.concatenate([floats(f"{n}.bias") for n in names])
            self.keep += [weight, bias]
            return Projection(weight.ctypes.data, None, None if bias is None else bias.ctypes.data, None, kind,
                              TILED.get(layout, Projection.GGML))

        self.blocks = []
        for i in range(c.n_layers):
            b = f"blk.{i}."
            norms = floats(f"{b}attn_norm.weight"), floats(f"{b}ffn_norm.weight")
            self.keep += norms
            self.blocks.append(BlockArgs(
                qkv=projection([b + p for p in _PARTS["qkv"]], [c.n_heads, c.n_kv_heads, None]),
                o=projection([b + "attn_output"], [None]),
                gate_up=projection([b + p for p in _PARTS["gate_up"]], [None, None]),
                down=projection([b + "ffn_down"], [None]),
                attn_norm=norms[0].ctypes.data, mlp_norm=norms[1].ctypes.data, dim=c.dim, n_heads=c.n_heads,
                n_kv=c.n_kv_heads, head_dim=c.head_dim, ffn=c.ffn_dim, eps=c.norm_eps, kv_half=kv_cache == "float16"))
        self.args = (ctypes.POINTER(BlockArgs) * c.n_layers)(*(ctypes.pointer(a) for a in self.blocks))
        self.embed, self.embed_type = stored("token_embd.weight"), tensors["token_embd.weight"].type
        head = "token_embd.weight" if c.tie_embeddings else "output.weight"
        self.head_type = tensor(head).type
        # in tiles or our layout as the blocks' products, a copy (a head tied to the table too: lookups read the stored
        # rows)
        self.head_layout = _arithmetic(int8_activations, self.head_type, [tensor(head).shape[0]])
        if self.head_layout in TILED:
            self.head_weight = tile_rows(rows(head), self.head_type)
        elif self.head_layout == "fields":
            self.head_weight, self.head_type = as_fields(rows(head), self.head_type), FIELDS[self.head_type]
        else:
            self.head_weight = stored(head)
        self.head_product = getattr(library, TILED_GEMM.get(self.head_layout, "mighty_gemm_ggml"))
        self.head_bias = floats("output.bias") if "output.bias" in tensors else None
        self.norm = floats("output_norm.weight")
        self.cos = self.sin = np.empty((0, c.head_dim), np.float32)
        self._pack_weights()

    def _pack_weights(self) -> None:
        """Move every weight this model copied (tiles, fields; not those read in place from the file) into one buffer
        made after loading, in pass order on 64-byte boundaries, and give the memory the copies leave back to the
        OS (give_back_freed_memory, every PACK_TRIM bytes moved, so resident memory stays near the weights' size).
        SmolLM2-135M in int8 on the Intel VM, 8 pairs of processes alternated: one-row passes 1.00-1.39x faster
        (median 1.09x), 3-row passes 0.96-1.32x (median 1.07x), resident memory 189 -> 197 MB, peak unchanged. Why
        is not established: numpy asks for huge pages for the one buffer, but placing each weight in 32 MiB buffers
        as it was made got them too and measured 0.97-1.13x (bench/RESULTS.md)."""
        projections = [getattr(b, name) for b in self.blocks for name in ("qkv", "o", "gate_up", "down")]
        pointers = {p.w for p in projections}
        moving = [a for a in self.keep if isinstance(a, np.ndarray) and a.flags.writeable and a.ctypes.data in pointers]
        if self.head_weight.flags.writeable:  # (the stored rows of the file are read-only views: they stay)
            moving.append(self.head_weight)
        if not moving:
            return
        sizes = [(a.nbytes + 63) // 64 * 64 for a in moving]
        buffer = _zeros64((sum(sizes),), np.uint8)
        kept = {id(a) for a in moving}
        self.keep = [a for a in self.keep if id(a) not in kept] + [buffer]
        moved, at, since_trim = {}, 0, 0
        while moving:
            a, size = moving.pop(0), sizes.pop(0)
            copy = buffer[at:at + a.nbytes].view(a.dtype).reshape(a.shape)
            copy[...] = a
            moved[a.ctypes.data] = copy
            at, since_trim = at + size, since_trim + size
            if a is self.head_weight:
                self.head_weight = copy
            del a  # (the last reference: the original is freed)
            if since_trim >= PACK_TRIM or not moving:
                give_back_freed_memory()
                since_trim = 0
        for p in projections:
            if p.w in moved:
                p.w = moved[p.w].ctypes.data

    def rope(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and signed-sin tables (length, hd) as model.rope_cos_sin makes them, grown by doubling."""
        if length > len(self.cos):
            size, d = max(length, 2 * len(self.cos), 256), self.config.head_dim
            inv_freq = (1.0 / (np.float32(self.config.rope_theta) ** (np.arange(0, d, 2).astype(np.float32) / d))
                        ).astype(np.float32)
            freqs = np.outer(np.arange(size, dtype=np.float32), inv_freq)  # (T, hd / 2)
            self.cos = np.cos(np.concatenate([freqs, freqs], axis=1))
            self.sin = np.concatenate([-np.sin(freqs), np.sin(freqs)], axis=1)
        return self.cos, self.sin

    def cache(self, length: int) -> "LiteCache":
        return LiteCache(self.config, length, np.float16 if self.kv_cache == "float16" else np.float32)

    def forward(self, ids: list[int], cache, start: int) -> np.ndarray:
        """The logits (vocab,) after the last of `ids`, which go into `cache` from slot `start`."""
        return self.head(self.hidden(ids, cache, start)[-1:])[0]

    def forward_rows(self, ids: list[int], cache, start: int) -> np.ndarray:
        """The logits (len(ids), vocab) after each of at most NATIVE_ROWS `ids` (a speculative verification pass)."""
        if len(ids) > NATIVE_ROWS:
            raise ValueError(f"at most {NATIVE_ROWS} tokens a pass, got {len(ids)}")
        return self.head(self.hidden(ids, cache, start))

    def hidden(self, ids: list[int], cache, start: int) -> np.ndarray:
        """The blocks' output rows (at most NATIVE_ROWS: the last pass's) after `ids` go into `cache` from `start`."""
        if start + len(ids) > cache.length:
            raise ValueError(f"KV cache overflow: position {start + len(ids)} > cache length {cache.length}")
        c, lib = self.config, self.lib
        cos, sin = self.rope(start + len(ids))
        for a in range(0, len(ids), NATIVE_ROWS):
            chunk = np.asarray(ids[a:a + NATIVE_ROWS], dtype=np.int64)
            x = np.empty((len(chunk), c.dim), np.float32)
            if lib.mighty_ggml_rows(self.embed.ctypes.data, len(self.embed), self.embed_type, chunk.ctypes.data,
                                    len(chunk), c.dim, x.ctypes.data):
                raise UsageError(f"token id out of range: the vocabulary has {len(self.embed)} tokens")
            pos = start + a
            lib.mighty_decode_blocks(x.ctypes.data, self.args, c.n_layers, cache.key_pointers, cache.value_pointers,
                                     cos[pos:pos + len(chunk)].ctypes.data, sin[pos:pos + len(chunk)].ctypes.data,
                                     pos, cache.length, len(chunk), self.threads, None, 0, 1, None)
        return x

    def head(self, x: np.ndarray) -> np.ndarray:
        """The final RMSNorm and the head over rows x (R, dim): logits (R, vocab)."""
        h, logits = self._normed(x), np.empty((len(x), self.config.vocab_size), np.float32)
        self.head_product(h.ctypes.data, len(h), self.head_weight.ctypes.data, self.head_type,
                          None if self.head_bias is None else self.head_bias.ctypes.data, logits.ctypes.data,
                          self.config.dim, self.config.vocab_size, self.threads)
        return logits

    def greedy(self, x: np.ndarray) -> list[int]:
        """head(x).argmax(-1) as a list: each row's greedy token (the first largest logit, as numpy's argmax). In
        int8 tiles without a bias the threads find each row's largest as they make the logits, which are never
        written (mighty_gemm_ggml_q8x_best): numpy's argmax read SmolLM2's 49,152 a row back from another core's
        cache, ~25 us a row. On 88 HumanEval completions greedy decoding ran 1.000-1.006x as fast as before and
        prompt lookup with a history 1.009-1.017x (bench/RESULTS.md)."""
        if self.head_layout != "int8" or self.head_bias is not None or len(x) > NATIVE_ROWS:
            return self.head(x).argmax(-1).tolist()
        c, h = self.config, self._normed(x)
        best = np.empty(len(h), np.int64)
        if self.lib.mighty_gemm_ggml_q8x_best(h.ctypes.data, len(h), self.head_weight.ctypes.data, self.head_type,
                                              c.dim, c.vocab_size, self.threads, best.ctypes.data):
            return self.head(x).argmax(-1).tolist()  # (a Q6_K head: refused, nothing written)
        return best.tolist()

    def _normed(self, x: np.ndarray) -> np.ndarray:
        """The final RMSNorm of rows x, contiguous float32 for the head's product."""
        h = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(self.config.norm_eps)) * self.norm
        return np.ascontiguousarray(h, dtype=np.float32)


def _arithmetic(int8_activations: bool, kind: int | None, rows: list[int]) -> str:
    """How a product of GGUF blocks of ggml type `kind`, stacked from parts of these row counts, multiplies (each part
    whole tiles, as the torch path tiles each layer before fusing them): "int8" (activations rounded to 8 bits,
    where asked), else kernels.float_arithmetic's "int24", "fields" or "stored"."""
    if int8_activations and all(int8_layout(kind, n) == "tiles" for n in rows):
        return "int8"
    return float_arithmetic(kind, rows)


PACK_TRIM = 16 << 20  # bytes of weights moved between two returns of freed memory to the OS (_pack_weights)


def _zeros64(shape: tuple, dtype) -> np.ndarray:
    """np.zeros(shape, dtype) starting on a 64-byte boundary (numpy's large arrays start 16 bytes into a page, so
    that every other 32-byte load of a row of keys or values spans two cache lines: ~30 % slower)."""
    n, size = int(np.prod(shape)), np.dtype(dtype).itemsize
    raw = np.zeros(n + 64 // size, dtype)
    skip = -raw.ctypes.data % 64 // size
    return raw[skip:skip + n].reshape(shape)


class LiteCache:
    """One sequence's keys and values: a zeroed (1, n_kv, length, hd) buffer per layer for each (float32, or
    float16), as model.KVCache lays them out (the OS maps pages as they are written), and the pointer arrays the
    native call takes."""

    def __init__(self, config, length: int, dtype=np.float32):
        shape = (1, config.n_kv_heads, length, config.head_dim)
        self.keys = [_zeros64(shape, dtype) for _ in range(config.n_layers)]
        self.values = [_zeros64(shape, dtype) for _ in range(config.n_layers)]
        self.length = length
        self.key_pointers = (ctypes.c_void_p * config.n_layers)(*(a.ctypes.data for a in self.keys))
        self.value_pointers = (ctypes.c_void_p * config.n_layers)(*(a.ctypes.data for a in self.values))


def load_lite(model: str, log=None, int8_activations: bool = False, kv_cache: str = "float32"):
    """(LiteModel, tokenizer) for `model` (a path or an embedded name) where it is a GGUF file that decodes here,
    else None (`unsupported` says why; the caller loads through torch)."""
    log = log or sys.stderr
    try:
        path = resolve(model)
    except CheckpointError:
        return None  # the torch path says what is wrong with it
    if not (path.is_file() and path.suffix == ".gguf"):
        return None
    t0 = time.perf_counter()
    print(f"loading {model} ...", file=log, flush=True)
    file, meta = gguf_metadata(path)
    config = gguf_config(meta, file, source=path)
    reason = unsupported(config, {t.name: t for t in file.tensors}, gemv_library())
    if reason is not None:
        print(f"{reason}: loading through torch", file=log, flush=True)
        return None
    tokenizer = gguf_tokenizer(meta, path)
    lite = LiteModel(path, file, config, gemv_library(), int8_activations, kv_cache)
    print(f"loaded {config.n_params / 1e6:.0f}M parameters in {time.perf_counter() - t0:.1f}s (native kernels, "
          "without torch)", file=log, flush=True)
    return lite, tokenizer


def probabilities(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """generate.logits_to_probs for one row in numpy: logits (V,) -> the distribution tokens are drawn from, after
    temperature, top-k and top-p (float32; greedy settings give a one-hot row at the argmax)."""
    if s.temperature == 0:
        probs = np.zeros(len(logits), np.float32)
        probs[int(np.argmax(logits))] = 1
        return probs
    z = logits.astype(np.float32) / np.float32(s.temperature)
    if s.top_k is not None and s.top_k < len(z):
        kth = np.partition(z, len(z) - s.top_k)[len(z) - s.top_k]
        z = np.where(z < kth, -np.inf, z).astype(np.float32)
    e = np.exp(z - z.max())
    probs = e / e.sum()
    if s.top_p is not None and s.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        ranked = probs[order]
        ranked[np.cumsum(ranked) - ranked > s.top_p] = 0  # mass before this token already covers top_p
        probs = np.zeros_like(probs)
        probs[order] = ranked
        probs /= probs.sum()
    return probs


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn from `probs` (inverse CDF: a token of probability 0 is never drawn)."""
    cdf = np.cumsum(probs, dtype=np.float64)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(probs) - 1))


class Session:
    """A conversation's cache kept from one generation to the next (`mighty chat`, which sends the whole conversation
    every turn): a prompt that begins with tokens the cache already holds is read from where they end, so a turn
    reads its new tokens only. `reused`: how many the last prompt took from the cache. The cache grows by doubling
    (up to the model's context), the kept slots copied over. The logits are those of reading the prompt whole, bit
    for bit, in either arithmetic: every product and attention give a row the bits it gets alone."""

    def __init__(self, model: LiteModel):
        self.model, self.cache, self.ids, self.reused = model, None, [], 0

    def start(self, prompt: list[int], slots: int) -> int:
        """Make room for `slots` and keep the longest prefix of `prompt` the cache holds (never the whole prompt: its
        last token's pass gives the first logits); returns how many tokens were kept."""
        keep = cached_prefix(self.ids, prompt)
        if self.cache is None or self.cache.length < slots:
            doubled = min(2 * (self.cache.length if self.cache else 0), self.model.config.max_seq_len)
            grown = self.model.cache(max(slots, doubled))  # (never past the context but for a pass's drafts)
            if self.cache is not None and keep:
                for old, new in zip(self.cache.keys + self.cache.values, grown.keys + grown.values):
                    new[:, :, :keep] = old[:, :, :keep]
            self.cache = grown
        self.ids, self.reused = list(prompt[:keep]), keep  # (a generation then sets the tokens its cache holds)
        return keep


def _begin(model: LiteModel, prompt: list[int], s: Sampling, room: int = 0, session: Session | None = None):
    """What every generation on this path starts with: the checks, then the prompt's pass (from the session's kept
    prefix, with one). (rng, cache, the first token), or None when no token is asked for; `room`: cache slots past
    prompt + max_new_tokens (drafts)."""
    if not prompt:
        raise UsageError("every prompt needs at least one token")
    total = len(prompt) + s.max_new_tokens
    if total > model.config.max_seq_len:
        raise UsageError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({s.max_new_tokens}) exceeds the model's "
                         f"context of {model.config.max_seq_len} tokens")
    if s.max_new_tokens == 0:
        return None
    rng = np.random.default_rng(s.seed)
    if session is None:
        cache, keep = model.cache(total + room), 0
    else:
        keep = session.start(prompt, total + room)
        cache = session.cache
    return rng, cache, _next(model, prompt[keep:], cache, keep, s, rng)


def _next(model: LiteModel, ids: list[int], cache, start: int, s: Sampling, rng: np.random.Generator) -> int:
    """The token after `ids`, which go into `cache` from slot `start`: the argmax when greedy (LiteModel.greedy),
    else a draw from the last row's logits by Sampling's rule."""
    last = model.hidden(ids, cache, start)[-1:]
    return model.greedy(last)[0] if s.temperature == 0 else draw(probabilities(model.head(last)[0], s), rng)


def stream_tokens(model: LiteModel, prompt: list[int], s: Sampling, session: Session | None = None
                  ) -> Iterator[int]:
    """generate.stream_tokens on this path: the tokens after `prompt`, up to and including a stop token; with a
    `session`, on its cache (see Session)."""
    started = _begin(model, prompt, s, session=session)
    if started is None:
        return
    rng, cache, token = started
    context = list(prompt)
    try:
        for step in range(s.max_new_tokens):
            context.append(token)
            yield token
            if token in s.stop_token_ids or step + 1 == s.max_new_tokens:
                return
            token = _next(model, [token], cache, len(prompt) + step, s, rng)
    finally:  # (also when the caller stops early: a stop string) every token but the last yielded is in the cache
        if session is not None:
            session.ids = context[:-1]


def accept_copied(rows: np.ndarray, s: Sampling, drafts: list[int], rng: np.random.Generator) -> tuple[int, int]:
    """The exact rule of speculative decoding for a deterministic draft (prompt lookup: q one-hot at each drafted
    token), on this path: rows (len(drafts) + 1, vocab) the target's logits at each drafted position and the one
    after, p_i their distributions by Sampling's rule. Each position's token is drawn from p_i with one uniform of
    `rng`, as plain decoding draws it; drafted token x_i is accepted when that draw is x_i (probability p_i(x_i):
    the rule's min(1, p/q)), and a draw that differs is the next token (distributed as p_i without x_i:
    norm(max(0, p - q))); with all accepted a bonus token comes from the last row. The rows' distributions are
    computed as far as they are read. One uniform per token, as plain decoding spends them, so a seed gives plain
    decoding's text however much was drafted. Returns (accepted count, the next token)."""
    for i, x in enumerate(drafts):
        token = draw(probabilities(rows[i], s), rng)
        if token != x:
            return i, token
    return len(drafts), draw(probabilities(rows[len(drafts)], s), rng)


def speculative_tokens(model: LiteModel, prompt: list[int], s: Sampling, lookup, gamma: int = 4,
                       stats=None, session: Session | None = None, every_draft: bool = False) -> Iterator[int]:
    """speculative.speculative_tokens on this path, for prompt lookup's drafts (lookup.Lookup, with or without a
    History): each pass of the model checks up to `gamma` drafted tokens, as many of a draft as are expected to pay
    for their rows (draft_width: the model's measured pass times, how often this generation's drafts from the same
    source were accepted; a draft is checked whole every RECHECK_EVERY cut ones, and until passes of two sizes have
    been timed); `every_draft`: all of every draft. Greedy: the same tokens as plain decoding; sampled with a seed:
    the text plain decoding samples with it (accept_copied), whatever the widths chosen. With a `session`, on its
    cache."""
    if not 1 <= gamma < NATIVE_ROWS:
        raise UsageError(f"gamma (drafted tokens per pass) must be from 1 to {NATIVE_ROWS - 1} here, got {gamma}")
    started = _begin(model, prompt, s, room=gamma, session=session)
    if started is None:
        return
    rng, cache, first = started
    pending, context, produced = [first], list(prompt), 0
    widths = None if every_draft else Widths(model.pass_cost)
    try:
        while True:
            for token in pending:  # the accepted drafts and the next token; the last is not yet in the cache
                context.append(token)
                yield token
                produced += 1
                if stats is not None:
                    stats.tokens += 1
                if token in s.stop_token_ids or produced >= s.max_new_tokens:
                    return
            drafts, source = lookup.draft(context, min(gamma, s.max_new_tokens - produced - 1))
            if widths is not None:
                drafts = drafts[:widths.choose(len(drafts), source)]
            began = time.perf_counter()
            ids = [context[-1], *drafts]
            if s.temperature == 0:  # the rule with one-hot p and q: the argmax prefix
                best = model.greedy(model.hidden(ids, cache, len(context) - 1))
                n = next((i for i, d in enumerate(drafts) if d != best[i]), len(drafts))
                nxt = best[n]
            else:
                n, nxt = accept_copied(model.forward_rows(ids, cache, len(context) - 1), s, drafts, rng)
            if widths is not None:
                widths.observe(len(ids), time.perf_counter() - began, source, len(drafts), n)
            if stats is not None:
                stats.drafted, stats.accepted = stats.drafted + len(drafts), stats.accepted + n
                stats.target_passes += 1
            pending = drafts[:n] + [nxt]
    finally:  # every token but the last yielded is in the cache (slots past it may hold rejected drafts)
        if session is not None:
            session.ids = context[:-1]
