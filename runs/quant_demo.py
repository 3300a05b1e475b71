"""Size and quality of the LoRA-fine-tuned SmolLM2 before and after quantization.

Merges the adapter of runs/lora_demo.py into SmolLM2-135M-Instruct (float32), then quantizes the
merged model with each method and reports, for float32 and every method: the bytes of the weights,
perplexity and bits per byte on held-out Shakespeare (the corpus' last play in file order, the
first 2,048 tokens, windows of 256), and exact match on the held-out 2-digit additions of
runs/lora_demo.py. SmoothQuant calibrates on the corpus' first play (not the evaluation text).

    .venv/bin/python runs/quant_demo.py --adapter runs/out/lora-demo/adapter [--methods int8 nf4 int4 smoothquant w8a8]

(w8a8: the W8A8 layers of SmoothQuant without the smoothing, to show what smoothing buys; a
"-tensor" suffix, e.g. smoothquant-tensor, uses one activation scale per tensor instead of per token.)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import mightylm
from lora_demo import MODEL, accuracy
from mightylm.adapters.lora import load_lora, strip_lora
from mightylm.compress.quantize import model_bytes, quantize_
from mightylm.compress.smoothquant import smooth_quantize_
from mightylm.data.pretrain import collect_files
from mightylm.data.synthetic import generate_task
from mightylm.evaluate.perplexity import perplexity


def held_out_problems(size: int = 2) -> list[dict]:
    seen = {e["input"] for e in generate_task("addition", 400, seed=1, size=size)}
    return [e for e in generate_task("addition", 50, seed=2, size=size) if e["input"] not in seen]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapter", default="runs/out/lora-demo/adapter")
    p.add_argument("--methods", nargs="+", default=["int8", "nf4", "int4", "smoothquant"])
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    p.add_argument("--tokens", type=int, default=2048, help="held-out Shakespeare tokens for perplexity")
    p.add_argument("--out", default="runs/out/quant-demo.json")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = mightylm.load(MODEL)
    load_lora(model, args.adapter)
    strip_lora(model)  # the fine-tuned model, float32
    plays = collect_files(["shakespeare"])
    text = plays[-1].read_text(encoding="utf-8", errors="replace")
    calib_ids = tok.encode(plays[0].read_text(encoding="utf-8", errors="replace"))[:8 * 256]
    calib = [torch.tensor(calib_ids[i:i + 256])[None] for i in range(0, len(calib_ids), 256)]
    problems = held_out_problems()
    rows = []
    print(f"{'weights':12s} {'MiB':>7s} {'ratio':>6s} {'perplexity':>10s} {'bits/byte':>9s} {'exact match':>11s} {'seconds':>7s}")
    for method in ["float32", *args.methods]:
        t = time.perf_counter()
        net = model if method == "float32" else copy.deepcopy(model)
        if method.startswith(("smoothquant", "w8a8")):  # w8a8: the same W8A8 layers without smoothing
            with torch.no_grad():  # "-tensor": one activation scale per tensor instead of per token
                smooth_quantize_(net, calib, alpha=args.alpha, smooth=method.startswith("smoothquant"),
                                 per_token=not method.endswith("-tensor"))
        elif method != "float32":
            quantize_(net, method)
        ppl = perplexity(net, tok, text, window=256, max_tokens=args.tokens)
        exact, _ = accuracy(net, tok, problems)
        size = model_bytes(net)
        row = {"method": method, "bytes": size, "perplexity": ppl["perplexity"], "bits_per_byte": ppl["bits_per_byte"],
               "exact_match": exact, "seconds": time.perf_counter() - t}
        rows.append(row)
        print(f"{method:12s} {size / 2**20:7.1f} {rows[0]['bytes'] / size:5.2f}x {row['perplexity']:10.2f} "
              f"{row['bits_per_byte']:9.3f} {exact:10.0%} {row['seconds']:7.0f}", flush=True)
        if net is not model:
            del net
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"problems": len(problems), "tokens": args.tokens, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
