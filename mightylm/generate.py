"""Generation: a few small functions over a static KV cache (after gpt-fast's generate.py).

    prefill(model, idx | embeds, cache, pad) -> logits of each row's last prompt position
    decode_one_token(model, tok, cache, ...) -> logits of the next position
    logits_to_probs(logits, settings)        -> the distribution tokens are drawn from
    sample_from_probs(probs, generator)      -> token ids;  sample = the two composed
    streaming.TextStream(tokenizer, stop)    -> incremental text with stop strings (used by the server and
                                                evaluation too: one decode loop, one text stream)
    generate(...)                            -> token ids, batched (prompts of any lengths)
    stream_tokens(...) / stream_text(...)    -> one prompt, streamed, with stop tokens and strings
    load_for_generation(model, dtype, adapter) -> (model, tokenizer) ready to decode

Prompts of different lengths are left-padded into one batch; `pad` tells the model which
cache slots are padding, so each row sees exactly what it would see alone.
"""

from __future__ import annotations

import sys
import time
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from mightylm.errors import UsageError
from mightylm.model import KVCache, SinkKVCache, Transformer
from mightylm import static_decode
from mightylm.streaming import Sampling, Timings, cached_prefix, stream_text_from


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits (..., V) -> the index of each row's largest value (the first among equals, NaN counting as largest,
    as torch.argmax). Float32 rows on the CPU go through numpy: torch's CPU argmax took 56 us per row of SmolLM2's
    49,152 logits on a 2-core AMD EPYC, numpy's 6 (1 % of a decode step, 2-5 % of a speculative pass)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(np.asarray(logits.detach().numpy().argmax(-1)))
    return logits.argmax(dim=-1)


def logits_to_probs(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """logits (B, V) -> the distribution tokens are drawn from (B, V): temperature, then top-k, then top-p.
    Greedy settings (temperature 0) give one-hot rows at the argmax. Speculative decoding compares the draft's
    and the target's distributions, so this is a function of its own (gpt-fast's split)."""
    if s.temperature == 0:
        return F.one_hot(greedy(logits), logits.shape[-1]).float()
    logits = logits.float() / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p is not None and s.top_p < 1:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        drop = sorted_p.cumsum(dim=-1) - sorted_p > s.top_p  # mass before this token already covers top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)  # a distribution again (speculation compares them)
    return probs


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
                      ) -> torch.Tensor:
    """probs (B, V) -> token ids (B,). A list of generators gives each row its own random stream, so a row's
    sample does not depend on which other rows share its batch."""
    if isinstance(generator, list):
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | list[torch.Generator] | None = None
           ) -> torch.Tensor:
    """logits (B, V) -> token ids (B,): sample_from_probs(logits_to_probs(...)); greedy is the argmax itself
    (no draw, so a generator is not advanced)."""
    if s.temperature == 0:
        return greedy(logits)
    return sample_from_probs(logits_to_probs(logits, s), generator)


