"""Offline image-text data for the two training stages, with exact answers, and the encoder's features cached.

    scenes    synthetic pictures drawn with PIL: one to four shapes (circle, square, triangle) in four colours on a
              light background. Question types: colour and shape (one shape), count (1-4 shapes), position (one
              shape, left or right half). Seeded: the same seed draws the same scenes.
    fashion   Fashion-MNIST (Debian package dataset-fashion-mnist, Xiao et al. 2017): 28x28 grey clothing photos,
              ten classes; captions and answers from the labels. Train and test come from its own splits.

Stage 1 (alignment) trains on captions ("a red circle on the left."); stage 2 on questions and answers. Every
sample is one image and a chat: the user turn starts with the image placeholder. The frozen encoder runs once per
image (`cached_features`, kept on disk keyed by what was encoded); training then reads the features.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (230, 195, 30)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
QUESTIONS = {
    "colour": "What colour is the shape? Answer in one word.",
    "shape": "What shape is it? Answer in one word.",
    "count": "How many shapes are there? Answer in one word.",
    "position": "Is the shape on the left or on the right? Answer in one word.",
    "class": "What item of clothing is this? Answer in one or two words.",
}
SYSTEM = "You look at images."
# Every answer a question type can have: the closed set `score.choice_accuracy` ranks
CANDIDATES = {"colour": tuple(COLOURS), "shape": SHAPES, "count": NUMBERS[1:], "position": ("left", "right"),
              "class": FASHION_CLASSES}
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "count": 1 / 4, "position": 1 / 2,
          "class": 1 / len(FASHION_CLASSES)}


@dataclass
class Sample:
    image: object  # PIL image
    kind: str  # question type
    question: str
    answer: str
    caption: str


def _draw(canvas, shape: str, colour: str, cx: int, cy: int, r: int) -> None:
    from PIL import ImageDraw

    draw, fill = ImageDraw.Draw(canvas), COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(((cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)), fill=fill)


def scene(rng: np.random.Generator, kind: str, size: int = 224) -> Sample:
    """One synthetic picture and a question of `kind` about it."""
    from PIL import Image

    background = tuple(int(v) for v in rng.integers(225, 250, 3))
    canvas = Image.new("RGB", (size, size), background)
    n = int(rng.integers(1, 5)) if kind == "count" else 1
    shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
    r = int(rng.integers(size // 14, size // 8))
    side = "left" if rng.random() < 0.5 else "right"
    placed = []
    for _ in range(n):
        for _ in range(100):  # rejection sampling: shapes do not overlap
            if n == 1:
                lo, hi = (r + 4, size // 2 - r - 4) if side == "left" else (size // 2 + r + 4, size - r - 4)
                cx = int(rng.integers(lo, hi))
            else:
                cx = int(rng.integers(r + 2, size - r - 2))
            cy = int(rng.integers(r + 2, size - r - 2))
            if all((cx - x) ** 2 + (cy - y) ** 2 > (2 * r + 6) ** 2 for x, y in placed):
                break
        placed.append((cx, cy))
        _draw(canvas, shape, colour, cx, cy, r)
    answer = {"colour": colour, "shape": shape, "count": NUMBERS[n], "position": side}[kind]
    plural = "s" if n > 1 else ""
    caption = f"{NUMBERS[n]} {colour} {shape}{plural}" + (f" on the {side}." if n == 1 else ".")
    return Sample(canvas, kind, QUESTIONS[kind], answer, caption)


def scenes(n: int, seed: int, kinds=("colour", "shape", "count", "position")) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [scene(rng, kinds[i % len(kinds)]) for i in range(n)]


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    kind, dims = data[2], data[3]
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    if kind != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion(n: int, split: str = "train", seed: int = 0) -> list[Sample]:
    """`n` Fashion-MNIST photos (seeded choice from the split), upscaled to RGB, with their class."""
    from PIL import Image

    from mightylm.errors import UsageError

    prefix = "train" if split == "train" else "t10k"
    images, labels = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz", FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise UsageError(f"{images}: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    pixels, classes = _idx(images), _idx(labels)
    chosen = np.random.default_rng(seed).choice(len(classes), size=n, replace=False)
    out = []
    for i in chosen:
        image = Image.fromarray(255 - pixels[i]).convert("RGB")  # dark garment on a light ground, like the scenes
        name = FASHION_CLASSES[classes[i]]
        out.append(Sample(image, "class", QUESTIONS["class"], name, f"a photo of a {name}."))
    return out


def conversation(sample: Sample, stage: int, mark: str) -> list[dict]:
    """The sample as a chat (system, user, assistant): stage 1 asks for a caption, stage 2 the question."""
    question = "Describe the image in a few words." if stage == 1 else sample.question
    answer = sample.caption if stage == 1 else sample.answer
    return [{"role": "system", "content": SYSTEM},  # short: SmolLM2's template otherwise adds a 30-token default
            {"role": "user", "content": f"{mark}\n{question}" if mark else question},
            {"role": "assistant", "content": answer}]


def cached_features(vlm, images: list, cache: Path | None, *, batch_size: int = 32, progress: bool = True
                    ) -> torch.Tensor:
    """The frozen encoder's features (N, T, width) of `images`, as float16, read from `cache` when it holds this
    encoder's features of these exact pixels, else computed and written there."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    pixels = [vlm.processor(image)[0] for image in images]
    digest = hashlib.sha256(f"{vlm.vision_name}|{vlm.feature_layer}|{vlm.strategy}".encode())
    for p in pixels:
        digest.update(p.numpy().tobytes())
    file = None if cache is None else Path(cache) / f"features-{digest.hexdigest()[:16]}.safetensors"
    if file is not None and file.exists():
        return load_file(str(file))["features"]
    out = []
    for start in tqdm(range(0, len(pixels), batch_size), desc="encode images", disable=not progress):
        out.append(vlm.encode(torch.stack(pixels[start:start + batch_size])).to(torch.float16))
    features = torch.cat(out)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({"features": features.contiguous()}, str(file.with_suffix(".tmp")))
        file.with_suffix(".tmp").replace(file)
    return features


