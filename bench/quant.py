"""Batch-1 decode speed and model bytes per weight format, at the SmolLM2-135M shape, in one run.

The embedded SmolLM2-135M-Instruct (float32) is decoded greedily (32-token prompt, 64 new tokens)
as float32 (with the decode layout of mightylm/fuse.py and the native GEMV), and with its seven
projections per block as int8, int4 (group 64) and NF4 (block 64, double quantization); the
embedding/LM head (tied) stays float32 in every row but "int8+head", where the head gets its own
int8 copy and the float table is only looked up (one row per token). Runs are interleaved and medians reported.
"bound" = measured read bandwidth / bytes of weights read per token (all of them, as the tied head
reads the whole table; for int8+head all but the float table), the speed a memory-bound decoder
would reach.

torchao's int8 weight-only (`Int8WeightOnlyConfig` on the same seven projections, head float32 in
our decode layout) runs in the same table where torchao is installed (the test extras install
0.18.0, which does not ask for another torch); its int4 weight-only has no float32 CPU path.

Then one matrix-vector product per format at SmolLM2's shapes, against PyTorch's own int8 kernel,
torchao's int8 and bitsandbytes' NF4 (its CPU backend), on the same weights.

Then QLoRA training memory: LoRA r=8 on every projection over a float32 base vs over an NF4 base
(the same recipe), peak RSS of a fresh subprocess each, batch 4 x 256 tokens.

    .venv/bin/python bench/quant.py [--repeats 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode import read_bandwidth_gbs  # noqa: E402

WORKER = r"""
import json, resource, sys, tempfile
import torch
import mightylm
from mightylm.adapters.lora import apply_lora
from mightylm.data.loader import Loader
from mightylm.train import TrainConfig, fit
model, _ = mightylm.load(sys.argv[1])  # a float32 or an NF4 checkpoint: the float weights never exist for NF4
apply_lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=8, alpha=16)
torch.manual_seed(0)
items = [{"input_ids": b[:-1], "labels": b[1:]} for b in torch.randint(0, model.config.vocab_size, (24, 257))]
cfg = TrainConfig(steps=6, batch_size=4, lr=1e-4, warmup=1, eval_every=10**9, save_every=10**9, log_every=1)
with tempfile.TemporaryDirectory() as run:
    fit(model, Loader(items, 4, shuffle=False), run, cfg, progress=False)
    rows = [json.loads(l) for l in open(run + "/metrics.jsonl")]
speed = sorted(r["tokens_per_s"] for r in rows[2:])[len(rows[2:]) // 2]
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "tokens_per_s": speed}))
"""


def torchao_int8(module):
    """torchao's int8 weight-only on every nn.Linear but the head, in place; None without torchao."""
    try:
        import logging

        logging.getLogger("torchao").setLevel(logging.ERROR)  # it logs missing CUDA kernels on import
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return None
    quantize_(module, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn)
    return module


