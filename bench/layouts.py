"""Our Q4_0 / Q4_1 / Q5_0 / Q6_K layouts (kernels/q4_fields.c, q5_0_fields.c, q6_k_fields.c) against the stored
blocks' loops (gguf_blocks.c)
on a real file's products, in one process, alternated.

    .venv/bin/python bench/layouts.py [--model qwen2.5-coder-0.5b-instruct] [--rows 1 3 16] [--rounds 5]

For each tensor name whose type has a layout (attn_output, ffn_gate, ffn_up, ffn_down, ... as the file stores them),
the same product of every layer that holds it is run once per round, stored blocks and layout taking turns, so
the weights stream from memory as in a decode (one layer's matrix alone would sit in L3). Printed per product:
microseconds, the weights' GB/s in each layout, layout / stored, and the bound: the layout's bytes over the
measured read bandwidth. Which layout lite takes on which kernel path is kernels.float_layout's rule (Q6_K
everywhere, Q5_0 on AVX2, Q4_0 / Q4_1 on AVX-512); this measures a file's layouts on the current path whatever the
rule says.
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
from mightylm.kernels import FIELDS, as_fields, cpu_flags, gemv_library, kernel_isa, physical_cores  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="a GGUF path or an embedded name")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 3, 16], help="rows of x per product")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    lib, threads = gemv_library(), physical_cores()
    try:
        path = resolve(args.model)
    except CheckpointError as e:  # a missing file, or the optional Qwen parts not installed: say so in one line
        sys.exit(str(e))
    if path.suffix != ".gguf":
        sys.exit(f"{path}: not a .gguf file (the layouts are made from a GGUF file's Q4_0 / Q4_1 / Q5_0 / Q6_K blocks)")
    file, _ = gguf_metadata(path)
    by_name: dict[tuple[str, int], list] = {}
    for t in file.tensors:  # blk.N.<name>.weight of a type with a layout, grouped over the layers
        if t.name.startswith("blk.") and t.type in FIELDS and len(t.shape) == 2:
            by_name.setdefault((t.name.split(".", 2)[2], t.type), []).append(t)
    if not by_name:
        sys.exit(f"{args.model}: no Q4_0, Q4_1, Q5_0 or Q6_K products")
    bandwidth = read_bandwidth_gbs()
    flags = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in cpu_flags())
    print(f"CPU flags: {flags}; kernel path {kernel_isa()}; {threads} threads; read bandwidth {bandwidth:.1f} GB/s")
    print(f"{'product':22s} {'type':5s} {'shape':>11s} {'rows':>4s} {'stored us':>10s} {'GB/s':>5s} "
          f"{'layout us':>10s} {'GB/s':>5s} {'layout/stored':>13s} {'bound us':>9s}")
    for (name, kind), tensors in sorted(by_name.items()):
        n_in, out = tensors[0].shape[1], tensors[0].shape[0]
        stored = [file.read(t).reshape(out, -1) for t in tensors]
        fields = [as_fields(raw, kind) for raw in stored]
        for rows in args.rows:
            x = np.random.default_rng(0).standard_normal((rows, n_in)).astype(np.float32)
            y = np.empty((rows, out), np.float32)
            times = {"stored": [], "layout": []}
            for _ in range(args.rounds + 1):  # the first round warms up
                for which, weights, kind_ in (("stored", stored, kind), ("layout", fields, FIELDS[kind])):
                    start = time.perf_counter()
                    for w in weights:
                        lib.mighty_gemm_ggml(x.ctypes.data, rows, w.ctypes.data, kind_, None, y.ctypes.data, n_in,
                                             out, threads)
                    times[which].append((time.perf_counter() - start) / len(weights))
            s, f = (statistics.median(times[k][1:]) for k in ("stored", "layout"))
            print(f"{name:22s} {TYPE_NAMES[kind]:5s} {out:>5d}x{n_in:<5d} {rows:>4d} {s * 1e6:>10.1f} "
                  f"{stored[0].nbytes / s / 1e9:>5.1f} {f * 1e6:>10.1f} {fields[0].nbytes / f / 1e9:>5.1f} "
                  f"{f / s:>12.2f}x {fields[0].nbytes / bandwidth / 1e3:>9.1f}")


if __name__ == "__main__":
    main()
