"""Training throughput and peak memory: mightylm's fit() vs a plain transformers training loop.

Same config, random weights, AdamW (lr 3e-4, betas 0.9/0.95, wd 0.1), batch 4 x 256 tokens,
float32, at a ~15M shape and the SmolLM2-135M shape. Each (framework, shape) trains in a fresh
subprocess so that its peak resident memory is its own; runs are interleaved (ours, theirs,
ours, theirs) and medians reported. Warm-up steps are excluded from tokens/s.

    .venv/bin/python bench/train.py [--steps 12] [--warmup 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

WORKER = r"""
import json, resource, sys, tempfile, time
if sys.argv[1] == "mightylm":
    from mightylm.huge_pages import for_training
    for_training()  # what `mighty pretrain|finetune|distill` do before torch is imported
import torch
import mightylm
from mightylm.config import ModelConfig

framework, shape, steps, warmup = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
bf16 = sys.argv[5] == "bf16"
method = sys.argv[6] if len(sys.argv) > 6 else "full"  # full (AdamW) | lora | lomo, optionally +ckpt
checkpointing = method.endswith("+ckpt")
method = method.removesuffix("+ckpt")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
from contextlib import nullcontext
autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
config = ModelConfig.from_preset(shape)
torch.manual_seed(0)
batches = [torch.randint(0, config.vocab_size, (4, 257)) for _ in range(steps)]
if framework == "mightylm":
    from mightylm.data.loader import Loader
    from mightylm.train import TrainConfig, fit
    model = mightylm.Transformer(config)
    optimizer = None
    if method == "lora":
        from mightylm.adapters.lora import apply_lora
        apply_lora(model, TARGETS, r=8, alpha=16)
    if method == "lomo":
        from mightylm.optim.lomo import LOMO
        optimizer = LOMO(model.parameters(), lr=1e-3)
    items = [{"input_ids": b[i, :-1], "labels": b[i, 1:]} for b in batches for i in range(4)]
    cfg = TrainConfig(steps=steps, batch_size=4, lr=3e-4, warmup=1, eval_every=10**9, save_every=10**9, log_every=1,
                      bf16=bf16, grad_clip=None if method == "lomo" else 1.0, activation_checkpointing=checkpointing)
    with tempfile.TemporaryDirectory() as run:
        fit(model, Loader(items, 4, shuffle=False), run, cfg, optimizer=optimizer, progress=False)
        rows = [json.loads(l) for l in open(run + "/metrics.jsonl")]
    times = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])][warmup - 1:]
else:
    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as d:
        mightylm.save(mightylm.Transformer(config), None, d)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    times = []
    for step, b in enumerate(batches):
        t = time.perf_counter()
        with autocast:
            loss = model(input_ids=b[:, :-1], labels=b[:, :-1]).loss  # HF shifts labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"tokens_per_s": 4 * 256 / (sum(times) / len(times)), "peak_mb": peak / 1024,
                  "params_m": config.n_params / 1e6}))
"""


def run(framework: str, shape: str, steps: int, warmup: int, precision: str = "fp32", method: str = "full") -> dict:
    """Train in a fresh subprocess; returns tokens_per_s, peak_mb (its peak RSS) and params_m."""
    result = subprocess.run([sys.executable, "-c", WORKER, framework, shape, str(steps), str(warmup), precision,
                             method],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{framework} {shape} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def gemm_peak_gflops() -> float:
    """Measured float32 matrix-multiply rate of this machine (best of 2048^3 products), in GFLOP/s."""
    import time

    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best / 1e9


def flops_per_token(shape: str, method: str = "full", seq_len: int = 256) -> float:
    """Matrix-multiply FLOPs one training token needs: 6 per weight for full training (forward, input
    gradient, weight gradient), 4 per frozen weight (LoRA's base and head: no weight gradient; the rank-8
    adapters add <1 %), plus causal attention (forward and a backward of twice its cost)."""
    from mightylm.config import ModelConfig

    c = ModelConfig.from_preset(shape)
    block = c.n_layers * (c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.dim * c.ffn_dim)
    head = c.vocab_size * c.dim
    per_weight = 4 if method.startswith("lora") else 6
    attention = 3 * c.n_layers * 2 * seq_len * c.n_heads * c.head_dim  # QK^T and AV over T/2 keys on average, x3
    return per_weight * (block + head) + attention


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["micro-15m", "smollm2-135m"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], help="bf16: autocast on both sides")
    args = parser.parse_args()
    peak = gemm_peak_gflops()
    print(f"float32 GEMM peak here: {peak:.0f} GFLOP/s (2048^3). 'bound': tokens/s if every step were only its "
          "matrix products at that rate (fp32 rows; nothing else free of cost)")
    print(f"{'shape':14s} {'prec':4s} {'params':>8s} {'transformers':>22s} {'mightylm':>22s} {'speed':>7s} {'memory':>7s} "
          f"{'bound':>10s} {'ours/bound':>10s}")
    for shape, precision in [(s, p) for s in args.shapes for p in args.precisions]:
        results = {"mightylm": [], "transformers": []}
        for _ in range(args.repeats):
            for framework in results:
                results[framework].append(run(framework, shape, args.steps, args.warmup, precision))
        med = {f: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for f, rs in results.items()}
        ours, ref = med["mightylm"], med["transformers"]
        bound = peak * 1e9 / flops_per_token(shape)
        print(f"{shape:14s} {precision:4s} {ours['params_m']:7.1f}M {ref['tokens_per_s']:8.0f} tok/s {ref['peak_mb']:6.0f} MB "
              f"{ours['tokens_per_s']:8.0f} tok/s {ours['peak_mb']:6.0f} MB {ours['tokens_per_s'] / ref['tokens_per_s']:6.2f}x "
              f"{ours['peak_mb'] / ref['peak_mb']:6.2f}x {bound:10.0f} {ours['tokens_per_s'] / bound:9.0%}")


if __name__ == "__main__":
    main()
