"""The Llama-family decoder (Llama, Mistral, Qwen2, Phi-2, Phi-3; Mixtral, Qwen2-MoE and OLMoE with moe.py) in one
file.

RMSNorm -> grouped-query attention with RoPE -> RMSNorm -> SwiGLU, repeated, then a final norm and
the LM head. Module names follow Hugging Face's leaf names (`q_proj`, `gate_proj`, ...) so that the
checkpoint maps in `checkpoint.py` stay trivial and techniques can target layers by those names.

Seams for later techniques:
- The model in named parts: `inputs(idx | embeds, pad, start)` (embedding + virtual-token prefix),
  `trunk(x, cache, start, pad) -> h` (blocks + final norm), `head(h)` (logits) and `loss(h, labels)`;
  `forward` is their composition. Distillation and recurrent memory read `h`, the vision model feeds
  `embeds`, speculation verifies with `trunk` + `head`: they call the parts, forward gains no keywords.
- `Transformer.prefix`: a module returning (P, dim) virtual-token embeddings that enter before
  every sequence (prompt tuning, P-tuning). The model places them after each row's left padding,
  shifts cache slots by P, and returns logits for the real tokens only, so callers never see them.
- `Attention.attend(q, k, v, mask)`: the one method an attention adapter wraps.
- `Block.mlp` is built by `make_mlp(config, layer_idx)`: the mixture-of-experts feed-forward (moe.MoE) plugs in
  there for the sparse layers of a config with `n_experts`.
- Architecture axes of the config enter as follows: `n_kv_heads` (grouped-query attention in `attend`),
  `qkv_bias`, `o_bias`, `head_bias` (Linear biases), `norm` (`make_norm`: RMSNorm or LayerNorm), `parallel_block`
  (`Block.forward`: attention and MLP from one norm, summed), `mlp_act` (`make_mlp`: SwiGLU or Phi-2's GELU MLP),
  `partial_rotary_factor` (`apply_rope` turns the first `rotary_dim` dimensions of each head), `qk_norm` and
  `clip_qkv` (OLMoE: `Attention.forward` before the heads split), `sliding_window` (the mask), `rope_scaling` (ROPE_SCALINGS), `tie_embeddings` (the head shares the
  table), `n_experts` and friends (`make_mlp`).
- RoPE scalings are a table, `ROPE_SCALINGS` (linear, dynamic NTK, YaRN, llama3, LongRoPE); initialisation finds residual projections by leaf name.
- The KV cache is a `KVCache` object passed to `forward`, not state hidden in the modules. `Segments` passed as
  `trunk`'s cache runs several batches, each on its own cache, in one pass (a server's decode step carrying a
  chunk of a long prompt): the projections see all their tokens at once, attention is per segment.
- `Block.fused_decode`: a callable the decode layout (fuse.py) sets to run a whole block natively for
  one token of one sequence; the block falls back to its modules wherever it returns None. `Transformer.fused_decode`
  (likewise) runs every block in one native call.
- `Transformer.loss` (and `forward(idx, labels=...)`) computes the training loss through
  `linear_cross_entropy`, which never holds the (B*T, vocab) logits at once.

This file imports only torch, `mightylm.config` and `mightylm.moe` (which imports neither it nor anything else of
ours: it is handed the expert class).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mightylm.config import ModelConfig, parse_rope_scaling
from mightylm.moe import MoE

IGNORE_INDEX = -100  # label of positions that are not scored (PyTorch's and Hugging Face's convention)
RESIDUAL_PROJECTIONS = ("o_proj", "down_proj")  # leaf names of the layers that write into the residual stream


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32 like the reference."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.normalize = None  # a callable (x, weight, eps) -> F.rms_norm's result with its own backward, set by fit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            if self.normalize is not None:
                return self.normalize(x, self.weight, self.eps)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Half precision: normalise in float32, cast back, then scale (transformers' order).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    """The block and final norms: RMSNorm, or LayerNorm with a bias (Phi-2; config.norm == "layer")."""
    if config.norm == "layer":
        return nn.LayerNorm(config.dim, eps=config.norm_eps)
    return RMSNorm(config.dim, config.norm_eps)


# RoPE scalings, by `rope_scaling["type"]`: f(inverse frequencies theta^(-2i/d), the scaling's settings, the config,
# the sequence's length) -> (scaled inverse frequencies, attention factor). The attention factor multiplies the cos
# and sin tables (YaRN's "mscale", LongRoPE's), as transformers does. Each follows transformers'
# modeling_rope_utils (tests compare inverse frequencies, factors and whole-model logits); the config's dict holds
# every setting with its default filled in (config.ROPE_SCALING_KEYS).

def _linear_scaling(inv_freq: torch.Tensor, s: dict, config: ModelConfig, seq_len: int):
    """Position interpolation (Chen et al. 2023): every frequency divided by `factor`."""
    return inv_freq / s["factor"], 1.0


def _dynamic_scaling(inv_freq: torch.Tensor, s: dict, config: ModelConfig, seq_len: int):
    """Dynamic NTK (bloc97, emozilla 2023): unscaled up to the trained length L; past it the base grows with the
    sequence, theta' = theta (factor T / L - (factor - 1))^(d / (d - 2)), recomputed as T grows."""
    L, factor, d = s["original_max_position_embeddings"], s["factor"], config.rotary_dim
    if seq_len <= L:
        return inv_freq, 1.0
    base = config.rope_theta * (factor * seq_len / L - (factor - 1)) ** (d / (d - 2))
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)), 1.0


