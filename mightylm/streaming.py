"""What a decode loop shares with its callers, without torch: the sampling settings, where a completion's time
went, and the text stream (stop strings, incomplete characters held back). generate.py's loop over a model and
lite.py's over the native kernels alone both feed `stream_text_from`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from mightylm.errors import UsageError


@dataclass
class Sampling:
    """How to pick tokens."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # nucleus: keep the smallest set with this much probability
    seed: int | None = None  # fixes sampling; same seed, same text
    stop_token_ids: tuple[int, ...] = ()  # end a sequence when one of these is produced
    stop: tuple[str, ...] = field(default_factory=tuple)  # stop strings (text-level, see stream_text)
    # (cache size, sinks): StreamingLLM's cache (model.SinkKVCache) of a fixed size, for generating past the
    # model's context with constant memory; one unpadded prompt length per batch
    attention_sinks: tuple[int, int] | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Timings:
    """Where one completion's time went (`mighty generate --stats`): the prompt's prefill (up to the first
    generated token) and the decoding of the tokens after it."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_s: float = 0.0

    def report(self) -> str:
        decoded = self.new_tokens - 1  # the first token comes out of the prefill
        rate = f"{decoded / self.decode_s:.1f} tokens/s" if decoded > 0 and self.decode_s > 0 else "-"
        return (f"prefill: {self.prompt_tokens} tokens in {self.prefill_s:.3f} s "
                f"({self.prompt_tokens / max(self.prefill_s, 1e-9):.1f} tokens/s); decode: {max(decoded, 0)} tokens "
                f"in {self.decode_s:.3f} s ({rate})")


def cached_prefix(held: list[int], prompt: list[int]) -> int:
    """How many of `prompt`'s first tokens a session's cache can keep: those equal to the tokens it holds, never the
    whole prompt (its last token's pass gives the first logits). generate.Session and lite.Session share it."""
    keep = 0
    for a, b in zip(held, prompt[:-1]):
        if a != b:
            break
        keep += 1
    return keep


def stream_text_from(tokens, tokenizer, prompt: str | list[int], s: Sampling, timings: Timings | None = None
                     ) -> Iterator[str]:
    """Stream the completion of one prompt as text deltas.

    Ends at a stop token (not printed) or a stop string (not printed). Text that could be the
    start of a stop string is held back until it is clear that it is not (TextStream). `timings`, when
    given, is filled in as the tokens come. `tokens(ids, settings)` yields the token ids (generate.stream_tokens over
    a model, speculative.speculative_tokens, lite.stream_tokens).
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    s = Sampling(**{**s.__dict__, "stop_token_ids": tuple(s.stop_token_ids) or tokenizer.stop_token_ids})
    text = TextStream(tokenizer, s.stop)
    timings = timings if timings is not None else Timings()
    timings.prompt_tokens, start = len(ids), time.perf_counter()
    for token in tokens(ids, s):
        now = time.perf_counter()
        if timings.new_tokens == 0:
            timings.prefill_s = now - start
        else:
            timings.decode_s = now - start - timings.prefill_s
        timings.new_tokens += 1
        if token in s.stop_token_ids:
            break
        piece = text.push(token)
        if text.stopped:
            yield piece
            return
        if piece:
            yield piece
    yield text.finish()


class TextStream:
    """The text of one generated sequence, token by token: ids in, certain text out, cut before the first
    stop string. Text that could be the start of a stop string is held back until it is clear that it is not,
    and incomplete UTF-8 characters wait for their last byte. The one place streaming text is made: the
    decode loop here, the server's engine and the evaluation backend use it.

        text = TextStream(tokenizer, stop=("\n\n",))
        for token in tokens:
            out(text.push(token))        # '' while held back
            if text.stopped: break       # a stop string was reached; its text is not given
        out(text.finish())               # at the end: what was held back (cut at a stop string)
    """

    def __init__(self, tokenizer, stop=()):
        self.decoder = tokenizer.stream_decoder()
        self.stop = tuple(x for x in stop if x)
        self.text = ""  # given out so far
        self.pending = ""  # decoded, held back
        self.stopped = False

    @property
    def seen(self) -> str:
        """Everything decoded so far (given out or held back)."""
        return self.text + self.pending

    def push(self, token: int) -> str:
        """The text `token` makes certain ('' while held back); at a stop string, the text before it, and
        `stopped` is set."""
        self.pending += self.decoder.push(token)
        cut = find_stop(self.pending, self.stop)
        if cut is not None:
            out, self.pending, self.stopped = self.pending[:cut], "", True
        else:
            safe = len(self.pending) - held_back(self.pending, self.stop)
            out, self.pending = self.pending[:safe], self.pending[safe:]
        self.text += out
        return out

    def finish(self) -> str:
        """At the end of generation: what was held back, incomplete characters flushed, cut at a stop string."""
        if self.stopped:
            return ""
        self.pending += self.decoder.flush()
        cut = find_stop(self.pending, self.stop)
        out = self.pending if cut is None else self.pending[:cut]
        self.pending, self.stopped = "", cut is not None
        self.text += out
        return out


def find_stop(text: str, stops) -> int | None:
    hits = [i for i in (text.find(x) for x in stops if x) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
