"""Decoding one token with every shape fixed, so that a CUDA graph can replay it (after gpt-fast and vLLM).

On a GPU a small model's decode step is some fifteen kernel launches per block, each a few microseconds of CPU
time for a kernel that runs for less: the GPU waits on Python. `StaticDecode` writes the step so that nothing in it
changes from token to token except the contents of a few tensors (the token ids, the cache slot): keys and values
are written at the slot by `index_copy_`, attention reads the whole cache under a mask built on the device, and
the RoPE rows are gathered by a device index. On CUDA the step is captured once as a CUDA graph and each token
is one `replay`; elsewhere it runs as written (the tests check it there against `generate.decode_one_token`,
which it replaces in `generate.generate_steps`).

    take(model, batch, length, pad) -> StaticDecode | None  (None: the model needs the dynamic step)
    decode.cache                                            (prefill writes the prompt here first)
    decode(token (B,), start: int) -> logits (B, V)         (a buffer the next call overwrites)
    give_back(model, decode)                                (kept for the model's next generation)
    compile_blocks(model)                                   (its later decoders compile their block with inductor)

A capture costs tens of milliseconds, as much as a hundred replays of a small model, so a model keeps its last
decoder (its cache and graph) between generations of the same batch size and a cache length rounded up to
`ROUND` slots: what a later prefill leaves in the slots past its prompt is masked, and every slot before the one
decoded was written by this generation. A decoder is taken while in use (two generations at once get two), and
it is made again when the model's modules or the memory of its tensors changed (an adapter applied, `.to()`):
the graph reads that memory by address.

`compile_blocks(model)` has the model's later decoders run each block through `torch.compile` (inductor fuses the
norms, RoPE and SwiGLU's elementwise kernels: fewer, larger kernels in the graph). One compiled function serves
every block (PyTorch's regional compilation: the blocks' weights are its inputs, the block's cache is passed as its
own pair of tensors), so the compile costs one block's, seconds rather than the whole step's tens of seconds. A
second batch size or cache length compiles once more, for sizes given at run time (torch.compile's automatic
dynamic shapes), which later sizes reuse.
"""

from __future__ import annotations

import weakref

import torch

from mightylm.model import KVCache, Transformer, rope_regime

ROUND = 256


class _SlotCache:
    """The cache interface a block calls, writing at a slot held in a device tensor: `update` puts the new keys
    and values at `slot` into this block's buffers and returns them whole (the mask hides the slots not yet
    written). One per block, holding only that block's tensors: a compiled block reads no layer index."""

    def __init__(self, K: torch.Tensor, V: torch.Tensor, slot: torch.Tensor):
        self.K, self.V, self.slot = K, V, slot

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        self.K.index_copy_(2, self.slot, k)
        self.V.index_copy_(2, self.slot, v)
        return self.K, self.V


def _run_block(block, x, cos, sin, mask, cache):
    return block(x, cos, sin, mask, cache, 0)


_compiled_block = None  # torch.compile(_run_block), made at the first compiled decoder (compiling imports inductor)


def _block_runner(compiled: bool):
    global _compiled_block
    if not compiled:
        return _run_block
    if _compiled_block is None:
        _compiled_block = torch.compile(_run_block, fullgraph=True)
    return _compiled_block


