"""Before/after LoRA on the embedded SmolLM2-135M-Instruct: exact-match accuracy on a held-out set
of a synthetic task with exact answers (mightylm.data.synthetic), zero-shot and after LoRA.

    .venv/bin/python runs/lora_demo.py [--task addition --size 2 --train 400 --test 50 --steps 60]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mightylm
from mightylm.adapters.lora import load_lora
from mightylm.data.synthetic import generate_task
from mightylm.generate import Sampling, generate
from mightylm.recipes import LoRA, SFTData, finetune_lora
from mightylm.train import TrainConfig

MODEL = "smollm2-135m-instruct"


def prompt_of(example: dict) -> list[dict]:
    return [{"role": "user", "content": f"{example['instruction']} Answer with the result only.\n\n{example['input']}"}]


def accuracy(model, tokenizer, examples: list[dict], batch: int = 16) -> tuple[float, list[str]]:
    answers = []
    for i in range(0, len(examples), batch):
        prompts = [tokenizer.encode_chat(prompt_of(e)) for e in examples[i:i + batch]]
        outs = generate(model, prompts, Sampling(max_new_tokens=16, stop_token_ids=tokenizer.stop_token_ids))
        answers += [tokenizer.decode(o).strip() for o in outs]
    right = sum(a == e["output"] for a, e in zip(answers, examples))
    return right / len(examples), answers


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="addition")
    p.add_argument("--size", type=int, default=2)
    p.add_argument("--train", type=int, default=400)
    p.add_argument("--test", type=int, default=50)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default="runs/out/lora-demo")
    args = p.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    train = generate_task(args.task, args.train, seed=1, size=args.size)
    test = generate_task(args.task, args.test, seed=2, size=args.size)
    test = [e for e in test if e["input"] not in {t["input"] for t in train}]
    out.mkdir(parents=True, exist_ok=True)
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": prompt_of(e) + [{"role": "assistant", "content": e["output"]}]})
                            + "\n" for e in train))
    model, tok = mightylm.load(MODEL)
    before, answers = accuracy(model, tok, test)
    print(f"zero-shot exact match on {len(test)} held-out {args.task} ({args.size}) problems: {before:.0%}")
    print("  e.g.", [(e["input"], a) for e, a in zip(test[:3], answers[:3])])
    t = time.perf_counter()
    run = out / "adapter"
    finetune_lora(MODEL, str(data), str(run), lora=LoRA(r=8, alpha=16, dropout=0.0), sft=SFTData(max_len=128),
                  train=TrainConfig(steps=args.steps, batch_size=8, lr=2e-3, min_lr=2e-4, warmup=6, weight_decay=0.0,
                                    eval_every=args.steps, save_every=args.steps, log_every=5))
    minutes = (time.perf_counter() - t) / 60
    load_lora(model, run)
    after, answers = accuracy(model, tok, test)
    print(f"after LoRA ({args.steps} steps, {minutes:.1f} min on this CPU): exact match {after:.0%} (was {before:.0%})")
    print("  e.g.", [(e["input"], a) for e, a in zip(test[:3], answers[:3])])
    (out / "result.json").write_text(json.dumps({"task": args.task, "size": args.size, "test": len(test),
                                                 "before": before, "after": after, "minutes": minutes}) + "\n")


if __name__ == "__main__":
    main()
