"""Six ways to adapt SmolLM2-135M-Instruct to one task, on the same data and steps.

Full fine-tuning with AdamW, full fine-tuning with LOMO, LoRA, prompt tuning, P-tuning and
LLaMA-Adapter, each through its `mighty finetune` recipe function, on the task of
runs/lora_demo.py (2-digit addition, "answer with the result only": 400 training problems, the
held-out ones as validation data). Reported per method: trainable parameters, peak resident
memory of its process (and the increase over the loaded model), training tokens/s (real tokens;
virtual tokens are extra work, not counted), held-out loss and greedy exact-match accuracy.

Each method runs in a fresh subprocess so that its peak memory is its own. The embedded GGUF is
converted once to a safetensors directory, so loading costs every method the same.

    .venv/bin/python bench/adapters.py [--steps 60] [--methods lora prompt ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "runs"))

METHODS = ["full-adamw", "full-lomo", "lora", "prompt", "ptuning", "adapter"]
INIT = "Add the two numbers and answer with the result only."


LR = {"full-adamw": 3e-5, "full-lomo": 1e-2, "lora": 2e-3, "prompt": 3e-2, "ptuning": 3e-3, "adapter": 2e-2}


def worker(method: str, base: str, data: str, test: str, out: str, steps: int, lr: float, adapter_layers: int) -> dict:
    import resource

    import mightylm
    from lora_demo import accuracy
    from mightylm import recipes
    from mightylm.adapters import load_adapter
    from mightylm.train import TrainConfig

    def rss_mb():  # current resident set size
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20

    model, tok = mightylm.load(base)
    loaded_mb = rss_mb()
    del model
    train = TrainConfig(steps=steps, batch_size=8, lr=lr, min_lr=lr / 10, warmup=6, weight_decay=0.0,
                        eval_every=steps, save_every=steps, log_every=5, eval_batches=None)
    common = dict(model=base, data=data, out=out, sft=recipes.SFTData(val_data=test, max_len=128), train=train)
    t = time.perf_counter()
    printed = io.StringIO()  # the recipe prints its trainable-parameter count
    with contextlib.redirect_stdout(printed):
        run(method, recipes, common, adapter_layers)
    sys.stderr.write(printed.getvalue())
    minutes = (time.perf_counter() - t) / 60
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # training's peak, before evaluation
    summary = json.loads((Path(out) / "summary.json").read_text())
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    speeds = speeds[1:] or speeds  # the first window includes warm-up
    if method.startswith("full"):
        tuned, _ = mightylm.load(out)
        trainable = tuned.config.n_params
    else:
        tuned, _ = mightylm.load(base)
        load_adapter(tuned, out)
        line = next(l for l in printed.getvalue().splitlines() if "trainable parameters" in l)
        trainable = int(line.split(": ")[-1].split(" trainable")[0].replace(",", ""))
    examples = [json.loads(l) for l in Path(test).read_text().splitlines()]
    problems = [{"instruction": e["messages"][0]["content"].split(" Answer")[0],
                 "input": e["messages"][0]["content"].split("\n\n", 1)[1],
                 "output": e["messages"][1]["content"]} for e in examples]
    acc, answers = accuracy(tuned, tok, problems)
    return {"method": method, "trainable": trainable, "peak_mb": peak_mb, "loaded_mb": loaded_mb,
            "tokens_per_s": statistics.median(speeds), "val_loss": summary["val_loss"], "accuracy": acc,
            "minutes": minutes, "lr": lr, "adapter_layers": adapter_layers if method == "adapter" else None,
            "examples": answers[:3]}


def run(method: str, recipes, common: dict, adapter_layers: int = 28) -> None:
    if method.startswith("full"):
        recipes.finetune_full(**common, optimizer=method.removeprefix("full-"))
    elif method == "lora":
        recipes.finetune_lora(**common, lora=recipes.LoRA(r=8, alpha=16, dropout=0.0))
    elif method == "prompt":
        recipes.finetune_prompt(**common, prompt=recipes.SoftPrompt(n_tokens=20, init_text=INIT))
    elif method == "ptuning":
        recipes.finetune_ptuning(**common, prompt=recipes.SoftPrompt(n_tokens=20, init_text=INIT), encoder="mlp",
                                 hidden=256)
    else:
        recipes.finetune_adapter(**common, layers=adapter_layers, length=10)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "adapters"))
    p.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR", help="override a method's learning rate")
    p.add_argument("--adapter-layers", type=int, default=28, help="LLaMA-Adapter: adapt the top this many blocks")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    lrs = {**LR, **{k: float(v) for k, v in (item.split("=") for item in args.lr)}}
    base, data, test = out / "base", out / "train.jsonl", out / "test.jsonl"
    if args.worker:
        print(json.dumps(worker(args.worker, str(base), str(data), str(test), str(out / args.worker), args.steps,
                                lrs[args.worker], args.adapter_layers)))
        return
    import shutil

    import mightylm
    from lora_demo import prompt_of
    from mightylm.data.synthetic import generate_task

    out.mkdir(parents=True, exist_ok=True)
    train = generate_task("addition", 400, seed=1, size=2)
    seen = {t["input"] for t in train}
    held = [e for e in generate_task("addition", 50, seed=2, size=2) if e["input"] not in seen]
    for path, rows in ((data, train), (test, held)):
        path.write_text("".join(json.dumps({"messages": prompt_of(e) + [{"role": "assistant", "content": e["output"]}]})
                                + "\n" for e in rows))
    if not (base / "model.safetensors").exists():
        model, tok = mightylm.load("smollm2-135m-instruct")
        mightylm.save(model, tok, base)
    results = []
    print(f"{'method':12s} {'lr':>7s} {'trainable':>12s} {'peak RSS':>9s} {'over model':>10s} {'tok/s':>6s} {'val loss':>8s} "
          f"{'exact match':>11s} {'minutes':>7s}", flush=True)
    for method in args.methods:
        shutil.rmtree(out / method, ignore_errors=True)
        (out / method).mkdir(parents=True)
        with open(out / method / "train.log", "w") as log:
            proc = subprocess.run([sys.executable, __file__, "--worker", method, "--steps", str(args.steps),
                                   "--out", str(out), "--adapter-layers", str(args.adapter_layers),
                                   "--lr", *[f"{k}={v}" for k, v in lrs.items()]],
                                  stdout=subprocess.PIPE, stderr=log, text=True)
        if proc.returncode != 0:
            print(f"{method}: failed, see {out / method / 'train.log'}", flush=True)
            continue
        (out / method / "train.log").write_text((out / method / "train.log").read_text() + proc.stdout)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{method:12s} {r['lr']:7.0e} {r['trainable']:12,d} {r['peak_mb']:6.0f} MB {r['peak_mb'] - r['loaded_mb']:7.0f} MB "
              f"{r['tokens_per_s']:6.0f} {r['val_loss']:8.3f} {r['accuracy']:10.0%} {r['minutes']:7.1f}", flush=True)
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else []
    (out / "results.json").write_text(json.dumps(previous + results, indent=1) + "\n")


if __name__ == "__main__":
    main()