class ImageChatDataset:
    """Tokenised image chats with their cached features: items {input_ids, labels, image_features}. Only the
    answer is scored; the image span is checked whole (never cut: a sample longer than `max_len` is refused)."""

    def __init__(self, vlm, tokenizer, samples: list[Sample], features: torch.Tensor, stage: int, max_len: int = 256):
        from mightylm.data.sft import tokenize_chat
        from mightylm.model import IGNORE_INDEX
        from mightylm.multimodal.vlm import IMAGE_TOKEN, check_spans, expand_images

        mark = IMAGE_TOKEN if vlm.mode == "llava" else ""
        self.items = []
        for i, (sample, feature) in enumerate(zip(samples, features)):
            ids, scored = tokenize_chat(conversation(sample, stage, mark), tokenizer)
            if mark:  # each placeholder becomes the image's span; its positions are never scored
                n = vlm.image_tokens
                scored = [s for t, s in zip(ids, scored) for _ in range(n if t == vlm.image_token_id else 1)]
                ids = expand_images(ids, vlm.image_token_id, n)
            if len(ids) > max_len:
                raise ValueError(f"sample {i}: {len(ids)} tokens with its image, over max_len {max_len}; raise it "
                                 "(an image span is never truncated)")
            check_spans(torch.tensor([ids]) == vlm.image_token_id, 1 if mark else 0, vlm.image_tokens, i)
            labels = [t if s else IGNORE_INDEX for t, s in zip(ids[1:], scored[1:])]  # next-token targets
            self.items.append({"input_ids": torch.tensor(ids[:-1]), "labels": torch.tensor(labels),
                               "image_features": feature})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]
