"""Pruning and distillation on the embedded SmolLM2-135M-Instruct (float32) and held-out Shakespeare, in one run.

1. Unstructured pruning, one shot: magnitude, Wanda and SparseGPT at 50 % and at 2:4 (calibration: 16 windows of
   256 tokens from the start of the corpus); perplexity on held-out windows from its end, and batch-1 greedy
   decode tokens/s after the prompt's prefill (a 2:4 model through the 2:4 kernel; the others are dense with
   zeros, so as fast as the original), dense and 2:4 timed interleaved, median of 3.
2. Structured pruning to about half the parameters (Minitron-style: FFN 0.5, head groups 2 of 3, 20 of 30 blocks),
   then the same tokens of training for (a) plain CE, (b) distillation from the unpruned model (forward KL,
   T 1, kd_ratio 0.5: the DistilBERT-style claim), (c) the same small config from scratch; perplexity and decode
   speed of each.

    .venv/bin/python bench/compress.py [--steps 120] [--batch 4] [--seq 256] [--skip-training]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch


def perplexity(model, windows) -> float:
    with torch.no_grad():
        losses = [float(model(w["input_ids"][None], labels=w["labels"][None])) for w in windows]
    return math.exp(sum(losses) / len(losses))


def decode_tok_s(model, prompt, n: int = 64) -> float:
    """Greedy decode tokens/s after the prompt's prefill (decode only, as the other decode benches)."""
    from mightylm.generate import Sampling, generate_steps

    steps = generate_steps(model, [prompt], Sampling(max_new_tokens=n + 1, temperature=0))
    next(steps)  # the prefill's token
    t = time.perf_counter()
    count = sum(1 for _ in steps)
    return count / (time.perf_counter() - t)


def decode_layout(model):
    """What `mighty generate` runs: a 2:4 model packed, then the fused native decode layout."""
    from mightylm.compress.sparse24 import pack_24_
    from mightylm.fuse import fuse_projections_

    model = copy.deepcopy(model)
    pack_24_(model)
    fuse_projections_(model)
    return model.eval()


def interleaved_speeds(models: dict, prompt, repeats: int = 3) -> dict:
    runs = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            runs[name].append(decode_tok_s(m, prompt))
    return {name: statistics.median(v) for name, v in runs.items()}


