"""The serving engine: continuous batching over one KV-cache pool, in a thread of its own.

Requests wait in a bounded queue. Between decode steps the engine admits waiting requests (all that
fit are prefilled together, one forward pass, into free rows of the pool) and drops finished or
cancelled ones, so the batch changes every step. Rows of the pool are handed to a sequence when it starts and taken back when it
ends (finished, cancelled, or its client gone); the last running row moves into the freed one so
the running rows stay 0..n-1 and a decode step is one forward pass over them.

All running rows write their next token at the same cache slot `t`; a row's own tokens sit at slots
pad..t-1, and `pad` (the model's left-padding seam) hides everything before them and starts its
RoPE positions at 0, so each row computes what it would compute alone. A new prompt longer than
`t` shifts the running rows right; when the pool's end is near, all rows shift left by the
smallest pad (compaction).

Each sequence samples with its own settings and random generator; its text is decoded
incrementally and checked for stop strings here, so the HTTP layer only forwards events.

A prompt longer than `prefill_chunk` tokens is prefilled on a cache of its own, a chunk per step (so the running
streams keep flowing), and joins the pool when it is complete: its keys and values are copied into a free row,
right-aligned to end at slot t like any other prompt. While rows are decoding, each decode step carries the next
chunk in its own forward pass (model.Segments: the projections run once over the rows' tokens and the chunk's,
attention is per segment), the chunk sized so that it adds about half a step (CHUNK_SHARE, from the measured cost
of the last one): the gaps between the running rows' tokens grow by about half meanwhile. Where a step cannot
carry it (a speculative step, a multimodal LLaMA-Adapter's per-row image terms) the chunk runs as a pass of its own.

With a draft (`mighty serve --draft`), a step may be speculative (serve/speculation.py): every row's drafts are
verified in one pass, each row keeps what the exact rule accepts, and the rows that accepted fewer move right so
that all rows' next tokens again share slot `t`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from mightylm.generate import Sampling, greedy, logits_to_probs, sample
from mightylm.streaming import TextStream
from mightylm.model import KVRows, Segment, Segments
from mightylm.serve.speculation import ALPHA_PRIOR, ALPHA_WEIGHT, PROBE_EVERY, PROBE_MAX, PassCost, PooledDraft, \
    choose_width, timed
from mightylm.speculative import History, PromptLookup, accept, accept_copied


class Latency:
    """Count, sum and the recent values (for quantiles) of a latency in seconds."""

    def __init__(self, window: int = 10_000):
        self.count, self.sum, self.recent = 0, 0.0, deque(maxlen=window)

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        self.recent.append(seconds)

    def quantile(self, q: float) -> float:
        values = sorted(self.recent)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _score(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under the model's distribution (before temperature and top-p, as OpenAI and
    vLLM report it) and the `top` most likely tokens with theirs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = logp.topk(top) if top else None
    return float(logp[token]), ([] if best is None else list(zip(best.indices.tolist(), best.values.tolist())))


def logprob_entries(tokenizer, tokens: list[int], logprobs: list, tops: list | None, start: int = 0) -> dict:
    """OpenAI's legacy logprobs object: each token's text, log-probability, alternatives ({text: logprob}, or
    None) and offset in the text (counted from `start`). Alternatives whose texts coincide (pieces of one UTF-8
    character all read "\ufffd") keep the likeliest, so the best alternative's value is always the row's best."""
    decoder = tokenizer.stream_decoder()
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [] if tops is not None else None, "text_offset": []}
    length = start
    for k, (token, logprob) in enumerate(zip(tokens, logprobs)):
        out["tokens"].append(tokenizer.decode([token], skip_special_tokens=False))
        out["token_logprobs"].append(logprob)
        if tops is not None:
            alternatives = None
            if tops[k] is not None:
                alternatives = {}
                for i, value in tops[k]:  # best first
                    alternatives.setdefault(tokenizer.decode([i], skip_special_tokens=False), value)
            out["top_logprobs"].append(alternatives)
        out["text_offset"].append(length)
        length += len(decoder.push(token))
    return out


# While rows decode, a long prompt's prefill gets at most this share of the time decode steps take (a chunk sized
# to that share of one step, and no chunk while the prefill is ahead of its share), so the gaps between the running
# rows' tokens grow by about that much while it is prefilled (bench/long_prompt.py).
CHUNK_SHARE = 0.5
MIN_CHUNK = 8  # tokens in a chunk run as a pass of its own: its fixed cost (every layer's operations) makes smaller
# ones mostly overhead; a chunk carried by a decode step shares that cost, and may be a single token
FIRST_CARRIED = 4  # tokens in the first chunk a decode step carries, before its cost is measured


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the client should retry later."""


