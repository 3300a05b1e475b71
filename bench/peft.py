"""LoRA training speed and memory: mightylm vs transformers + peft; LOMO vs AdamW memory.

Same model shape, rank 8 (alpha 16) on q/k/v/o/gate/up/down, AdamW on the adapters, batch
4 x 256 tokens, float32, random weights; each run in a fresh subprocess (peak RSS is its own),
interleaved, medians. Then full fine-tuning at the SmolLM2-135M shape with AdamW vs LOMO (SGD
fused into backward): peak memory, with stored activations and with activation checkpointing
(where weights, gradients and optimizer state, what LOMO removes, dominate the peak).

    .venv/bin/python bench/peft.py [--steps 10] [--repeats 2] [--parts lora lomo]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train import flops_per_token, gemm_peak_gflops, run  # noqa: E402  (bench/train.py's runner and bound)


def median_of(framework: str, shape: str, method: str, args) -> dict:
    rows = [run(framework, shape, args.steps, args.warmup, "fp32", method) for _ in range(args.repeats)]
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["micro-15m", "smollm2-135m"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--parts", nargs="+", choices=["lora", "lomo"], default=["lora", "lomo"])
    args = parser.parse_args()
    if "lora" in args.parts:
        lora_vs_peft(args)
    if "lomo" in args.parts:
        lomo_vs_adamw(args)


def lora_vs_peft(args):
    peak = gemm_peak_gflops()
    print(f"float32 GEMM peak here: {peak:.0f} GFLOP/s; 'bound': tokens/s if a step were only its matrix products "
          "at that rate (4 FLOPs per frozen weight and token, plus attention; the rank-8 adapters' own products neglected)")
    print(f"{'LoRA r=8':14s} {'params':>8s} {'transformers+peft':>24s} {'mightylm':>22s} {'speed':>7s} {'memory':>7s} "
          f"{'bound':>10s} {'ours/bound':>10s}")
    for shape in args.shapes:
        ours, ref = median_of("mightylm", shape, "lora", args), median_of("transformers", shape, "lora", args)
        bound = peak * 1e9 / flops_per_token(shape, "lora")
        print(f"{shape:14s} {ours['params_m']:7.1f}M {ref['tokens_per_s']:10.0f} tok/s {ref['peak_mb']:7.0f} MB "
              f"{ours['tokens_per_s']:8.0f} tok/s {ours['peak_mb']:6.0f} MB "
              f"{ours['tokens_per_s'] / ref['tokens_per_s']:6.2f}x {ours['peak_mb'] / ref['peak_mb']:6.2f}x "
              f"{bound:10.0f} {ours['tokens_per_s'] / bound:9.0%}")


def lomo_vs_adamw(args):
    for suffix, label in (("", "stored activations"), ("+ckpt", "activation checkpointing")):
        adamw = median_of("mightylm", "smollm2-135m", "full" + suffix, args)
        lomo = median_of("mightylm", "smollm2-135m", "lomo" + suffix, args)
        print(f"full fine-tuning at smollm2-135m, {label}: AdamW {adamw['peak_mb']:.0f} MB "
              f"({adamw['tokens_per_s']:.0f} tok/s), LOMO {lomo['peak_mb']:.0f} MB ({lomo['tokens_per_s']:.0f} tok/s): "
              f"LOMO needs {lomo['peak_mb'] / adamw['peak_mb']:.2f}x the memory of AdamW")


if __name__ == "__main__":
    main()
