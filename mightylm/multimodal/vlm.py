"""The LLaVA-style model (Liu et al. 2023, "Visual Instruction Tuning"): a frozen vision encoder, a projector,
and our decoder, joined at one seam: the decoder's input embeddings (`Transformer.inputs(embeds=...)`).

A prompt carries one image placeholder token per image token ("<image>" in the text; the processor or
`expand_images` repeats it to the encoder's count). `embed` looks the text up in the embedding table and writes
the projected image tokens over the placeholders, in order, after checking that every span is whole: a prompt
whose placeholders do not match its images fails with the sample's number, never silently (a cut span would
otherwise shift every later image token, or zero the loss).

Two ways in, one model:
    "llava"    image tokens spliced into the text (projector: mlp2x_gelu, linear, pixel_shuffle)
    "adapter"  the multimodal LLaMA-Adapter (Zhang et al. 2023, section 3.3): the image's global feature,
               projected, is added to the adaption prompts of the top layers; their zero-init gates keep the
               model unchanged at step 0 (multimodal/adapter.py). No image tokens in the text.
"""

from __future__ import annotations

import torch
from torch import nn

from mightylm.errors import MightyError
from mightylm.model import IGNORE_INDEX, Transformer

IMAGE_TOKEN = "<image>"


class SpliceError(MightyError, ValueError):
    """Image placeholders and images that do not line up; the message names the sample."""


class VisionLanguageModel(nn.Module):
    def __init__(self, vision: nn.Module, projector: nn.Module | None, language: Transformer, *, image_token_id: int,
                 feature_layer: int = -2, strategy: str = "default", processor=None, vision_name: str = ""):
        super().__init__()
        self.vision, self.projector, self.language = vision, projector, language
        self.image_token_id, self.feature_layer, self.strategy = image_token_id, feature_layer, strategy
        self.processor = processor  # images.ImageProcessor: how pixels are prepared for `vision`
        self.vision_name = vision_name  # "efficientnet-lite0", or "" for a tower stored with the model
        self.visual_prompt: nn.Module | None = None  # set by multimodal.adapter (the LLaMA-Adapter way in)
        self.system: str | None = None  # the system message it was trained with: a chat without one gets it
        for p in self.vision.parameters():
            p.requires_grad_(False)  # the encoder stays frozen (its features can then be cached)

    @property
    def config(self):
        return self.language.config

    @property
    def mode(self) -> str:
        return "adapter" if self.visual_prompt is not None else "llava"

    @property
    def image_tokens(self) -> int:
        """Placeholder tokens per image in the text (0 for the adapter way in)."""
        if self.mode == "adapter":
            return 0
        return self.projector.tokens(self.vision.tokens(self.strategy))

    def trains_with_adapters(self) -> list[nn.Parameter]:
        """What trains beside any adapter on the decoder (`adapters.mark_trainable`): the projector, or the visual
        projection of the multimodal LLaMA-Adapter."""
        parts = [m for m in (self.projector, self.visual_prompt) if m is not None]
        return [p for m in parts for p in m.parameters()]

    # ---- images -> decoder embeddings ----

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's image tokens (N, T, vision width): what a feature cache stores."""
        self.vision.eval()
        return self.vision.features(pixels, self.feature_layer, self.strategy)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(N, T, vision width) -> (N, image_tokens, dim) in the decoder's dtype."""
        return self.projector(features).to(self.language.dtype)

    def embed(self, idx: torch.Tensor, images: torch.Tensor | None, *, first_sample: int = 0) -> torch.Tensor:
        """Input embeddings (B, T, dim) of token ids `idx` with projected images (N, image_tokens, dim) written over
        the placeholders, images taken in reading order (row by row). Spans are checked first."""
        is_image = idx == self.image_token_id
        check_spans(is_image, 0 if images is None else images.shape[0], self.image_tokens, first_sample)
        x = self.language.embed(idx.masked_fill(is_image, 0))  # a placeholder id may lie past the vocabulary
        if images is None or images.shape[0] == 0:
            return x
        return x.masked_scatter(is_image[..., None], images.to(x.dtype))  # (B, T, dim)

    def condition(self, features: torch.Tensor | None) -> None:
        """The adapter way in: set each adapted layer's visual term from the images' global features (N = B)."""
        from mightylm.multimodal.adapter import set_visual

        set_visual(self, features)

    def condition_rows(self, terms: list[torch.Tensor | None]) -> None:
        """The adapter way in, row by row: each row's image term (`visual_terms`, from its own request) or None."""
        from mightylm.multimodal.adapter import set_visual_rows

        set_visual_rows(self, terms)

    # ---- training and scoring ----

    def forward(self, idx: torch.Tensor, *, features: torch.Tensor | None = None, pixels: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, first_sample: int = 0) -> torch.Tensor:
        """Logits (B, T, vocab), or the mean next-token loss with `labels` (placeholder positions carry no loss).
        Images come as encoder features (cached) or pixels, one per sample for the adapter way in."""
        h = self.hidden(idx, features=features, pixels=pixels, first_sample=first_sample)
        if labels is None:
            return self.language.head(h)
        return self.language.loss(h, labels.masked_fill(idx == self.image_token_id, IGNORE_INDEX))

    def hidden(self, idx: torch.Tensor, *, features: torch.Tensor | None = None, pixels: torch.Tensor | None = None,
               first_sample: int = 0) -> torch.Tensor:
        """The decoder's final hidden states (B, T, dim) for token ids and images (see `forward`)."""
        if features is None and pixels is not None:
            features = self.encode(pixels)
        if self.mode == "adapter":
            check_spans(idx == self.image_token_id, 0, 0, first_sample)
            self.condition(features)
            try:
                return self.language.trunk(self.language.inputs(idx))
            finally:
                self.condition(None)
        x = self.embed(idx, None if features is None else self.project(features), first_sample=first_sample)
        return self.language.trunk(self.language.inputs(embeds=x))


def check_spans(is_image: torch.Tensor, n_images: int, per_image: int, first_sample: int = 0) -> None:
    """Every row's placeholders form whole spans of `per_image` consecutive tokens, and there are as many spans
    as images. Raises SpliceError naming the first sample that is wrong."""
    counts = is_image.sum(dim=1).tolist()
    if per_image == 0:
        if any(counts):
            raise SpliceError(f"sample {first_sample + next(i for i, c in enumerate(counts) if c)} has image "
                              "placeholders, but this model takes its images through the adapter, not the text")
        return
    for row, count in enumerate(counts):
        if count % per_image:
            raise SpliceError(f"sample {first_sample + row}: {count} image placeholder tokens, not a multiple of the "
                              f"{per_image} each image needs (was the prompt truncated inside an image, or was "
                              "the placeholder not expanded?)")
        if count:
            positions = is_image[row].nonzero().flatten()
            starts = positions[::per_image]
            whole = (positions.view(-1, per_image) - starts[:, None] == torch.arange(per_image)).all()
            if not bool(whole):
                raise SpliceError(f"sample {first_sample + row}: an image span is broken by other tokens")
    spans = sum(counts) // per_image
    if spans != n_images:
        raise SpliceError(f"samples {first_sample}..{first_sample + len(counts) - 1}: {spans} image spans in the "
                          f"text but {n_images} images given")


def expand_images(ids: list[int], image_token_id: int, per_image: int) -> list[int]:
    """Token ids with each single placeholder repeated `per_image` times (what LlavaProcessor does to the text)."""
    out = []
    for i in ids:
        out.extend([i] * per_image if i == image_token_id else [i])
    return out
