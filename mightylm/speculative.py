"""Speculative decoding (Leviathan et al. 2023, Chen et al. 2023): a cheap draft proposes gamma tokens, the target
scores them all in one pass, and the exact rule keeps the target's distribution, so the output is what the target
alone would sample (token for token when greedy), only with fewer target passes.

The rule, with q the draft's and p the target's distribution *as sampled from* (after temperature, top-k and top-p:
generate.logits_to_probs for both): drafted token x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); the
first rejected position is resampled from norm(max(0, p_i - q_i)); when all gamma are accepted a bonus token is
drawn from p_{gamma+1}. Greedy settings make p and q one-hot, which reduces the rule to "accept while the draft
equals the target's argmax". A deterministic draft (prompt lookup) has a one-hot q: accepted with probability
p(x), resampled from p without x.

Drafts (each `propose(context, gamma, settings, generator) -> (tokens, q)`; q may be None when greedy):
- DraftModel: any model that shares the target's tokenizer, with its own KV cache; a rejected suffix is rolled back
  by position (its cache slots are overwritten next time; nothing accepted is recomputed).
- PromptLookup: the tokens that followed an earlier occurrence of the context's ending (Saxena 2023), as many as the
  agreement supports: no second model; strong where the answer repeats the prompt (code edits, summaries, retrieval).
  With a History (n-grams of what the model wrote before) it also drafts where the text has no match.
- self_draft(target, layers): the target's first N blocks, final norm and head (its weights, not a copy) as a
  draft model: the lossless form of early exit.
The target's cache rolls back the same way: the verification pass writes slots pos..pos+gamma and the next pass
starts at the first position after what was accepted. Batch 1 here; the server's batched steps are in
serve/engine.py and serve/speculation.py.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from mightylm.errors import UsageError
from mightylm.generate import Sampling, greedy, logits_to_probs, prefill, sample, sample_from_probs


def accept(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact rule for a batch of rows: p (B, g + 1, V) the target's distributions at each drafted position and
    the one after, q (B, g, V) the draft's, drafts (B, g) the drafted tokens. Returns (accepted count (B,), the
    next token (B,): the resampled or bonus one)."""
    B, g = drafts.shape
    rows = torch.arange(B, device=p.device)
    if g:
        p_x = p[:, :g].gather(-1, drafts[..., None])[..., 0]
        q_x = q.gather(-1, drafts[..., None])[..., 0]
        ratio = torch.where(q_x > 0, p_x / q_x.clamp(min=1e-30), torch.zeros_like(p_x))
        u = torch.rand(B, g, generator=generator, device=p.device)
        n = (u < ratio.clamp(max=1)).int().cumprod(dim=-1).sum(dim=-1)  # the accepted prefix
        q_n = torch.where((n < g)[:, None], q[rows, n.clamp(max=g - 1)], torch.zeros_like(p[:, 0]))
    else:
        n = torch.zeros(B, dtype=torch.long, device=p.device)
        q_n = torch.zeros_like(p[:, 0])
    p_n = p[rows, n]
    residual = (p_n - q_n).clamp(min=0)
    total = residual.sum(dim=-1, keepdim=True)
    residual = torch.where(total > 0, residual / total.clamp(min=1e-30), p_n)
    return n, sample_from_probs(residual, generator)


