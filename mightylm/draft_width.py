"""How many drafted tokens a speculative pass should check, without PyTorch (the server's engine, lite's loop and
speculative.py's choose this way): a pass over more token-rows costs more (`PassCost`, fitted from the passes
timed), and a draft yields what its tokens are expected to be accepted for (`expected_tokens`, Leviathan et al.
2023, eq. 1; `Acceptance` for drafts whose tokens are accepted as runs). The width with the most expected tokens per
second wins; width 0 is a plain step, so where drafts do not pay for their rows the loop stops checking them by itself.

Why lite needs it: on a CPU whose one-row pass is cheap (its weights in a large cache), extra rows cost a large
share of a step, more so in float32 (int24 tiles run each row as three int8 rows): a chat question or a code edit
whose drafts are seldom accepted decoded at 0.73-0.87x plain with every draft checked (bench/RESULTS.md)."""

from __future__ import annotations

RECHECK_EVERY = 16  # passes that cut a draft before one checks a draft whole: it measures the pass cost and the
# acceptance again (a slow minute on a VM would otherwise stop a width from being tried for good)


def expected_tokens(alpha: float, g: int) -> float:
    """Tokens one pass yields for a row with g drafts accepted with probability alpha each (the accepted prefix
    plus the token the target adds)."""
    if g <= 0:
        return 1.0
    if alpha >= 1:
        return g + 1.0
    return (1 - alpha ** (g + 1)) / (1 - alpha)


class PassCost:
    """Seconds of one forward pass as a function of its token-rows R (rows x tokens per row): the average of the
    recent passes of that size, or, for a size seen too little lately, a + b R fitted by least squares over all passes
    seen. Every pass seen weighs `decay` times less with each newer pass, in the line's sums and in each size's count
    (running sums, faded lazily: observing and predicting cost O(1)), so that a size not seen for a while falls back
    to the line. On a CPU the cost is convex in R (the products bound by the weights' bytes for a few rows, then by
    their arithmetic): fitted over passes of mostly 1-3 rows, the line put a 9-row pass at ~2.2 one-row passes where
    it cost 2.7, and prompt lookup's longest drafts were checked where they did not pay (bench/RESULTS.md)."""

    SEEN = 3  # (faded) passes of a size before their average replaces the line for it

    def __init__(self, decay: float = 0.99):
        self.decay = decay
        self.n = self.x = self.y = self.xx = self.xy = 0.0
        self.passes = 0
        self.sizes: dict[int, tuple[float, float, int]] = {}  # R -> (count, sum of seconds) as of pass number

    def observe(self, rows: int, seconds: float) -> None:
        f = self.decay
        self.n, self.x, self.y = f * self.n + 1, f * self.x + rows, f * self.y + seconds
        self.xx, self.xy = f * self.xx + rows * rows, f * self.xy + rows * seconds
        count, total = self._size(rows)
        self.passes += 1
        self.sizes[rows] = (f * count + 1, f * total + seconds, self.passes)

    def _size(self, rows: int) -> tuple[float, float]:
        """Size `rows`'s faded count and sum of seconds now"""
        count, total, then = self.sizes.get(rows, (0.0, 0.0, self.passes))
        fade = self.decay ** (self.passes - then)
        return count * fade, total * fade

    def fitted(self) -> bool:
        """Whether passes of more than one size have been seen (before that, extra rows cost what one does)."""
        mx = self.x / max(self.n, 1e-9)
        return self.n > 0 and self.xx / self.n - mx * mx > 1e-6 * max(mx * mx, 1)

    def predict(self, rows: int) -> float:
        count, total = self._size(rows)
        if count >= self.SEEN * self.decay ** self.SEEN:  # (SEEN passes in a row, the first faded the most)
            return total / count
        if not self.n:
            return float(rows)  # nothing measured yet: proportional to the rows (only ratios are compared)
        mx, my = self.x / self.n, self.y / self.n
        if not self.fitted():  # one size seen so far: assume the worst, every row costs the same
            return my * rows / max(mx, 1)
        b = max((self.xy / self.n - mx * my) / (self.xx / self.n - mx * mx), 0.0)
        return max(my - b * mx, 0.0) + b * rows


class Acceptance:
    """How often each source's drafted tokens are accepted: its first token, and a later one once the token before
    it was (a copied run tends to be right as a whole or wrong from its start: over 84 HumanEval completions, the
    first token of an 8-token match 0.95, of a 2-token match 0.58, the history's 0.48; later tokens 0.56-0.95). As
    counts that fade (`decay` per newer pass of the same source), starting from `prior` (first, later)."""

    def __init__(self, decay: float = 0.9, prior: tuple[float, float] = (0.5, 0.8)):
        self.decay, self.prior = decay, prior
        self.counts: dict[object, tuple[float, float, float, float]] = {}  # source -> first: hits, tries; later: ...

    def rates(self, source) -> tuple[float, float]:
        h1, n1, h2, n2 = self.counts.get(source, (0.0, 0.0, 0.0, 0.0))
        return (h1 + 2 * self.prior[0]) / (n1 + 2), (h2 + 2 * self.prior[1]) / (n2 + 2)  # two pseudo-passes

    def expected(self, source, g: int) -> float:
        """Tokens a pass yields checking g of this source's drafts."""
        first, later = self.rates(source)
        return 1.0 + first * sum(later ** j for j in range(g)) if g > 0 else 1.0

    def observe(self, source, drafted: int, accepted: int) -> None:
        if drafted:
            f = self.decay
            h1, n1, h2, n2 = self.counts.get(source, (0.0, 0.0, 0.0, 0.0))
            self.counts[source] = (f * h1 + (accepted > 0), f * n1 + 1, f * h2 + max(accepted - 1, 0),
                                   f * n2 + min(accepted, drafted - 1))


def draft_width(drafted: int, source, acceptance: Acceptance, cost: PassCost) -> int:
    """How many of `drafted` tokens from `source` one sequence's pass should check (0: a plain step)."""
    return max(range(drafted + 1), key=lambda g: acceptance.expected(source, g) / max(cost.predict(g + 1), 1e-12))


class Widths:
    """One generation's choice of widths: `choose` how many of a draft to check (every token until passes of two sizes
    have been timed, and one whole draft after RECHECK_EVERY cut ones), `observe` what a pass cost and accepted.
    `cost`: a PassCost that outlives the generation (a model's), else this generation's own."""

    def __init__(self, cost: PassCost | None = None):
        self.cost, self.acceptance, self.cut = cost if cost is not None else PassCost(), Acceptance(), 0

    def choose(self, drafted: int, source) -> int:
        width = drafted
        if drafted and self.cut < RECHECK_EVERY and self.cost.fitted():
            width = draft_width(drafted, source, self.acceptance, self.cost)
        self.cut = self.cut + 1 if width < drafted else 0
        return width

    def observe(self, rows: int, seconds: float, source, drafted: int, accepted: int) -> None:
        self.cost.observe(rows, seconds)
        self.acceptance.observe(source, drafted, accepted)
