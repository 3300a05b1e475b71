"""Cold-start time: how long a fresh process takes to import, print --help, and load the embedded model and
generate one token (through mightylm.lite, the default, and through torch), with its peak resident memory; and, when llama-cpp-python is installed (a bench-only
extra, never in `make test`), llama.cpp loading the same GGUF file and generating one token.

Each figure is the median of --repeats fresh processes, run one after another (never two at once), so the
OS file cache is warm after the first: this measures our start, not the disk.

    .venv/bin/python bench/startup.py [--repeats 3] [--llama-python .venv-llama/bin/python]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_PYTHON = ROOT / ".venv-llama/bin/python"  # `make llama-cpp`
LLAMA_CPP = """
import sys, time
t = time.perf_counter()
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=2, n_batch=1, verbose=False)
llm(sys.argv[2], max_tokens=1, temperature=0)
print(time.perf_counter() - t)
"""


# Started by a small Python that imports nothing large: a child's peak RSS (ru_maxrss) keeps the high-water mark
# of the process it was forked from, so spawned from this script (torch imported) every child read >= 220 MiB.
WRAPPER = """
import os, subprocess, sys, time
t = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(child.pid, 0)
wall = time.perf_counter() - t
if os.waitstatus_to_exitcode(status) != 0:
    sys.exit(child.stderr.read().decode()[-2000:])
print(wall, usage.ru_maxrss / 1024)
"""


def run(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one fresh process (its own rusage, from wait4 in a small wrapper)."""
    r = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    wall, rss = r.stdout.split()
    return float(wall), float(rss)


def median_of(cmd: list[str], repeats: int) -> dict:
    runs = [run(cmd) for _ in range(repeats)]
    walls = [w for w, _ in runs]
    return {"wall_s": statistics.median(walls), "min_s": min(walls), "peak_rss_mb": max(r for _, r in runs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--llama-python", default=None,
                   help="a Python with llama-cpp-python installed (its own venv; default: .venv-llama from `make "
                        "llama-cpp`, else this one if it has it)")
    args = p.parse_args()
    from mightylm.checkpoint import resolve
    from mightylm.kernels import cpu_flags

    gguf = str(resolve("smollm2-135m-instruct"))
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))
    print(f"CPU flags: {' '.join(flags)}")
    mighty = [sys.executable, "-m", "mightylm.cli"]
    rows = {
        "import mightylm.cli": [sys.executable, "-c", "import mightylm.cli"],
        "mighty --help": [*mighty, "--help"],
        # the default: the embedded file decodes through mightylm.lite (the native kernels, no torch)
        "mighty generate, 1 token": [*mighty, "generate", "--prompt", "Hello", "--max-new-tokens", "1",
                                     "--temperature", "0"],
        "... --engine torch": [*mighty, "generate", "--prompt", "Hello", "--max-new-tokens", "1", "--temperature",
                               "0", "--engine", "torch"],
        "... --blocks false": [*mighty, "generate", "--prompt", "Hello", "--max-new-tokens", "1", "--temperature",
                               "0", "--blocks", "false"],
    }
    results = {name: median_of(cmd, args.repeats) for name, cmd in rows.items()}
    llama_python = args.llama_python or (str(LLAMA_PYTHON) if LLAMA_PYTHON.exists() else None) or (
        sys.executable if importlib.util.find_spec("llama_cpp") else None)
    if llama_python:
        results["llama.cpp load + 1 token"] = median_of([llama_python, "-c", LLAMA_CPP, gguf, "Hello"], args.repeats)
    else:
        print("llama-cpp-python is not installed: llama.cpp's figure is not measured in this run")
    for name, r in results.items():
        print(f"{name:28s} {r['wall_s']:6.2f} s (min {r['min_s']:.2f})  peak RSS {r['peak_rss_mb']:.0f} MiB")
    if "llama.cpp load + 1 token" in results:
        ours, theirs = results["mighty generate, 1 token"], results["llama.cpp load + 1 token"]
        print(f"ratio: ours / llama.cpp {ours['wall_s'] / theirs['wall_s']:.2f}x time, "
              f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x peak RSS")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