def _sampled(logits: torch.Tensor, s: Sampling, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(token (B,), the distribution it was drawn from (B, V)); greedy draws the argmax without using the RNG."""
    probs = logits_to_probs(logits, s)
    token = greedy(logits) if s.temperature == 0 else sample_from_probs(probs, generator)
    return token, probs


class DraftModel:
    """A smaller model with the target's vocabulary, decoding on its own KV cache."""

    def __init__(self, model):
        self.model, self.cache, self.fed = model.eval(), None, []

    def reset(self, max_len: int) -> None:
        self.cache, self.fed = self.model.make_cache(1, max_len), []

    @torch.inference_mode()
    def propose(self, context: list[int], gamma: int, s: Sampling, generator=None):
        if gamma == 0:
            return [], torch.zeros(0, self.model.config.vocab_size)
        keep = 0  # the cache is valid for the common prefix of what it was fed and the context
        while keep < min(len(self.fed), len(context)) and self.fed[keep] == context[keep]:
            keep += 1
        keep = min(keep, len(context) - 1)  # the last context token is always fed: its logits propose
        logits = self.model(torch.tensor([context[keep:]]), cache=self.cache, start=keep)[:, -1]
        self.fed = list(context)
        tokens, dists = [], []
        for i in range(gamma):
            token, probs = _sampled(logits, s, generator)
            tokens.append(int(token[0]))
            dists.append(probs[0])
            if i + 1 < gamma:
                logits = self.model(token[:, None], cache=self.cache, start=len(self.fed))[:, -1]
                self.fed.append(tokens[-1])
        return tokens, torch.stack(dists)


class History:
    """What the model wrote before (earlier answers of a session, or a file of them), as next-token counts after
    each context of 1 .. `max_order` tokens. It drafts, token by token, the most frequent continuation of the
    longest context it has seen, while that continuation followed the context at least half the time. Fed to
    PromptLookup, it drafts where the text itself has no match: a model repeats its own idioms across answers (on
    HumanEval completions, with 76 other problems' completions as the history, 1.30 -> 1.45x on held-out problems
    in a replay with measured pass costs; bench/RESULTS.md). A draft only proposes: the output is unchanged."""

    def __init__(self, max_order: int = 4, limit: int | None = None):
        self.max_order, self.limit = max_order, limit
        self.follows: dict[tuple[int, ...], dict[int, int]] = {}  # context -> {next token: count}
        self.tokens = 0

    def add(self, tokens: list[int]) -> None:
        """Count one text's n-grams (contexts never reach across texts). Past `limit` tokens in all, the counts
        start over from this text (a server's per-user histories stay bounded: ~0.6 KB a token)."""
        if self.limit is not None and self.tokens + len(tokens) > self.limit:
            self.follows, self.tokens = {}, 0
        for i in range(1, len(tokens)):
            for n in range(1, min(self.max_order, i) + 1):
                counts = self.follows.setdefault(tuple(tokens[i - n:i]), {})
                counts[tokens[i]] = counts.get(tokens[i], 0) + 1
        self.tokens += len(tokens)

    def draft(self, context: list[int], gamma: int) -> list[int]:
        out, ctx = [], list(context[-self.max_order:])
        while len(out) < gamma:
            counts = next((c for n in range(min(self.max_order, len(ctx)), 0, -1)
                           if (c := self.follows.get(tuple(ctx[-n:]))) is not None), None)
            if counts is None:
                break
            token, count = max(counts.items(), key=lambda kv: kv[1])
            if 2 * count < sum(counts.values()):
                break
            out.append(token)
            ctx = ctx[1:] + [token] if len(ctx) == self.max_order else ctx + [token]
        return out


@dataclass
class PromptLookup:
    """Drafts copied from the context: the tokens that followed the earlier occurrence of its ending that agrees with
    it longest (up to `max_ngram` tokens compared, the latest among equals), at least `min_ngram` tokens of it.
    The draft is as long as the agreement supports: gamma tokens after `max_ngram` agreeing tokens, proportionally
    fewer after fewer (at least one). On a CPU a verification pass costs more per drafted token than a GPU's, and a
    short match is the one most often wrong; on 40 held-out HumanEval completions and three summaries (a `/tmp`
    replay with measured pass costs, bench/RESULTS.md) this gave 4-7 % more speed than gamma tokens after any
    2- or 3-gram, and it keeps a large gamma from costing speed where matches are short."""

    max_ngram: int = 8
    min_ngram: int = 2  # a single repeated token predicts little and costs a wider verification pass
    vocab_size: int = 0
    history: History | None = None  # drafts where the text has no match (History)
    history_gamma: int = 2  # its most tokens a pass (1 to 3 measured in the replay: 2 best on code)

    def __post_init__(self):
        if self.min_ngram < 1 or self.max_ngram < self.min_ngram:
            raise UsageError(f"prompt lookup needs 1 <= min n-gram <= max n-gram, got {self.min_ngram}, "
                             f"{self.max_ngram}")

    def reset(self, max_len: int) -> None:
        pass

    def match(self, context: list[int]) -> tuple[int, int]:
        """(where the copied tokens start, how many tokens of the context's ending agree there); (0, 0) for none."""
        end, last, best, agree = len(context) - 1, context[-1] if context else None, 0, 0
        for start in range(end - 1, -1, -1):  # latest first: a later occurrence wins ties
            if context[start] != last:
                continue
            n = 1
            while n < self.max_ngram and n <= start and context[start - n] == context[end - n]:
                n += 1
            if n > agree:
                best, agree = start + 1, n
                if n == self.max_ngram:
                    break
        return (best, agree) if agree >= self.min_ngram else (0, 0)

    def propose(self, context: list[int], gamma: int, s: Sampling, generator=None, history: History | None = None):
        """`history`: one for this call in place of self.history (a server's per-user histories)."""
        start, agree = self.match(context)
        history = history if history is not None else self.history
        if agree and gamma:
            tokens = context[start:start + max(1, gamma * agree // self.max_ngram)]
        elif history is not None and gamma:
            tokens = history.draft(context, min(gamma, self.history_gamma))
        else:
            tokens = []
        if s.temperature == 0:  # greedy verification compares tokens; no distribution needed
            return tokens, None
        q = F.one_hot(torch.tensor(tokens, dtype=torch.long), self.vocab_size).float() if tokens \
            else torch.zeros(0, self.vocab_size)
        return tokens, q


def self_draft(target, layers: int) -> DraftModel:
    """The target's first `layers` blocks, final norm and head as a draft model (shared weights, its own cache)."""
    from mightylm.model import Transformer

    if not 1 <= layers < target.config.n_layers:
        raise UsageError(f"a self-draft uses the first N of the target's {target.config.n_layers} blocks: "
                         f"1 <= N < {target.config.n_layers}, got {layers}")
    config = dataclasses.replace(target.config, n_layers=layers)
    with torch.device("meta"):
        shallow = Transformer(config)
    shallow.embed, shallow.norm, shallow.lm_head = target.embed, target.norm, target.lm_head
    shallow.layers = torch.nn.ModuleList(list(target.layers)[:layers])
    shallow.prefix, shallow.transforms = target.prefix, target.transforms
    return DraftModel(shallow.eval())


def check_draft(target, draft, target_name: str = "the target", draft_name: str = "the draft") -> None:
    """A draft must speak the target's vocabulary; one larger than the target only wastes time (a warning)."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise UsageError(f"{draft_name} has a vocabulary of {draft.config.vocab_size} tokens and {target_name} "
                         f"{target.config.vocab_size}: speculative decoding compares their distributions token by "
                         "token, so the draft must share the target's tokenizer")
    if draft.config.n_params >= target.config.n_params:
        warnings.warn(f"{draft_name} ({draft.config.n_params / 1e6:.0f}M parameters) is not smaller than {target_name} "
                      f"({target.config.n_params / 1e6:.0f}M): speculation will be slower than plain decoding",
                      stacklevel=2)


@dataclass
class Stats:
    """What one speculative generation did."""

    drafted: int = 0
    accepted: int = 0
    target_passes: int = 0
    tokens: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / max(self.target_passes, 1)

    def report(self) -> str:
        return (f"speculative: {self.accepted} of {self.drafted} drafted tokens accepted ({self.acceptance:.0%}), "
                f"{self.tokens_per_pass:.2f} tokens per target pass")


@torch.inference_mode()
def speculative_tokens(model, prompt: list[int], s: Sampling, draft, gamma: int = 4, adaptive: bool = False,
                       stats: Stats | None = None) -> Iterator[int]:
    """The target's tokens for one prompt, as plain decoding would sample them, each target pass checking up to
    `gamma` drafted tokens (`adaptive`: one more after a full acceptance, one fewer after a rejection)."""
    if gamma < 1:
        raise UsageError(f"gamma (drafted tokens per target pass) must be at least 1, got {gamma}")
    if not prompt:
        raise UsageError("the prompt needs at least one token")
    if len(prompt) + s.max_new_tokens > model.config.max_seq_len:
        raise UsageError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({s.max_new_tokens}) exceeds the model's "
                         f"context of {model.config.max_seq_len} tokens")
    stats = stats if stats is not None else Stats()
    if s.max_new_tokens == 0:
        return
    generator = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
    room = len(prompt) + s.max_new_tokens + gamma + 2
    cache = model.make_cache(1, room)
    draft.reset(room + 8)
    pending = [int(sample(prefill(model, torch.tensor([prompt]), cache), s, generator)[0])]
    context, produced, g = list(prompt), 0, gamma
    stops = set(s.stop_token_ids)
    while True:
        for t in pending:  # the accepted drafts and the next token; the last is not yet in the target's cache
            yield t
            produced += 1
            stats.tokens += 1
            context.append(t)
            if t in stops or produced >= s.max_new_tokens:
                return
        g = min(g, s.max_new_tokens - produced - 1)  # never draft past the end
        drafts, q = draft.propose(context, g, s, generator)
        pos = len(context) - 1  # the slot of the context's last token
        logits = model(torch.tensor([[context[-1], *drafts]]), cache=cache, start=pos)[0]  # (len(drafts) + 1, V)
        if s.temperature == 0:  # the rule with one-hot p and q, without building them: the argmax prefix
            best = greedy(logits).tolist()
            n = next((i for i, d in enumerate(drafts) if d != best[i]), len(drafts))
            nxt = best[n]
        else:
            p = logits_to_probs(logits, s)
            n, nxt = accept(p[None], q[None].to(p.dtype), torch.tensor([drafts], dtype=torch.long).view(1, -1),
                            generator)
            n, nxt = int(n[0]), int(nxt[0])
        stats.drafted += len(drafts)
        stats.accepted += n
        stats.target_passes += 1
        pending = drafts[:n] + [nxt]
        if adaptive:
            g = gamma = min(gamma + 1, 16) if drafts and n == len(drafts) else max(1, gamma - 1)
        else:
            g = gamma


def make_draft(spec: str, target, *, load=None) -> object:
    """A draft from its command-line spelling: a model path, `prompt-lookup` (or `prompt-lookup:N`, up to N
    tokens of agreement compared), or `layers:N` (the target's first N blocks)."""
    if spec.startswith("prompt-lookup"):
        _, _, n = spec.partition(":")
        try:
            return PromptLookup(max_ngram=int(n) if n else 8, vocab_size=target.config.vocab_size)
        except ValueError:
            raise UsageError(f"--draft {spec}: write prompt-lookup or prompt-lookup:N, N the most tokens compared "
                             f"(a whole number, at least {PromptLookup.min_ngram})") from None
    if spec.startswith("layers:"):
        try:
            n = int(spec.partition(":")[2])
        except ValueError:
            raise UsageError(f"--draft {spec}: write layers:N (the target's first N blocks)") from None
        return self_draft(target, n)
    model = load(spec)
    check_draft(target, model, "the target", spec)
    return DraftModel(model)
