"""Supervised fine-tuning throughput on variable-length chat data: mightylm's LoRA with packed rows (attention
kept within each conversation) against transformers + peft with padded batches (DataCollatorForSeq2Seq, the
padding collator SFT scripts use), same model, rank, examples, tokens and loss mask.

The data is real text of uneven length: conversations built from the embedded Shakespeare corpus ("Continue
this passage" + a passage, answered by what follows), 20 to 800 tokens each, tokenized once with the model's
chat template (the same ids and labels for both). Each framework trains one epoch over the same examples in
a fresh subprocess (its own peak resident memory). Reported: useful (non-padding) tokens per second, the
tokens each computed (padding included), peak RSS, and the ratio.

    .venv/bin/python bench/sft.py [--examples 48] [--batch 8] [--pack_len 1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import json, resource, sys, time
import torch
framework, data_path, model_dir, batch, pack_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
examples = [json.loads(l) for l in open(data_path)]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
useful = sum(len(e["ids"]) - 1 for e in examples)
if framework == "mightylm":
    import tempfile
    import mightylm
    from mightylm.adapters.lora import apply_lora
    from mightylm.data.loader import Loader
    from mightylm.data.sft import SFTDataset
    from mightylm.train import TrainConfig, fit
    model, _ = mightylm.load(model_dir)
    apply_lora(model, TARGETS, r=8, alpha=16, dropout=0.0)
    data = SFTDataset([(e["ids"], e["mask"]) for e in examples], max_len=pack_len, pack=True)
    rows_per_step = max(1, batch * sum(len(e["ids"]) for e in examples) // len(examples) // pack_len)
    steps = -(-len(data) // rows_per_step)
    lengths = [len(data[i]["input_ids"]) for i in range(len(data))]
    computed = sum(max(lengths[i:i + rows_per_step]) * len(lengths[i:i + rows_per_step])  # padded to the step's longest
                   for i in range(0, len(lengths), rows_per_step))
    cfg = TrainConfig(steps=steps, batch_size=rows_per_step, lr=2e-4, warmup=1, weight_decay=0.0,
                      eval_every=10**9, save_every=10**9, log_every=1)
    with tempfile.TemporaryDirectory() as run:
        start = time.perf_counter()
        fit(model, Loader(data, rows_per_step, shuffle=False), run, cfg, progress=False)
        seconds = time.perf_counter() - start
    shape = f"{len(data)} packed rows of <= {pack_len} tokens, {rows_per_step} per step, {steps} steps"
else:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, PreTrainedTokenizerFast
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    tok = PreTrainedTokenizerFast(tokenizer_file=model_dir + "/tokenizer.json")
    tok.pad_token_id = 0
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    items = [{"input_ids": e["ids"], "labels": [t if m else -100 for t, m in zip(e["ids"], e["mask"])]}
             for e in examples]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
    model.train()
    computed, steps = 0, 0
    start = time.perf_counter()
    for i in range(0, len(items), batch):
        b = collate(items[i:i + batch])
        computed += b["input_ids"].numel()
        loss = model(**b).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    seconds = time.perf_counter() - start
    shape = f"{len(items)} examples padded in batches of {batch}, {steps} steps"
print(json.dumps({"framework": framework, "seconds": seconds, "useful_tokens": useful, "computed_tokens": computed,
                  "useful_tokens_per_s": useful / seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "shape": shape}))
"""


def make_examples(tokenizer, n: int, seed: int = 0) -> list[dict]:
    """Conversations of 20 to 800 tokens from the Shakespeare corpus, tokenized with the chat template."""
    import random

    from mightylm.data.pretrain import collect_files, read_documents
    from mightylm.data.sft import tokenize_chat

    text = " ".join(" ".join(read_documents(f)) for f in collect_files(["shakespeare"])[:3]).split()
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        target = rng.randint(20, 800)
        start = rng.randrange(len(text) - 2000)
        words = max(1, int(target * 0.6))  # ~1.4-1.7 tokens per word of Shakespeare with SmolLM2's tokenizer
        ask, answer = words * 2 // 3, words - words * 2 // 3
        messages = [{"role": "user", "content": "Continue this passage:\n" + " ".join(text[start:start + ask])},
                    {"role": "assistant", "content": " ".join(text[start + ask:start + ask + answer])}]
        ids, mask = tokenize_chat(messages, tokenizer)
        if 20 <= len(ids) <= 800:
            out.append({"ids": ids, "mask": mask})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=48)
    p.add_argument("--batch", type=int, default=8, help="examples per step for the padded loop")
    p.add_argument("--pack_len", type=int, default=1024, help="tokens per packed row")
    args = p.parse_args()
    import mightylm
    from mightylm.kernels import cpu_flags

    print("CPU flags:", " ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))))
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = mightylm.load("smollm2-135m-instruct")  # the embedded GGUF, dequantized, as an HF directory
        mightylm.save(model, tok, Path(tmp) / "model")
        del model
        examples = make_examples(tok, args.examples)
        lengths = sorted(len(e["ids"]) for e in examples)
        print(f"{len(examples)} conversations, {sum(lengths):,} tokens, lengths {lengths[0]}-{lengths[-1]} "
              f"(median {lengths[len(lengths) // 2]})")
        data = Path(tmp) / "data.jsonl"
        data.write_text("".join(json.dumps(e) + "\n" for e in examples))
        results = {}
        for framework in ("mightylm", "transformers+peft"):
            out = subprocess.run([sys.executable, "-c", WORKER, framework, str(data), str(Path(tmp) / "model"),
                                  str(args.batch), str(args.pack_len)], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(out.stderr[-3000:])
            results[framework] = json.loads(out.stdout.strip().splitlines()[-1])
    for r in results.values():
        print(f"{r['framework']:18s} {r['useful_tokens_per_s']:7.1f} useful tokens/s  ({r['seconds']:.1f} s; computed "
              f"{r['computed_tokens']:,} tokens for {r['useful_tokens']:,} useful; peak RSS {r['peak_rss_mb']:.0f} MiB; "
              f"{r['shape']})")
    ours, theirs = results["mightylm"], results["transformers+peft"]
    print(f"ratio: {ours['useful_tokens_per_s'] / theirs['useful_tokens_per_s']:.2f}x useful tokens/s, "
          f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x peak memory")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
