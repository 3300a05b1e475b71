"""Recurrent memory on a task that needs it: a key stated in the first segment, asked for at the end of the last.

    .venv/bin/python bench/rmt.py [--segments 2 4 8] [--steps 1500] [--segment 8] [--memory 4] [--curriculum]

Sequences of --segment x N tokens: [BOS, key (one of 16), random filler ..., QUERY, key]; only the key after QUERY
is scored. A tiny decoder (2 layers, dim 64, trained from scratch with AdamW, lr 1e-3, batch 32, gradients clipped
to norm 1) learns it three ways: with the whole sequence in one segment (full attention: the upper bound), as a
Recurrent Memory Transformer
with --memory slots over segments of --segment tokens (full BPTT), and over the same segments without memory
(each segment alone: chance, 1/16, is all it can do). Reported: held-out accuracy on 500 sequences and the
training time. This measures the mechanism (information carried only by the memory), not a pretrained model's
long-context skill: `mighty finetune rmt` is the way to train SmolLM2 with it, far slower on 2 cores.
"""

from __future__ import annotations

import argparse
import time

import torch

KEYS = 16


def batch(n: int, length: int, generator: torch.Generator):
    from mightylm.model import IGNORE_INDEX

    keys = torch.randint(10, 10 + KEYS, (n,), generator=generator)
    x = torch.randint(30, 64, (n, length), generator=generator)
    x[:, 0], x[:, 1], x[:, -2], x[:, -1] = 1, keys, 2, keys
    labels = torch.full_like(x, IGNORE_INDEX)
    labels[:, -2] = keys  # the QUERY position predicts the key
    return x, labels, keys


def schedule(length: int, steps: int, unit: int, curriculum: bool) -> list[int]:
    """The sequence length of each training step: `length` throughout, or with `curriculum` (Bulatov et al. 2023)
    equal shares of the steps at 1, 2, 4, ... units (segments) and then the full length."""
    if not curriculum:
        return [length] * steps
    stages = [unit * 2 ** i for i in range(20) if unit * 2 ** i < length] + [length]
    share = steps // len(stages)
    return [n for i, n in enumerate(stages) for _ in range(share if i < len(stages) - 1 else steps - share * i)]


def run(segment: int, memory: int, length: int, steps: int, seed: int = 0, curriculum: bool = False,
        unit: int = 8) -> tuple[float, float]:
    """Train the tiny decoder on the key task (one segment of `segment` tokens, with `memory` slots if any, over
    sequences of `length`); returns (held-out accuracy at `length`, training seconds). `curriculum`: the sequences
    grow from one `unit` to `length` over the steps."""
    from mightylm.config import ModelConfig
    from mightylm.model import Transformer
    from mightylm.rmt import RecurrentMemory

    torch.manual_seed(seed)
    base = Transformer(ModelConfig.from_preset("tiny", vocab_size=64, dim=64, n_layers=2, max_seq_len=256))
    rmt = RecurrentMemory(base, segment=segment, memory=memory, bptt=None)
    opt = torch.optim.AdamW(rmt.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + 1)
    began = time.perf_counter()
    for n in schedule(length, steps, unit, curriculum):
        x, labels, _ = batch(32, n, g)
        loss = rmt(x, labels=labels)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rmt.parameters(), 1.0)  # as `fit` does (train.grad_clip); without it the
        opt.step()  # gradient through 16 segments blew the RMT run up in a first try (accuracy back to chance)
    seconds = time.perf_counter() - began
    x, _, keys = batch(500, length, torch.Generator().manual_seed(99))
    with torch.no_grad():
        accuracy = float((rmt(x)[:, -2].argmax(-1) == keys).float().mean())
    return accuracy, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--segments", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--segment", type=int, default=8)
    ap.add_argument("--memory", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--curriculum", action="store_true",
                    help="train each model on 1, 2, 4, ... segments, then all of them, in equal shares of the steps")
    args = ap.parse_args()
    for name in ("segments", "segment", "steps"):
        value = getattr(args, name)
        if min(value if isinstance(value, list) else [value]) < 1:
            ap.error(f"--{name} must be positive, got {value}")
    if args.memory < 0:
        ap.error(f"--memory must be 0 or more, got {args.memory}")

    from mightylm.cli import env

    env()
    torch.set_num_threads(2)
    print(f"\nkey in segment 1 of N, asked at the end; {args.steps} steps; chance {1 / KEYS:.3f}\n")
    print("| segments | tokens | full attention | RMT (memory) | segments alone (no memory) |")
    print("|---|---|---|---|---|")
    for n in args.segments:
        length = n * args.segment
        kw = dict(curriculum=args.curriculum, unit=args.segment)
        full = run(length, 0, length, args.steps, **kw)
        memory = run(args.segment, args.memory, length, args.steps, **kw)
        alone = run(args.segment, 0, length, args.steps, **kw)
        print(f"| {n} | {length} | {full[0]:.3f} ({full[1]:.0f} s) | {memory[0]:.3f} ({memory[1]:.0f} s) | "
              f"{alone[0]:.3f} ({alone[1]:.0f} s) |", flush=True)


if __name__ == "__main__":
    main()
