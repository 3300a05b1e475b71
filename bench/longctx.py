"""The Recurrent Memory Transformer's claim at small scale (issue 22): retrieval by length, and the cost of length.

    .venv/bin/python bench/longctx.py [--segments 1 2 4 8 16] [--steps 1500] [--lengths 512 1024 2048 4096 8192]
        [--no-curriculum] [--skip-accuracy] [--skip-cost]

Accuracy (bench/rmt.py's task and tiny decoder, trained from scratch for each point): a key stated in the first of
N segments of 8 tokens, asked for at the end of the last, for (a) the plain model truncated to its window (each
segment alone: it never sees the key past the first), (b) full attention over the whole length (the upper bound, as
a model extended to the full length would be), (c) RMT with 4 memory slots and the same decoder. Chance is 1/16.
Each is trained with the curriculum of Bulatov et al. 2023 (equal shares of the steps on 1, 2, 4, ... segments, then
the full length) and gradients clipped to norm 1; --no-curriculum trains at the full length throughout. (Without
either, RMT learned at 2 and 8 segments and stayed near chance at 4 and 16; with the curriculum but no clipping, it
learned at 4 and collapsed to chance in the 16-segment stage.)

Cost (SmolLM2-135M-Instruct, the embedded GGUF with its blocks kept, 2 threads): reading a prompt of L tokens and
being ready to answer, each L in a fresh process: full attention (one pass writing a KV cache of L slots) against
RMT (segments of 128 tokens and 16 memory slots read one after the other; only the memory is carried). Reported:
seconds per token (the better of two reads) and the peak resident memory the reading adds (VmHWM reset after
loading).

Printed as tables, saved to bench/longctx.json (a part skipped keeps the figures an earlier run saved there) and
drawn as one figure, bench/figures/longctx.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

COST = r"""
import json, sys, time, torch
import mightylm
from mightylm.rmt import RecurrentMemory, read

mode, length = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(2)
model = mightylm.load("smollm2-135m-instruct", keep_blocks=True)[0].eval()
ids = torch.randint(100, 40000, (1, length), generator=torch.Generator().manual_seed(0))
rmt = RecurrentMemory(model, segment=128, memory=16, bptt=None) if mode == "rmt" else None

def hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1])

def once(n):
    with torch.inference_mode():
        if rmt is None:
            return model(ids[:, :n], cache=model.make_cache(1, n), last_only=True)
        memory, rest = read(rmt, ids[0, :n].tolist())
        return rmt.segment_pass(torch.tensor([rest]), memory)

once(256)  # warm-up: kernels, RoPE tables
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident memory starts again from here
base = hwm_kib()
seconds = []
for _ in range(2):
    began = time.perf_counter()
    once(length)
    seconds.append(time.perf_counter() - began)
seconds = min(seconds)
print(json.dumps({"seconds": seconds, "added_mib": (hwm_kib() - base) / 1024}))
"""


def cost(mode: str, length: int) -> dict:
    out = subprocess.run([sys.executable, "-c", COST, mode, str(length)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{mode} at {length} tokens failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--segments", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--no-curriculum", action="store_true", help="train at the full length from the first step")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--figure", default=str(BENCH / "figures" / "longctx.png"))
    ap.add_argument("--results", default=str(BENCH / "longctx.json"))
    args = ap.parse_args()
    for name in ("segments", "lengths"):
        if min(getattr(args, name)) < 1:
            ap.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.steps < 1:
        ap.error(f"--steps must be positive, got {args.steps}")

    import torch

    from mightylm.cli import env
    from rmt import KEYS, run  # bench/rmt.py: the key task and its tiny decoder

    env()
    torch.set_num_threads(2)
    saved = json.loads(Path(args.results).read_text()) if Path(args.results).exists() else {}
    accuracy = {int(k): v for k, v in saved.get("accuracy", {}).items()} if args.skip_accuracy else {}
    costs = {int(k): v for k, v in saved.get("cost", {}).items()} if args.skip_cost else {}
    if not args.skip_cost:
        print("\nreading L tokens, SmolLM2-135M-Instruct (fresh process each)\n")
        print("| tokens | full attention ms/token | added MiB | RMT (128 + 16 memory) ms/token | added MiB |")
        print("|---|---|---|---|---|")
        for length in args.lengths:
            costs[length] = {mode: cost(mode, length) for mode in ("full", "rmt")}
            full, rmt = costs[length]["full"], costs[length]["rmt"]
            print(f"| {length} | {1e3 * full['seconds'] / length:.2f} | {full['added_mib']:.0f} | "
                  f"{1e3 * rmt['seconds'] / length:.2f} | {rmt['added_mib']:.0f} |", flush=True)
    if not args.skip_accuracy:
        how = "at the full length" if args.no_curriculum else "with the curriculum"
        print(f"\nkey in segment 1 of N (8 tokens each), asked at the end; {args.steps} steps {how}; "
              f"chance {1 / KEYS:.3f}\n")
        print("| segments | tokens | (a) truncated to the window | (b) full attention | (c) RMT, 4 memory slots |")
        print("|---|---|---|---|---|")
        for n in args.segments:
            length = 8 * n
            kw = dict(curriculum=not args.no_curriculum, unit=8)
            accuracy[n] = {"truncated": run(8, 0, length, args.steps, **kw),
                           "full": run(length, 0, length, args.steps, **kw), "rmt": run(8, 4, length, args.steps, **kw)}
            a = accuracy[n]
            print(f"| {n} | {length} | {a['truncated'][0]:.3f} ({a['truncated'][1]:.0f} s) | "
                  f"{a['full'][0]:.3f} ({a['full'][1]:.0f} s) | {a['rmt'][0]:.3f} ({a['rmt'][1]:.0f} s) |", flush=True)
    Path(args.results).write_text(json.dumps({"accuracy": accuracy, "cost": costs}, indent=1) + "\n")
    draw(accuracy, costs, 1 / KEYS, args.figure)


def draw(accuracy: dict, costs: dict, chance: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p, data in (("accuracy", accuracy), ("time", costs), ("memory", costs)) if data]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    axes = [axes] if len(panels) == 1 else list(axes)
    styles = {"truncated": ("(a) truncated to the window", "tab:gray"), "full": ("(b) full attention", "tab:blue"),
              "rmt": ("(c) RMT", "tab:red")}
    for ax, panel in zip(axes, panels):
        if panel == "accuracy":
            xs = sorted(accuracy)
            for key, (label, colour) in styles.items():
                ax.plot(xs, [accuracy[n][key][0] for n in xs], "o-", label=label, color=colour)
            ax.axhline(chance, ls=":", color="black", label="chance")
            ax.set(xscale="log", xlabel="length (x the segment of 8 tokens)", ylabel="held-out accuracy",
                   title="key retrieval, tiny decoder", ylim=(-0.05, 1.05))
            ax.set_xticks(xs, [str(n) for n in xs])
            ax.minorticks_off()
        else:
            xs = sorted(costs)
            for key in ("full", "rmt"):
                label, colour = styles[key]
                ys = [1e3 * costs[n][key]["seconds"] / n if panel == "time" else costs[n][key]["added_mib"] for n in xs]
                ax.plot(xs, ys, "o-", label=label, color=colour)
            ax.set(xscale="log", xlabel="prompt tokens", title=f"reading a prompt: {panel}, SmolLM2-135M",
                   ylabel="ms per token" if panel == "time" else "peak memory added (MiB)")
            ax.set_xticks(xs, [str(n) for n in xs])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nfigure: {path}")


if __name__ == "__main__":
    main()
