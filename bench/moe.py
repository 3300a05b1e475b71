"""Mixture of experts at small scale, on the embedded Shakespeare corpus, and its batch-1 decode speed.

1. The Switch claim: a dense model and a mixture (8 experts, top-2) with the same active parameters per token
   (the dense feed-forward is as wide as two experts), trained from the same initialisation seed on the same
   tokens: validation loss over training on one plot (bench/figures/moe.png).
2. Balancing ablation, same mixture: per-layer balancing (ours, the default), Hugging Face's pooled loss, none;
   validation loss and the experts' lowest / highest utilisation at the end (1.0 fair, 0.0 dead).
3. Upcycling: a dense model as wide as one expert trained for half the steps, upcycled (8 copies, top-2,
   renormalised: the same function at the switch) and trained for the other half.
4. Decode: batch-1 greedy tokens/s of a mixture (8 x 1024, top-2) against a dense model of equal total size
   (one feed-forward of 8192) and one of equal active size (2048), random weights, in one run; decode steps only
   (the 32-token prompt's prefill, which runs every expert some token chose, is not timed).

    .venv/bin/python bench/moe.py [--steps 300] [--skip-training]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def shape(**overrides):
    from mightylm.config import ModelConfig

    base = dict(arch="llama", vocab_size=2048, dim=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=512,
                max_seq_len=256)
    base.update(overrides)
    return ModelConfig(**base)


def train(model, windows, val, steps: int, run: Path, balance: str = "per_layer"):
    import json

    from mightylm.data.loader import Loader
    from mightylm.moe import set_router_losses
    from mightylm.train import TrainConfig, fit

    cfg = TrainConfig(steps=steps, batch_size=8, lr=2e-3, min_lr=2e-4, warmup=20, eval_every=max(steps // 6, 1),
                      eval_batches=8, save_every=10**9, log_every=10, seed=0)
    set_router_losses(model, balance=balance)  # the default loss adds them, as `mighty pretrain --router.balance`
    fit(model, Loader(windows, 8, seed=0), run, cfg, val=Loader(val, 8, shuffle=False), progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    last = [r for r in rows if "moe_util_min" in r][-1:] or [{}]
    return curve, last[0]


def experiment(steps: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mightylm.data.pretrain import TokenStream, embedded_corpus, read_documents
    from mightylm.model import MLP, Transformer
    from mightylm.moe import upcycle_
    from mightylm.tokenizer import train_bpe

    files = embedded_corpus("shakespeare")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        tok = train_bpe(vocab_size=2048, texts=(d for f in files[:12] for d in read_documents(f)))
        stream = TokenStream.build(files[:12], tok, scratch / "data", progress=False)
        windows, val = stream.split(128, 0.02)
        print(f"data: {len(stream):,} tokens, {len(windows)} training windows of 128; {steps} steps of 8 windows")
        runs = {
            "dense (ffn 512)": (shape(), "per_layer"),
            "MoE 8x256 top-2, per-layer balancing": (shape(arch="mixtral", n_experts=8, experts_per_token=2,
                                                          ffn_dim=256), "per_layer"),
            "MoE, HF pooled balancing": (shape(arch="mixtral", n_experts=8, experts_per_token=2, ffn_dim=256), "hf"),
            "MoE, no balancing": (shape(arch="mixtral", n_experts=8, experts_per_token=2, ffn_dim=256), "off"),
        }
        curves, ends = {}, {}
        for name, (config, balance) in runs.items():
            torch.manual_seed(0)
            model = Transformer(config)
            t = time.perf_counter()
            curves[name], ends[name] = train(model, windows, val, steps, scratch / name.replace(" ", "_"), balance)
            print(f"{name:40s} {config.n_params / 1e6:.2f}M params ({config.active_params / 1e6:.2f}M active): "
                  f"val loss {curves[name][-1][1]:.3f}, utilisation min {ends[name].get('moe_util_min', 1):.2f} "
                  f"max {ends[name].get('moe_util_max', 1):.2f}, {time.perf_counter() - t:.0f} s", flush=True)
        torch.manual_seed(0)
        dense = Transformer(shape(ffn_dim=256))
        first, _ = train(dense, windows, val, steps // 2, scratch / "upcycle-dense")
        upcycle_(dense, n_experts=8, top_k=2, expert=MLP)
        second, end = train(dense, windows, val, steps - steps // 2, scratch / "upcycle-moe")
        offset = first[-1][0]
        name = "dense ffn 256, upcycled at half way"
        curves[name] = first + [(tokens + offset, v) for tokens, v in second]
        print(f"{name:40s} val loss {curves[name][-1][1]:.3f}, utilisation min {end.get('moe_util_min', 1):.2f} "
              f"max {end.get('moe_util_max', 1):.2f}")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot([t for t, _ in curve], [v for _, v in curve], marker="o", ms=3, label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("Dense vs mixture of experts (same active parameters), Shakespeare")
    ax.legend(fontsize=8)
    out = ROOT / "bench" / "figures" / "moe.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    print(f"plot: {out}")


def decode_speed(repeats: int = 3) -> None:
    from mightylm.fuse import fuse_projections_
    from mightylm.generate import Sampling, generate, generate_steps
    from mightylm.model import Transformer

    big = dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, max_seq_len=512)
    models = {
        "MoE 8 x 1024, top-2": shape(arch="mixtral", n_experts=8, experts_per_token=2, ffn_dim=1024, **big),
        "dense, equal total (ffn 8192)": shape(ffn_dim=8192, **big),
        "dense, equal active (ffn 2048)": shape(ffn_dim=2048, **big),
    }
    prompt = torch.randint(0, 8192, (32,)).tolist()
    rates = {}
    built = {}
    for name, config in models.items():
        torch.manual_seed(0)
        model = Transformer(config).eval()
        fuse_projections_(model)
        built[name] = model
        generate(model, [prompt], Sampling(max_new_tokens=8))  # warm-up
        rates[name] = []
    with torch.inference_mode():
        for _ in range(repeats):  # interleaved, so drift in this VM's speed lands on all alike
            for name, model in built.items():
                steps = generate_steps(model, [prompt], Sampling(max_new_tokens=65))
                next(steps)  # the prefill and its token
                t = time.perf_counter()
                n = sum(1 for _ in steps)
                rates[name].append(n / (time.perf_counter() - t))
    moe = statistics.median(rates["MoE 8 x 1024, top-2"])
    for name, config in models.items():
        r = statistics.median(rates[name])
        print(f"{name:32s} {config.n_params / 1e6:6.1f}M params, {config.active_params / 1e6:5.1f}M active: "
              f"{r:6.1f} tok/s (MoE / this: {moe / r:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--skip-training", action="store_true")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from mightylm.kernels import cpu_flags

    print("CPU flags:", " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))))
    print(f"{torch.get_num_threads()} threads")
    decode_speed()
    if not args.skip_training:
        experiment(args.steps)


if __name__ == "__main__":
    main()
