"""The native decode block against the eager block on the same model: batch-1 greedy decode speed and
whether the two give the same tokens. SmolLM2-135M-Instruct (the embedded GGUF, dequantized to float32),
32-token prompt, 64 new tokens, each layout in the decode layout of `fuse_projections_`; the eager rows
are the same model with every `Block.fused_decode` switched off. Speeds include the prefill.

    .venv/bin/python bench/native_block.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import time

import mightylm
from mightylm.compress.quantize import DEFAULT_TARGETS, quantize_
from mightylm.fuse import fuse_projections_
from mightylm.generate import Sampling, generate


def timed(model, prompt, s: Sampling, repeats: int) -> tuple[list[int], float]:
    tokens = generate(model, [prompt], s)[0]  # also the warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        generate(model, [prompt], s)
        best = min(best, time.perf_counter() - start)
    return tokens, len(tokens) / best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base, tok = mightylm.load("smollm2-135m-instruct")
    prompt = tok.encode("The history of the printing press begins in the fifteenth century, when")[:32]
    s = Sampling(max_new_tokens=64)
    print(f"{'weights':10s} {'native tok/s':>12s} {'eager tok/s':>11s} {'speed-up':>8s} {'same tokens':>11s}")
    for method in ("float32", "int8", "int8+head", "nf4", "int4", "gguf blocks"):
        model = copy.deepcopy(base)
        if method == "gguf blocks":  # the file's own Q4_1 (and Q8_0) projections, as stored
            model, _ = mightylm.load("smollm2-135m-instruct", keep_blocks=True)
        elif method in ("nf4", "int4"):
            quantize_(model, method)
        elif method != "float32":
            quantize_(model, "int8", targets=DEFAULT_TARGETS + (("lm_head",) if method == "int8+head" else ()))
        fuse_projections_(model)
        native_tokens, native = timed(model, prompt, s, args.repeats)
        for block in model.layers:
            block.fused_decode = None
        eager_tokens, eager = timed(model, prompt, s, args.repeats)
        same = sum(a == b for a, b in zip(native_tokens, eager_tokens))
        print(f"{method:10s} {native:12.1f} {eager:11.1f} {native / eager:7.2f}x {same:>7d}/{len(eager_tokens)}",
              flush=True)


if __name__ == "__main__":
    main()
