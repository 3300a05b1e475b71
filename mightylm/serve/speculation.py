"""Speculative decoding inside continuous batching: what the engine needs beyond speculative.py's exact rule.

One speculative step over the running rows: each row gets up to G drafted tokens (prompt lookup on its own text, or
a draft model decoding all rows on a KV-cache pool laid out like the target's), the target scores every row's
[last token, drafts] in one pass of width G + 1, and each row keeps what the rule accepts (speculative.accept; the
argmax prefix when greedy). Rows accept different counts; the engine then moves the rows that accepted fewer to
the right (their pad grows) so that every row's next token again sits at one common slot.

Whether to speculate, and how wide, is decided every step (`choose_width`): a pass over R token-rows costs about
a + b R (draft_width.PassCost, fitted online from the passes the engine times), and a row whose drafts are accepted
with probability alpha yields (1 - alpha^(g + 1)) / (1 - alpha) tokens per pass for g drafts (Leviathan et al. 2023,
eq. 1). The width with the most expected tokens per second wins; width 0 is a plain decoding step. Under load
(many rows, little acceptance) this turns speculation off by itself; a plain step costs nothing extra.
"""

from __future__ import annotations

import time

import torch

from mightylm.draft_width import PassCost, expected_tokens
from mightylm.generate import Sampling, _left_pad
from mightylm.speculative import _sampled

ALPHA_PRIOR = 0.5  # the acceptance assumed for a row that has not been measured yet
ALPHA_WEIGHT = 0.3  # weight of the newest pass in a row's running acceptance
PROBE_EVERY = 16  # steps without speculating before one narrow step measures acceptance and pass cost again; the
# gap doubles after each probe (up to PROBE_MAX) until the policy speculates by itself, so under a load where it
# does not pay, probing costs a fraction of a percent
PROBE_MAX = 1024


def timed(fn, device) -> tuple[object, float]:
    """(fn(), its wall-clock seconds), waiting for the GPU where there is one."""
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def choose_width(available: list[int], alphas: list[float], cap: int, target: PassCost,
                 draft: PassCost | None = None) -> int:
    """The drafts per row (0 = a plain step) with the most expected tokens per second. available[i]: the drafts row
    i could take (0 for a row that opted out or has no match); every row is computed at the common width."""
    B = len(available)
    best, best_rate = 0, B / max(target.predict(B), 1e-9)
    for g in range(1, cap + 1):
        tokens = sum(expected_tokens(a, min(g, n)) for a, n in zip(alphas, available))
        seconds = target.predict(B * (g + 1))
        if draft is not None:  # catching up (about two tokens a row), then g - 1 one-token steps
            seconds += draft.predict(2 * B) + (g - 1) * draft.predict(B)
        rate = tokens / max(seconds, 1e-9)
        if rate > best_rate:
            best, best_rate = g, rate
    return best


class PooledDraft:
    """A draft model for the engine: its own KV-cache pool with the target pool's layout (same rows, same slots;
    its pads are the target's plus each row's virtual tokens, which only the target has), moved with it. Its cache
    is valid for every row up to slot `valid` (exclusive); a proposal first feeds the slots from there up to the
    rows' last tokens."""

    def __init__(self, model, max_batch: int, max_len: int):
        self.model = model.eval()
        self.pool = model.make_cache(max_batch, max_len)
        self.valid = 0
        self.cost = PassCost()
        self.last = 0.0  # seconds the latest proposal took
        self.device = model.device

    def caches(self) -> list[torch.Tensor]:
        return self.pool.k + self.pool.v

    def prefill(self, view, prompts: list[list[int]], pads: torch.Tensor, t: int) -> None:
        """Write new rows' prompts (right-aligned to end at slot t - 1, as in the target's pool) into the pool rows
        of `view`."""
        idx, _ = _left_pad(prompts, 0, self.device)
        self.model(idx, cache=view, start=t - idx.shape[1], pad=pads, last_only=True)

    def propose(self, rows, histories: list[list[int]], pads: torch.Tensor, t: int, g: int,
                settings: list[Sampling], generators: list) -> tuple[list[list[int]], list[torch.Tensor]]:
        """g drafted tokens per row and the distributions they were drawn from ((g, V) each). `rows` is the engine's
        view of its pool rows, histories[i] row i's tokens (prompt + generated; the last at slot t), pads the
        draft's pads."""
        began = time.perf_counter()
        B = len(histories)
        start = min(self.valid, t)
        idx = torch.zeros(B, t + 1 - start, dtype=torch.long)
        for i, h in enumerate(histories):  # the row's token at slot s is h[s - pad]; slots before pad are padding
            first = max(start, int(pads[i]))
            idx[i, first - start:] = torch.tensor(h[first - int(pads[i]):], dtype=torch.long)
        idx = idx.to(self.device)
        logits, seconds = timed(lambda: self.model(idx, cache=rows(self.pool), start=start, pad=pads,
                                                   last_only=True)[:, -1], self.device)
        self.cost.observe(idx.numel(), seconds)
        tokens: list[list[int]] = [[] for _ in range(B)]
        dists: list[list[torch.Tensor]] = [[] for _ in range(B)]
        for k in range(g):
            for i in range(B):
                token, probs = _sampled(logits[i:i + 1], settings[i], generators[i])
                tokens[i].append(int(token[0]))
                dists[i].append(probs[0])
            if k + 1 < g:
                step = torch.tensor([[ts[-1]] for ts in tokens], device=self.device)
                logits, seconds = timed(lambda: self.model(step, cache=rows(self.pool), start=t + 1 + k,
                                                           pad=pads)[:, -1], self.device)
                self.cost.observe(B, seconds)
        self.last = time.perf_counter() - began
        return tokens, [torch.stack(d) for d in dists]
