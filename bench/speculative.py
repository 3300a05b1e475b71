"""Speculative decoding on the embedded SmolLM2-135M-Instruct (GGUF blocks kept, as `mighty generate` runs it):
acceptance, tokens per target pass and decode tokens/s against plain decoding, per draft and prompt kind, at
temperature 0 and 0.7, in one run (each speculative run right after its plain one).

Drafts: prompt lookup (n-grams of the prompt and the text so far) and the target's own first N blocks. Prompts:
a chat question, a code edit (the answer repeats the code) and a summary of a given text. The speed-up Leviathan
et al.'s formula predicts from the measured acceptance a and the draft's cost c relative to one target pass,
E[tokens per pass] / (gamma c + 1) with E = (1 - a^(gamma + 1)) / (1 - a), is printed beside the measured one
(c = 0 for prompt lookup, N / n_layers for early layers).

    .venv/bin/python bench/speculative.py [--gamma 4] [--max-new-tokens 96] [--adaptive] [--drafts prompt-lookup ...]
"""

from __future__ import annotations

import argparse
import time

PROMPTS = {
    "chat": "What are three good habits for staying healthy? Answer in a short list.",
    "code": ("Rename the variable `total` to `acc` in this function and return the code:\n\n"
             "def add_all(values):\n    total = 0\n    for v in values:\n        total = total + v\n"
             "    return total\n"),
    "summary": ("Summarise this text in two sentences:\n\nThe quick brown fox jumps over the lazy dog. The dog, "
                "who had been asleep in the sun all afternoon, woke up and chased the fox across the field. The fox "
                "escaped into the forest, and the dog returned to its place in the sun, where it slept until "
                "evening."),
}


def run(source, n: int) -> tuple[list[int], float]:
    """(tokens, decode tokens/s after the first token)."""
    it = source()
    first = [next(it)]
    t = time.perf_counter()
    rest = list(it)
    return first + rest, len(rest) / max(time.perf_counter() - t, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--adaptive", action="store_true", help="grow gamma after a full acceptance, shrink it after a rejection")
    ap.add_argument("--drafts", nargs="*", default=["prompt-lookup", "layers:8", "layers:15"])
    args = ap.parse_args()

    from mightylm.cli import env
    from mightylm.generate import Sampling, load_for_generation, stream_tokens
    from mightylm.speculative import PromptLookup, Stats, self_draft, speculative_tokens

    env()
    model, tok = load_for_generation("smollm2-135m-instruct", keep_blocks=True)
    L = model.config.n_layers
    drafts = {"prompt-lookup": (lambda: PromptLookup(vocab_size=model.config.vocab_size), 0.0),
              "layers:8": (lambda: self_draft(model, 8), 8 / L), "layers:15": (lambda: self_draft(model, 15), 15 / L)}
    drafts = {name: drafts[name] for name in args.drafts}
    print(f"\ngamma {args.gamma}, {args.max_new_tokens} new tokens, decode only (after the first token)\n")
    print("| prompt | T | draft | acceptance | tokens/pass | plain tok/s | speculative tok/s | speed-up | predicted |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, text in PROMPTS.items():
        ids = tok.encode_chat([{"role": "user", "content": text}])
        for temperature in (0.0, 0.7):
            s = Sampling(max_new_tokens=args.max_new_tokens, temperature=temperature, seed=0,
                         stop_token_ids=tok.stop_token_ids)
            for name, (make, cost) in drafts.items():
                plain_tokens, plain_rate = run(lambda: stream_tokens(model, ids, s), args.max_new_tokens)
                stats = Stats()
                spec_tokens, spec_rate = run(lambda: speculative_tokens(model, ids, s, make(), args.gamma,
                                                                                    adaptive=args.adaptive, stats=stats),
                                             args.max_new_tokens)
                if temperature == 0:
                    assert spec_tokens == plain_tokens, "greedy speculation must reproduce plain decoding"
                a, g = stats.acceptance, args.gamma
                expected = (1 - a ** (g + 1)) / (1 - a) if a < 1 else g + 1
                print(f"| {kind} | {temperature} | {name} | {a:.0%} | {stats.tokens_per_pass:.2f} | {plain_rate:.1f} | "
                      f"{spec_rate:.1f} | {spec_rate / plain_rate:.2f}x | {expected / (g * cost + 1):.2f}x |")


if __name__ == "__main__":
    main()
