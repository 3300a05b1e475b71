"""Batch-1 greedy decode speed: mightylm vs transformers `generate`, same weights, same prompt.

Two shapes: a ~15M random model (per-token overhead dominates) and SmolLM2-135M (the embedded
GGUF, dequantized to float32; memory bandwidth dominates). Prompt of 32 tokens, 128 new tokens,
greedy, float32, all CPU threads PyTorch uses by default. Prints tokens/s, the ratio, and the
memory-bandwidth bound: (bytes of weights read per token) / (measured copy bandwidth).

    .venv/bin/python bench/decode.py [--repeats 3] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import mightylm
from mightylm.checkpoint import resolve
from mightylm.config import ModelConfig
from mightylm.fuse import fuse_projections_
from mightylm.generate import Sampling, generate


def read_bandwidth_gbs() -> float:
    """Sustained read bandwidth (GB/s): best of 5 sums over 512 MiB of written memory, far larger
    than any cache. (Written: untouched pages all map to one zero page and read from cache.)"""
    a = torch.ones(128 * 2**20)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best / 1e9


def timed_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Median seconds of each, runs interleaved (a, b, a, b, ...) so that drift in machine speed
    (this is a shared VM) lands on both sides alike."""
    fn_a(), fn_b()  # warm-up
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times_a), statistics.median(times_b)


def f32_gguf_of_embedded(directory: str) -> str:
    """The embedded SmolLM2 GGUF with every tensor dequantized to F32 (metadata copied), so that
    llama.cpp decodes the same float32 weights as the other two."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    reader = GGUFReader(str(resolve("smollm2-135m-instruct")))
    path = f"{directory}/smollm2-135m-f32.gguf"
    writer = GGUFWriter(path, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # written by the writer itself
        if key == "general.file_type":
            writer.add_file_type(0)  # ALL_F32
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
    for t in reader.tensors:
        array = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        writer.add_tensor(t.name, np.ascontiguousarray(array, dtype=np.float32), raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_runner(gguf_path: str, prompt: list[int], n: int):
    """A greedy decode of n tokens with llama.cpp (llama-cpp-python), or None if not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=gguf_path, n_ctx=len(prompt) + n + 8, n_threads=torch.get_num_threads(),
                n_batch=64, verbose=False)

    def run():
        llm.reset()
        out = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            out.append(token)
            if len(out) == n:
                return out

    return run


def hf_pair(shape: str):
    """(transformers model, mightylm model) holding the same float32 weights."""
    from transformers import AutoModelForCausalLM

    if shape == "smollm2-135m":
        path = resolve("smollm2-135m-instruct")
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        ours, _ = mightylm.load(path)
        return hf.eval(), ours
    config = ModelConfig.from_preset(shape)
    torch.manual_seed(0)
    ours = mightylm.Transformer(config).eval()
    with tempfile.TemporaryDirectory() as d:
        mightylm.save(ours, None, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return hf, ours


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["micro-15m", "smollm2-135m"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    bandwidth = read_bandwidth_gbs()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, read bandwidth {bandwidth:.1f} GB/s")
    print(f"{'shape':14s} {'params':>8s} {'transformers':>13s} {'mightylm':>10s} {'ratio':>6s} {'bound':>8s}")
    scratch = tempfile.TemporaryDirectory()
    for shape in args.shapes:
        hf, ours = hf_pair(shape)
        g = torch.Generator().manual_seed(1)
        prompt = torch.randint(100, ours.config.vocab_size, (1, args.prompt_tokens), generator=g)
        n = args.new_tokens

        def run_hf():
            with torch.inference_mode():
                return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, prompt.shape[1]:].tolist()

        fuse_projections_(ours)
        settings = Sampling(max_new_tokens=n)

        def run_ours():
            return generate(ours, [prompt[0].tolist()], settings)[0]

        same = run_hf() == run_ours()
        t_hf, t_ours = timed_pair(run_hf, run_ours, args.repeats)
        # Per decoded token every weight is read once, except the embedding table (one row);
        # a tied head reads the table once as the head.
        c = ours.config
        weight_bytes = (c.n_params - (0 if c.tie_embeddings else c.vocab_size * c.dim)) * 4
        bound = bandwidth * 1e9 / weight_bytes
        print(f"{shape:14s} {c.n_params / 1e6:7.1f}M {n / t_hf:9.1f} tok/s {n / t_ours:6.1f} tok/s "
              f"{t_hf / t_ours:5.2f}x {bound:5.1f} tok/s   same tokens: {same}")
        if shape == "smollm2-135m":
            run_cpp = llama_cpp_runner(f32_gguf_of_embedded(scratch.name), prompt[0].tolist(), n)
            if run_cpp is None:
                print("  llama.cpp: not installed (pip install llama-cpp-python builds it from source)")
                continue
            agree = sum(a == b for a, b in zip(run_cpp(), run_ours()))
            t_cpp, t_ours = timed_pair(run_cpp, run_ours, args.repeats)
            print(f"  llama.cpp F32 GGUF {n / t_cpp:6.1f} tok/s, mightylm {n / t_ours:6.1f} tok/s in the same "
                  f"interleaved runs: {t_cpp / t_ours:.2f}x of llama.cpp; {agree}/{n} greedy tokens agree")


if __name__ == "__main__":
    main()
