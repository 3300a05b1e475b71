"""Prompts with images, into the one decode loop (`generate.generate_steps` with `embed=`).

A prompt marks each image with the model's image token ("<image>"); a prompt given with images but no
placeholder gets one in front. Each placeholder is expanded to the encoder's token count, and the count is
checked against the images before anything runs (vlm.check_spans).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from mightylm.errors import UsageError
from mightylm.generate import Sampling, generate_steps
from mightylm.multimodal.vlm import IMAGE_TOKEN, VisionLanguageModel, check_spans, expand_images


def prompt_ids(vlm: VisionLanguageModel, tokenizer, text: str, n_images: int, *, chat: bool = False,
               messages: list[dict] | None = None) -> list[int]:
    """Token ids of a prompt with `n_images` images: the text (or chat `messages`) encoded, a placeholder put in
    front of the (last user) text when there is none, each placeholder expanded to the model's image tokens. A
    chat without a system message gets the one the model was trained with (`vlm.system`), if it records one."""
    mark = IMAGE_TOKEN if vlm.mode == "llava" else ""
    if messages is None:
        messages = [{"role": "user", "content": text}] if chat else None
    if messages and vlm.system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": vlm.system}, *messages]
    if n_images and mark:
        texts = [m["content"] for m in messages] if messages else [text]
        if not any(mark in t for t in texts):
            if messages:
                last = max(i for i, m in enumerate(messages) if m["role"] == "user")
                messages[last] = {**messages[last], "content": mark * n_images + "\n" + messages[last]["content"]}
            else:
                text = mark * n_images + "\n" + text
    ids = tokenizer.encode_chat(messages) if messages else tokenizer.encode(text)
    ids = expand_images(ids, vlm.image_token_id, vlm.image_tokens) if mark else ids
    check_spans(torch.tensor([ids]) == vlm.image_token_id, n_images if mark else 0, vlm.image_tokens)
    if vlm.mode == "adapter" and n_images > 1:
        raise UsageError("the multimodal LLaMA-Adapter takes one image per prompt")
    return ids


def pixels_of(vlm: VisionLanguageModel, images: list) -> torch.Tensor | None:
    if not images:
        return None
    if vlm.processor is None:
        raise UsageError("this vision-language model has no image processor settings (preprocessor_config.json)")
    return vlm.processor(images)


@contextmanager
def looking_at(vlm: VisionLanguageModel, images: list, rows: int = 1):
    """While open: the `embed` function for generate_steps (image tokens written over the placeholders), or None
    for the adapter way in, whose layers are conditioned on the image until the block ends."""
    pixels = pixels_of(vlm, images)
    with seeing(vlm, None if pixels is None else vlm.encode(pixels), rows) as embed:
        yield embed


@contextmanager
def seeing(vlm: VisionLanguageModel, features: torch.Tensor | None, rows: int = 1):
    """`looking_at` from encoder features (N, T, width) already computed (a feature cache): in reading order for
    the image tokens, one per row for the adapter way in."""
    if vlm.mode == "adapter":
        if features is not None and features.shape[0] not in (1, rows):
            raise UsageError("the multimodal LLaMA-Adapter takes one image per prompt")
        vlm.condition(None if features is None else features.float())
        try:
            yield None
        finally:
            vlm.condition(None)
        return
    projected = None if features is None else vlm.project(features.float())
    yield lambda idx: vlm.embed(idx, projected)


def image_tokens(vlm: VisionLanguageModel, ids: list[int], s: Sampling, images: list) -> Iterator[int]:
    """The tokens of one prompt's completion given its images (a `source` for generate.stream_text)."""
    with torch.inference_mode(), looking_at(vlm, images) as embed:
        for step in generate_steps(vlm.language, [ids], s, embed=embed):
            yield int(step[0])
