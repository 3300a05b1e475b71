"""Prompt lookup's drafts without PyTorch (speculative.py and the torch-free lite.py both use them): the tokens
that followed an earlier occurrence of the text's ending, or where it has none, what most often followed the last
few tokens in the model's earlier answers (History); and the statistics of a speculative generation."""

from __future__ import annotations

from dataclasses import dataclass

from mightylm.errors import UsageError


class History:
    """What the model wrote before (earlier answers of a session, or a file of them), as next-token counts after
    each context of 1 .. `max_order` tokens. It drafts, token by token, the most frequent continuation of the
    longest context it has seen, while that continuation followed the context at least `share` of the time (half;
    looser shares drafted more and gained nothing, bench/lookup_replay.py). Fed to Lookup, it drafts where the text
    itself has no match: a model repeats its own idioms across answers (greedy HumanEval completions, 76 other
    problems' answers as the history, int8 on an AVX2 CPU: held-out problems 1.47x -> 1.62x plain decoding on the lite
    path; bench/RESULTS.md). A draft only proposes: the output is unchanged."""

    def __init__(self, max_order: int = 4, limit: int | None = None, share: float = 0.5):
        self.max_order, self.limit, self.share = max_order, limit, share
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
            if count < self.share * sum(counts.values()):
                break
            out.append(token)
            ctx = ctx[1:] + [token] if len(ctx) == self.max_order else ctx + [token]
        return out


@dataclass
class Lookup:
    """Drafts copied from the context: the tokens that followed the earlier occurrence of its ending that agrees with
    it longest (up to `max_ngram` tokens compared, the latest among equals), at least `min_ngram` tokens of it.
    The draft is as long as the agreement supports: gamma tokens after `max_ngram` agreeing tokens, proportionally
    fewer after fewer (at least one). On a CPU a verification pass costs more per drafted token than a GPU's, and a
    short match is the one most often wrong; on 40 held-out HumanEval completions and three summaries (a `/tmp`
    replay with measured pass costs, bench/RESULTS.md) this gave 4-7 % more speed than gamma tokens after any
    2- or 3-gram, and it keeps a large gamma from costing speed where matches are short."""

    max_ngram: int = 8
    min_ngram: int = 2  # a single repeated token predicts little and costs a wider verification pass
    history: History | None = None  # drafts where the text has no match (History)
    history_gamma: int = 2  # its most tokens a pass (1 to 3 measured in the replay: 2 best on code)

    def __post_init__(self):
        if self.min_ngram < 1 or self.max_ngram < self.min_ngram:
            raise UsageError(f"prompt lookup needs 1 <= min n-gram <= max n-gram, got {self.min_ngram}, "
                             f"{self.max_ngram}")

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

    def draft(self, context: list[int], gamma: int, history: History | None = None) -> tuple[list[int], object]:
        """(the drafted tokens, at most gamma: the text's own match, else the history's, `history` for this call in
        place of self.history: a server's per-user histories; where they come from: the number of agreeing tokens of
        the text's own match, or "history", None for no draft; how often each is accepted differs:
        draft_width.Acceptance)."""
        start, agree = self.match(context)
        history = history if history is not None else self.history
        if agree and gamma:
            return context[start:start + max(1, gamma * agree // self.max_ngram)], agree
        tokens = history.draft(context, min(gamma, self.history_gamma)) if history is not None and gamma else []
        return tokens, "history" if tokens else None


def parse_lookup(spec: str, kind: type = Lookup, **fields) -> Lookup:
    """`--draft prompt-lookup` or `prompt-lookup:N` (up to N tokens of agreement compared) as a `kind` (Lookup, or
    speculative.PromptLookup) with `fields`."""
    _, _, n = spec.partition(":")
    try:
        return kind(max_ngram=int(n) if n else 8, **fields)
    except ValueError:
        raise UsageError(f"--draft {spec}: write prompt-lookup or prompt-lookup:N, N the most tokens compared "
                         f"(a whole number, at least {Lookup.min_ngram})") from None


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
