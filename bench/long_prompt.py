"""Chunked prefill in `mighty serve`: inter-token latency of running streams while a long prompt arrives.

    .venv/bin/python bench/long_prompt.py [--streams 8] [--prompt-tokens 4096] [--max-tokens 160] [--repeat 3]
        [--runs without one-pass chunked]

Three runs of the server (SmolLM2-135M-Instruct, its own process, loopback only), each with --streams clients
streaming greedy replies to max tokens (ignore_eos): without a long prompt; with one --prompt-tokens prompt (the
held-out play) sent 3 s in and prefilled in one pass (--prefill_chunk larger than it); and the same prompt
prefilled in chunks (the default --prefill_chunk 512, each chunk about half a decode step long while others
decode).
Reported: the streams' inter-token latency p50 / p99 / max, their tokens/s, and the long prompt's time to its
first token. Goal (issue 22): p99 with the long prompt no more than 2x its value without it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve import QUESTIONS, stream_one  # noqa: E402  (bench/serve.py: one streaming chat request, timed)


def long_prompt_ids(n: int) -> list[int]:
    from mightylm.checkpoint import load_tokenizer
    from mightylm.data.pretrain import collect_files, read_documents

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    text = "\n\n".join(doc for f in collect_files(["shakespeare"])[-1:] for doc in read_documents(f))
    ids = tokenizer.encode(text)[:n]
    if len(ids) < n:
        raise SystemExit(f"the held-out play has {len(ids)} tokens; --prompt-tokens must not exceed it")
    return ids


def run(args, chunk: int | None, ids: list[int] | None, log: str) -> dict:
    from mightylm.serve.command import start_server

    url, proc = start_server(["--max-batch", str(args.streams + 1), "--max-len", str(args.prompt_tokens + 64),
                              "--prefill_chunk", str(chunk or 512)], log)
    late = {}
    try:
        stream_one(url, "smollm2-135m-instruct", QUESTIONS[0], 4)  # warm-up

        def send_long():
            time.sleep(3)
            body = {"model": "smollm2-135m-instruct", "prompt": ids, "max_tokens": 1, "temperature": 0}
            request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            began = time.perf_counter()
            with urllib.request.urlopen(request, timeout=900) as r:
                r.read()
            late["seconds"] = time.perf_counter() - began

        sender = threading.Thread(target=send_long) if ids else None
        if sender:
            sender.start()
        began = time.perf_counter()
        with ThreadPoolExecutor(args.streams) as pool:
            results = list(pool.map(lambda i: stream_one(url, "smollm2-135m-instruct", QUESTIONS[i % len(QUESTIONS)],
                                                         args.max_tokens), range(args.streams)))
        seconds = time.perf_counter() - began
        if sender:
            sender.join()
    finally:
        proc.terminate()
        proc.wait(30)
    gaps = sorted(g for r in results for g in r["gaps"])
    q = lambda p: gaps[min(len(gaps) - 1, int(p * len(gaps)))]  # noqa: E731
    return {"p50": q(0.5), "p99": q(0.99), "max": gaps[-1], "rate": sum(r["tokens"] for r in results) / seconds,
            "long": late.get("seconds")}


RUNS = ("without", "one-pass", "chunked")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS),
                    help="which servers to run (the ratio needs 'without')")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the servers this many times, in turn; each row is the median of its repeats and the "
                         "ratio the median of the ratios of runs made side by side (the VM's speed drifts)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")

    from mightylm.cli import env

    env()
    ids = long_prompt_ids(args.prompt_tokens)
    log = tempfile.mkdtemp(prefix="bench-long-") + "/serve.log"
    settings = {"without": ("no long prompt", None, None),
                "one-pass": (f"{args.prompt_tokens}-token prompt, one pass", args.prompt_tokens + 1, ids),
                "chunked": (f"{args.prompt_tokens}-token prompt, chunked", 512, ids)}
    results = {name: [] for name in args.runs}
    for _ in range(args.repeat):
        for name in args.runs:
            _, chunk, prompt = settings[name]
            results[name].append(run(args, chunk, prompt, log))
            print(name, {k: round(v, 3) for k, v in results[name][-1].items() if v is not None}, flush=True)
    print(f"\n{args.streams} streams x {args.max_tokens} tokens; the long prompt sent 3 s in; "
          f"median of {args.repeat} run(s)\n")
    print("| run | ITL p50 | ITL p99 | ITL max | p99 / without | streams tok/s | long prompt's first token |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in results.items():
        r = {k: statistics.median([x[k] for x in rs]) if rs[0][k] is not None else None for k in rs[0]}
        ratio = f"{statistics.median([x['p99'] / b['p99'] for x, b in zip(rs, results['without'])]):.2f}x" \
            if "without" in results else "-"
        first = f"{r['long']:.1f} s" if r["long"] else "-"
        print(f"| {settings[name][0]} | {r['p50'] * 1e3:.0f} ms | {r['p99'] * 1e3:.0f} ms | {r['max'] * 1e3:.0f} ms | "
              f"{ratio} | {r['rate']:.1f} | {first} |")


if __name__ == "__main__":
    main()
