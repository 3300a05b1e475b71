"""Decode-time attention over a KV cache: the native block's (kernels/attention.c) against PyTorch's
scaled_dot_product_attention on the same queries, keys and values, in one process, alternated.

    .venv/bin/python bench/attention.py [--positions 200 1000 4000] [--rows 1 5] [--repeats 15]

SmolLM2-135M's shape (9 query heads over 3 kv heads of 64, 30 layers, each layer its own cache so that a step reads
them from memory as a decode does): k rows (a token, or a speculative pass of k) at position P. PyTorch gets the
grouped heads by enable_gqa and a causal mask for the k rows; ours reads the cache in place, float32 and float16.
Printed: ms per step (30 layers), ours / PyTorch, and the bound: the cache's bytes read once per step over the
measured read bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from decode import read_bandwidth_gbs  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--positions", type=int, nargs="+", default=[200, 1000, 4000])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 5])
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    from mightylm.kernels import cpu_flags, gemv_library, kernel_isa

    lib = gemv_library()
    if lib is None:
        raise SystemExit("the native kernels are not built here (no C compiler or no AVX2/FMA)")
    threads = torch.get_num_threads()
    bandwidth = read_bandwidth_gbs()
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    print(f"CPU flags: {' '.join(flags)}; kernel path {kernel_isa()}; {threads} threads; "
          f"read bandwidth {bandwidth:.1f} GB/s")
    print("| position | rows | PyTorch SDPA ms | ours float32 ms | ratio | ours float16 ms | ratio "
          "| bound f32 / f16 ms |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    q_out, kv_out = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    for pos in args.positions:
        length = pos + max(args.rows)
        caches = {dtype: [(torch.randn(KV_HEADS, length, HEAD_DIM, generator=g).to(dtype),
                           torch.randn(KV_HEADS, length, HEAD_DIM, generator=g).to(dtype)) for _ in range(LAYERS)]
                  for dtype in (torch.float32, torch.float16)}
        for rows in args.rows:
            qkv = torch.randn(rows, q_out + 2 * kv_out, generator=g)
            q = qkv[:, :q_out].view(rows, HEADS, HEAD_DIM).transpose(0, 1)[None]  # (1, heads, rows, hd)
            mask = torch.ones(rows, pos + rows, dtype=torch.bool).tril(pos)  # row i sees slots 0 .. pos + i
            att = torch.empty(rows, q_out)

            def torch_step():
                for k, v in caches[torch.float32]:
                    F.scaled_dot_product_attention(q, k[None, :, :pos + rows], v[None, :, :pos + rows], attn_mask=mask,
                                                   enable_gqa=True)

            def ours(dtype):
                def step():
                    for k, v in caches[dtype]:
                        lib.mighty_attention(qkv.data_ptr(), qkv.shape[1], att.data_ptr(), k.data_ptr(), v.data_ptr(),
                                             dtype == torch.float16, HEADS, KV_HEADS, HEAD_DIM, length, pos, rows, 1,
                                             None, 0, threads)
                return step

            # the same numbers: ours against PyTorch's on the last layer
            k, v = caches[torch.float32][-1]
            ours(torch.float32)()
            expected = F.scaled_dot_product_attention(q, k[None, :, :pos + rows], v[None, :, :pos + rows],
                                                      attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
            torch.testing.assert_close(att.view(rows, HEADS, HEAD_DIM), expected, atol=1e-4, rtol=1e-4)
            steps = {"torch": torch_step, "f32": ours(torch.float32), "f16": ours(torch.float16)}
            times: dict[str, list[float]] = {name: [] for name in steps}
            for step in steps.values():
                step()  # warm-up
            for _ in range(args.repeats):  # alternated, so that the VM's slow minutes fall on all three
                for name, step in steps.items():
                    t = time.perf_counter()
                    step()
                    times[name].append(time.perf_counter() - t)
            ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
            bound = [2 * LAYERS * kv_out * (pos + rows) * size / bandwidth / 1e6 for size in (4, 2)]
            print(f"| {pos} | {rows} | {ms['torch']:.2f} | {ms['f32']:.2f} | {ms['torch'] / ms['f32']:.1f}x faster | "
                  f"{ms['f16']:.2f} | {ms['torch'] / ms['f16']:.1f}x faster | {bound[0]:.2f} / {bound[1]:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