class StaticDecode:
    """`decode_one_token(model, token, cache, start, pad)` with its shapes fixed by `cache` (any generation that
    fits it: `set_pad` gives each its padding).

    Each call costs attention over all of the cache's slots (masked), not only the filled ones: for the lengths one
    generation holds this is small next to reading the weights. On CUDA the first call captures the step as a
    CUDA graph (after two warm-up runs on a side stream, which write the same slot the call then writes) and
    every call replays it."""

    def __init__(self, model: Transformer, cache: KVCache, pad: torch.Tensor | None, compiled: bool = False):
        device, B, L = model.device, cache.batch_size, cache.max_len
        self._model, self.cache = weakref.ref(model), cache  # weak: a model's kept decoder must not keep it alive
        self.layout, self.compiled = _layout(model), compiled
        self.token = torch.zeros(B, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.pad = torch.zeros(B, dtype=torch.long, device=device)
        self.keys = torch.arange(L, device=device)
        self.valid = torch.ones(B, 1, 1, L, dtype=torch.bool, device=device)  # (B, 1, 1, L): not padding
        self.set_pad(pad)
        cos, sin = model.rope(L, device)  # made now: the graph reads these very tensors
        self.cos, self.sin = cos.to(model.dtype), sin.to(model.dtype)
        self.window = model.config.sliding_window
        self.slots = [_SlotCache(K, V, self.slot) for K, V in zip(cache.k, cache.v)]
        self.run_block = _block_runner(compiled)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def set_pad(self, pad: torch.Tensor | None) -> None:
        """Each row's count of left-padding slots (None: none), written into the tensors the step reads."""
        if pad is None:
            self.pad.zero_()
        else:
            self.pad.copy_(pad)
        self.valid.copy_((self.keys[None, :] >= self.pad[:, None])[:, None, None, :])

    def _step(self) -> torch.Tensor:
        model = self._model()
        position = (self.slot - self.pad).clamp(min=0)  # (B,) RoPE positions, after each row's padding
        cos, sin = self.cos[position][:, None, None], self.sin[position][:, None, None]  # (B, 1, 1, hs)
        mask = self.valid & (self.keys <= self.slot)  # (B, 1, 1, L): causal over the slots written
        if self.window is not None:
            mask = mask & (self.keys > self.slot - self.window)
        x = model.embed(self.token[:, None])
        for layer, cache in zip(model.layers, self.slots):
            x = self.run_block(layer, x, cos, sin, mask, cache)
        return model.head(model.norm(x))[:, -1]

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (allocator pools, library handles)
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def __call__(self, token: torch.Tensor, start: int) -> torch.Tensor:
        """Logits (B, V) of `token` (B,) at cache slot `start`, which it writes; on CUDA a buffer that the next
        call overwrites (sample from it first)."""
        if start >= self.cache.max_len:
            raise ValueError(f"KV cache overflow: position {start + 1} > cache length {self.cache.max_len}")
        self.token.copy_(token)
        self.slot.fill_(start)
        if self.token.device.type != "cuda":
            return self._step()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits


def _layout(model: Transformer) -> tuple:
    """What a captured step depends on beyond the contents of tensors: the modules, where their tensors live, and
    the config (another RoPE scaling makes other tables)."""
    return (tuple(map(id, model.modules())), tuple(t.data_ptr() for t in model.parameters()),
            tuple(t.data_ptr() for t in model.buffers()), model.dtype, model.config)


def fixed_shape(model: Transformer, length: int) -> bool:
    """Whether a decode step over a full cache of `length` slots can be fixed: not with virtual tokens (prompt
    tuning), experts (their routing picks experts on the CPU), a RoPE table that depends on the length (dynamic
    NTK, LongRoPE's switch inside the cache), or a CPU decode layout (native blocks read the filled prefix)."""
    config = model.config
    if model.prefix_len or config.n_experts or model.fused_decode is not None:
        return False
    if any(block.fused_decode is not None for block in model.layers):
        return False
    return rope_regime(config, 1) == rope_regime(config, length)


_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its last StaticDecode, while not in use
_COMPILE: weakref.WeakSet = weakref.WeakSet()  # models whose decoders compile their block (compile_blocks)


def compile_blocks(model: Transformer, on: bool = True) -> None:
    """Have `model`'s later decoders run every block through one `torch.compile`d function (off with on=False)."""
    if on:
        _COMPILE.add(model)
    else:
        _COMPILE.discard(model)


def take(model: Transformer, batch: int, length: int, pad: torch.Tensor | None) -> StaticDecode | None:
    """A StaticDecode for `batch` rows of up to `length` slots (the model's kept one where it fits, else a new one
    over a new cache of `length` rounded up to ROUND), or None where the step cannot be fixed (`fixed_shape`)."""
    slots = -(-length // ROUND) * ROUND
    if not fixed_shape(model, slots):
        slots = length
        if not fixed_shape(model, slots):
            return None
    compiled = model in _COMPILE
    kept = _KEPT.pop(model, None)
    if kept is not None and kept.cache.batch_size == batch and kept.cache.max_len == slots \
            and kept.layout == _layout(model) and kept.compiled == compiled:
        kept.set_pad(pad)
        return kept
    return StaticDecode(model, model.make_cache(batch, slots), pad, compiled)


def give_back(model: Transformer, decoder: StaticDecode) -> None:
    """Keep `decoder` for the model's next generation (the last one given back wins)."""
    _KEPT[model] = decoder
