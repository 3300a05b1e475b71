"""The float32 products of GGUF blocks in each of their ways, on a real file's products, in one process,
alternated: the stored blocks' loops (gguf_blocks.c), our Q4_0 / Q4_1 / Q5_0 / Q6_K layouts (q4_fields.c,
q5_0_fields.c, q6_k_fields.c) and the int8 tiles with activations in 24 bits (mighty_gemm_ggml_int24: Q8_0 / Q4_0 /
Q4_1 / Q5_0 / Q6_K), with the tiles' int8 activations (llama.cpp's arithmetic, not float32's) beside them.

    .venv/bin/python bench/layouts.py [--model smollm2-135m-instruct] [--rows 1 3 16] [--rounds 5]

For each tensor name (attn_output, ffn_gate, ffn_up, ffn_down, ... as the file stores them), the same product of
every layer that holds it is run once per round, the ways taking turns, so the weights stream from memory as in a
decode (one layer's matrix alone would sit in L3). Printed per product and way: microseconds, the weights' GB/s,
the time over the stored loop's, and the bound: the weights' bytes over the measured read bandwidth. Which way lite
and the torch path take on which kernel path is kernels.int24_tiles' rule, then kernels.float_layout's; this
measures every way on the current path whatever the rules say (MIGHTYLM_ISA=avx2 for the baseline path).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from decode import read_bandwidth_gbs  # noqa: E402

from mightylm.checkpoint import CheckpointError, gguf_metadata, resolve  # noqa: E402
from mightylm.checkpoint.gguf_file import TYPE_NAMES  # noqa: E402
from mightylm.kernels import (FIELDS, as_fields, cpu_flags, gemv_library, int8_layout, kernel_isa,  # noqa: E402
                              physical_cores, tile_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a GGUF path or an embedded name")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 3, 16], help="rows of x per product")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    lib, threads = gemv_library(), physical_cores()
    try:
        path = resolve(args.model)
    except CheckpointError as e:  # a missing file, or the optional Qwen parts not installed: say so in one line
        sys.exit(str(e))
    if path.suffix != ".gguf":
        sys.exit(f"{path}: not a .gguf file (the layouts are made from a GGUF file's blocks)")
    file, _ = gguf_metadata(path)
    by_name: dict[tuple[str, int], list] = {}
    for t in file.tensors:  # blk.N.<name>.weight of a type with another way, grouped over the layers
        if (t.name.startswith("blk.") and len(t.shape) == 2
                and (t.type in FIELDS or int8_layout(t.type, t.shape[0]) == "tiles")):
            by_name.setdefault((t.name.split(".", 2)[2], t.type), []).append(t)
    if not by_name:
        sys.exit(f"{args.model}: no Q8_0, Q4_0, Q4_1, Q5_0 or Q6_K products")
    bandwidth = read_bandwidth_gbs()
    flags = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in cpu_flags())
    print(f"CPU flags: {flags}; kernel path {kernel_isa()}; {threads} threads; read bandwidth {bandwidth:.1f} GB/s")
    print(f"{'product':22s} {'type':5s} {'shape':>11s} {'rows':>4s} {'way':>14s} {'us':>8s} {'GB/s':>5s} "
          f"{'/ stored':>8s} {'bound us':>9s}")
    for (name, kind), tensors in sorted(by_name.items()):
        n_in, out = tensors[0].shape[1], tensors[0].shape[0]
        stored = [file.read(t).reshape(out, -1) for t in tensors]
        ways = {"stored": (lib.mighty_gemm_ggml, stored, kind)}  # name: (product, weights, the type it reads)
        if kind in FIELDS:
            ways["our layout"] = (lib.mighty_gemm_ggml, [as_fields(raw, kind) for raw in stored], FIELDS[kind])
        if int8_layout(kind, out) == "tiles":
            tiles = [tile_rows(raw, kind) for raw in stored]
            ways["int24 tiles"] = (lib.mighty_gemm_ggml_int24, tiles, kind)
            ways["(int8 tiles)"] = (lib.mighty_gemm_ggml_q8x, tiles, kind)
        for rows in args.rows:
            x = np.random.default_rng(0).standard_normal((rows, n_in)).astype(np.float32)
            y = np.empty((rows, out), np.float32)
            times = {way: [] for way in ways}
            for _ in range(args.rounds + 1):  # the first round warms up
                for way, (product, weights, kind_) in ways.items():
                    start = time.perf_counter()
                    for w in weights:
                        product(x.ctypes.data, rows, w.ctypes.data, kind_, None, y.ctypes.data, n_in, out, threads)
                    times[way].append((time.perf_counter() - start) / len(weights))
            base = statistics.median(times["stored"][1:])
            for way, (_, weights, _) in ways.items():
                t, size = statistics.median(times[way][1:]), weights[0].nbytes
                print(f"{name:22s} {TYPE_NAMES[kind]:5s} {out:>5d}x{n_in:<5d} {rows:>4d} {way:>14s} {t * 1e6:>8.1f} "
                      f"{size / t / 1e9:>5.1f} {t / base:>7.2f}x {size / bandwidth / 1e3:>9.1f}")


if __name__ == "__main__":
    main()
