"""Batch-1 decode speed of each native-kernel instruction set the CPU has (AVX2 baseline, AVX-512 with VNNI),
on SmolLM2-135M-Instruct in float32, int8 (+ int8 head) and the file's own Q4_1 blocks kept as stored, in one
process, paths interleaved.

    .venv/bin/python bench/isa.py [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def decode_tokens_per_s(model, prompt: list[int], tokens: int) -> float:
    from mightylm.generate import Sampling, generate

    settings = Sampling(max_new_tokens=tokens, temperature=0.0, stop_token_ids=())
    generate(model, [prompt], Sampling(max_new_tokens=2, temperature=0.0, stop_token_ids=()))  # warm
    t = time.perf_counter()
    out = generate(model, [prompt], settings)[0]
    return len(out) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import mightylm
    from mightylm import kernels
    from mightylm.compress.quantize import DEFAULT_TARGETS, quantize_
    from mightylm.fuse import fuse_projections_

    print("CPU flags:", " ".join(sorted(f for f in kernels.cpu_flags() if f.startswith(("avx", "amx", "fma")))))
    models = {}
    for name in ("float32", "int8 + int8 head", "GGUF blocks (Q4_1)"):
        model, tok = mightylm.load("smollm2-135m-instruct", keep_blocks=name.startswith("GGUF"))
        if name.startswith("int8"):
            quantize_(model, "int8", targets=DEFAULT_TARGETS + ("lm_head",))
        fuse_projections_(model)
        models[name] = model.eval()
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. " * 3)
    results = {(m, path): [] for m in models for path in kernels.available_isas()}
    for _ in range(args.repeats):
        for (name, path), runs in results.items():
            kernels.set_kernel_isa(path)
            with torch.inference_mode():
                runs.append(decode_tokens_per_s(models[name], prompt, args.tokens))
    for name in models:
        speeds = {path: statistics.median(results[name, path]) for path in kernels.available_isas()}
        line = ", ".join(f"{path} {v:.1f} tok/s" for path, v in speeds.items())
        ratio = f" ({speeds['avx512'] / speeds['avx2']:.2f}x)" if "avx512" in speeds else ""
        print(f"{name:18s} {line}{ratio}")


if __name__ == "__main__":
    main()
