"""Load test of `mighty serve` against a naive baseline, on 127.0.0.1 only, bounded in count and time.

    .venv/bin/python bench/serve.py [--clients 1 4 16 64] [--requests-per-client 2] [--max-tokens 64]
                                    [--blocks true|false] [--int8-activations] [--skip-baseline]
    python3 bench/serve.py --model DIR --device cuda --dtype bfloat16      # on a GPU (any model with a tokenizer)

The server is `mighty serve` (SmolLM2-135M-Instruct, continuous batching) in a process of its own
on a loopback port, as deployed; N concurrent clients (threads here) each send streaming chat
requests back to back. Reported per N: generated tokens/s over the run, time to first token and
inter-token latency (p50/p99) seen by the clients, and errors. Every request runs to max tokens
(`ignore_eos`, as vLLM's benchmarks do; tokens counted from the streamed usage), so runs with
different models or adapters do the same work. The baseline serves the same requests one at a time
with transformers' generate (greedy, the same max tokens), as a server without batching would. For
16 clients and more, a mixed-adapter run follows: half of the requests name a LoRA adapter (the
tour's, or a random one), served in the same batches as the base model's.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

QUESTIONS = ["Tell me about the history of Rome.", "Explain how a bicycle works.", "Write a short story about a cat.",
             "What are the benefits of exercise?", "Describe the water cycle.", "How do airplanes fly?",
             "Give me tips for learning a language.", "Why is the sky blue?"]


def stream_one(url, model, question, max_tokens):
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    times, tokens = [], 0
    with urllib.request.urlopen(request, timeout=300) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if not event["choices"]:  # the last chunk: usage
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"tokens": tokens, "ttft": times[0] - t0 if times else None, "gaps": gaps, "seconds": time.perf_counter() - t0}


def load(url, clients, per_client, max_tokens, models):
    jobs = [(models[i % len(models)], QUESTIONS[i % len(QUESTIONS)]) for i in range(clients * per_client)]
    errors, results = 0, []

    def client(c):
        nonlocal errors
        out = []
        for model, q in jobs[c::clients]:
            try:
                out.append(stream_one(url, model, q, max_tokens))
            except Exception:
                errors += 1
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for out in pool.map(client, range(clients)):
            results += out
    seconds = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    gaps = sorted(g for r in results for g in r["gaps"])
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")  # noqa: E731
    return {"clients": clients, "requests": len(jobs), "errors": errors, "tokens": sum(r["tokens"] for r in results),
            "tokens_per_s": sum(r["tokens"] for r in results) / seconds, "ttft_p50": q(ttft, 0.5),
            "ttft_p99": q(ttft, 0.99), "itl_p50": q(gaps, 0.5), "itl_p99": q(gaps, 0.99), "seconds": seconds}


def report(r, what):
    print(f"{r['clients']:3d} clients{what}: {r['tokens_per_s']:7.1f} tok/s  TTFT p50 {r['ttft_p50']*1e3:6.0f} ms "
          f"p99 {r['ttft_p99']*1e3:6.0f} ms  ITL p50 {r['itl_p50']*1e3:5.0f} ms p99 {r['itl_p99']*1e3:5.0f} ms  "
          f"errors {r['errors']}  ({r['requests']} requests, {r['seconds']:.0f} s)", flush=True)


def baseline(hf, tokenizer, requests, max_tokens):
    """One request at a time with transformers' generate: tokens/s."""
    tokens, t0 = 0, time.perf_counter()
    for q in QUESTIONS[:requests]:
        ids = torch.tensor([tokenizer.encode_chat([{"role": "user", "content": q}])], device=hf.device)
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                              eos_token_id=list(tokenizer.stop_token_ids))  # every request max_tokens long
        tokens += out.shape[1] - ids.shape[1]
    return tokens / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--adapter", default="runs/out/lora-demo/adapter", help="a LoRA adapter for the mixed run")
    p.add_argument("--blocks", default="true", choices=["true", "false"],
                   help="mighty serve --blocks: keep the GGUF blocks (the default) or dequantize them at load")
    p.add_argument("--int8-activations", action="store_true",
                   help="mighty serve --int8_activations true: decoded tokens in llama.cpp's arithmetic")
    p.add_argument("--skip-baseline", action="store_true", help="do not time transformers' one-at-a-time baseline")
    p.add_argument("--model", default="smollm2-135m-instruct", help="what mighty serve loads (and the baseline)")
    p.add_argument("--device", default="cpu", help="mighty serve --device (the baseline runs there too)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args()
    import mightylm

    model, tokenizer = mightylm.load(args.model)
    adapter = args.adapter
    if not Path(adapter).is_dir():  # no tour output: a random LoRA of the same shape costs the same
        from mightylm.adapters.lora import apply_lora, save_lora

        scratch = copy.deepcopy(model)
        apply_lora(scratch, targets=("q_proj", "v_proj"), r=8, alpha=16)
        adapter = save_lora(scratch, Path("bench/out/serve-lora"))
    Path("bench/out").mkdir(parents=True, exist_ok=True)
    from mightylm.serve.command import start_server

    try:
        url, server = start_server(["--model", args.model, "--name", "smollm2", "--adapter", f"lora={adapter}",
                                    "--max-batch", str(args.max_batch), "--max-queue", "256", "--max-len", "1024",
                                    "--blocks", args.blocks, "--int8_activations", str(args.int8_activations).lower(),
                                    "--device", args.device, "--dtype", args.dtype],
                                   "bench/out/serve.log")
    except RuntimeError as e:
        sys.exit(str(e))
    print(f"server: mighty serve --model {args.model} --blocks {args.blocks} --int8_activations "
          f"{str(args.int8_activations).lower()} --device {args.device} --dtype {args.dtype}, max batch "
          f"{args.max_batch}; {args.max_tokens} tokens per request, greedy")
    rows = []
    try:
        for n in args.clients:
            rows.append(load(url, n, args.requests_per_client, args.max_tokens, ["smollm2"]))
            report(rows[-1], "")
            if n >= 16:
                mixed = load(url, n, args.requests_per_client, args.max_tokens, ["smollm2", "smollm2:lora"])
                report(mixed, f", half on LoRA: {mixed['tokens_per_s'] / rows[-1]['tokens_per_s']:.2f}x of base-only")
        memory = {k: v for k, v in (line.split(":", 1) for line in Path(f"/proc/{server.pid}/status").read_text()
                                    .splitlines()) if k in ("VmHWM", "VmRSS")}
        print(f"server memory: resident {memory['VmRSS'].strip()}, peak {memory['VmHWM'].strip()}")
    finally:
        server.terminate()
        server.wait(30)
    if args.skip_baseline:
        return
    from transformers import AutoModelForCausalLM

    name = Path(args.model).name.removesuffix(".gguf").replace("smollm2-135m-instruct", "smollm2")
    hf_dir = Path(args.model) if Path(args.model).is_dir() else Path("bench/out") / f"{name}-hf"
    if not hf_dir.exists():
        mightylm.save(model, tokenizer, hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    base = baseline(hf, tokenizer, 4, args.max_tokens)
    print(f"baseline (transformers generate, one request at a time, {args.device}, {args.dtype}): {base:.1f} tok/s")
    for r in rows:
        print(f"  {r['clients']:3d} clients: {r['tokens_per_s'] / base:.2f}x the baseline")


if __name__ == "__main__":
    main()
