"""Vision-language training on the CPU: SmolLM2-135M-Instruct + EfficientNet-Lite0 on held-out synthetic scenes and
Fashion-MNIST. Exact-match accuracy per question type before training, after stage 1 (projector on captions),
after stage 2 (projector + LoRA on questions); and the multimodal LLaMA-Adapter trained on the same questions for
the same steps. Accuracy two ways: exact match of the greedy reply, and the closed-set choice (the type's most
likely answer, near chance before training). Prints markdown tables (paste into bench/RESULTS.md with the CPU flags) and writes bench/vlm.json.

    python bench/vlm.py [--train_samples 1200] [--test_samples 200] [--stage1_steps 60] [--stage2_steps 300] [--out runs/bench-vlm]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from mightylm.config import TrainConfig
from mightylm.recipes.vlm import VisionData, finetune_vlm


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor()
    return " ".join(sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_samples", type=int, default=1200)
    p.add_argument("--test_samples", type=int, default=200)
    p.add_argument("--stage1_steps", type=int, default=60)
    p.add_argument("--stage2_steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--out", default="runs/bench-vlm")
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CPU flags: {cpu_flags()}", flush=True)
    out = Path(a.out)
    data = VisionData(train_samples=a.train_samples, test_samples=a.test_samples)

    def config(steps, lr):
        return TrainConfig(steps=steps, lr=lr, min_lr=lr / 10, warmup=min(10, steps // 5), batch_size=a.batch_size,
                           eval_every=steps, save_every=10 ** 6, weight_decay=0.0, log_every=10)

    runs = {}
    runs["stage 1 (projector, captions)"] = finetune_vlm(stage=1, out=str(out / "stage1"), data=data,
                                                         train=config(a.stage1_steps, 1e-3), evaluate_before=True,
                                                         overwrite=True)
    runs["stage 2 (projector + LoRA, questions)"] = finetune_vlm(stage=2, init=str(out / "stage1"),
                                                                 out=str(out / "stage2"), data=data,
                                                                 train=config(a.stage2_steps, 2e-4), overwrite=True)
    runs["multimodal LLaMA-Adapter (questions)"] = finetune_vlm(stage=2, projector="adapter",
                                                                out=str(out / "adapter"), data=data,
                                                                train=config(a.stage2_steps, 3e-3), overwrite=True)
    kinds = list(runs["stage 2 (projector + LoRA, questions)"]["after"])
    first = runs["stage 1 (projector, captions)"]
    for title, before, after in (("exact match of the greedy reply", "before", "after"),
                                 ("closed-set choice (most likely answer of the type)", "choice_before", "choice_after")):
        counts = ", ".join(f"{k} {first[after][k]['n']}" for k in kinds)
        print(f"\n{title}, held-out samples ({counts}):")
        print("\n| model | trainable | train s | " + " | ".join(kinds) + " |")
        print("|---|---:|---:|" + "---:|" * len(kinds))
        print("| chance | | | " + " | ".join(f"{first['after'][k]['chance']:.0%}" for k in kinds) + " |")
        print("| before training | | | " + " | ".join(f"{first[before][k]['accuracy']:.0%}" for k in kinds) + " |")
        for name, r in runs.items():
            print(f"| {name} | {r['trainable_parameters']:,} | {r['train_seconds']:.0f} | "
                  + " | ".join(f"{r[after][k]['accuracy']:.0%}" for k in kinds) + " |")
    print("\ncaptions after stage 1 (truth -> model):")
    for c in first["captions"] or []:
        print(f"  {c['truth']!r} -> {c['caption']!r}")
    print("\nstage 2 examples:")
    for k in kinds:
        print(f"  {k}: {runs['stage 2 (projector + LoRA, questions)']['after'][k]['examples']}")
    Path("bench/vlm.json").write_text(json.dumps({"cpu_flags": cpu_flags(), "args": vars(a), "runs": runs}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