def _yarn_scaling(inv_freq: torch.Tensor, s: dict, config: ModelConfig, seq_len: int):
    """YaRN (Peng et al. 2023, eqs. 17-23): dimensions that turn fewer than beta_slow times over the original
    length L are interpolated (divided by `factor`), those that turn more than beta_fast times are kept, a linear
    ramp in between; the attention factor is 0.1 ln(factor) + 1 (or mscale / mscale_all_dim's ratio) unless
    given."""
    d, base, factor, L = config.rotary_dim, config.rope_theta, s["factor"], s["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s["attention_factor"]
    if attention is None:
        attention = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"]) \
            if s["mscale"] and s["mscale_all_dim"] else mscale(factor)

    def dimension(rotations: float) -> float:  # the dimension that turns `rotations` times over L
        return d * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension(s["beta_fast"]), dimension(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # no division by zero
    kept = 1 - ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # 1: extrapolate
    return inv_freq / factor * (1 - kept) + inv_freq * kept, attention


def _llama3_scaling(inv_freq: torch.Tensor, s: dict, config: ModelConfig, seq_len: int):
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between."""
    factor, old_len = s["factor"], s["original_max_position_embeddings"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled), 1.0


def _longrope_scaling(inv_freq: torch.Tensor, s: dict, config: ModelConfig, seq_len: int):
    """LongRoPE (Ding et al. 2024; Phi-3): each dimension's frequency divided by its own factor, the short list up
    to the original length L and the long one past it; attention factor sqrt(1 + ln(factor) / ln(L)) unless
    given, factor defaulting to the context over L. (A GGUF file's rope_freqs, llama.cpp's per-dimension
    divisors, read as both lists with attention factor 1.)"""
    L = s["original_max_position_embeddings"]
    factor = s["factor"] or config.max_seq_len / L
    attention = s["attention_factor"]
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(L))
    divisors = s["long_factor"] if seq_len > L else s["short_factor"]
    return inv_freq / torch.tensor(divisors, dtype=torch.float32), attention


ROPE_SCALINGS = {"linear": _linear_scaling, "dynamic": _dynamic_scaling, "yarn": _yarn_scaling,
                 "llama3": _llama3_scaling, "longrope": _longrope_scaling}


def rope_frequencies(config: ModelConfig, seq_len: int = 0) -> tuple[torch.Tensor, float]:
    """(inverse frequencies theta^(-2i/d) with the config's RoPE scaling applied, attention factor) for a sequence
    of `seq_len` positions (dynamic NTK and LongRoPE depend on it)."""
    d = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = config.rope_scaling or {}
    if scaling.get("type") is None:
        return inv_freq, 1.0
    return ROPE_SCALINGS[scaling["type"]](inv_freq, scaling, config, seq_len)


def rope_regime(config: ModelConfig, seq_len: int):
    """What the RoPE table of a sequence of `seq_len` positions depends on beyond the config: the length itself
    past the trained one for dynamic NTK, short or long for LongRoPE, nothing (None) otherwise."""
    scaling = config.rope_scaling or {}
    kind, L = scaling.get("type"), scaling.get("original_max_position_embeddings", 0)
    if kind == "dynamic":
        return seq_len if seq_len > L else None
    if kind == "longrope":
        return seq_len > L
    return None


def rope_cos_sin(config: ModelConfig, max_len: int, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed-sin tables (max_len, rotary_dim) for the rotate-half layout of HF checkpoints, for a sequence
    of `seq_len` positions (default max_len), times the scaling's attention factor.

    Rotate-half RoPE is x*cos + cat(-x2, x1)*sin. With the sign folded into the table
    (sin_signed = cat(-sin, sin)) it becomes x*cos + roll(x, hs/2)*sin_signed: fewer ops per
    call and bit-identical results (negation is exact).
    """
    inv_freq, attention = rope_frequencies(config, max_len if seq_len is None else seq_len)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, hs/2)
    cos, sin = torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
    if attention != 1.0:
        cos, sin = cos * attention, sin * attention
    return cos, sin


def set_rope_scaling(model: "Transformer", scaling: str | dict | None) -> str:
    """Give a loaded model another RoPE scaling ("yarn:4", "linear:2", "dynamic:2", a scaling dict, or "none"), its
    context growing by the factor over the length it was trained at (the current scaling's original length, else
    its context). The cos/sin tables are made again on the next call. Returns what changed, to be said."""
    old = model.config
    trained = (old.rope_scaling or {}).get("original_max_position_embeddings") or old.max_seq_len
    new = parse_rope_scaling(scaling, trained)
    context = trained if new is None else int(round(trained * new["factor"])) if new.get("factor") else old.max_seq_len
    model.config = dataclasses.replace(old, rope_scaling=new, max_seq_len=max(context, trained))  # only it holds it
    model._rope_len, model._rope_regime = 0, None

    def name(s):
        return "none" if s is None else f"{s['type']}" + (f" x{s['factor']:g}" if s.get("factor") else "")
    return (f"RoPE scaling {name(old.rope_scaling)} -> {name(new)} (trained length {trained}); context "
            f"{old.max_seq_len} -> {model.config.max_seq_len} tokens")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hs); cos, sin_signed: (B|1, 1, T, rd). With partial rotary embeddings (rd < hs) only the first rd
    dimensions of each head turn; the rest pass through."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + x.roll(rd // 2, dims=-1) * sin_signed
    turned = x[..., :rd]
    return torch.cat((turned * cos + turned.roll(rd // 2, dims=-1) * sin_signed, x[..., rd:]), dim=-1)


def _lazy_zeros(shape, dtype, device) -> torch.Tensor:
    """torch.zeros, but on the CPU an anonymous memory map: pages the OS zero-fills on first touch, 4 KiB at a time,
    instead of every byte written now (torch.zeros) or 2 MiB huge pages faulted by the first write into each
    (numpy.zeros asks for those): untouched slots of a KV cache then cost no resident memory. The map is freed
    with the tensor. Measured: a 16 x 1024-slot pool after one 16-row prefill of 42 tokens, 1,123 -> 551 MiB."""
    if device is not None and torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import mmap

    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=dtype, count=count).view(shape)


class KVCache:
    """A static key/value cache: one preallocated (B, n_kv, max_len, hd) buffer per layer.

    `update` writes the new keys and values at the given slots and returns views of everything
    written so far, so attention at decode time reads only the filled prefix. On the CPU the buffers are zeros
    whose pages the OS maps on first write (`_lazy_zeros`), so a server's pool of max_batch x max_len slots
    holds memory for the tokens written, not for its whole size.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, *, dtype=torch.float32, device=None):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = [_lazy_zeros(shape, dtype, device) for _ in range(config.n_layers)]
        self.v = [_lazy_zeros(shape, dtype, device) for _ in range(config.n_layers)]
        self.max_len = max_len
        self.batch_size = batch_size

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: position {end} > cache length {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class KVRows:
    """Rows a..b-1 of a KVCache (a server's pool), with the cache interface the model calls: several sequences
    decoded together, each in its own row."""

    def __init__(self, pool: KVCache, a: int, b: int):
        self.pool, self.a, self.b = pool, a, b

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        K, V = self.pool.k[layer], self.pool.v[layer]
        K[self.a:self.b, :, start:end] = k
        V[self.a:self.b, :, start:end] = v
        return K[self.a:self.b, :, :end], V[self.a:self.b, :, :end]


class RollingKVCache:
    """A sliding-window model's KV cache that keeps only the last `window` positions (Mistral's rolling buffer), so
    its memory stays constant however long the generation: position p lives in slot p % window.

    Decoding one token attends over the whole buffer, in slot order (softmax does not depend on the order, and every
    position kept is inside the window; no mask). Several new tokens at once (a prompt, a chunk) attend over the
    positions kept before them, gathered in order, and over themselves, under the window mask `mask` gives; the
    last `window` of them are then kept. One sequence per row, no left padding.
    """

    def __init__(self, config: ModelConfig, batch_size: int, window: int, *, dtype=torch.float32, device=None):
        shape = (batch_size, config.n_kv_heads, window, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.window, self.batch_size = window, batch_size

    def _kept(self, start: int) -> torch.Tensor:
        """The positions before `start` that a query at `start` may still see, oldest first."""
        return torch.arange(max(0, start - self.window + 1), start)

    def mask(self, start: int, T: int, device) -> torch.Tensor | None:
        """(1, 1, T, kept + T) for the queries start..start+T-1 over [the kept positions, the new ones]; None for
        one token."""
        if T == 1:
            return None
        keys = torch.cat([self._kept(start), torch.arange(start, start + T)]).to(device)
        queries = torch.arange(start, start + T, device=device)
        return ((keys[None, :] <= queries[:, None]) & (keys[None, :] > queries[:, None] - self.window))[None, None]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        K, V, T, W = self.k[layer], self.v[layer], k.shape[2], self.window
        if T == 1:
            K[:, :, start % W], V[:, :, start % W] = k[:, :, 0], v[:, :, 0]
            n = min(start + 1, W)
            return K[:, :, :n], V[:, :, :n]
        slots = self._kept(start) % W
        keys, values = torch.cat([K[:, :, slots], k], dim=2), torch.cat([V[:, :, slots], v], dim=2)
        keep = min(T, W)
        slots = torch.arange(start + T - keep, start + T) % W
        K[:, :, slots], V[:, :, slots] = k[:, :, T - keep:], v[:, :, T - keep:]
        return keys, values


class SinkKVCache:
    """StreamingLLM's cache (Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks") for models
    without a sliding window: the first `sinks` positions (the "attention sinks" that softmax leans on) and the most
    recent ones, `size` slots in all, so memory stays constant however long the text. As the paper does, positions
    are those within the cache, not in the text: keys are kept before RoPE and rotated at their place in the cache
    at every step (sinks 0..S-1, then the recent ones in order), and a query takes the place after them, so RoPE never
    sees a distance the model was not trained on. One sequence per row, no padding; after the first `size` tokens,
    one token per call.
    """

    raw_keys = True  # Attention hands over keys before RoPE; `update` rotates them

    def __init__(self, config: ModelConfig, batch_size: int, size: int, sinks: int = 4, *, dtype=torch.float32,
                 device=None):
        if not 0 <= sinks < size - 1:
            raise ValueError(f"attention sinks: {sinks} sinks need a cache of more than {sinks + 1} slots, got {size}")
        shape = (batch_size, config.n_kv_heads, size, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.size, self.sinks, self.batch_size = size, sinks, batch_size
        cos, sin = rope_cos_sin(config, size)
        self.cos, self.sin = cos.to(device, dtype)[None, None], sin.to(device, dtype)[None, None]  # (1, 1, size, hs)

    def position(self, start: int) -> int:
        """The cache position of the token at text position `start`: itself until the cache is full, then the last."""
        return min(start, self.size - 1)

    def _slot(self, p: int) -> int:
        S = self.sinks
        return p if p < S else S + (p - S) % (self.size - S)

    def _order(self, end: int) -> torch.Tensor:
        """Slots of the positions kept once text positions < `end` are in, sinks first, then oldest to newest."""
        if end <= self.size:
            return torch.arange(end)
        recent = range(end - (self.size - self.sinks), end)
        return torch.tensor([*range(self.sinks), *(self._slot(p) for p in recent)])

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        T = k.shape[2]
        if T > 1 and start + T > self.size:
            raise ValueError(f"attention sinks: {start + T} positions at once exceed the cache's {self.size}; feed "
                             "the rest one token at a time")
        slots = torch.tensor([self._slot(p) for p in range(start, start + T)])
        self.k[layer][:, :, slots], self.v[layer][:, :, slots] = k, v
        order = self._order(start + T)
        n = len(order)
        keys = apply_rope(self.k[layer][:, :, order], self.cos[:, :, :n], self.sin[:, :, :n])
        return keys, self.v[layer][:, :, order]


@dataclass
class Segment:
    """One batch of a `Segments` pass: `rows` rows of `tokens` new tokens each, written at slots start.. of `cache`
    (anything with KVCache's `update`), `pad` (rows,) left-padding slots per row as in `forward`."""

    cache: object
    start: int
    rows: int
    tokens: int
    pad: torch.Tensor | None = None


class Segments:
    """Several independent batches in one forward pass: a server's decode step (its rows, one token each, on the
    pool) and a chunk of a long prompt being prefilled (one row on its own cache), say. Pass it as `trunk`'s
    `cache` with an input of shape (N, 1, dim): the segments' tokens one per row, segment by segment, row-major
    within each. Every projection then runs once over all N tokens (per-row adapters see one row per token); only
    attention is done per segment, on its own cache, with its own slots, padding, RoPE positions and mask, so each
    segment computes what it would alone."""

    def __init__(self, segments: list[Segment]):
        self.parts = segments
        self.tokens = sum(s.rows * s.tokens for s in segments)

    def attend(self, attn: "Attention", q, k, v, masks: list) -> torch.Tensor:
        """q (N, nh, 1, hs), k and v (N, nkv, 1, hs) after RoPE -> the attention output (N, nh, 1, hs)."""
        out, a = [], 0
        for s, mask in zip(self.parts, masks):
            b = a + s.rows * s.tokens
            split = lambda t: t[a:b, :, 0].view(s.rows, s.tokens, t.shape[1], -1).transpose(1, 2)  # noqa: E731
            keys, values = s.cache.update(attn.layer_idx, s.start, split(k), split(v))
            y = attn.attend(split(q), keys, values, mask)  # (rows, nh, tokens, hs)
            out.append(y.transpose(1, 2).reshape(b - a, y.shape[1], 1, y.shape[3]))
            a = b
        return torch.cat(out)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        bias = config.qkv_bias
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=config.o_bias)
        if config.qk_norm:  # OLMoE: over the whole projections, before the heads split
            self.q_norm = RMSNorm(config.n_heads * config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.n_kv_heads * config.head_dim, config.norm_eps)
        self.clip_qkv = config.clip_qkv
        self.fused_qkv = None  # a callable x -> cat(q, k, v), set by fuse.fuse_projections_

    def forward(self, x, cos, sin, mask, cache: KVCache | None, start: int):
        B, T, _ = x.shape
        if self.fused_qkv is not None:  # one matmul instead of three (decode speed)
            q, k, v = self.fused_qkv(x).split(
                [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        if not getattr(cache, "raw_keys", False):  # SinkKVCache rotates keys at their place in the cache itself
            k = apply_rope(k, cos, sin)
        if isinstance(cache, Segments):  # each segment's rows attend over their own cache
            y = cache.attend(self, q, k, v, mask)
        else:
            if cache is not None:
                k, v = cache.update(self.layer_idx, start, k, v)  # (B, nkv, S, hs), S = start + T
            y = self.attend(q, k, v, mask)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def attend(self, q, k, v, mask):
        """Scaled dot-product attention; `mask` is None (causal, no cache offset), a bool (B|1, 1, T, S), or a
        DocumentMask (packed training rows)."""
        gqa = self.n_heads != self.n_kv_heads
        if isinstance(mask, DocumentMask):
            return mask.attend(q, k, v, gqa)
        if mask is None:
            causal = q.shape[2] > 1
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


@dataclass(frozen=True)
class DocumentMask:
    """Causal attention within each document of packed rows: `spans[b]` lists row b's documents as (start, end)
    slots. Each document is attended to by its own causal SDPA call, which never forms the (T, T) scores of the
    whole row (an explicit block-diagonal mask sends SDPA down its math path: measured on SmolLM2-135M with rows
    of 1024 tokens, several GB of saved attention weights)."""

    spans: tuple[tuple[tuple[int, int], ...], ...]
    window: int | None = None

    @classmethod
    def of(cls, documents: torch.Tensor, window: int | None = None) -> DocumentMask:
        T = documents.shape[1]
        spans = []
        for row in documents.tolist():
            starts = [0] + [t for t in range(1, T) if row[t] != row[t - 1]]
            spans.append(tuple(zip(starts, starts[1:] + [T])))
        return cls(tuple(spans), window)

    def positions(self, device) -> torch.Tensor:
        """(B, T) each token's position within its document: 0 where a document starts, counting up from there."""
        return torch.stack([torch.cat([torch.arange(end - start, device=device) for start, end in spans])
                            for spans in self.spans])

    def attend(self, q, k, v, gqa: bool) -> torch.Tensor:
        """(B, nh, T, hs) from q (B, nh, T, hs), k and v (B, nkv, T, hs)."""
        rows = []
        for b, spans in enumerate(self.spans):
            parts = []
            for start, end in spans:
                qs, ks, vs = q[b:b + 1, :, start:end], k[b:b + 1, :, start:end], v[b:b + 1, :, start:end]
                n = end - start
                if self.window is not None and n > self.window:
                    slots = torch.arange(n, device=q.device)
                    mask = (slots[None, :] <= slots[:, None]) & (slots[None, :] > slots[:, None] - self.window)
                    parts.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=gqa))
                else:
                    parts.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=n > 1, enable_gqa=gqa))
            rows.append(torch.cat(parts, dim=2))
        return torch.cat(rows, dim=0)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)); `ffn_dim` (default config.ffn_dim) wide,
    which the experts of a mixture set to their own size."""

    def __init__(self, config: ModelConfig, ffn_dim: int | None = None):
        super().__init__()
        ffn_dim = ffn_dim or config.ffn_dim
        self.gate_proj = nn.Linear(config.dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, config.dim, bias=False)
        self.fused_gate_up = None  # a callable x -> cat(gate, up), set by fuse.fuse_projections_
        self.act_mul = None  # a callable (gate, up) -> silu(gate) * up with its own backward, set by train.fit

    def forward(self, x):
        if self.fused_gate_up is not None:
            gate, up = self.fused_gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up if self.act_mul is None else self.act_mul(gate, up))


class GeluMLP(nn.Module):
    """Phi-2's feed-forward: down(gelu_tanh(up(x))), with biases (Hugging Face's fc1 = up_proj, fc2 = down_proj)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.dim, config.ffn_dim)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


