"""Batch-1 decode of GGUF files as stored: mightylm (blocks kept, native kernels) against llama.cpp, each in its own
fresh process (torch in llama.cpp's process halves its speed), same file, same prompt tokens, greedy, decode only.

Files: the embedded SmolLM2-135M-Instruct as shipped (Q4_1 projections, Q8_0 embedding and tied head) and the same
weights re-quantized by the gguf package's quantizers to all-Q8_0, all-Q4_0, all-Q5_0, all-F16 and all-BF16 (from
the shipped file, dequantized), and to Q6_K where a tensor's rows are a multiple of 256 values (ffn_down), Q8_0 elsewhere;
--files adds other GGUF files as stored (the optional Qwen2.5-Coder-0.5B-Instruct Q4_K_M: Q5_0, Q8_0, Q4_K, Q6_K).
Each process loads the file, prefills a 32-token prompt (--context N: N tokens, the text repeated; attention over
the cache grows with it), then times 64 greedy single-token steps, three times (ours
through the torch path, and through mightylm.lite: the same kernels without torch in the process);
the median is printed with the process's peak resident memory, the ratio to llama.cpp, and the bound: packed bytes
read per token over the measured read bandwidth. For the block types, ours runs a second time with
int8_activations_ (llama.cpp's arithmetic: each decoded token's activations rounded to 8 bits per block).
llama.cpp runs with n_batch=1 (its batched quantized prefill crashed on the Intel machine) and as many threads as
torch uses here.

llama.cpp comes from llama-cpp-python, a bench-only extra built from source (10-20 min), best in its own venv:
    python -m venv /tmp/cppvenv && /tmp/cppvenv/bin/pip install llama-cpp-python==0.3.36
    .venv/bin/python bench/gguf_decode.py --llama-python /tmp/cppvenv/bin/python [--repeats 3] [--rounds 1]
        [--new-tokens 64]
        [--formats Q4_1 Q8_0 Q4_0 F16 BF16 Q6_K] [--files qwen2.5-coder-0.5b-instruct]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_PYTHON = str(ROOT / ".venv-llama/bin/python")  # `make llama-cpp`

# Q4_1: the shipped file; the others re-quantized from it. Q6_K: the K-quant where a tensor's rows allow it (a multiple of
# 256 values: SmolLM2's ffn_down), Q8_0 for the rest, as llama.cpp's quantizer falls back
FORMATS = ("Q4_1", "Q8_0", "Q4_0", "Q5_0", "F16", "BF16", "Q6_K")

OURS = """
import io, json, sys, time, torch
from mightylm.generate import Sampling, generate_steps, load_for_generation
path, n, repeats, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
# what `mighty generate` loads: the blocks kept, the decode layout, the loaded objects out of the collector's reach
model, _ = load_for_generation(path, keep_blocks=True, int8_activations=sys.argv[5:] == ["int8"], log=io.StringIO())
rates, tokens = [], None
with torch.inference_mode():
    for _ in range(repeats + 1):  # the first is a warm-up
        steps = generate_steps(model, [prompt], Sampling(max_new_tokens=n + 1))
        out = [int(next(steps)[0])]  # the prefill's token
        t = time.perf_counter()
        out += [int(step[0]) for step in steps]
        rates.append(n / (time.perf_counter() - t))
        tokens = out
print(json.dumps({"rates": rates[1:], "tokens": tokens}))
"""

# the same on mightylm.lite (what `mighty generate` runs by default on these files): no torch in the process
LITE = """
import io, json, sys, time
from mightylm.lite import load_lite
path, n, repeats, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
model, _ = load_lite(path, log=io.StringIO(), kv_cache=sys.argv[5])
rates, tokens = [], None
cache = model.cache(len(prompt) + n + 1)  # one for every run (each writes its slots from 0): one is what a run holds
for _ in range(repeats + 1):  # the first is a warm-up
    out = [int(model.forward(prompt, cache, 0).argmax())]
    t = time.perf_counter()
    for step in range(n):
        out.append(int(model.forward([out[-1]], cache, len(prompt) + step).argmax()))
    rates.append(n / (time.perf_counter() - t))
    tokens = out
assert "torch" not in sys.modules
print(json.dumps({"rates": rates[1:], "tokens": tokens}))
"""

LLAMA_CPP = """
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, n, repeats, prompt, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
llm = Llama(model_path=path, n_ctx=len(prompt) + n + 8, n_threads=threads, n_batch=1, verbose=False)
vocab = llm.n_vocab()
last = lambda: int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))  # the last token's
rates, tokens = [], None
for _ in range(repeats + 1):
    llm.reset()
    llm.eval(prompt)
    out = [last()]
    t = time.perf_counter()
    for _ in range(n):
        llm.eval([out[-1]])
        out.append(last())
    rates.append(n / (time.perf_counter() - t))
    tokens = out
