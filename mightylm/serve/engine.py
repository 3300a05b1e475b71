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
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from mightylm.generate import Sampling, TextStream, sample


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


class QueueFull(RuntimeError):
    """The waiting queue is at its bound; the client should retry later."""


class _Rows:
    """A view of rows a..b-1 of the pool, with the KVCache interface the model calls."""

    def __init__(self, pool, a: int, b: int):
        self.pool, self.a, self.b = pool, a, b

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        K, V = self.pool.k[layer], self.pool.v[layer]
        K[self.a:self.b, :, start:end] = k
        V[self.a:self.b, :, start:end] = v
        return K[self.a:self.b, :, :end], V[self.a:self.b, :, :end]


@dataclass
class Sequence:
    """One generation: its prompt, settings, progress and where its events go."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[dict], None]  # called from the engine thread with {"type": "text"|"done", ...}
    adapter: int = 0
    ignore_eos: bool = False  # run to max_new_tokens through end-of-sequence tokens (for benchmarks)
    logprobs: int | None = None  # record each generated token's log-probability and this many alternatives
    generated: list[int] = field(default_factory=list)
    scores: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)  # per generated token
    finish_reason: str | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None
    _text: TextStream | None = None  # its text so far, with stop strings (generate.TextStream)
    _generator: torch.Generator | None = None
    _error: str | None = None

    def cancel(self) -> None:
        self.cancelled = True


class Engine:
    def __init__(self, model, tokenizer, bank, *, max_batch: int = 16, max_queue: int = 64, max_len: int = 2048):
        self.model, self.tokenizer, self.bank = model, tokenizer, bank
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_len = min(max_len, model.config.max_seq_len)
        self.pool = model.make_cache(max_batch, self.max_len)
        self.device = model.embed.weight.device
        self.pads = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.t = 0  # the next cache slot every running row writes
        self.running: list[Sequence] = []  # row i of the pool holds running[i]
        self.waiting: deque[Sequence] = deque()
        self.ops: deque[Callable[[], None]] = deque()  # work to do between steps (adapter changes)
        self.cond = threading.Condition()
        self.stopped = False
        self.stats = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "ttft": Latency(), "itl": Latency(),
                      "finished": {}, "prefill_passes": 0}
        self.thread = threading.Thread(target=self._loop, name="mightylm-engine", daemon=True)

    # ---- called from other threads ----

    def start(self) -> "Engine":
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
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
            self.bank.set_rows([adapter])
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
                    while not (self.stopped or self.ops or self.waiting or self.running):
                        self.cond.wait()
                    if self.stopped:
                        break
                    ops = list(self.ops)
                    self.ops.clear()
                for op in ops:
                    op()
                try:
                    self._admit()
                    if self.running:
                        self._decode()
                except Exception as e:  # a shared forward pass failed: it ends the rows in it, never the server
                    for seq in self.running:
                        self._finish_all(seq, "error", f"{type(e).__name__}: {e}")
                    self.running.clear()
                    self.t = 0
        for seq in self.running + list(self.waiting):
            self._finish_all(seq, "abort", "the server is shutting down")

    def _embed(self, prompt: list[int], adapter: int) -> torch.Tensor:
        """(P + T, dim): the adapter's virtual tokens, if any, then the prompt's token embeddings."""
        rows = self.model.embed(torch.tensor(prompt, device=self.device))
        prefix = self.bank.prefix(adapter)
        return rows if prefix is None else torch.cat([prefix.to(rows.dtype), rows])

    def _admit(self) -> None:
        """Move the waiting sequences that fit into the pool, prefilling them in one forward pass."""
        group: list[tuple[Sequence, int]] = []
        while self.waiting and len(self.running) + len(group) < self.max_batch:
            with self.cond:
                seq = self.waiting[0]
            if seq.cancelled:
                with self.cond:
                    self.waiting.popleft()
                self._finish_all(seq, "cancelled")
                continue
            own = len(seq.prompt) + self.bank.prefix_len(seq.adapter)
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

    def _remaining(self, seq: Sequence) -> int:
        return seq.sampling.max_new_tokens - len(seq.generated)

    def _fits(self, need: int, new_tokens: int) -> bool:
        t = max(self.t, need) if self.running else need
        return t + max([new_tokens] + [self._remaining(s) for s in self.running]) <= self.max_len

    def _compact(self) -> None:
        n = len(self.running)
        if not n:
            self.t = 0
            return
        m = int(self.pads[:n].min())
        if m == 0:
            return
        for K in self.pool.k + self.pool.v:
            K[:n, :, :self.t - m] = K[:n, :, m:self.t].clone()
        self.pads[:n] -= m
        self.t -= m

    def _shift_right(self, d: int) -> None:
        n = len(self.running)
        for K in self.pool.k + self.pool.v:
            K[:n, :, d:self.t + d] = K[:n, :, :self.t].clone()
        self.pads[:n] += d
        self.t += d

    def _prefill(self, group: list[tuple[Sequence, int]]) -> None:
        """Prefill new sequences into rows after the running ones, left-padded so each ends at slot t."""
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
            except Exception as e:  # fails this row only (swept below, before any token)
                self._fail(seq, e)
            self.stats["prompt_tokens"] += len(seq.prompt)
        last = first + len(group)
        self.stats["prefill_passes"] += 1
        self.bank.set_rows([seq.adapter for seq, _ in group])
        kwargs = dict(cache=_Rows(self.pool, first, last), start=self.t - width, pad=self.pads[first:last],
                      last_only=True)
        try:
            if all(need == len(seq.prompt) for seq, need in group):  # no soft prompt among them: token ids
                idx = torch.zeros(len(group), width, dtype=torch.long, device=self.device)
                for j, (seq, _) in enumerate(group):
                    idx[j, width - len(seq.prompt):] = torch.tensor(seq.prompt, device=self.device)
                logits = self.model(idx, **kwargs)[:, -1]
            else:  # soft prompts: each row's own virtual tokens before its prompt, as embeddings
                weight = self.model.embed.weight
                embeds = torch.zeros(len(group), width, weight.shape[1], dtype=weight.dtype, device=self.device)
                for j, (seq, need) in enumerate(group):
                    embeds[j, width - need:] = self._embed(seq.prompt, seq.adapter)
                logits = self.model(embeds=embeds, **kwargs)[:, -1]
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

    def _decode(self) -> None:
        n = len(self.running)
        tokens = torch.tensor([s.generated[-1] for s in self.running], device=self.device)
        self.bank.set_rows([s.adapter for s in self.running])
        logits = self.model(tokens[:, None], cache=_Rows(self.pool, 0, n), start=self.t, pad=self.pads[:n])[:, -1]
        self.t += 1
        self._take(logits, 0)

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
                for K in self.pool.k + self.pool.v:
                    K[row, :, :self.t] = K[last, :, :self.t]
                self.pads[row] = self.pads[last]
                self.running[row] = self.running[last]
            self.running.pop()
            self._finish_all(seq, seq.finish_reason or "cancelled", seq._error)
        if not self.running:
            self.t = 0

    def _finish_all(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        seq.finish_reason = reason
        self.stats["finished"][reason] = self.stats["finished"].get(reason, 0) + 1
        event = {"type": "done", "finish_reason": reason, "prompt_tokens": len(seq.prompt),
                 "completion_tokens": len(seq.generated)}
        if error:
            event["error"] = error
        if seq.logprobs is not None:
            n = len(seq.scores) - (1 if reason == "stop" and seq.generated and seq.generated[-1] in self._stops(seq)
                                   and not seq.ignore_eos else 0)
            event["logprobs"] = [(token, *score) for token, score in zip(seq.generated[:n], seq.scores[:n])]
        try:
            seq.emit(event)
        except Exception:  # a listener that is gone (its loop closed) must not stop the engine
            pass
