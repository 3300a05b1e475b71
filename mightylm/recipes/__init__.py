"""Training recipes: the functions behind `mighty pretrain` and `mighty finetune <method>`.

    pretrain.py  a model from scratch on plain text
    distill.py   a student trained on a teacher's distributions (knowledge distillation)
    finetune.py  full fine-tuning, the adapter methods and the recurrent memory (rmt) on instruction or chat JSONL
    vlm.py       the two training stages of a vision-language model (and the multimodal LLaMA-Adapter)
    groups.py    the option groups they share (SFT data, LoRA, NF4, soft prompt) as dataclasses
    rundir.py    the run directory: ownership, resuming, run_args.json, torchrun ranks

Each verb is a plain function with typed arguments; `recipes/*.yaml` files mirror those arguments
(`mighty pretrain --config recipes/pretrain-shakespeare.yaml --train.lr 1e-3`). A finished run
directory is a normal Hugging Face checkpoint (config.json, model.safetensors, tokenizer files)
that `mighty generate` and `transformers` load, or an adapter in PEFT's layout, plus metrics.jsonl,
summary.json, report.png, report.md and checkpoint/ (what `--resume` continues from).
"""

from mightylm.recipes.distill import distill
from mightylm.recipes.finetune import (finetune_adapter, finetune_full, finetune_lora, finetune_ptuning,
                                       finetune_prompt, finetune_qlora, finetune_rmt)
from mightylm.recipes.groups import NF4, LoRA, Router, SFTData, SoftPrompt
from mightylm.recipes.pretrain import pretrain
from mightylm.recipes.vlm import VisionData, finetune_vlm

__all__ = ["NF4", "LoRA", "Router", "SFTData", "SoftPrompt", "distill", "finetune_adapter", "finetune_full", "finetune_lora", "finetune_rmt",
           "finetune_ptuning", "finetune_prompt", "finetune_qlora", "finetune_vlm", "pretrain", "VisionData"]