def prefill(model: Transformer, idx: torch.Tensor | None, cache: KVCache, pad: torch.Tensor | None = None, *,
            embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, V) of each row's last prompt position, the prompt given as token ids or as input embeddings
    (a vision projector's output, soft prompts), written into `cache` from slot 0."""
    return model(idx, embeds=embeds, cache=cache, start=0, pad=pad, last_only=True)[:, -1]


def decode_one_token(model: Transformer, token: torch.Tensor, cache: KVCache, start: int,
                     pad: torch.Tensor | None = None) -> torch.Tensor:
    return model(token[:, None], cache=cache, start=start, pad=pad)[:, -1]


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    return idx.to(device), (pad if bool(pad.any()) else None)


class Session:
    """A conversation's KV cache kept from one generation to the next (`mighty chat`, which sends the whole
    conversation every turn), as lite.Session on the torch-free path: a prompt that begins with tokens the cache
    holds is read from where they end (one prompt, a cache that keeps every position: not a sliding window's rolling
    cache, attention sinks or a CUDA graph's fixed cache, which read the prompt whole). `reused`: how many the last
    prompt took from the cache. A soft prompt's virtual tokens stay at the front."""

    def __init__(self, model: Transformer):
        self.model, self.cache, self.ids, self.reused = model, None, [], 0

    def start(self, prompt: list[int], length: int) -> int:
        """Room for `length` real tokens, keeping the longest prefix of `prompt` the cache holds (never the whole
        prompt: its last token's pass gives the first logits); returns how many were kept."""
        keep = cached_prefix(self.ids, prompt)
        if self.cache is None or self.cache.max_len < length + self.model.prefix_len:
            old = self.cache
            doubled = min(2 * (old.max_len - self.model.prefix_len if old else 0), self.model.config.max_seq_len)
            self.cache = self.model.make_cache(1, max(length, doubled))  # (doubling, never past the context)
            if old is not None:
                slots = self.model.prefix_len + keep if keep else 0  # (keep 0: the virtual tokens are written again)
                for kept, new in zip(old.k + old.v, self.cache.k + self.cache.v):
                    new[:, :, :slots] = kept[:, :, :slots]
        self.ids, self.reused = list(prompt[:keep]), keep
        return keep


@torch.inference_mode()
def generate_steps(model: Transformer, prompts: list[list[int]], s: Sampling,
                   row_seeds: list[int] | None = None, *, embed=None,
                   cuda_graphs: bool | None = None, session: Session | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), step by step; finished rows repeat a stop token.

    Stops when every row has produced a stop token or `max_new_tokens` is reached. `row_seeds`
    (one per prompt) sample each row from its own generator instead of one for the batch. `embed`, a function
    from the left-padded prompt ids (B, W) to their input embeddings (B, W, dim), replaces the embedding lookup
    of the prompt (a vision-language model writes its image tokens over the placeholders there). `cuda_graphs`
    (default: where the model is on a CUDA device): each decoded token is one replay of a CUDA graph of the step
    (static_decode.py) where the model allows; True on the CPU: that fixed step without a graph (as tested);
    False: the step as PyTorch runs it, launch by launch. `session`: one prompt on a Session's cache (where the
    generation keeps every position; otherwise the session is left as it was and the prompt read whole).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UsageError("every prompt needs at least one token")
    device = model.device
    width = max(len(p) for p in prompts)
    total = width + s.max_new_tokens
    if total + model.prefix_len > model.config.max_seq_len and s.attention_sinks is None:
        virtual = f" + {model.prefix_len} virtual tokens" if model.prefix_len else ""
        raise UsageError(f"prompt ({width} tokens) + max_new_tokens ({s.max_new_tokens}){virtual} exceeds the "
                         f"model's context of {model.config.max_seq_len} tokens")
    if s.max_new_tokens == 0:
        return
    generator = None
    if row_seeds is not None:
        generator = [torch.Generator(device=device).manual_seed(seed) for seed in row_seeds]
    elif s.seed is not None:
        generator = torch.Generator(device=device).manual_seed(s.seed)
    idx, pad = _left_pad(prompts, 0, device)
    fixed = None  # the decode step with fixed shapes, replayed as a CUDA graph on CUDA (static_decode.py)
    if s.attention_sinks is not None:
        session = None  # (a window of the latest tokens: the prompt is read whole)
        if pad is not None or model.prefix_len or embed:
            raise UsageError("attention sinks take prompts of one length per batch and no soft prompt")
        size, sinks = s.attention_sinks
        cache = SinkKVCache(model.config, len(prompts), size, sinks, dtype=model.dtype, device=device)
        logits = prefill(model, idx[:, :size], cache)  # what fits at once, then the rest of the prompt one by one
        for t in range(size, width):
            logits = decode_one_token(model, idx[:, t], cache, t)
    else:
        # A sliding-window model's unpadded rows keep only their window (memory constant in the generated length)
        window = model.config.sliding_window
        rolling = window is not None and pad is None and total + model.prefix_len > window
        if not rolling and (cuda_graphs or (cuda_graphs is None and device.type == "cuda")):
            fixed = static_decode.take(model, len(prompts), total + model.prefix_len, pad)
        if session is not None and (rolling or fixed or embed or len(prompts) > 1):
            session = None  # a cache that does not keep every position, or several prompts: read whole
        if session is not None:
            keep = session.start(prompts[0], total)
            cache = session.cache
            logits = model(idx[:, keep:], cache=cache, start=keep, last_only=True)[:, -1]
        else:
            cache = fixed.cache if fixed else model.make_cache(len(prompts), total, rolling=rolling)
            logits = prefill(model, None, cache, pad, embeds=embed(idx)) if embed else prefill(model, idx, cache, pad)
    decode = fixed or (lambda token, start: decode_one_token(model, token, cache, start, pad))
    stops = torch.tensor(list(s.stop_token_ids) or [-1], device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    token = sample(logits, s, generator)
    fed = []  # the tokens decode() has written into the cache after the prompt (a session's)
    try:
        for step in range(s.max_new_tokens):
            yield token
            done |= torch.isin(token, stops)
            if step + 1 == s.max_new_tokens or bool(done.all()):
                return
            logits = decode(token, width + step)
            if session is not None:
                fed.append(int(token[0]))
            token = torch.where(done, token, sample(logits, s, generator))
    finally:
        if fixed:
            static_decode.give_back(model, fixed)
        if session is not None:
            session.ids = list(prompts[0]) + fed


def generate(model: Transformer, prompts: list[list[int]], s: Sampling,
             row_seeds: list[int] | None = None, *, embed=None, cuda_graphs: bool | None = None) -> list[list[int]]:
    """Completions (token ids) for a batch of prompts; each ends at and includes its stop token."""
    steps = list(generate_steps(model, prompts, s, row_seeds, embed=embed, cuda_graphs=cuda_graphs))
    out = []
    stops = set(s.stop_token_ids)
    for row in range(len(prompts)):
        ids = []
        for step in steps:
            ids.append(int(step[row]))
            if ids[-1] in stops:
                break
        out.append(ids)
    return out


def stream_tokens(model: Transformer, prompt: list[int], s: Sampling, session: Session | None = None
                  ) -> Iterator[int]:
    for step in generate_steps(model, [prompt], s, session=session):
        yield int(step[0])


def stream_text(model: Transformer, tokenizer, prompt: str | list[int], s: Sampling,
                timings: Timings | None = None, source=None) -> Iterator[str]:
    """streaming.stream_text_from over this model's plain decoding, or over `source(ids, settings)` (speculative
    decoding: speculative.speculative_tokens)."""
    return stream_text_from(source or (lambda ids, st: stream_tokens(model, ids, st)), tokenizer, prompt, s, timings)


def generation_device(device: str) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:1") checked: a UsageError naming what to do where it is not one or PyTorch
    here cannot reach it."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this PyTorch ({torch.__version__}) reaches no CUDA device; install a "
                         "CUDA build of torch on a machine with an NVIDIA GPU, or decode on the CPU (--device cpu)")
    if parsed.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: decoding runs on cpu or cuda")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         "numbered from 0")
    return parsed


