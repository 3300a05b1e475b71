"""The GPU side of issue 18: batch-1 greedy decode and bf16 training steps, mightylm against transformers on the same
weights in one run (for a session lent a device machine: `bash runs/gpu_check.sh` runs this after the gpu tests).

Decode: a prompt of 32 random tokens, 128 new tokens, greedy, bf16 weights; transformers' `generate` (its dynamic
cache, eager; with --hf-compile also its static cache, which `generate` compiles with torch.compile), ours launch
by launch (`cuda_graphs=False`), ours with each token one CUDA graph replay (static_decode.py; the capture
is in the first, untimed call, printed; the model keeps its decoder for the next generations), and that graph of
a step whose block torch.compile fused (`mighty generate --compile`; compiling is in the first call). Median of
`--repeats` after that first call; tok/s of decode and prefill together, as a user waits for them. Bound: the
bf16 weight bytes read per token over the measured copy bandwidth.

Training: float32 weights under bf16 autocast (what `fit` does with bf16=True), one step = forward with the
loss, backward, fused AdamW; batch x sequence random tokens; tokens/s and peak allocated memory.

    python3 bench/gpu.py [--shapes smollm2-135m llama-1b] [--repeats 3] [--hf-compile]
    python3 bench/gpu.py --device cpu --shapes tiny --repeats 1      # the script itself, checked on a CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch

import mightylm
from mightylm.config import ModelConfig
from mightylm import static_decode
from mightylm.generate import Sampling, generate

SHAPES = {
    "tiny": dict(preset="tiny"),
    "smollm2-135m": dict(preset="smollm2-135m"),
    # Llama-3.2-1B's shape (random weights): 1.24B parameters, 2.5 GB in bf16
    "llama-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                     rope_theta=500000.0, tie_embeddings=True, max_seq_len=8192),
}


def config_of(shape: str) -> ModelConfig:
    spec = dict(SHAPES[shape])
    return ModelConfig.from_preset(spec.pop("preset")) if "preset" in spec else ModelConfig(**spec)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth_gbs(device: str) -> float:
    """Bytes read and written per second by a 1 GiB device-to-device copy (best of 10)."""
    a = torch.ones(2**28, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(10):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best / 1e9


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def pair(config: ModelConfig, device: str, dtype: torch.dtype):
    """(ours, transformers') with the same random weights, in `dtype` on `device`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        ours = mightylm.Transformer(config)
    ours = ours.to(dtype).eval()
    with tempfile.TemporaryDirectory() as d:
        mightylm.save(ours.cpu(), None, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    return ours.to(device), hf


def decode_row(shape: str, config: ModelConfig, args, bandwidth: float) -> None:
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    ours, hf = pair(config, args.device, dtype)
    n = args.new_tokens
    prompt = torch.randint(100, config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(args.device)
    settings = Sampling(max_new_tokens=n)

    def run_hf(**extra):
        with torch.inference_mode():
            return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0, **extra)[0, prompt.shape[1]:].tolist()

    def run_ours(graphs: bool, compiled: bool = False):
        def run():
            static_decode.compile_blocks(ours, compiled)
            return generate(ours, [prompt[0].tolist()], settings, cuda_graphs=graphs)[0]
        return run

    runs = {
        "transformers": run_hf,
        "mightylm": run_ours(False),
        "mightylm graphs": run_ours(True),
        "mightylm compiled graphs": run_ours(True, compiled=True),
    }
    tokens, seconds = {}, {}
    for name, run in runs.items():  # each timed right after its first call: the model keeps that run's decoder
        sync(args.device)
        t = time.perf_counter()
        tokens[name] = run()
        sync(args.device)
        print(f"  first call of {name}: {time.perf_counter() - t:.2f} s")
        seconds[name] = timed(run, args.repeats, args.device)
    static_decode.compile_blocks(ours, False)
    if args.hf_compile:
        def static():
            return run_hf(cache_implementation="static")

        t = time.perf_counter()
        tokens["transformers static+compile"] = static()
        sync(args.device)
        print(f"  transformers static cache: first generate (compiling) {time.perf_counter() - t:.1f} s")
        seconds["transformers static+compile"] = timed(static, args.repeats, args.device)
    weight_bytes = (config.n_params - (0 if config.tie_embeddings else config.vocab_size * config.dim)) * \
        torch.empty((), dtype=dtype).element_size()
    bound = bandwidth * 1e9 / 2 / weight_bytes  # a copy's bandwidth counts each byte read and written
    base = seconds["transformers"]
    print(f"{shape} ({config.n_params / 1e6:.0f}M, {dtype}), {args.prompt_tokens}-token prompt + {n} tokens, "
          f"batch 1, bound {bound:.0f} tok/s:")
    for name, s in seconds.items():
        agree = sum(a == b for a, b in zip(tokens[name], tokens["transformers"]))
        print(f"  {name:28s} {n / s:8.1f} tok/s  {base / s:5.2f}x transformers  {n / s / bound:6.1%} of bound  "
              f"{agree}/{n} tokens as transformers")
    same = tokens["mightylm"] == tokens["mightylm graphs"] == tokens["mightylm compiled graphs"]
    print(f"  graphs, compiled graphs and launch-by-launch give the same tokens: {same}")
    if args.step_profile:
        step_profile(ours, config, args)


def step_profile(ours, config: ModelConfig, args) -> None:
    """Milliseconds per decoded token of the step alone (no sampling, no Python loop around it; 100 steps between
    two synchronisations): launch by launch, one CUDA graph replay, one replay of the step whose block
    torch.compile fused (inductor: fewer kernels per graph; compile_blocks), and with --whole-step-compile one of
    the whole step compiled; the first call's time includes capturing and compiling."""
    from mightylm.generate import decode_one_token, prefill
    from mightylm.static_decode import StaticDecode

    device, P, n = args.device, args.prompt_tokens, 100
    prompt = torch.randint(100, config.vocab_size, (1, P), device=device)
    token = torch.tensor([5], device=device)
    times = {}
    names = ["launch by launch", "graph", "compiled blocks"]
    names += ["whole step compiled"] if args.whole_step_compile else []
    for name in names:
        with torch.inference_mode():
            cache = ours.make_cache(1, 256)
            prefill(ours, prompt, cache)
            step = lambda t, i: decode_one_token(ours, t, cache, i)  # noqa: E731
            if name != "launch by launch":
                step = StaticDecode(ours, cache, None, compiled=name == "compiled blocks")
                if name == "whole step compiled":
                    step._step = torch.compile(step._step, fullgraph=True)
            sync(device)
            t = time.perf_counter()
            step(token, P)
            sync(device)
            first = time.perf_counter() - t
            t = time.perf_counter()
            for i in range(n):
                step(token, P + 1 + i)
            sync(device)
            times[name] = (time.perf_counter() - t) / n
        print(f"  step alone, {name:17s} {times[name] * 1e3:7.3f} ms/token  ({1 / times[name]:7.0f} tok/s; "
              f"first call {first:.2f} s)")


def precision_row(shape: str, config: ModelConfig, args) -> None:
    """Why bf16 tokens can differ between the graph and the compiled graph: each step's bf16 logits against the
    same model's float32 logits, the tokens fed being float32's argmax (teacher-forced, `--new-tokens` steps):
    the largest difference and how often each variant's argmax is float32's. Random weights have near-ties."""
    import copy

    from mightylm.generate import prefill
    from mightylm.static_decode import StaticDecode

    device, P = args.device, args.prompt_tokens
    torch.manual_seed(0)
    with torch.device(device):
        exact = mightylm.Transformer(config).eval()
    half = copy.deepcopy(exact).to(torch.bfloat16)
    prompt = torch.randint(100, config.vocab_size, (1, P), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        cache = exact.make_cache(1, P + args.new_tokens)
        reference = StaticDecode(exact, cache, None)
        token = prefill(exact, prompt, cache).argmax(-1)
        variants = {}
        for name, compiled in (("graph", False), ("compiled graph", True)):
            c = half.make_cache(1, P + args.new_tokens)
            prefill(half, prompt, c)
            variants[name] = StaticDecode(half, c, None, compiled=compiled)
        worst, agree, gaps = dict.fromkeys(variants, 0.0), dict.fromkeys(variants, 0), []
        for t in range(args.new_tokens):
            r = reference(token, P + t).float().clone()
            for name, step in variants.items():
                logits = step(token, P + t).float()
                worst[name] = max(worst[name], (logits - r).abs().max().item())
                agree[name] += int(torch.equal(logits.argmax(-1), r.argmax(-1)))
            top = r.topk(2).values
            gaps.append((top[0, 0] - top[0, 1]).item())
            token = r.argmax(-1)
    n = args.new_tokens
    print(f"{shape}: bf16 against float32 logits over {n} teacher-forced steps (median top-2 gap of float32 "
          f"{statistics.median(gaps):.3f}, logit std {r.std().item():.2f}):")
    for name in variants:
        print(f"  bf16 {name:15s} max |difference| {worst[name]:.3f}   argmax = float32's {agree[name]}/{n}")


def train_rate(make_model, loss_of, device: str, tokens: int, steps: int) -> tuple[float, float]:
    """(tokens/s, peak GiB allocated) of training steps on the model `make_model()` builds; its memory is freed
    when this returns."""
    torch.manual_seed(0)
    with torch.device(device):
        model = make_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    autocast = torch.autocast(device, dtype=torch.bfloat16)

    def step():
        with autocast:
            loss = loss_of(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    s = timed(step, steps, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return tokens / s, peak


def train_row(shape: str, config: ModelConfig, args) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from mightylm.train import cross_entropy

    device, B, T = args.device, args.batch, args.seq
    ids = torch.randint(0, config.vocab_size, (B, T + 1), device=device)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    with tempfile.TemporaryDirectory() as d:
        mightylm.save(mightylm.Transformer(dataclasses.replace(config, n_layers=1)), None, d)  # for its config
        hf_config = AutoConfig.from_pretrained(d)
    hf_config.num_hidden_layers = config.n_layers
    runs = {"transformers": (lambda: AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32),
                             lambda m: m(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss),
            "mightylm": (lambda: mightylm.Transformer(config), lambda m: cross_entropy(m, batch))}
    print(f"{shape} training, float32 weights, bf16 autocast, batch {B} x {T}, fused AdamW:")
    rates = {}
    for name, (make_model, loss_of) in runs.items():
        rates[name], peak = train_rate(make_model, loss_of, device, B * T, args.train_steps)
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"  {name:14s} {rates[name]:10.0f} tokens/s  {B * T / rates[name] * 1e3:7.1f} ms/step  "
              f"peak {peak:6.2f} GiB")
    print(f"  mightylm / transformers: {rates['mightylm'] / rates['transformers']:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama-1b"], choices=list(SHAPES))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-compile", action="store_true", help="also transformers' static cache (compiled)")
    parser.add_argument("--batch", type=int, default=8, help="training rows per step")
    parser.add_argument("--seq", type=int, default=1024, help="training tokens per row")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--step-profile", action="store_true", help="also time the decode step alone (and compiled)")
    parser.add_argument("--precision", action="store_true",
                        help="also bf16 logits (graph, compiled graph) against float32, teacher-forced")
    parser.add_argument("--whole-step-compile", action="store_true",
                        help="with --step-profile: also the whole step compiled (20-40 s of compiling per shape)")
    args = parser.parse_args()
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    bandwidth = copy_bandwidth_gbs(args.device)
    print(f"torch {torch.__version__}, {name}, device copy {bandwidth:.0f} GB/s (read + written)")
    for shape in args.shapes:
        config = config_of(shape)
        if not args.skip_decode:
            decode_row(shape, config, args, bandwidth)
        if args.precision:
            precision_row(shape, config, args)
        if not args.skip_training:
            train_row(shape, config, args)


if __name__ == "__main__":
    main()
