"""Speculative decoding (Leviathan et al. 2023, Chen et al. 2023): a cheap draft proposes gamma tokens, the target
scores them all in one pass, and the exact rule keeps the target's distribution, so the output is what the target
alone would sample (token for token when greedy), only with fewer target passes.

The rule, with q the draft's and p the target's distribution *as sampled from* (after temperature, top-k and top-p:
generate.logits_to_probs for both): drafted token x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); the
first rejected position is resampled from norm(max(0, p_i - q_i)); when all gamma are accepted a bonus token is
drawn from p_{gamma+1}. Greedy settings make p and q one-hot, which reduces the rule to "accept while the draft
equals the target's argmax". A deterministic draft (prompt lookup) has a one-hot q: accepted with probability
p(x), resampled from p without x, which accept_copied does by drawing each token as plain decoding draws it and
accepting a draft that equals the draw (a seed then gives plain decoding's text).

Drafts (each `propose(context, gamma, settings, generator) -> (tokens, q)`; q is None when greedy, and always for
prompt lookup):
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
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch

from mightylm.draft_width import Widths
from mightylm.errors import UsageError
from mightylm.generate import Sampling, greedy, logits_to_probs, prefill, sample, sample_from_probs
from mightylm.lookup import History, Lookup, Stats, parse_lookup


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


def accept_copied(logits: torch.Tensor, s: Sampling, drafts: list[int], generator=None) -> tuple[int, int]:
    """The exact rule for a deterministic draft (prompt lookup: q one-hot at each drafted token), drawn as plain
    decoding draws: logits (len(drafts) + 1, V) the target's at each drafted position and the one after. Each
    position's token is `sample`d from its row with `generator`, one draw as plain decoding takes it; drafted x_i is
    accepted when the draw is x_i (probability p_i(x_i): the rule's min(1, p/q)), and a draw that differs is the next
    token (distributed as p_i without x_i: norm(max(0, p - q))); with all accepted a bonus token comes from the last
    row. One draw per token, as plain decoding spends them, so a seed gives plain decoding's text however much was
    drafted (lite.accept_copied is the same rule in numpy). Returns (accepted count, the next token)."""
    for i, x in enumerate(drafts):
        token = int(sample(logits[i:i + 1], s, generator)[0])
        if token != x:
            return i, token
    return len(drafts), int(sample(logits[len(drafts):len(drafts) + 1], s, generator)[0])


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


@dataclass
class PromptLookup(Lookup):
    """Lookup's drafts (mightylm/lookup.py) as a draft of this module. They are deterministic (q one-hot at each
    drafted token), so `propose` gives no q: the loops check them with accept_copied, which draws as plain decoding
    draws."""

    source: object = field(default=None, init=False, repr=False)  # the last proposal's (Lookup.draft)

    def reset(self, max_len: int) -> None:
        pass

    def propose(self, context: list[int], gamma: int, s: Sampling, generator=None, history: History | None = None):
        tokens, self.source = self.draft(context, gamma, history)
        return tokens, None


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


@torch.inference_mode()
def speculative_tokens(model, prompt: list[int], s: Sampling, draft, gamma: int = 4, adaptive: bool = False,
                       stats: Stats | None = None, every_draft: bool = False) -> Iterator[int]:
    """The target's tokens for one prompt, as plain decoding would sample them, each target pass checking up to
    `gamma` drafted tokens (`adaptive`: one more after a full acceptance, one fewer after a rejection). Prompt lookup
    checks only as much of a draft as pays for its rows (draft_width, as lite's loop does: the passes timed,
    acceptance learnt per draft source; `every_draft`: all of every draft), and samples by accept_copied: with a
    seed, plain decoding's text, whatever the widths chosen."""
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
    generator = torch.Generator(device=model.device).manual_seed(s.seed) if s.seed is not None else None
    room = len(prompt) + s.max_new_tokens + gamma + 2
    cache = model.make_cache(1, room)
    draft.reset(room + 8)
    pending = [int(sample(prefill(model, torch.tensor([prompt]), cache), s, generator)[0])]
    context, produced, g = list(prompt), 0, gamma
    stops = set(s.stop_token_ids)
    copied = isinstance(draft, PromptLookup)
    widths = Widths() if copied and not (adaptive or every_draft) else None  # this generation's pass times
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
        if widths is not None:
            drafts = drafts[:widths.choose(len(drafts), draft.source)]
        began = time.perf_counter()
        pos = len(context) - 1  # the slot of the context's last token
        logits = model(torch.tensor([[context[-1], *drafts]]), cache=cache, start=pos)[0]  # (len(drafts) + 1, V)
        if s.temperature == 0:  # the rule with one-hot p and q, without building them: the argmax prefix
            best = greedy(logits).tolist()
            n = next((i for i, d in enumerate(drafts) if d != best[i]), len(drafts))
            nxt = best[n]
        elif copied:
            n, nxt = accept_copied(logits, s, drafts, generator)
        else:
            p = logits_to_probs(logits, s)
            n, nxt = accept(p[None], q[None].to(p.dtype), torch.tensor([drafts], dtype=torch.long).view(1, -1),
                            generator)
            n, nxt = int(n[0]), int(nxt[0])
        if widths is not None:  # (the tokens above are on the host: the pass has finished on any device)
            widths.observe(len(drafts) + 1, time.perf_counter() - began, draft.source, len(drafts), n)
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
        return parse_lookup(spec, PromptLookup)
    if spec.startswith("layers:"):
        try:
            n = int(spec.partition(":")[2])
        except ValueError:
            raise UsageError(f"--draft {spec}: write layers:N (the target's first N blocks)") from None
        return self_draft(target, n)
    model = load(spec)
    check_draft(target, model, "the target", spec)
    return DraftModel(model)