def load_for_generation(model: str, dtype: str = "float32", adapter: str | None = None, log=None,
                        keep_blocks: bool = False, rope_scaling: str | None = None, int8_activations: bool = False,
                        device: str = "cpu", compile_blocks: bool = False):
    """(model, tokenizer) for `mighty generate|chat|eval`: loaded (a tokenizer required; a GGUF file's blocks kept
    as stored with `keep_blocks` when the dtype is float32, the one the block kernels compute in), the adapter
    applied unmerged, another RoPE scaling set when asked (model.set_rope_scaling: "yarn:4", "none", ...), then
    the decode layout (fuse.fuse_projections_: same outputs, faster batch-1 decoding); `int8_activations`: the kept
    blocks multiply decoded tokens in llama.cpp's arithmetic (compress.gguf_blocks.int8_activations_). On a CUDA
    `device` the weights are dequantized to `dtype` and moved there, without the CPU's blocks and layouts, and
    decoding replays CUDA graphs (static_decode.py), of a step whose block `torch.compile` fused with
    `compile_blocks`. Progress lines go to `log`."""
    from mightylm.checkpoint import load
    from mightylm.compress.sparse24 import pack_24_
    from mightylm.fuse import fuse_projections_

    log = log or sys.stderr  # looked up now: a default bound at import would keep a replaced stream
    on_gpu = generation_device(device).type == "cuda"
    if on_gpu and int8_activations:
        raise UsageError("--int8_activations is the CPU's block arithmetic; on a GPU the weights are dequantized "
                         "to --dtype (bfloat16 is the fast one there)")
    if compile_blocks and not on_gpu:
        raise UsageError("--compile compiles the decode step that --device cuda replays as a CUDA graph; on the CPU "
                         "the native kernels decode (use it with --device cuda)")
    keep_blocks = keep_blocks and dtype == "float32" and not on_gpu
    t0 = time.perf_counter()
    print(f"loading {model} ...", file=log, flush=True)
    loaded, tokenizer = load(model, dtype=dtype, need_tokenizer=True, keep_blocks=keep_blocks)
    if adapter:
        from mightylm.adapters import load_adapter

        print(f"applied {adapter}: {load_adapter(loaded, adapter)}", file=log)  # before the decode layout
    if rope_scaling:
        from mightylm.model import set_rope_scaling

        print(set_rope_scaling(loaded, rope_scaling), file=log)
    if on_gpu:
        loaded.to(device)
        if compile_blocks:
            static_decode.compile_blocks(loaded)
        freeze_what_lives()
        print(f"loaded {loaded.config.n_params / 1e6:.0f}M parameters onto {device} in "
              f"{time.perf_counter() - t0:.1f}s", file=log, flush=True)
        return loaded.eval(), tokenizer
    pack_24_(loaded)  # a 2:4-pruned model: only its kept weights are read while decoding
    if int8_activations:
        from mightylm.compress.gguf_blocks import int8_activations_

        if not int8_activations_(loaded):
            print("--int8_activations: no Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q6_K blocks kept in this model; it changes "
                  "nothing", file=log)
    else:
        from mightylm.compress.gguf_blocks import float_layouts_

        float_layouts_(loaded)  # kept blocks laid out for float32 (kernels.float_arithmetic), as lite
    fuse_projections_(loaded)
    freeze_what_lives()
    print(f"loaded {loaded.config.n_params / 1e6:.0f}M parameters in {time.perf_counter() - t0:.1f}s", file=log,
          flush=True)
    return loaded.eval(), tokenizer


def freeze_what_lives() -> None:
    """Put every object alive now (torch's ~160k, the model's, the tokenizer's) out of the cyclic garbage
    collector's reach (gc.freeze, after a last collection): they live as long as the process, and every full
    collection walked all of them, which cost decoding 5-8 % of its time (SmolLM2-135M Q4_0, bench/RESULTS.md).
    Objects made later are collected as before. For the processes that load a model to serve or decode
    (`mighty generate|chat|eval|serve`)."""
    import gc

    gc.collect()
    gc.freeze()
