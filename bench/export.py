"""Do llama.cpp and mightylm agree on the GGUF files `mighty export` writes? For each type, the embedded
SmolLM2-135M-Instruct (dequantized to float32) is exported, then read by llama.cpp in its own process (no torch
there) and by our loader here; printed per file: size, whether llama.cpp's tokenizer gives our ids on a
multilingual text, greedy agreement over 32 tokens from a fixed prompt, and the last prompt position's logits
(max |difference|, relative RMS, same top-1). A random LoRA adapter is also exported with --format gguf-lora and
applied by llama.cpp (`lora_path`) over the F32 file, against our model with the adapter.

llama.cpp quantizes the activations of Q8_0/Q4_0/Q4_1 products to 8 bits and we do not, so quantized files agree
within that rounding, not exactly; F32 differs only by summation order.

llama.cpp comes from llama-cpp-python, a bench-only extra built from source (10-20 min), in its own venv:
    make llama-cpp                       # .venv-llama, used by default
    .venv/bin/python bench/export.py [--llama-python OTHER_PYTHON]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

LLAMA_PYTHON = str(Path(__file__).resolve().parent.parent / ".venv-llama/bin/python")  # `make llama-cpp`
TEXT = "Hello world! Héllo wörld, naïve café. 東京タワー 123456 + 7 = ?\n  def f(x):\n\treturn x ** 2  🙂"
PROMPT = "The capital of France is"

LLAMA_CPP = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, lora, text, prompt, n = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
kwargs = {"lora_path": lora} if lora else {}
llm = Llama(model_path=path, n_ctx=256, n_threads=2, n_batch=1, verbose=False, **kwargs)
vocab = llm.n_vocab()
logits = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).copy()
llm.eval(prompt)
last = logits()
out = []
for _ in range(n):
    out.append(int(np.argmax(logits())))
    llm.eval([out[-1]])
print(json.dumps({"ids": llm.tokenize(text.encode(), add_bos=False, special=False), "greedy": out,
                  "logits": last.tolist(), "template": llm.metadata.get("tokenizer.chat_template", "")[:64]}))
"""


def llama_cpp(python: str, path: Path, lora: Path | None, prompt: list[int], n: int) -> dict:
    done = subprocess.run([python, "-c", LLAMA_CPP, str(path), str(lora or ""), TEXT, json.dumps(prompt), str(n)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise SystemExit(f"llama.cpp failed on {path}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@torch.no_grad()
def ours(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    from mightylm.generate import Sampling, generate

    last = model(torch.tensor([prompt]))[0, -1]
    return generate(model, [prompt], Sampling(max_new_tokens=n, temperature=0))[0], last


def compare(name: str, size: float, theirs: dict, greedy: list[int], last: torch.Tensor, ids_ok: bool) -> str:
    ref = torch.tensor(theirs["logits"])
    agree = next((i for i, (a, b) in enumerate(zip(greedy, theirs["greedy"])) if a != b), len(greedy))
    rms = ((last - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()
    return (f"| {name} | {size:.1f} | {'yes' if ids_ok else 'NO'} | {agree}/{len(greedy)} | "
            f"{(last - ref).abs().max().item():.4f} | {rms:.2e} | {'yes' if last.argmax() == ref.argmax() else 'no'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-python", default=LLAMA_PYTHON if Path(LLAMA_PYTHON).exists() else None,
                   help="a Python with llama-cpp-python installed, in its own venv (default: .venv-llama from `make llama-cpp`)")
    p.add_argument("--types", nargs="+", default=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"])
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    if args.llama_python is None:
        raise SystemExit("llama.cpp is not installed: `make llama-cpp` builds it into .venv-llama (10-20 minutes), or "
                         "pass --llama-python PYTHON")

    import mightylm
    from mightylm.adapters import load_adapter
    from mightylm.adapters.gguf import export_gguf_lora
    from mightylm.adapters.lora import apply_lora, save_lora
    from mightylm.checkpoint.gguf_export import export_gguf
    from mightylm.kernels import cpu_flags

    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    print(f"CPU flags: {' '.join(flags)}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    source, tokenizer = mightylm.load("smollm2-135m-instruct")
    prompt = tokenizer.encode(PROMPT)
    print(f"prompt {PROMPT!r}: {len(prompt)} tokens; greedy {args.tokens} tokens; text for the tokenizer check: "
          f"{len(TEXT)} characters")
    print("\n| file | MiB | llama.cpp's ids = ours | greedy tokens equal (first difference) | max |dlogit| | "
          "relative RMS | same top-1 |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for kind in args.types:
            path = scratch / f"smollm2.{kind}.gguf"
            export_gguf(source, tokenizer, path, kind=kind)
            model, tok = mightylm.load(path)
            theirs = llama_cpp(args.llama_python, path, None, prompt, args.tokens)
            greedy, last = ours(model, prompt, args.tokens)
            ids_ok = theirs["ids"] == tok.encode(TEXT, add_special_tokens=False)
            print(compare(kind.upper(), path.stat().st_size / 2**20, theirs, greedy, last, ids_ok), flush=True)
        # a LoRA adapter (r 8 on q/k/v/o, random B so that it matters) as llama.cpp's adapter GGUF, over the F32 file
        f32 = scratch / "smollm2.f32.gguf"
        if not f32.exists():
            export_gguf(source, tokenizer, f32, kind="f32")
        adapted = mightylm.load(f32)[0]
        apply_lora(adapted, ("q_proj", "k_proj", "v_proj", "o_proj"), r=8, alpha=16)
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p_ in adapted.named_parameters():
                if "lora_B" in name:
                    p_.normal_(0, 0.02)
        save_lora(adapted, scratch / "lora")
        base = mightylm.load(f32)[0]
        export_gguf_lora(base, scratch / "lora", scratch / "lora.gguf")
        load_adapter(base, scratch / "lora.gguf")  # ours, read back from the adapter GGUF
        theirs = llama_cpp(args.llama_python, f32, scratch / "lora.gguf", prompt, args.tokens)
        greedy, last = ours(base, prompt, args.tokens)
        print(compare("F32 + LoRA GGUF", (scratch / "lora.gguf").stat().st_size / 2**20, theirs, greedy, last, True))
        plain = llama_cpp(args.llama_python, f32, None, prompt, args.tokens)
        moved = (torch.tensor(theirs["logits"]) - torch.tensor(plain["logits"])).abs().max().item()
        print(f"\nthe adapter moves llama.cpp's last logits by up to {moved:.3f} (so the LoRA row compares a real change)")


if __name__ == "__main__":
    sys.exit(main())
