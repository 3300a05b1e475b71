"""The Recurrent Memory Transformer on a pretrained small Llama (issue 22): SmolLM2-135M-Instruct with LoRA and
learned memory slots, trained on 2 CPU cores to carry BABILong-style facts across segments.

    .venv/bin/python bench/rmt_smollm2.py [--segment 64] [--memory 8] [--steps 100 300] [--stages 2 4]
        [--batch 4] [--eval-segments 4 8 16] [--samples 100] [--out bench/out/rmt-smollm2] [--overwrite]

Task: qa1 (`mightylm.evaluate.longctx.fact_items`): four "X went to the room" facts at random places of Shakespeare
filler, then "Where is X? Answer: X is in the"; right when the next token (greedy) is the room's first token
(chance among the six rooms: 1/6). Each prompt is one token short of N segments, so the answer is the last token of
the last segment and the only one scored in training.

Reported, on held-out filler (the last tenth of the corpus) and other stories, by length in segments:
(a) SmolLM2 truncated to one segment's window (the last --segment tokens: the question and whatever facts fall
there), (b) SmolLM2 with the whole prompt in its 8k window (the upper bound here: this model's window is not the
limit; the point is what the memory carries), (c) RMT: the same decoder reading the prompt in segments of --segment
tokens, carrying only its --memory slots between them. Training: the curriculum of Bulatov et al. (--steps[i] steps
at --stages[i] segments), AdamW, gradients clipped to norm 1, BPTT over the last 2 segments, LoRA r 8 on the
attention projections. The trained run is saved in --out (`mighty generate --model smollm2-135m-instruct --rmt
OUT` uses it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent


def items(tokenizer, text: str, segments: list[int], segment: int, samples: int, seed: int) -> list[dict]:
    """qa1 prompts one token short of n segments, with the answer's first token: {"ids", "answer", "segments"}."""
    from mightylm.evaluate.longctx import fact_items

    out = []
    for n in segments:
        for item in fact_items(tokenizer, text, [n * segment - 1], "qa1", samples, seed=seed + n):
            out.append({"ids": item["ids"], "answer": tokenizer.encode(" " + item["key"])[0], "segments": n})
    return out


@torch.no_grad()
def accuracy(forward, batch: list[dict], size: int = 10) -> float:
    """The share of prompts whose next token under `forward` (ids (B, L) -> logits of the last position) is the
    answer."""
    right = 0
    for i in range(0, len(batch), size):
        part = batch[i:i + size]
        logits = forward(torch.tensor([b["ids"] for b in part]))
        right += int((logits.argmax(-1) == torch.tensor([b["answer"] for b in part])).sum())
    return right / len(batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--segment", type=int, default=64)
    ap.add_argument("--memory", type=int, default=8)
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4], help="segments per training stage")
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 300], help="steps per stage")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-segments", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--samples", type=int, default=100, help="held-out prompts per length")
    ap.add_argument("--out", default=str(BENCH / "out" / "rmt-smollm2"))
    ap.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    args = ap.parse_args()
    for name in ("segment", "memory", "stages", "steps", "batch", "eval_segments", "samples"):
        value = getattr(args, name)
        if min(value if isinstance(value, list) else [value]) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if Path(args.out).exists() and any(Path(args.out).iterdir()) and not args.overwrite:
        ap.error(f"--out {args.out} holds files (an earlier run?); pass --overwrite to replace them or another --out")
    if len(args.steps) != len(args.stages):
        ap.error(f"--steps needs one count per stage: {len(args.stages)} stages, {len(args.steps)} counts")

    import mightylm
    from mightylm import adapters
    from mightylm.adapters import save_adapter
    from mightylm.adapters.lora import apply_lora
    from mightylm.cli import env
    from mightylm.data.pretrain import collect_files, read_documents
    from mightylm.model import IGNORE_INDEX
    from mightylm.rmt import RecurrentMemory, save_rmt

    env()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tokenizer = mightylm.load("smollm2-135m-instruct", need_tokenizer=True)
    corpus = "\n\n".join(doc for f in collect_files(["shakespeare"]) for doc in read_documents(f))
    cut = len(corpus) * 9 // 10
    train_text, held_out = corpus[:cut], corpus[cut:]
    tests = items(tokenizer, held_out, args.eval_segments, args.segment, args.samples, seed=1000)
    S = args.segment
    results = {"segment": S, "memory": args.memory, "stages": args.stages, "steps": args.steps, "batch": args.batch,
               "samples": args.samples, "chance": 1 / 6, "by_segments": {}}

    began = time.perf_counter()
    model.eval()
    for n in args.eval_segments:
        part = [t for t in tests if t["segments"] == n]
        results["by_segments"][n] = {
            "truncated": accuracy(lambda x: model(x[:, -S:], last_only=True)[:, -1], part),
            "full": accuracy(lambda x: model(x, last_only=True)[:, -1], part),
        }
        print(f"{n} segments: SmolLM2 truncated to {S} tokens {results['by_segments'][n]['truncated']:.3f}, "
              f"whole prompt {results['by_segments'][n]['full']:.3f}", flush=True)
    results["baseline_seconds"] = time.perf_counter() - began

    apply_lora(model, targets=("q_proj", "k_proj", "v_proj", "o_proj"), r=8, alpha=16)
    rmt = RecurrentMemory(model, S, args.memory, bptt=2)
    adapters.mark_trainable(rmt)
    params = [p for p in rmt.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    from tqdm import tqdm

    began, losses, step = time.perf_counter(), [], 0
    total = sum(args.steps)
    bar = tqdm(total=total, desc="train", dynamic_ncols=True)
    rmt.train()
    for n, steps in zip(args.stages, args.steps):
        pool = items(tokenizer, train_text, [n], S, steps * args.batch, seed=step)
        for i in range(steps):
            batch = pool[i * args.batch:(i + 1) * args.batch]
            x = torch.tensor([b["ids"] + [b["answer"]] for b in batch])
            labels = torch.full_like(x, IGNORE_INDEX)
            labels[:, -2] = x[:, -1]  # labels are next-token targets by position: the prompt's last predicts it
            for group in opt.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / 20)
            loss = rmt(x, labels=labels)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(segments=n, loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    results["train_seconds"] = time.perf_counter() - began
    results["loss_by_20_steps"] = [round(sum(losses[i:i + 20]) / len(losses[i:i + 20]), 4)
                                   for i in range(0, len(losses), 20)]
    save_adapter(model, args.out, base_model="smollm2-135m-instruct")
    save_rmt(rmt, args.out)

    rmt.eval()
    for n in args.eval_segments:
        part = [t for t in tests if t["segments"] == n]
        results["by_segments"][n]["rmt"] = accuracy(lambda x: model.head(rmt.run(x)[0][:, -1]), part)
    print(f"\nqa1, {args.samples} held-out prompts per length; segment {S} tokens, {args.memory} memory slots; "
          f"trained {total} steps of batch {args.batch} in {results['train_seconds'] / 60:.1f} min; chance 1/6\n")
    print("| segments | tokens | SmolLM2 truncated to one segment | SmolLM2, whole prompt | RMT (LoRA + memory) |")
    print("|---|---|---|---|---|")
    for n in args.eval_segments:
        r = results["by_segments"][n]
        print(f"| {n} | {n * S} | {r['truncated']:.3f} | {r['full']:.3f} | {r['rmt']:.3f} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nsaved: {args.out} (the run: mighty generate --model smollm2-135m-instruct --rmt {args.out}), "
          f"{args.out}/results.json")


if __name__ == "__main__":
    main()