def train(model, windows, val, steps, batch, run: Path, loss_fn=None, lr=5e-4):
    from mightylm.data.loader import Loader
    from mightylm.train import TrainConfig, cross_entropy, fit

    cfg = TrainConfig(steps=steps, batch_size=batch, lr=lr, min_lr=lr / 10, warmup=10, eval_every=10**9,
                      save_every=10**9, log_every=10, seed=0)
    t = time.perf_counter()
    summary = fit(model, Loader(windows, batch, seed=0), run, cfg, loss_fn=loss_fn or cross_entropy, progress=True)
    return summary["tokens"], time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=24)
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()

    import mightylm
    from mightylm.cli import env
    from mightylm.compress.distill import Distiller
    from mightylm.compress.prune import prune_, sparsity_of
    from mightylm.compress.structured import measure, prune_structured
    from mightylm.data.pretrain import TokenStream, collect_files
    from mightylm.model import Transformer

    env()
    torch.manual_seed(0)
    base, tok = mightylm.load("smollm2-135m-instruct")
    tmp = Path(tempfile.mkdtemp(prefix="compress-bench-"))
    stream = TokenStream.build(collect_files(["shakespeare"]), tok, tmp / "data", progress=False)
    train_windows, held_out = stream.split(args.seq, 0.02)
    evaluation = [held_out[i] for i in range(min(args.eval_windows, len(held_out)))]
    calib = [train_windows[i]["input_ids"][None] for i in range(16)]
    prompt = tok.encode("To be, or not to be, that is the question:")
    print(f"\nheld-out: {len(evaluation)} windows of {args.seq} tokens; calibration: 16 windows")

    base_ppl = perplexity(base, evaluation)
    print(f"\n## 1. one-shot pruning of SmolLM2-135M (float32, {base.config.n_params / 1e6:.1f}M parameters)\n")
    print("| method | sparsity | held-out ppl | decode tok/s | vs dense |")
    print("|---|---|---|---|---|")
    dense = decode_layout(base)
    rows = []
    for method in ("magnitude", "wanda", "sparsegpt"):
        for kw in ({"sparsity": 0.5}, {"pattern": (2, 4)}):
            m = copy.deepcopy(base)
            t = time.perf_counter()
            names = prune_(m, method, batches=calib, **kw)
            seconds = time.perf_counter() - t
            rows.append((method, kw, m, sparsity_of(m, names), perplexity(m, evaluation), seconds))
    speeds = interleaved_speeds({"dense": dense, "2:4": decode_layout(rows[1][2])}, prompt)
    print(f"| none (dense) | 0% | {base_ppl:.2f} | {speeds['dense']:.1f} | 1.00x |")
    for method, kw, m, sparsity, ppl, seconds in rows:
        label = "2:4" if "pattern" in kw else "50% unstructured"
        speed = speeds["2:4"] if "pattern" in kw else speeds["dense"]
        print(f"| {method} ({seconds:.0f} s) | {label} ({sparsity:.1%}) | {ppl:.2f} | {speed:.1f} | "
              f"{speed / speeds['dense']:.2f}x |")
    print(f"\n2:4 decode: {speeds['2:4']:.1f} vs dense {speeds['dense']:.1f} tok/s = {speeds['2:4'] / speeds['dense']:.2f}x "
          "(same run, interleaved, median of 3; 64 greedy tokens). Bytes read per token: dense 538 MB, 2:4 "
          f"{(base.config.n_params - 49152 * 576) * 2.25 / 1e6 + 49152 * 576 * 4 / 1e6:.0f} MB (projections at 2.25 "
          "bytes per weight, the tied 113 MB float32 head as it is): the bound is "
          f"{538 / ((base.config.n_params - 49152 * 576) * 2.25 / 1e6 + 49152 * 576 * 4 / 1e6):.2f}x")
    del rows, dense

    print("\n## 2. structured pruning to about half, then the same tokens of training\n")
    importance = measure(base, calib)
    small = prune_structured(base, importance, ffn=0.5, heads=0.67, layers=20)
    c = small.config
    print(f"pruned config: {c.n_layers} layers, dim {c.dim}, {c.n_heads} heads / {c.n_kv_heads} kv, ffn {c.ffn_dim}: "
          f"{c.n_params / 1e6:.1f}M parameters ({c.n_params / base.config.n_params:.0%} of "
          f"{base.config.n_params / 1e6:.1f}M); held-out ppl right after pruning {perplexity(small, evaluation):.1f}")
    results = [("teacher (unpruned)", base, None, None)]
    if not args.skip_training:
        a = copy.deepcopy(small)
        results.append(("(a) pruned + CE", a, *train(a, train_windows, held_out, args.steps, args.batch, tmp / "a")))
        b = copy.deepcopy(small)
        kd = Distiller(base, loss="fkl", temperature=1.0, kd_ratio=0.5)
        results.append(("(b) pruned + distillation", b,
                        *train(b, train_windows, held_out, args.steps, args.batch, tmp / "b", loss_fn=kd)))
        torch.manual_seed(0)
        scratch = Transformer(c)
        results.append(("(c) same config from scratch", scratch,
                        *train(scratch, train_windows, held_out, args.steps, args.batch, tmp / "c", lr=1e-3)))
    speeds = interleaved_speeds({"teacher": decode_layout(base), "pruned": decode_layout(small)}, prompt)
    print("\n| model | parameters | tokens trained | train time | held-out ppl | decode tok/s |")
    print("|---|---|---|---|---|---|")
    for name, m, tokens, seconds in results:
        speed = speeds["teacher"] if m is base else speeds["pruned"]
        print(f"| {name} | {m.config.n_params / 1e6:.1f}M | {tokens or 0:,} | {seconds or 0:.0f} s | "
              f"{perplexity(m.eval(), evaluation):.2f} | {speed:.1f} |")
    print(f"\ndecode speed-up of the pruned config: {speeds['pruned'] / speeds['teacher']:.2f}x (interleaved, median of 3)")


if __name__ == "__main__":
    main()