@dataclass
class Sequence:
    """One generation: its prompt, settings, progress and where its events go."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[dict], None]  # called from the engine thread with {"type": "text"|"done", ...}
    adapter: int = 0
    ignore_eos: bool = False  # run to max_new_tokens through end-of-sequence tokens (for benchmarks)
    speculative: bool = True  # may take drafted tokens when the server has a draft (false: plain steps only)
    history: History | None = None  # its user's earlier answers, for prompt lookup's drafts; this answer joins them
    logprobs: int | None = None  # record each generated token's log-probability and this many alternatives
    generated: list[int] = field(default_factory=list)
    scores: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)  # per generated token
    finish_reason: str | None = None
    cancelled: bool = False
    drafted: int = 0  # drafted tokens verified for this sequence, and how many of them were accepted
    accepted: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    _text: TextStream | None = None  # its text so far, with stop strings (generate.TextStream)
    _generator: torch.Generator | None = None
    _error: str | None = None
    _alpha: float | None = None  # running acceptance of its drafts (None: not measured yet)
    images: torch.Tensor | None = None  # projected image tokens (N, T_img, dim) written over the prompt's placeholders
    visual: torch.Tensor | None = None  # or, for a multimodal LLaMA-Adapter, its image's term (1, 1, dim)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Staging:
    """A long prompt being prefilled chunk by chunk on its own cache before it joins the pool."""

    seq: Sequence
    embeds: torch.Tensor  # (P + T, dim): its virtual tokens, if any, and its prompt
    cache: object  # a KVCache of one row
    done: int = 0  # slots written so far
    logits: torch.Tensor | None = None  # (1, V) after the last chunk


class Engine:
    def __init__(self, model, tokenizer, bank, *, max_batch: int = 16, max_queue: int = 64, max_len: int = 2048,
                 draft=None, gamma: int = 4, always_speculate: bool = False, prefill_chunk: int = 512, vision=None):
        """`draft`: None, a speculative.PromptLookup, or a draft model sharing the target's vocabulary; `gamma`:
        the most drafted tokens a row takes per step; `always_speculate`: every step as wide as the drafts allow,
        whatever it costs (tests and benchmarks; by default each step's width is chosen by its expected speed);
        `prefill_chunk`: prompts longer than this many tokens are prefilled that many at a time between decode
        steps."""
        if gamma < 1:
            raise ValueError(f"gamma (drafted tokens per step) must be at least 1, got {gamma}")
        self.model, self.tokenizer, self.bank = model, tokenizer, bank
        self.vision = vision  # a VisionLanguageModel whose decoder is `model`: requests may carry images
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = min(max_len, model.config.max_seq_len)
        self.pool = model.make_cache(max_batch, self.max_len)
        self.prefill_chunk = prefill_chunk
        self.staging: _Staging | None = None
        self.step_seconds = 0.0  # the latest decode step's wall time
        self.prefill_ahead = 0.0  # seconds the staged prefill took beyond its share of the decode steps' time
        self.prefill_rate = 0.0  # tokens per second of the latest prefill chunk run alone
        self.carry_rate = 0.0  # tokens per second a chunk carried by a decode step added to it (the latest one)
        self.carried = 0  # tokens in the latest chunk a decode step carried
        self.gamma, self.always_speculate = gamma, always_speculate
        self.draft = draft if draft is None or isinstance(draft, PromptLookup) else \
            PooledDraft(draft, max_batch, self.max_len)
        self.cost = PassCost()  # the target's pass time by token-rows, for choosing the speculative width
        self.alpha = ALPHA_PRIOR  # running acceptance over all rows: a new row's first guess
        self.plain_steps = 0  # steps since the last speculative one
        self.probe_gap = PROBE_EVERY  # plain steps before a narrow speculative step measures again
        self.device = model.device
        self.pads = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.t = 0  # the next cache slot every running row writes
        self.running: list[Sequence] = []  # row i of the pool holds running[i]
        self.waiting: deque[Sequence] = deque()
        self.ops: deque[Callable[[], None]] = deque()  # work to do between steps (adapter changes)
        self.cond = threading.Condition()
        self.stopped = False
        self.stats = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "ttft": Latency(), "itl": Latency(),
                      "finished": {}, "prefill_passes": 0, "drafted_tokens": 0, "accepted_tokens": 0,
                      "speculative_passes": 0, "prefill_chunks": 0, "carried_chunks": 0}
        self.thread = threading.Thread(target=self._loop, name="mightylm-engine", daemon=True)

    # ---- called from other threads ----

    def start(self) -> "Engine":
        """The loop on a thread of its own. Where the model was loaded (or any tensor work done) on another thread
        that stays alive, every step pays OpenMP wake-ups: a server builds its engine with engine_on_its_thread."""
        self.thread.start()
        return self

    def run(self) -> None:
        """The loop on the calling thread (instead of start's own), until stop(): for a server that loaded the
        model on this thread (engine_on_its_thread)."""
        self.thread = threading.current_thread()
        self._loop()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        if self.thread.is_alive():  # (run()'s thread may not have taken over yet; its loop then sees `stopped`)
            self.thread.join(timeout=10)

    def submit(self, seq: Sequence) -> Sequence:
        """Queue a sequence; raises QueueFull when the queue is at its bound, ValueError when it cannot fit."""
        virtual = self.bank.prefix_len(seq.adapter)
        if len(seq.prompt) + virtual + seq.sampling.max_new_tokens > self.max_len:
            raise ValueError(f"the prompt ({len(seq.prompt)} tokens) + max_tokens ({seq.sampling.max_new_tokens}) "
                             f"exceeds the context of {self.max_len} tokens")
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already")
            self.waiting.append(seq)
            self.stats["requests"] += 1
            self.cond.notify_all()
        return seq

    def call(self, fn: Callable[[], object], timeout: float = 60.0):
        """Run `fn` in the engine thread between steps (so no forward pass sees a half-made change)."""
        done, box = threading.Event(), {}

        def op():
            try:
                box["value"] = fn()
            except Exception as e:  # handed back to the caller
                box["error"] = e
            done.set()

        with self.cond:
            self.ops.append(op)
            self.cond.notify_all()
        if not done.wait(timeout):
            raise TimeoutError("the engine did not get to the request in time")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def score(self, prompt: list[int], adapter: int = 0, top: int = 0) -> dict:
        """Log-probabilities of each prompt token given the ones before it (OpenAI's echo + logprobs), in the
        engine thread between steps: {"tokens", "token_logprobs" (first None), "top_logprobs", "text_offset"}."""
        def run():
            idx = torch.tensor([prompt], device=self.device)
            self._rows([adapter])
            if self.bank.prefix(adapter) is None:
                logits = self.model(idx)
            else:
                logits = self.model(embeds=self._embed(prompt, adapter)[None])[:, self.bank.prefix_len(adapter):]
            logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
            picked = logp.gather(-1, idx[0, 1:, None])[:, 0].tolist()
            best = logp.topk(top, dim=-1) if top else None
            return picked, best

        picked, best = self.call(run)
        tops = [None] + [list(zip(ids.tolist(), values.tolist())) for values, ids in zip(*best)] if top else None
        return logprob_entries(self.tokenizer, prompt, [None] + picked, tops)

    def load(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting)}

    # ---- the engine thread ----

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not (self.stopped or self.ops or self.waiting or self.running or self.staging):
                        self.cond.wait()
                    if self.stopped:
                        break
                    ops = list(self.ops)
                    self.ops.clear()
                for op in ops:
                    op()
                try:
                    self._admit()
                    carry = self._stage() if self.staging is not None else None
                    if self.running:
                        began = time.perf_counter()
                        chunk_seconds = self._decode(carry)
                        self.step_seconds = time.perf_counter() - began - chunk_seconds
                        self.prefill_ahead = max(self.prefill_ahead + chunk_seconds
                                                 - CHUNK_SHARE * self.step_seconds, 0.0)
                except Exception as e:  # a shared forward pass failed: it ends the rows in it, never the server
                    for seq in self.running:
                        self._finish_all(seq, "error", f"{type(e).__name__}: {e}")
                    self.running.clear()
                    self.t = 0
        staged = [self.staging.seq] if self.staging is not None else []
        for seq in self.running + staged + list(self.waiting):
            self._finish_all(seq, "abort", "the server is shutting down")

    def _rows(self, adapters: list[int], visuals: list[torch.Tensor | None] | None = None) -> None:
        """Before each forward pass: every row's LoRA adapter, and, for a multimodal LLaMA-Adapter, every row's
        image (None: none, the text-only prompts)."""
        self.bank.set_rows(adapters)
        if self.vision is not None and self.vision.mode == "adapter":
            self.vision.condition_rows(visuals or [None] * len(adapters))

    def _embed(self, prompt: list[int], adapter: int, images: torch.Tensor | None = None) -> torch.Tensor:
        """(P + T, dim): the adapter's virtual tokens, if any, then the prompt's token embeddings (a vision-language
        model's image tokens written over its placeholders)."""
        if images is not None:
            rows = self.vision.embed(torch.tensor([prompt], device=self.device), images)[0]
        else:
            rows = self.model.embed(torch.tensor(prompt, device=self.device))
        prefix = self.bank.prefix(adapter)
        return rows if prefix is None else torch.cat([prefix.to(rows.dtype), rows])

    def _admit(self) -> None:
        """Move the waiting sequences that fit into the pool, prefilling them in one forward pass."""
        group: list[tuple[Sequence, int]] = []
        reserved = self.staging is not None  # a long prompt being prefilled will need a row
        while self.waiting and len(self.running) + len(group) + reserved < self.max_batch:
            with self.cond:
                seq = self.waiting[0]
            if seq.cancelled:
                with self.cond:
                    self.waiting.popleft()
                self._finish_all(seq, "cancelled")
                continue
            own = len(seq.prompt) + self.bank.prefix_len(seq.adapter)
            if own > self.prefill_chunk:
                if self.staging is not None:
                    break  # one long prompt at a time; the queue keeps its order
                with self.cond:
                    self.waiting.popleft()
                self.staging = _Staging(seq, self._embed(seq.prompt, seq.adapter, seq.images),
                                        self.model.make_cache(1, own))
                reserved = True
                continue
            need = max([own] + [n for _, n in group])
            new_tokens = max([seq.sampling.max_new_tokens] + [s.sampling.max_new_tokens for s, _ in group])
            if not self._fits(need, new_tokens):
                self._compact()
                if not self._fits(need, new_tokens):
                    break  # the rest waits for running sequences to finish
            with self.cond:
                self.waiting.popleft()
            group.append((seq, own))
        if group:
            self._prefill(group)

    def _stage(self) -> int | None:
        """Advance the staged long prompt: returns where the chunk the coming decode step should carry ends (None:
        none), or prefills a chunk as a pass of its own (nothing running, or a step that cannot carry it); when the
        prompt is complete and a row fits, moves it into the pool and takes its first token."""
        st = self.staging
        if st.seq.cancelled:
            self.staging = None
            self._finish_all(st.seq, "cancelled")
            return None
        total = st.embeds.shape[0]
        if st.done < total:
            if self.running and self.prefill_ahead > 0:
                return None  # the prefill has had its share of the time; the running rows take a step first
            if self.running and self._can_carry():
                return min(st.done + self._carried_size(), total)
            size = self.prefill_chunk
            if self.running:  # CHUNK_SHARE of a decode step's time (the first chunk measures the rate)
                size = min(size, max(MIN_CHUNK, int(CHUNK_SHARE * self.prefill_rate * self.step_seconds))
                           if self.prefill_rate else 64)
            seconds = self._prefill_chunk(min(st.done + size, total))
            if self.running:
                self.prefill_ahead += seconds
            if self.staging is None or st.done < total:
                return None
        seq, need = st.seq, total
        if len(self.running) >= self.max_batch or not self._fits(need, seq.sampling.max_new_tokens):
            self._compact()
            if len(self.running) >= self.max_batch or not self._fits(need, seq.sampling.max_new_tokens):
                return None  # joins when running sequences have made room
        row = self._seat([(seq, need)])
        for K, staged in zip(self.pool.k + self.pool.v, st.cache.k + st.cache.v):
            K[row, :, self.t - need:self.t] = staged[0, :, :need]
        self.staging = None
        try:
            self._draft_prefill(row, [seq])
        except Exception as e:  # fails this row only (swept in _take, before any token)
            self._fail(seq, e)
        self._take(st.logits, row)
        return None

    def _can_carry(self) -> bool:
        """Whether a decode step can carry a chunk of the staged prompt: once a plain step's cost is measured (the
        chunk's own cost is what the step takes beyond it), and not for a multimodal LLaMA-Adapter (its image terms
        are per row of a pass, the chunk's tokens being rows of the running rows' pass here)."""
        return self.cost.n > 0 and not self.model.prefix_len and \
            not (self.vision is not None and self.vision.mode == "adapter")

    def _carried_size(self) -> int:
        """Tokens of the next carried chunk: what adds CHUNK_SHARE of a plain step at the latest chunk's measured
        rate, growing at most twofold from one chunk to the next (one fast measurement must not make a long step)."""
        if not self.carry_rate:
            return FIRST_CARRIED
        budget = CHUNK_SHARE * self.cost.predict(len(self.running))
        return max(1, min(int(budget * self.carry_rate), 2 * self.carried, self.prefill_chunk))

    def _prefill_chunk(self, end: int) -> float:
        """Prefill the staged prompt up to `end` in a pass of its own; returns its seconds. Its failure ends that
        prompt only."""
        st = self.staging
        began = time.perf_counter()
        try:
            self._rows([st.seq.adapter], [st.seq.visual])
            st.logits = self.model(embeds=st.embeds[None, st.done:end], cache=st.cache, start=st.done,
                                   last_only=True)[:, -1]
        except Exception as e:  # this prompt's own failure
            self.staging = None
            self._finish_all(st.seq, "error", f"{type(e).__name__}: {e}")
            return time.perf_counter() - began
        seconds = time.perf_counter() - began
        self.prefill_rate = (end - st.done) / max(seconds, 1e-6)
        st.done = end
        self.stats["prefill_chunks"] += 1
        return seconds

    def _remaining(self, seq: Sequence) -> int:
        return seq.sampling.max_new_tokens - len(seq.generated)

    def _fits(self, need: int, new_tokens: int) -> bool:
        t = max(self.t, need) if self.running else need
        return t + max([new_tokens] + [self._remaining(s) for s in self.running]) <= self.max_len

    def _caches(self) -> list[torch.Tensor]:
        """Every cache tensor whose rows and slots follow the running sequences: the target's, and a draft
        model's."""
        own = self.pool.k + self.pool.v
        return own + self.draft.caches() if isinstance(self.draft, PooledDraft) else own

    def _compact(self) -> None:
        n = len(self.running)
        if not n:
            self.t = 0
            return
        m = int(self.pads[:n].min())
        if m == 0:
            return
        for K in self._caches():
            K[:n, :, :self.t - m] = K[:n, :, m:self.t].clone()
        self.pads[:n] -= m
        self.t -= m
        if isinstance(self.draft, PooledDraft):
            self.draft.valid = max(self.draft.valid - m, 0)

    def _shift_right(self, d: int) -> None:
        n = len(self.running)
        for K in self._caches():
            K[:n, :, d:self.t + d] = K[:n, :, :self.t].clone()
        self.pads[:n] += d
        self.t += d
        if isinstance(self.draft, PooledDraft):
            self.draft.valid += d

    def _seat(self, group: list[tuple[Sequence, int]]) -> int:
        """Give new sequences (each with the slots it needs) the rows after the running ones, each ending at slot
        t (the running rows moved right when one needs more than t): its pad, text stream and generator. Returns
        the first of their rows."""
        width = max(need for _, need in group)
        if not self.running:
            self.t = width
        elif width > self.t:
            self._shift_right(width - self.t)
        first = len(self.running)
        for row, (seq, need) in enumerate(group, first):
            self.pads[row] = self.t - need
            self.running.append(seq)
            seq._text = TextStream(self.tokenizer, seq.sampling.stop)
            try:
                if seq.sampling.seed is not None:
                    seq._generator = torch.Generator(device=self.device).manual_seed(seq.sampling.seed)
            except Exception as e:  # fails this row only (swept in _take, before any token)
                self._fail(seq, e)
            self.stats["prompt_tokens"] += len(seq.prompt)
        return first

    def _draft_prefill(self, first: int, seqs: list[Sequence]) -> None:
        """A draft model's pool gets the prompts of the rows first.. (their tokens only: no soft prompts)."""
        if isinstance(self.draft, PooledDraft):
            if first == 0:
                self.draft.valid = self.t
            self.draft.prefill(KVRows(self.draft.pool, first, first + len(seqs)), [seq.prompt for seq in seqs],
                               torch.tensor([self.t - len(seq.prompt) for seq in seqs], device=self.device), self.t)

    def _prefill(self, group: list[tuple[Sequence, int]]) -> None:
        """Prefill new sequences into rows after the running ones, left-padded so each ends at slot t."""
        width = max(need for _, need in group)
        first = self._seat(group)
        last = first + len(group)
        self.stats["prefill_passes"] += 1
        self._rows([seq.adapter for seq, _ in group], [seq.visual for seq, _ in group])
        kwargs = dict(cache=KVRows(self.pool, first, last), start=self.t - width, pad=self.pads[first:last],
                      last_only=True)
        try:
            if all(need == len(seq.prompt) and seq.images is None for seq, need in group):  # plain token ids
                idx = torch.zeros(len(group), width, dtype=torch.long, device=self.device)
                for j, (seq, _) in enumerate(group):
                    idx[j, width - len(seq.prompt):] = torch.tensor(seq.prompt, device=self.device)
                logits = self.model(idx, **kwargs)[:, -1]
            else:  # soft prompts or images: each row's own embeddings (virtual tokens, image tokens)
                embeds = torch.zeros(len(group), width, self.model.config.dim, dtype=self.model.dtype,
                                     device=self.device)
                for j, (seq, need) in enumerate(group):
                    embeds[j, width - need:] = self._embed(seq.prompt, seq.adapter, seq.images)
                logits = self.model(embeds=embeds, **kwargs)[:, -1]
            self._draft_prefill(first, [seq for seq, _ in group])
        except Exception as e:  # take the group out again; alone, each fails or succeeds on its own
            del self.running[first:]
            if not self.running:
                self.t = 0
            if len(group) == 1:
                self._finish_all(group[0][0], "error", f"{type(e).__name__}: {e}")
            else:
                for one in group:
                    self._prefill([one])
            return
        self._take(logits, first)

    def _take(self, logits: torch.Tensor, first: int) -> None:
        """Sample each row's next token from `logits` (rows first.. of the pool) and accept it; an error in one row
        (its sampling settings, its generator, its text) ends that row only."""
        for j, seq in enumerate(self.running[first:first + logits.shape[0]]):
            if seq.finish_reason is not None:
                continue
            try:
                token = int(sample(logits[j:j + 1], seq.sampling, seq._generator)[0])
                if seq.logprobs is not None:
                    seq.scores.append(_score(logits[j], token, seq.logprobs))
                self._accept(first + j, token)
            except Exception as e:
                self._fail(seq, e)
        self._sweep()

    def _fail(self, seq: Sequence, error: Exception) -> None:
        seq.finish_reason, seq._error = "error", f"{type(error).__name__}: {error}"

    def _decode(self, carry: int | None = None) -> float:
        """One step of the running rows; with `carry`, the staged prompt's chunk up to there goes in the same pass
        (or, after a speculative step, in one of its own). Returns the seconds the chunk added."""
        if self.draft is not None and self._speculate():
            return self._prefill_chunk(carry) if carry is not None else 0.0
        if carry is not None:
            extra = self._carrying(carry)
            if extra is not None:
                return extra
            # the carrying pass failed: alone, the chunk fails or succeeds on its own, and so does the step
            seconds = self._prefill_chunk(carry)
            began = time.perf_counter()
            self._decode()
            return seconds + max(time.perf_counter() - began - self.cost.predict(len(self.running)), 0.0)
        n = len(self.running)
        tokens = torch.tensor([s.generated[-1] for s in self.running], device=self.device)
        self._rows([s.adapter for s in self.running], [s.visual for s in self.running])
        logits, seconds = timed(lambda: self.model(tokens[:, None], cache=KVRows(self.pool, 0, n), start=self.t,
                                                   pad=self.pads[:n])[:, -1], self.device)
        self.cost.observe(n, seconds)
        self.t += 1
        self._take(logits, 0)
        return 0.0

    def _carrying(self, end: int) -> float | None:
        """A plain step of the running rows that carries the staged prompt's tokens up to `end` (model.Segments: the
        rows on the pool, the chunk on its own cache, one pass); returns the seconds it took beyond a plain step, or
        None, with nothing advanced, when the pass raised (its writes are at the slots a rerun writes again)."""
        st, n = self.staging, len(self.running)
        size = end - st.done
        tokens = torch.tensor([s.generated[-1] for s in self.running], device=self.device)
        x = torch.cat([self.model.embed(tokens), st.embeds[st.done:end]])[:, None]  # (n + size, 1, dim)
        segments = Segments([Segment(KVRows(self.pool, 0, n), self.t, n, 1, self.pads[:n]),
                             Segment(st.cache, st.done, 1, size)])
        adapters = [s.adapter for s in self.running]

        def step():
            self._rows(adapters + [st.seq.adapter] * size)  # one row per token
            h = self.model.trunk(x, cache=segments)  # (n + size, 1, dim)
            self._rows(adapters + [st.seq.adapter])
            return self.model.head(torch.cat([h[:n], h[-1:]]))[:, -1]  # the rows' next tokens, the chunk's last

        try:
            logits, seconds = timed(step, self.device)
        except Exception:
            return None
        extra = max(seconds - self.cost.predict(n), 0.1 * seconds)  # never 0: a rate must stay finite
        self.carry_rate, self.carried = size / extra, size
        st.done, st.logits = end, logits[n:]
        self.stats["prefill_chunks"] += 1
        self.stats["carried_chunks"] += 1
        self.t += 1
        self._take(logits[:n], 0)
        return extra

    def _speculate(self) -> bool:
        """One speculative step over the running rows when its expected tokens per second beat a plain step's
        (serve/speculation.py); False, having done nothing, when they do not."""
        n = len(self.running)
        longest = max(self._remaining(s) for s in self.running)
        if self.t + self.gamma + longest > self.max_len:
            self._compact()  # room for the verification pass (rows that accept less are moved right after it)
        cap = min(self.gamma, self.max_len - self.t - longest)
        limits = [min(cap, self._remaining(s) - 1) if s.speculative and s.finish_reason is None else 0
                  for s in self.running]  # never draft past a row's last token
        if cap < 1 or not any(limits):
            return False
        alphas = [self.alpha if s._alpha is None else s._alpha for s in self.running]
        pooled = isinstance(self.draft, PooledDraft)
        draft_cost = self.draft.cost if pooled else None
        probe = self.plain_steps >= self.probe_gap
        if not (self.always_speculate or probe or choose_width(limits, alphas, cap, self.cost, draft_cost)):
            self.plain_steps += 1  # not even full drafts for every row would pay: a plain step, nothing looked up
            return False
        histories = [s.prompt + s.generated for s in self.running]
        if not pooled:  # prompt lookup: what each row's text offers
            looked = [self.draft.propose(h, g, s.sampling, history=s.history) if g else ([], None)
                      for h, g, s in zip(histories, limits, self.running)]
            limits = [len(tokens) for tokens, _ in looked]
        width = max(limits) if self.always_speculate or not any(limits) else \
            choose_width(limits, alphas, cap, self.cost, draft_cost)
        if width:
            self.probe_gap = PROBE_EVERY
        elif probe and any(limits):  # not measured for a while: one narrow step measures acceptance and cost again
            width, self.probe_gap = 1, min(2 * self.probe_gap, PROBE_MAX)
        if width == 0:
            self.plain_steps += 1
            return False
        self.plain_steps = 0
        began = time.perf_counter()
        if pooled:
            virtual = torch.tensor([self.bank.prefix_len(s.adapter) for s in self.running], device=self.device)
            tokens, dists = self.draft.propose(lambda pool: KVRows(pool, 0, n), histories, self.pads[:n] + virtual,
                                               self.t, width, [s.sampling for s in self.running],
                                               [s._generator for s in self.running])
            drafts = [(ts[:min(width, g)], q[:min(width, g)]) for ts, q, g in zip(tokens, dists, limits)]
        else:
            drafts = [(ts[:width], q if q is None else q[:width]) for ts, q in looked]
        idx = torch.zeros(n, width + 1, dtype=torch.long)
        for i, (seq, (ts, _)) in enumerate(zip(self.running, drafts)):
            idx[i, 0] = seq.generated[-1]
            idx[i, 1:1 + len(ts)] = torch.tensor(ts, dtype=torch.long)  # a shorter row's last slots: never accepted
        self._rows([s.adapter for s in self.running], [s.visual for s in self.running])
        logits = self.model(idx.to(self.device), cache=KVRows(self.pool, 0, n), start=self.t,
                            pad=self.pads[:n])  # (n, width + 1, V)
        self.stats["speculative_passes"] += 1
        counts = [self._verify(i, logits[i], *drafts[i]) for i in range(n)]
        live = [k for seq, k in zip(self.running, counts) if seq.finish_reason is None and not seq.cancelled]
        top = max(live, default=0)
        for i, k in enumerate(counts):  # every row's next token goes to slot t + top + 1
            if k < top and self.running[i].finish_reason is None:
                self._shift_row(i, top - k, self.t + k + 1)
        self.t += top + 1
        if pooled:
            self.draft.valid = self.t - 1  # a fully accepted row's last draft was never fed to the draft model
        if logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        # the whole step, moves included (moving rows costs ~2 ms per 100 slots of a row on a CPU; what the width
        # must pay for), less the draft model's own passes, which choose_width counts separately
        drafting = self.draft.last if pooled else 0.0
        self.cost.observe(n * (width + 1), time.perf_counter() - began - drafting)
        self._sweep()
        return True

    def _verify(self, row: int, logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None) -> int:
        """Accept row `row`'s drafted tokens by the exact rule (the argmax prefix when greedy) given the target's
        logits at its [last, drafts...] positions, take the accepted ones and the target's next token; returns
        how many drafts were accepted. An error here ends this row only."""
        seq = self.running[row]
        try:
            if seq.sampling.temperature == 0:
                best = greedy(logits[:len(drafts) + 1]).tolist()
                k = next((j for j, d in enumerate(drafts) if d != best[j]), len(drafts))
                nxt = best[k]
            elif not isinstance(self.draft, PooledDraft):  # prompt lookup: drawn as plain steps draw (a seed's text)
                k, nxt = accept_copied(logits[:len(drafts) + 1], seq.sampling, drafts, seq._generator)
            else:
                p = logits_to_probs(logits[:len(drafts) + 1], seq.sampling)
                q = q.to(p) if q is not None else p[:0]
                k, nxt = accept(p[None], q[None], torch.tensor([drafts], dtype=torch.long).view(1, -1),
                                seq._generator)
                k, nxt = int(k[0]), int(nxt[0])
            if drafts:
                rate = k / len(drafts)
                seq._alpha = rate if seq._alpha is None else (1 - ALPHA_WEIGHT) * seq._alpha + ALPHA_WEIGHT * rate
                self.alpha = (1 - ALPHA_WEIGHT) * self.alpha + ALPHA_WEIGHT * rate
                seq.drafted += len(drafts)
                seq.accepted += k
                self.stats["drafted_tokens"] += len(drafts)
                self.stats["accepted_tokens"] += k
            for j, token in enumerate(drafts[:k] + [nxt]):
                if seq.logprobs is not None:
                    seq.scores.append(_score(logits[j], token, seq.logprobs))
                self._accept(row, token)
                if seq.finish_reason is not None:
                    break
            return k
        except Exception as e:
            self._fail(seq, e)
            return 0

    def _shift_row(self, row: int, d: int, end: int) -> None:
        """Move row `row`'s cache slots pad..end-1 right by d (its pad grows by d)."""
        pad = int(self.pads[row])
        for K in self._caches():
            K[row, :, pad + d:end + d] = K[row, :, pad:end].clone()
        self.pads[row] += d

    def _accept(self, row: int, token: int) -> None:
        """Record a sampled token, emit its text, and decide whether the sequence is finished."""
        seq = self.running[row]
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.stats["ttft"].observe(now - seq.submitted)
        else:
            self.stats["itl"].observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.generated.append(token)
        self.stats["generated_tokens"] += 1
        if seq.cancelled:
            seq.finish_reason = "cancelled"
            return
        if token in self._stops(seq) and not seq.ignore_eos:
            seq.finish_reason = "stop"
            return
        self._emit_text(seq, seq._text.push(token))
        if seq._text.stopped:
            seq.finish_reason = "stop"
        elif len(seq.generated) >= seq.sampling.max_new_tokens:
            self._emit_text(seq, seq._text.finish())
            seq.finish_reason = "length"

    def _stops(self, seq: Sequence) -> tuple[int, ...]:
        """The token ids that end `seq`: its own, else the tokenizer's."""
        return seq.sampling.stop_token_ids or self.tokenizer.stop_token_ids

    def _emit_text(self, seq: Sequence, text: str) -> None:
        if text:
            seq.emit({"type": "text", "text": text})

    def _sweep(self) -> None:
        """Take finished rows out, moving the last running row into each freed one."""
        row = 0
        while row < len(self.running):
            seq = self.running[row]
            if seq.finish_reason is None and not seq.cancelled:
                row += 1
                continue
            last = len(self.running) - 1
            if row != last:
                for K in self._caches():
                    K[row, :, :self.t] = K[last, :, :self.t]
                self.pads[row] = self.pads[last]
                self.running[row] = self.running[last]
            self.running.pop()
            self._finish_all(seq, seq.finish_reason or "cancelled", seq._error)
        if not self.running:
            self.t = 0
        elif 2 * int(self.pads[:len(self.running)].min()) >= self.t:
            # a long sequence left: the rest sit far right, and every step would attend over the padding before
            # them; moving them left costs a copy of their own slots only
            self._compact()

    def _finish_all(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.finish_reason = reason
        if seq.history is not None and reason in ("stop", "length"):
            seq.history.add(seq.generated)  # on the engine's thread, like every draft from it
        self.stats["finished"][reason] = self.stats["finished"].get(reason, 0) + 1
        event = {"type": "done", "finish_reason": reason, "prompt_tokens": len(seq.prompt),
                 "completion_tokens": len(seq.generated)}
        if error:
            event["error"] = error
        if self.draft is not None:
            event["drafted"], event["accepted"] = seq.drafted, seq.accepted
        if seq.logprobs is not None:
            n = len(seq.scores) - (1 if reason == "stop" and seq.generated and seq.generated[-1] in self._stops(seq)
                                   and not seq.ignore_eos else 0)
            event["logprobs"] = [(token, *score) for token, score in zip(seq.generated[:n], seq.scores[:n])]
        try:
            seq.emit(event)
        except Exception:  # a listener that is gone (its loop closed) must not stop the engine
            pass


def engine_on_its_thread(build: Callable[[], "Engine"]) -> "Engine":
    """The engine `build()` makes (loading the model too), its loop running on the thread that made it (a daemon;
    Engine.stop ends it). Every OpenMP parallel region of a server should start from that one thread: with the model
    loaded on the main thread and the steps taken on another (or any other thread that ever ran a parallel region
    and stays alive, like an idle worker of asyncio.to_thread), libgomp counts more worker threads than cores and
    stops spinning between regions, so each of a step's ~120 small products pays a thread wake-up (measured: a
    decode step 2.5-5x slower, bench/RESULTS.md). Exceptions from `build` are raised here."""
    from concurrent.futures import Future

    made = Future()

    def run():
        try:
            engine = build()
        except BaseException as e:  # handed to the caller (a bad --adapter, a missing file)
            made.set_exception(e)
            return
        made.set_result(engine)
        engine.run()

    threading.Thread(target=run, name="mightylm-engine", daemon=True).start()
    return made.result()


