"""Scoring a vision-language model on held-out image questions: the training loss from cached features, exact-match
accuracy per question type (greedy replies, batched through the one decode loop), and a few captions."""

from __future__ import annotations

import re

import torch

from mightylm.generate import Sampling, generate
from mightylm.multimodal.data import CANDIDATES, CHANCE, conversation
from mightylm.multimodal.generate import prompt_ids, seeing


def features_loss(model, batch: dict) -> torch.Tensor:
    """The next-token loss given cached image features (placeholder positions unscored)."""
    return model(batch["input_ids"], features=batch["image_features"].float(), labels=batch["labels"])



@torch.inference_mode()
def answer_accuracy(vlm, tokenizer, samples, features, *, batch_size: int = 16, max_new_tokens: int = 6) -> dict:
    """Exact-match accuracy per question type: the greedy reply, lower-cased without the final full stop, equals
    the answer. Returns {type: {"accuracy", "n", "chance", "examples"}}."""
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
            with seeing(vlm, torch.stack([features[i] for i in chunk]), len(chunk)) as embed:
                replies = generate(vlm.language, prompts, settings, embed=embed)
            for i, reply in zip(chunk, replies):
                text = tokenizer.decode([t for t in reply if t not in settings.stop_token_ids]).strip()
                ok = re.sub(r"[.!]+$", "", text.lower()).strip() == samples[i].answer
                right += ok
                if len(examples) < 3:
                    examples.append({"answer": samples[i].answer, "reply": text})
        results[kind] = {"accuracy": right / len(rows), "n": len(rows), "chance": CHANCE[kind], "examples": examples}
    return results


@torch.inference_mode()
def choice_accuracy(vlm, tokenizer, samples, features, *, batch_size: int = 8) -> dict:
    """Closed-set accuracy per question type: the answer the model gives the highest log-probability among every
    answer of its type (CANDIDATES), after the same prompt and image. Unlike exact match, it does not ask the
    model to answer in the expected form, so an untrained model scores near chance: the baseline to beat."""
    right: dict[str, list[int]] = {}
    for start in range(0, len(samples), batch_size):
        rows, image_of, spans = [], [], []  # one row per (sample, candidate); where its answer is
        for i in range(start, min(start + batch_size, len(samples))):
            prompt = prompt_ids(vlm, tokenizer, "", 1, messages=conversation(samples[i], 2, "")[:2])
            for option in CANDIDATES[samples[i].kind]:
                answer = tokenizer.encode(option, add_special_tokens=False)
                rows.append(prompt + answer)
                image_of.append(i)
                spans.append((len(prompt), answer))
        idx = torch.zeros(len(rows), max(map(len, rows)) - 1, dtype=torch.long)  # right-padded; causal, so harmless
        for r, ids in enumerate(rows):
            idx[r, :len(ids) - 1] = torch.tensor(ids[:-1])
        h = vlm.hidden(idx, features=features[image_of].float())
        scores = []
        for r, (begin, answer) in enumerate(spans):  # logits at the answers' positions only (the vocabulary is large)
            logprobs = torch.log_softmax(vlm.language.head(h[r, begin - 1 + torch.arange(len(answer))]).float(), -1)
            scores.append(float(logprobs[torch.arange(len(answer)), torch.tensor(answer)].sum()))
        for i in sorted(set(image_of)):
            options = CANDIDATES[samples[i].kind]
            mine = [scores[r] for r in range(len(rows)) if image_of[r] == i]
            best = options[max(range(len(options)), key=mine.__getitem__)]
            right.setdefault(samples[i].kind, []).append(int(best == samples[i].answer))
    return {kind: {"accuracy": sum(r) / len(r), "n": len(r), "chance": CHANCE[kind]} for kind, r in right.items()}


@torch.inference_mode()
def captions(vlm, tokenizer, samples, features, n: int = 4) -> list[dict]:
    """Greedy captions of `n` held-out samples beside their true captions."""
    out = []
    for i in range(0, len(samples), max(1, len(samples) // n))[:n]:
        messages = conversation(samples[i], 1, "")[:2]
        ids = prompt_ids(vlm, tokenizer, "", 1, messages=messages)
        s = Sampling(max_new_tokens=16, temperature=0, stop_token_ids=tokenizer.stop_token_ids)
        with seeing(vlm, features[i:i + 1]) as embed:
            reply = generate(vlm.language, [ids], s, embed=embed)[0]
        out.append({"truth": samples[i].caption,
                    "caption": tokenizer.decode([t for t in reply if t not in s.stop_token_ids]).strip()})
    return out
