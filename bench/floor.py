"""The floor of a training step on this machine, against the 1.3x goals of the training and LoRA issues.

A float32 step of any implementation runs at least its matrix products and its attention. Here each
product of a step is timed alone at its real shape (rows = 4 x 256 tokens; whole, unchunked, the fastest
way to run it; into a preallocated output; the fastest of 7 runs) with PyTorch's own GEMM, and attention
with PyTorch's flash kernel (forward + backward, grouped-query); their sum is the floor. Norms, RoPE, SiLU, residual adds, the loss's softmax, the
embedding gradient, the optimizer and LoRA's own rank-8 products are counted as free. The reference
(transformers, + peft for LoRA) and mightylm are then measured in the same run (bench/train.py's runner)
and the goal's time per step, 1 / (1.3 x the reference's tokens/s), is set against the floor.

    .venv/bin/python bench/floor.py [--shapes micro-15m smollm2-135m] [--methods full lora] [--steps 12]
        [--warmup 6]

The goal is about fixed-shape steps, so the steps are timed once the allocator has settled: a 135M LoRA run
(huge pages on, as `mighty finetune` runs) took 234k, 84k, 57k, 47k, 21k and then ~2-5k page faults in its first
steps, 7.0 -> 4.7 s a step (2026-12-05; without huge pages it settled after 3 steps). Six warm-up steps leave that
out for both frameworks.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from train import run  # noqa: E402  (bench/train.py's runner: one fresh subprocess per measurement)

from mightylm.config import ModelConfig  # noqa: E402

ROWS = 4 * 256
GOAL = 1.3


def products(c: ModelConfig, method: str) -> Counter:
    """(m, k, n) -> how many (m x k) @ (k x n) products one training step needs."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    linears = {"q": (c.dim, q), "k": (c.dim, kv), "v": (c.dim, kv), "o": (q, c.dim),
               "gate": (c.dim, c.ffn_dim), "up": (c.dim, c.ffn_dim), "down": (c.ffn_dim, c.dim)}
    count = Counter()
    for layer in range(c.n_layers):
        for name, (d_in, d_out) in linears.items():
            count[ROWS, d_in, d_out] += 1  # forward
            # input gradient; with frozen embeddings (LoRA) layer 0's q/k/v inputs need none
            if method == "full" or layer > 0 or name not in ("q", "k", "v"):
                count[ROWS, d_out, d_in] += 1
            if method == "full":
                count[d_out, ROWS, d_in] += 1  # weight gradient
    count[ROWS, c.dim, c.vocab_size] += 1  # the head: forward, input gradient, weight gradient
    count[ROWS, c.vocab_size, c.dim] += 1
    if method == "full":
        count[c.vocab_size, ROWS, c.dim] += 1
    return count


def timed(fn, repeats: int = 7) -> float:
    """The fastest of `repeats` runs: a floor, so the best case, not a typical one (this shared VM is noisy)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def floor_seconds(c: ModelConfig, method: str) -> tuple[float, float]:
    """(seconds of matrix products, seconds of attention) for one step."""
    gemm = 0.0
    for (m, k, n), count in products(c, method).items():
        a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
        gemm += count * timed(lambda: torch.mm(a, b, out=out))
    q = torch.randn(4, c.n_heads, 256, c.head_dim, requires_grad=True)
    k, v = (torch.randn(4, c.n_kv_heads, 256, c.head_dim, requires_grad=True) for _ in range(2))
    grad = torch.randn(4, c.n_heads, 256, c.head_dim)
    attention = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(grad))
    return gemm, c.n_layers * attention


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["micro-15m", "smollm2-135m"])
    parser.add_argument("--methods", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=6)
    args = parser.parse_args()
    print(f"per step of 4 x 256 tokens, float32, {torch.get_num_threads()} threads; goal = {GOAL}x the reference")
    print(f"{'shape':13s} {'method':6s} {'products':>9s} {'attention':>9s} {'floor':>8s} {'reference':>10s} "
          f"{'mightylm':>9s} {'goal':>8s} {'left for the rest':>17s}")
    for shape in args.shapes:
        c = ModelConfig.from_preset(shape)
        for method in args.methods:
            gemm, attention = floor_seconds(c, method)
            ref = run("transformers", shape, args.steps, args.warmup, "fp32", method)["tokens_per_s"]
            ours = run("mightylm", shape, args.steps, args.warmup, "fp32", method)["tokens_per_s"]
            goal = ROWS / (GOAL * ref)
            floor = gemm + attention
            print(f"{shape:13s} {method:6s} {gemm:8.2f}s {attention:8.2f}s {floor:7.2f}s {ROWS / ref:9.2f}s "
                  f"{ROWS / ours:8.2f}s {goal:7.2f}s {goal - floor:8.2f}s ({(goal - floor) / goal:4.0%})")


if __name__ == "__main__":
    main()