def kernels_side_by_side(bandwidth: float, repeats: int = 200) -> None:
    """Microseconds per batch-1 product for each format, ours beside PyTorch's and bitsandbytes'."""
    from torch import nn

    from mightylm.compress.nf4 import NF4Linear
    from mightylm.compress.quantize import Int4Linear, Int8Linear
    from mightylm.kernels.ops import linear

    def usec(fn):
        for _ in range(10):
            fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t) / repeats * 1e6

    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnb = None
    print("one product, batch 1 (microseconds; GB/s of weight bytes read):")
    for out, n_in in ((1536, 576), (576, 1536)):
        torch.manual_seed(0)
        lin = nn.Linear(n_in, out, bias=False)
        x = torch.randn(1, n_in)
        w_in_major = lin.weight.detach().t().contiguous().t()
        q8, q4 = Int8Linear.from_linear(lin), NF4Linear.from_linear(lin)
        i4 = Int4Linear.from_linear(lin, 64)
        packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(i4.codes().to(torch.int32), 1)
        scales_and_zeros = torch.stack([i4.weight_scale, i4.weight_zero], -1).transpose(0, 1).contiguous()
        rows = {"float32 (ours)": (lambda: linear(x, w_in_major), 4 * out * n_in),
                "int8 (ours)": (lambda: q8(x), out * n_in),
                "int8 (torch _weight_int8pack_mm)": (lambda: torch.ops.aten._weight_int8pack_mm(x, q8.weight, q8.weight_scale),
                                                     out * n_in),
                "int4 g64 (ours)": (lambda: i4(x), out * n_in // 2),
                "int4 g64 (torch _weight_int4pack_mm)": (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x, packed4, 64, scales_and_zeros), out * n_in // 2),
                "nf4 (ours)": (lambda: q4(x), out * n_in // 2)}
        ao = torchao_int8(nn.Sequential(copy.deepcopy(lin)))
        if ao is not None:
            rows["int8 (torchao Int8WeightOnlyConfig)"] = (lambda: ao(x), out * n_in)
        if bnb is not None:
            packed, state = bnbf.quantize_4bit(lin.weight.detach(), blocksize=64, quant_type="nf4", compress_statistics=True)
            rows["nf4 (bitsandbytes matmul_4bit)"] = (lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state), out * n_in // 2)
        with torch.no_grad():
            for name, (fn, nbytes) in rows.items():
                t = usec(fn)
                print(f"  {out}x{n_in} {name:38s} {t:8.1f} us  {nbytes / t / 1e3:5.1f} GB/s (machine: {bandwidth:.1f})")


def main():
    import json

    import mightylm
    from mightylm.compress.quantize import DEFAULT_TARGETS, model_bytes, quantize_
    from mightylm.fuse import fuse_projections_
    from mightylm.generate import Sampling, generate

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    base, tok = mightylm.load("smollm2-135m-instruct")
    models = {}
    for method in ("float32", "int8", "int8+head", "int4", "nf4"):
        m = copy.deepcopy(base)
        if method == "int8+head":  # the tied head gets an int8 copy; the float table is only looked up
            quantize_(m, "int8", targets=DEFAULT_TARGETS + ("lm_head",))
        elif method != "float32":
            quantize_(m, method)
        fuse_projections_(m)  # the decode layout for whatever stays float (all of float32; the head otherwise)
        models[method] = m
    ao = torchao_int8(copy.deepcopy(base))
    if ao is not None:
        fuse_projections_(ao)  # only the float head: torchao's tensors are left as they are
        models["int8 torchao"] = ao
    prompt = tok.encode("The history of the printing press begins in the fifteenth century, when")[:32]
    s, first = Sampling(max_new_tokens=args.new_tokens), Sampling(max_new_tokens=1)
    outputs = {k: generate(m, [prompt], s)[0] for k, m in models.items()}  # warm-up, and the tokens to compare
    times = {k: [] for k in models}
    prefill = {k: [] for k in models}
    for _ in range(args.repeats):
        for k, m in models.items():
            t = time.perf_counter()
            generate(m, [prompt], first)  # prefill only
            t1 = time.perf_counter()
            generate(m, [prompt], s)
            times[k].append(time.perf_counter() - t1 - (t1 - t))  # the decode steps alone
            prefill[k].append(t1 - t)
    bandwidth = read_bandwidth_gbs()
    print(f"read bandwidth {bandwidth:.1f} GB/s; {torch.get_num_threads()} threads; 32-token prompt, "
          f"{args.new_tokens} new tokens; decode tok/s excludes the prefill")
    print(f"{'weights':12s} {'MiB':>7s} {'decode tok/s':>12s} {'vs f32':>7s} {'bound':>7s} {'of bound':>8s} "
          f"{'prefill ms':>10s} {'greedy tokens = f32':>20s}")
    f32 = None
    for k, m in models.items():
        size = model_bytes(m)
        speed = (args.new_tokens - 1) / statistics.median(times[k])
        f32 = f32 or speed
        read = size - (m.embed.weight.numel() * 4 if not m.head_shares_embedding else 0)  # the float table is only looked up
        bound = bandwidth * 1e9 / read
        same = sum(a == b for a, b in zip(outputs[k], outputs["float32"]))
        print(f"{k:12s} {size / 2**20:7.1f} {speed:12.1f} {speed / f32:6.2f}x {bound:7.1f} {speed / bound:7.0%} "
              f"{statistics.median(prefill[k]) * 1e3:10.0f} {same:>14d}/{len(outputs['float32'])}", flush=True)
    kernels_side_by_side(bandwidth)
    if args.skip_training:
        return
    print("LoRA r=8 training over a float32 vs an NF4 (QLoRA) base, batch 4 x 256, peak RSS of the process:")
    import tempfile

    directory = tempfile.mkdtemp()
    mightylm.save(base, tok, f"{directory}/float32")
    quantize_(base, "nf4")
    mightylm.save(base, tok, f"{directory}/nf4")
    import os

    # glibc keeps freed large blocks for reuse, so a process's peak RSS is its allocator's high-water
    # mark; with MALLOC_MMAP_THRESHOLD_ large blocks are mmap'd and returned on free, so the peak is
    # close to what was live at once (slower: every large allocation is a fresh mapping).
    for label, env in (("default allocator", {}), ("MALLOC_MMAP_THRESHOLD_=65536", {"MALLOC_MMAP_THRESHOLD_": "65536"})):
        for kind in ("float32", "nf4"):
            r = subprocess.run([sys.executable, "-c", WORKER, f"{directory}/{kind}"], capture_output=True, text=True,
                               env={**os.environ, **env})
            if r.returncode != 0:
                raise SystemExit(r.stderr[-2000:])
            row = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"  {label:29s} {kind:8s} base: peak {row['peak_mb']:6.0f} MB, {row['tokens_per_s']:5.0f} tok/s",
                  flush=True)


if __name__ == "__main__":
    main()