def make_mlp(config: ModelConfig, layer_idx: int) -> nn.Module:
    """The feed-forward of block `layer_idx`: a mixture of SwiGLU experts in the sparse layers of a
    mixture-of-experts config (moe.py; Qwen2-MoE keeps some layers dense, hence the index), a GELU MLP for Phi-2,
    else one SwiGLU."""
    if config.sparse_layer(layer_idx):
        return MoE(config, MLP)
    if config.mlp_act == "gelu":
        return GeluMLP(config)
    return MLP(config)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx)
        # Phi-2 runs attention and MLP side by side from attn_norm's output: no second norm
        self.mlp_norm = None if config.parallel_block else make_norm(config)
        self.mlp = make_mlp(config, layer_idx)
        # (x, cos, sin, cache, start, mask) -> x after this block for one or a few tokens of one sequence, or None
        # where it does not apply; set by fuse.fuse_projections_ (one native call instead of ~25 small operations).
        self.fused_decode = None

    def forward(self, x, cos, sin, mask, cache, start):
        if self.fused_decode is not None and (mask is None or x.shape[1] > 1):  # it checks a few rows' mask itself
            y = self.fused_decode(x, cos, sin, cache, start, mask)
            if y is not None:
                return y
        if self.mlp_norm is None:  # parallel block
            h = self.attn_norm(x)
            return x + self.attn(h, cos, sin, mask, cache, start) + self.mlp(h)
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config)
        # (x, cos, sin, cache, start, mask) -> x after every block, or None; set by fuse.fuse_projections_
        self.fused_decode = None
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=config.head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.prefix: nn.Module | None = None  # () -> (P, dim) virtual tokens; set by adapters.prompt
        # What in-place transforms did to this model, in order: {"kind": "quantize" | "lora" | "prompt" |
        # "llama_adapter" | ..., its settings}. Every transform records itself here; `save` writes the list into
        # the checkpoint's metadata and `load` replays it. Values the modules hold (a LoRA rank, a prompt's
        # length) are read from the modules, not from here.
        self.transforms: list[dict] = []
        # Where the loss keeps its chunk buffers from one call to the next (`linear_cross_entropy`), or None: set
        # by train.fit while it trains on the CPU.
        self.loss_workspace: dict | None = None
        # (logits, labels, scale) -> their summed cross-entropy, the logits turned into its gradient in place, or
        # None where it declines: the loss's softmax step in one native pass, set by train.fit on the CPU.
        self.softmax_grad = None
        self._rope_len = 0
        self._rope_regime = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 style init for training from scratch: N(0, 0.02) everywhere, with the two
        projections that write into the residual stream scaled by 1/sqrt(2 * n_layers) (GPT-2
        paper, section 2.3). Skipped on the meta device, where checkpoints are loaded: their tensors are
        assigned, and the first meta-device `normal_` of a process costs ~2.5 s of PyTorch's own set-up."""
        if self.embed.weight.is_meta:
            return
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                residual = name.rpartition(".")[2] in RESIDUAL_PROJECTIONS
                scale = (2 * self.config.n_layers) ** -0.5 if residual else 1.0
                nn.init.normal_(module.weight, std=0.02 * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def applied(self, kind: str) -> dict | None:
        """The record of the last `kind` transform applied to this model, or None."""
        return next((t for t in reversed(self.transforms) if t["kind"] == kind), None)

    def record_transform(self, kind: str, **settings) -> None:
        self.transforms.append({"kind": kind, **settings})

    def forget_transform(self, kind: str) -> None:
        """Drop the records of `kind` (the transform was undone: dequantized, merged and stripped)."""
        self.transforms = [t for t in self.transforms if t["kind"] != kind]

    @property
    def quantization(self) -> dict | None:
        """What quantization was applied ({"method", its settings, "modules"}), read from `transforms`."""
        record = self.applied("quantize")
        return None if record is None else {k: v for k, v in record.items() if k != "kind"}

    @property
    def dtype(self) -> torch.dtype:
        """The precision of the activations: the embedding table's (a table kept as GGUF blocks says its own)."""
        return self.embed.dtype if hasattr(self.embed, "blocks") else self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device if hasattr(self.embed, "blocks") else self.embed.weight.device

    @property
    def head_shares_embedding(self) -> bool:
        """The head is the embedding table (tied, and not replaced by a quantized copy)."""
        return self.config.tie_embeddings and isinstance(self.lm_head, nn.Linear)

    def tie_weights(self):
        """Re-share the head with the embedding (needed after `load_state_dict(assign=True)`)."""
        if self.head_shares_embedding:
            self.lm_head.weight = self.embed.weight

    @property
    def prefix_len(self) -> int:
        """Virtual tokens placed before every sequence (0 without prompt tuning)."""
        return 0 if self.prefix is None else self.prefix.n_tokens

    def make_cache(self, batch_size: int, length: int, *, dtype=None, device=None,
                   rolling: bool = False) -> KVCache | RollingKVCache:
        """A KV cache for `length` real tokens per row (room for the virtual ones is added); `rolling`, for a
        sliding-window model: a RollingKVCache of the window's size, whatever `length` is."""
        dtype = dtype or self.dtype
        device = device or self.device
        if rolling:
            if self.config.sliding_window is None:
                raise ValueError("a rolling KV cache is for sliding-window models; this one attends to every position")
            return RollingKVCache(self.config, batch_size, self.config.sliding_window, dtype=dtype, device=device)
        return KVCache(self.config, batch_size, length + self.prefix_len, dtype=dtype, device=device)

    def rope(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables covering `length` positions of a sequence that long, grown (doubling) and cached as
        needed, and made again when the scaling's regime changes (dynamic NTK past the trained length: every
        length; LongRoPE: short or long). Keys already in a KV cache keep the rotation they were made with, as in
        transformers."""
        regime = rope_regime(self.config, length)
        if length > self._rope_len or regime != self._rope_regime or self._rope_cos.device != torch.device(device):
            size = max(length, 2 * self._rope_len if regime == self._rope_regime else 0, 256)
            cos, sin = rope_cos_sin(self.config, size, seq_len=length)
            self._rope_cos, self._rope_sin, self._rope_len = cos.to(device), sin.to(device), size
            self._rope_regime = regime
        return self._rope_cos, self._rope_sin

    def fresh_sequence(self, T: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What `trunk` calls each block with for a fresh, unpadded sequence of T tokens: the RoPE tables
        (1, 1, T, hs) and the mask (None where plain causal attention is exact). For techniques that run blocks one
        at a time (pruning's calibration)."""
        cos, sin = self.rope(T, device)
        mask = self._mask(torch.arange(T, device=device), T, None, device)
        return cos[:T][None, None].to(dtype), sin[:T][None, None].to(dtype), mask

    # ---- the model in named parts: forward = head(trunk(inputs(...))) or loss(trunk(inputs(...)), labels) ----

    def inputs(self, idx: torch.Tensor | None = None, *, embeds: torch.Tensor | None = None,
               pad: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """The trunk's input (B, T', dim): the embeddings of token ids `idx` (B, T), or `embeds` (B, T, dim) as
        given, with the virtual-token prefix (prompt tuning) put in front of each row's tokens (after its left
        padding) when a sequence starts (start == 0): T' = P + T then, else T."""
        if (idx is None) == (embeds is None):
            raise ValueError("pass exactly one of idx (token ids) or embeds (input embeddings)")
        x = self.embed(idx) if embeds is None else embeds
        if self.prefix_len and start == 0:
            x = _insert_prefix(x, self.prefix().to(x.dtype), pad)  # (B, P + T, dim)
        return x

    def trunk(self, x: torch.Tensor, *, cache: KVCache | None = None, start: int = 0,
              pad: torch.Tensor | None = None, last_only: bool = False,
              documents: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks and the final norm over `x` from `inputs` (same `start` and `pad`): hidden states (B, T, dim)
        lined up with the caller's tokens (virtual tokens dropped), or (B, 1, dim) with `last_only`.
        `documents` (B, T): packed rows, see `forward`. `cache` may be `Segments` (x (N, 1, dim); start, pad and
        last_only unused: each segment has its own)."""
        if documents is not None:
            return self._packed_trunk(x, documents, last_only)
        if isinstance(cache, Segments):
            return self._segments_trunk(x, cache)
        P = self.prefix_len
        with_prefix = P > 0 and start == 0  # a fresh sequence: `inputs` put the virtual tokens in
        if P and not with_prefix:
            start += P  # a later call (decoding): this sequence's cache slots sit behind its virtual tokens
        B, T, _ = x.shape
        if isinstance(cache, SinkKVCache):  # queries sit at their place in the cache, not in the text
            if pad is not None or P:
                raise ValueError("attention sinks hold one unpadded sequence per row, without a soft prompt")
            first = cache.position(start)  # several tokens at once only while they fit: then first == start
            slots = torch.arange(first, first + T, device=x.device)
            cos, sin = self.rope(first + T, x.device)
            cos, sin = cos[slots][None, None].to(x.dtype), sin[slots][None, None].to(x.dtype)
            mask = self._mask(slots, first + T, None, x.device)
            for layer in self.layers:
                x = layer(x, cos, sin, mask, cache, start)
            return self.norm(x[:, -1:] if last_only else x)
        cos, sin = self.rope(start + T, x.device)
        slots = torch.arange(start, start + T, device=x.device)
        if pad is None:
            cos, sin = cos[slots][None, None], sin[slots][None, None]  # (1, 1, T, hs)
        else:
            pos = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, T) RoPE positions
            cos, sin = cos[pos][:, None], sin[pos][:, None]  # (B, 1, T, hs)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if isinstance(cache, RollingKVCache):
            if pad is not None:
                raise ValueError("a rolling KV cache holds one unpadded sequence per row; decode padded batches "
                                 "with a full cache")
            mask = cache.mask(start, T, x.device)
        else:
            mask = self._mask(slots, start + T, pad, x.device)
        x = self._blocks(x, cos, sin, mask, cache, start)
        if last_only:
            x = x[:, -1:]
        elif with_prefix:
            x = _drop_prefix(x, P, pad)  # (B, T, dim): outputs line up with the caller's tokens
        return self.norm(x)

    def _blocks(self, x, cos, sin, mask, cache, start) -> torch.Tensor:
        """Every block in turn, or all of them in one native call where the decode layout set one (fused_decode,
        which checks the cache, the rows and the mask itself)."""
        if self.fused_decode is not None:
            y = self.fused_decode(x, cos, sin, cache, start, mask)
            if y is not None:
                return y
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, start)
        return x

    def _segments_trunk(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """The trunk over several batches in one pass (`Segments`): x (N, 1, dim) -> hidden states (N, 1, dim)."""
        if self.prefix_len:
            raise ValueError("segments carry their soft prompts in their embeddings; the model's own prefix would "
                             "start only a fresh sequence")
        if x.shape[0] != segments.tokens or x.shape[1] != 1:
            raise ValueError(f"segments of {segments.tokens} tokens take an input of shape ({segments.tokens}, 1, "
                             f"dim), got {tuple(x.shape)}")
        coss, sins, masks = [], [], []
        for s in segments.parts:
            if isinstance(s.cache, (RollingKVCache, SinkKVCache)):
                raise ValueError("segments attend over full caches (a rolling or sink cache has its own positions)")
            cos, sin = self.rope(s.start + s.tokens, x.device)  # each segment's table, as it would have alone
            slots = torch.arange(s.start, s.start + s.tokens, device=x.device)
            pos = slots[None].expand(s.rows, -1) if s.pad is None else (slots[None] - s.pad[:, None]).clamp(min=0)
            coss.append(cos[pos.flatten()])
            sins.append(sin[pos.flatten()])
            masks.append(self._mask(slots, s.start + s.tokens, s.pad, x.device))
        cos = torch.cat(coss)[:, None, None].to(x.dtype)  # (N, 1, 1, hs)
        sin = torch.cat(sins)[:, None, None].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, masks, segments, 0)
        return self.norm(x)

    def _packed_trunk(self, x: torch.Tensor, documents: torch.Tensor, last_only: bool) -> torch.Tensor:
        """The trunk over rows that pack several documents: each token attends only to earlier tokens of its own
        document, and RoPE positions restart at 0 with each document, so a packed row computes exactly what
        its documents would one by one."""
        if self.prefix_len:
            raise ValueError("packed rows (documents=) cannot carry a soft prompt: its virtual tokens would "
                             "start the row, not each document; train prompt tuning unpacked")
        B, T, _ = x.shape
        mask = DocumentMask.of(documents, self.config.sliding_window)
        pos = mask.positions(x.device)  # (B, T)
        cos, sin = self.rope(T, x.device)
        cos, sin = cos[pos][:, None].to(x.dtype), sin[pos][:, None].to(x.dtype)  # (B, 1, T, hs)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, None, 0)
        return self.norm(x[:, -1:] if last_only else x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) from hidden states."""
        return self.lm_head(h)

    def loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the next-token `labels` (B, T; IGNORE_INDEX where unscored) given hidden states
        (B, T, dim). With a plain linear head it is computed a chunk of rows at a time (`linear_cross_entropy`),
        never holding the (B*T, vocab) logits."""
        if type(self.lm_head) is nn.Linear and self.lm_head.bias is None:
            return linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, labels.flatten(),
                                        workspace=self.loss_workspace, softmax_grad=self.softmax_grad)
        # A replaced head (LoRA on the head, quantized): materialise the logits.
        logits = self.head(h)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)

    def forward(
        self,
        idx: torch.Tensor | None = None,
        *,
        embeds: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        pad: torch.Tensor | None = None,
        last_only: bool = False,
        labels: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids `idx` (B, T) or input embeddings `embeds` (B, T, dim): the
        composition of `inputs`, `trunk` and `head` (or `loss`). New techniques call the parts; the keywords
        here only say how the input is laid out (cache slots, padding, packed documents) and what to return.

        cache/start: write keys and values at cache slots start..start+T-1 and attend to all
            slots before them (prefill with start=0, then decode one token at a time).
        pad: (B,) count of left-padding slots per row, for batches of prompts of different
            lengths; those slots are never attended to and RoPE positions start after them.
        last_only: compute logits for the last position only (generation needs nothing more).
        labels: (B, T) next-token targets, IGNORE_INDEX where unscored: return `loss` (a scalar) instead of
            logits.
        documents: (B, T) which document each token belongs to, for training rows that pack several
            conversations (non-decreasing along a row): attention never crosses documents and positions
            restart with each. Training only (no cache). It goes through forward, not the parts, so that
            DDP and FSDP see the call.
        """
        h = self.trunk(self.inputs(idx, embeds=embeds, pad=pad, start=start), cache=cache, start=start, pad=pad,
                       last_only=last_only, documents=documents)
        return self.head(h) if labels is None else self.loss(h, labels)

    def _mask(self, slots, total: int, pad, device):
        """Boolean attention mask (B|1, 1, T, total), or None where plain causal attention is exact."""
        window = self.config.sliding_window
        T = slots.numel()
        needs_window = window is not None and total > window
        if pad is None and not needs_window and (T == 1 or total == T):
            return None  # decoding one token sees every slot; a fresh prefill is plain causal
        keys = torch.arange(total, device=device)
        mask = keys[None, :] <= slots[:, None]  # (T, S) causal over cache slots
        if needs_window:
            mask &= keys[None, :] > slots[:, None] - window
        mask = mask[None, None]  # (1, 1, T, S)
        if pad is not None:
            valid = keys[None, :] >= pad[:, None]  # (B, S) not a padding slot
            mask = mask & valid[:, None, None, :]
            # A padding query would see nothing (NaN in softmax); let it see itself. Its output is unused.
            mask = mask | (keys[None, :] == slots[:, None])[None, None]
        return mask


def _insert_prefix(x: torch.Tensor, prefix: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, d), prefix (P, d) -> (B, P + T, d): each row is [its left padding, prefix, its tokens].

    Keeping the padding first means `pad` still counts the leading padding slots, so the mask and
    the RoPE positions (prefix at 0..P-1, tokens from P on) need no special case.
    """
    B, T, d = x.shape
    P = prefix.shape[0]
    prefix = prefix.expand(B, P, d)
    if pad is None:
        return torch.cat([prefix, x], dim=1)
    slot = torch.arange(T + P, device=x.device)[None]  # (1, T+P) output slots
    p = pad[:, None]  # (B, 1)
    # Gather from [tokens (0..T-1), prefix (T..T+P-1)]: padding, then prefix, then the rest.
    src = torch.where(slot < p, slot, torch.where(slot < p + P, T + slot - p, slot - P))  # (B, T+P)
    return torch.cat([x, prefix], dim=1).gather(1, src[..., None].expand(B, T + P, d))


def _drop_prefix(x: torch.Tensor, P: int, pad: torch.Tensor | None) -> torch.Tensor:
    """The inverse of `_insert_prefix` on hidden states: (B, P + T, d) -> (B, T, d)."""
    if pad is None:
        return x[:, P:]
    B, total, d = x.shape
    slot = torch.arange(total - P, device=x.device)[None]  # (1, T)
    src = torch.where(slot < pad[:, None], slot, slot + P)  # (B, T)
    return x.gather(1, src[..., None].expand(B, total - P, d))


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_elements: int | None = None, workspace: dict | None = None,
                         softmax_grad=None) -> torch.Tensor:
    """mean(cross_entropy(h @ weight.T, labels)) over labels != IGNORE_INDEX, without the full logits.

    h: (N, dim) final hidden states; weight: (vocab, dim), the LM head; labels: (N,).
    The usual path keeps (N, vocab) logits, their log-softmax and its gradient alive at once: at
    SmolLM2's 49,152-token vocabulary and 4 x 256 tokens that is three 200 MB tensors. Here rows
    are taken `chunk_elements // vocab` at a time, and the gradients are computed in the same pass
    (the loss is the graph's end, so d loss/d logits = (softmax - onehot) / n is known in forward):
    backward only scales the stored grad_h (N, dim) and grad_weight (vocab, dim). Same products as
    the usual forward + backward (logits, grad_h, grad_weight), no recomputation, and only for the scored rows:
    an unscored row adds nothing to the loss and gets a zero gradient, so its logits are never computed (in
    supervised fine-tuning most rows are the prompt's: the head's two products shrink by that share).

    chunk_elements (rows x vocab per chunk) defaults to 2^24 on the CPU (64 MB of float32 log-probabilities) and
    2^28 on a GPU: each chunk adds its (vocab, dim) gradient product into grad_weight, so small chunks cost a GPU
    one pass over that gradient per ~130 rows at a 128k vocabulary (measured on an H200, Llama-3.2-1B's shape,
    8 x 1024 tokens: 278 ms a training step at 2^24, transformers 182; bench/RESULTS.md).

    workspace: a dict the caller keeps between calls, where the chunk buffers stay (training reuses them every
    step); without one they are made afresh each call. On the CPU fresh ones cost more than their products: each
    (341, 49152) float32 buffer is 64 MB, past glibc's mmap threshold (32 MB at most), so it goes back to the
    kernel when freed and is faulted in again on its first write. Measured on SmolLM2-135M's LoRA step (4 x 256
    tokens, 2-core AMD EPYC, 2026-12-05): the loss 1.6 s -> 0.85 s, 1,590 page faults -> none.

    softmax_grad: (logits, labels, scale) -> the chunk's summed cross-entropy, having turned its float32 logits into
    scale * (softmax - one-hot) in place (kernels.ops.softmax_cross_entropy_), or None to decline. It needs no
    log-probability buffer, so its chunks are twice as many rows in the same memory.
    """
    if chunk_elements is None:
        chunk_elements = 1 << 24 if h.device.type == "cpu" else 1 << 28
    return _LinearCrossEntropy.apply(h, weight, labels, chunk_elements, workspace, softmax_grad)


def _chunk_buffers(workspace: dict | None, rows: int, vocab: int, dtype: torch.dtype, device: torch.device,
                   logps: bool):
    """(rows, vocab) buffers for a chunk's logits (dtype) and, with `logps`, its log-probabilities (float32; else
    None): views of the workspace's when they are large enough, else new ones (then kept in it)."""
    kept = workspace.get("chunks") if workspace is not None else None
    if kept is None or kept[0].shape[0] < rows or kept[0].shape[1] != vocab or kept[0].dtype != dtype \
            or kept[0].device != device or (logps and kept[1] is None):
        kept = (torch.empty(rows, vocab, dtype=dtype, device=device),
                torch.empty(rows, vocab, dtype=torch.float32, device=device) if logps else None)
        if workspace is not None:
            workspace["chunks"] = kept
    return kept[0][:rows], kept[1][:rows] if logps else None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, chunk_elements, workspace, softmax_grad):
        device = h.device.type
        # Under autocast the products run in its dtype (as nn.Linear's would); softmax in float32.
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(device, enabled=False):
            scored = labels != IGNORE_INDEX
            n = scored.sum().clamp(min=1)
            grad_h = torch.zeros_like(h) if need_h else None  # unscored rows keep a zero gradient
            grad_w = torch.zeros_like(weight) if need_w else None
            picked = None if bool(scored.all()) else scored.nonzero()[:, 0]  # the scored rows, where some are not
            hc, wc = (h if picked is None else h[picked]).to(dtype), weight.to(dtype)
            labels = labels if picked is None else labels[picked]
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            # the native step (float32 on the CPU) keeps no log-probabilities apart
            one_buffer = softmax_grad is not None and dtype == torch.float32 and device == "cpu"
            scale = 1.0 / float(n) if one_buffer else None  # d loss / d (summed cross-entropy)
            rows = max(1, min(chunk_elements * (2 if one_buffer else 1) // weight.shape[0], hc.shape[0]))
            # Buffers that every chunk reuses: fresh ones would be fresh pages each chunk, faulted in and zeroed by
            # the kernel (on the CPU a (341, 49152) log_softmax into new memory took 31 ms, into these 10 ms).
            logits, logps = _chunk_buffers(workspace, rows, weight.shape[0], dtype, h.device, not one_buffer)
            for s in range(0, hc.shape[0], rows):
                x, y = hc[s:s + rows], labels[s:s + rows]
                logit = logits[:len(x)]
                torch.mm(x, wc.T, out=logit)
                summed = softmax_grad(logit, y, scale) if one_buffer else None
                if summed is None:
                    logp = logps[:len(x)] if logps is not None else torch.empty_like(logit)  # (a label it declined)
                    torch.log_softmax(logit, -1, dtype=torch.float32, out=logp)  # one pass, unlike logsumexp
                    total -= logp.gather(1, y[:, None])[:, 0].sum()
                else:
                    total += summed  # and logit is d loss / d logits now
                if not (need_h or need_w):
                    continue
                if summed is None:
                    p = logp.exp_()  # softmax, in place
                    p[torch.arange(len(y), device=p.device), y] -= 1
                    p = p.div_(n).to(dtype)  # d loss / d logits for these rows
                else:
                    p = logit
                if need_h:
                    if picked is None and grad_h.dtype == dtype:
                        torch.mm(p, wc, out=grad_h[s:s + rows])
                    else:
                        g = (p @ wc).to(grad_h.dtype)
                        if picked is None:
                            grad_h[s:s + rows] = g
                        else:
                            grad_h[picked[s:s + rows]] = g
                if need_w:
                    if dtype == grad_w.dtype:
                        grad_w.addmm_(p.T, x)
                    else:
                        grad_w += (p.T @ x).to(grad_w.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss if grad_h is not None else None,
                grad_w * grad_loss if grad_w is not None else None, None, None, None, None)