print(json.dumps({"rates": rates[1:], "tokens": tokens}))
"""


def q6_k(array):
    """(rows, cols) float32 -> Q6_K blocks (rows, cols / 256 * 210) uint8, by a simple absmax rule (gguf-py has no
    K-quant quantizer; llama.cpp's searches each group's scale, but reads any valid bytes the same way): per group of
    16 an int8 scale, per super-block of 256 an fp16 d, codes round(x / (d scale)) in -32..31, stored as in
    ggml-common.h (low 4 bits in ql, high 2 in qh)."""
    import numpy as np

    rows, cols = array.shape
    x = array.reshape(rows, cols // 256, 16, 16).astype(np.float32)  # (rows, supers, groups, 16)
    group = np.abs(x).max(-1) / 31.5  # each group's step
    d = (group.max(-1) / 127).astype(np.float16).astype(np.float32)  # (rows, supers)
    scales = np.where(d[..., None] > 0, np.round(group / np.where(d[..., None] > 0, d[..., None], 1)), 0)
    scales = np.clip(scales, -128, 127).astype(np.int8)
    step = d[..., None, None] * scales[..., None].astype(np.float32)
    q = np.clip(np.round(np.where(step != 0, x / np.where(step != 0, step, 1), 0)), -32, 31).astype(np.int32) + 32
    q = q.reshape(rows, cols // 256, 2, 4, 32)  # (..., half h, quarter j, l): value 128 h + 32 j + l
    ql = np.concatenate([(q[..., 0, :] & 15) | ((q[..., 2, :] & 15) << 4),
                         (q[..., 1, :] & 15) | ((q[..., 3, :] & 15) << 4)], axis=-1)  # (rows, supers, 2, 64)
    qh = ((q[..., 0, :] >> 4) | ((q[..., 1, :] >> 4) << 2) | ((q[..., 2, :] >> 4) << 4) | ((q[..., 3, :] >> 4) << 6))
    blocks = np.concatenate([ql.reshape(rows, -1, 128).astype(np.uint8), qh.reshape(rows, -1, 64).astype(np.uint8),
                             scales.view(np.uint8), d.astype(np.float16).view(np.uint8).reshape(rows, -1, 2)], axis=-1)
    return blocks.reshape(rows, -1)


def requantized(source: str, qtype_name: str, directory: str) -> str:
    """The file with every 2-D tensor re-quantized to `qtype_name` by the gguf package (metadata copied)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize

    qtype = GGMLQuantizationType[qtype_name]
    reader = GGUFReader(source)
    path = f"{directory}/smollm2-135m-{qtype_name.lower()}.gguf"
    writer = GGUFWriter(path, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            ftype = {"Q8_0": 7, "Q4_0": 2, "Q5_0": 8, "F16": 1, "BF16": 32, "Q6_K": 18}  # llama_ftype
            writer.add_file_type(ftype[qtype_name])
            continue
        vtype = field.types[0]
        writer.add_key_value(key, field.contents(), vtype, field.types[-1] if vtype == GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        array = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)]).astype(np.float32)
        if array.ndim == 2:
            kind = qtype if array.shape[1] % GGML_QUANT_SIZES[qtype][0] == 0 else GGMLQuantizationType.Q8_0
            blocks = q6_k(array) if kind == GGMLQuantizationType.Q6_K else quantize(array, kind)
            writer.add_tensor(t.name, blocks, raw_dtype=kind)
        else:
            writer.add_tensor(t.name, array, raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama-python", default=LLAMA_PYTHON if Path(LLAMA_PYTHON).exists() else None,
                   help="a Python with llama-cpp-python installed, in its own venv (default: .venv-llama from `make llama-cpp`)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of 64 tokens in each process (after a warm-up)")
    p.add_argument("--rounds", type=int, default=1,
                   help="fresh processes per engine, the engines alternated round by round; the medians pool every "
                        "round's runs (use 3 or more on a noisy VM)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--kv-cache", default="float32", choices=["float32", "float16"],
                   help="lite's cache (mighty generate --kv_cache; llama.cpp's is float16)")
    p.add_argument("--context", type=int, default=32,
                   help="prompt tokens before the timed steps (the text repeated): the decode's attention reads them")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--files", nargs="*", default=[],
                   help="other GGUF files (paths or embedded names, e.g. qwen2.5-coder-0.5b-instruct), measured as "
                        "stored, each with its own tokenizer")
    args = p.parse_args()
    import torch

    from mightylm.checkpoint import load_tokenizer, resolve
    from mightylm.kernels import cpu_flags, kernel_isa

    sys.path.insert(0, str(ROOT / "bench"))
    from decode import read_bandwidth_gbs

    threads = torch.get_num_threads()
    bandwidth = read_bandwidth_gbs()
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))
    print(f"CPU flags: {' '.join(flags)}; kernel path {kernel_isa()}; {threads} threads; "
          f"read bandwidth {bandwidth:.1f} GB/s; {args.context}-token prompt, {args.new_tokens} new tokens; lite's "
          f"cache {args.kv_cache}")
    shipped = str(resolve("smollm2-135m-instruct"))
    tokenizer = load_tokenizer(shipped)
    text = ("The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz combined a "
            "screw press, oil-based ink and movable metal type")
    repeated = " ".join([text] * (args.context // 20 + 1))
    prompt = tokenizer.encode(repeated)[:args.context]
    with tempfile.TemporaryDirectory() as scratch:
        files = {f"{name} (as shipped)" if name == "Q4_1" else name:
                 shipped if name == "Q4_1" else requantized(shipped, name, scratch) for name in args.formats}
        prompts = dict.fromkeys(files, prompt)
        for extra in args.files:
            path = str(resolve(extra))
            files[Path(path).stem[:18]] = path
            prompts[Path(path).stem[:18]] = load_tokenizer(path).encode(repeated)[:args.context]
        print(f"{'file':18s} {'MiB':>5s} {'llama.cpp tok/s':>15s} {'mightylm tok/s':>14s} {'ratio':>6s} "
              f"{'RSS cpp':>7s} {'RSS ours':>8s} {'bound':>6s}  tokens agree  | int8 activations: tok/s  ratio  agree"
              f"  | lite (no torch): tok/s  ratio  RSS  agree")
        for name, path in files.items():
            common = [path, str(args.new_tokens), str(args.repeats), json.dumps(prompts[name])]
            kept_arithmetic = name.split()[0] in ("Q4_1", "Q8_0", "Q4_0", "Q5_0", "Q6_K") or name not in args.formats
            runs: dict[str, list] = {}  # engine -> its processes' (result, peak RSS), round after round
            for _ in range(args.rounds):  # engines alternated, so that a slow minute of the VM falls on all of them
                if args.llama_python:
                    runs.setdefault("cpp", []).append(measure([args.llama_python, "-c", LLAMA_CPP, *common,
                                                               str(threads)]))
                runs.setdefault("ours", []).append(measure([sys.executable, "-c", OURS, *common]))
                if args.llama_python and kept_arithmetic:  # llama.cpp's arithmetic
                    runs.setdefault("int8", []).append(measure([sys.executable, "-c", OURS, *common, "int8"]))
                if args.llama_python:
                    runs.setdefault("lite", []).append(measure([sys.executable, "-c", LITE, *common, args.kv_cache]))

            def rate(engine):  # median over every timed repeat of every round
                return statistics.median(r for result, _ in runs[engine] for r in result["rates"])

            def rss(engine):
                return max(peak for _, peak in runs[engine])

            def agree(engine, width):  # tokens equal to llama.cpp's, in the last round
                ours, theirs = runs[engine][-1][0]["tokens"], runs["cpp"][-1][0]["tokens"]
                return f"{sum(a == b for a, b in zip(ours, theirs)):>{width}d}/{len(ours)}"

            size = os.path.getsize(path) / 2**20
            bound = bandwidth * 1e9 / os.path.getsize(path)  # every weight read once per token
            if not args.llama_python:
                print(f"{name:18s} {size:5.0f} {'-':>15s} {rate('ours'):14.1f} {'-':>6s} {'-':>7s} {rss('ours'):8.0f} "
                      f"{bound:6.0f}")
                continue
            cpp = rate("cpp")
            line = (f"{name:18s} {size:5.0f} {cpp:15.1f} {rate('ours'):14.1f} {rate('ours') / cpp:5.2f}x "
                    f"{rss('cpp'):7.0f} {rss('ours'):8.0f} {bound:6.0f}  {agree('ours', 5)}")
            if kept_arithmetic:
                line += f"  | {rate('int8'):26.1f} {rate('int8') / cpp:5.2f}x {agree('int8', 4)}"
            else:
                line += f"  | {'':26s} {'':6s} {'':9s}"
            line += f"  | {rate('lite'):22.1f} {rate('lite') / cpp:5.2f}x {rss('lite'):4.0f} {agree('lite', 4)}"
            print(line, flush=True)
    if not args.llama_python:
        print("no --llama-python: llama.cpp is not measured in this run")


def measure(cmd: list[str]) -> tuple[dict, float]:
    """Run a worker in a fresh wrapper process, so that the peak RSS read is that worker's alone."""
    wrapper = ("import json, os, resource, subprocess, sys\n"
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "sys.stderr.write(r.stderr)\n"
               "if r.returncode: sys.exit(r.returncode)\n"
               "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
               "print(json.dumps({'worker': json.loads(r.stdout.strip().splitlines()[-1]), 'rss': peak}))\n")
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"{cmd[0]} failed:\n{r.stderr[-2000:]}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    return result["worker"], result["rss"]


if __name__ == "__main__":
    main()
