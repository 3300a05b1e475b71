"""The multimodal LLaMA-Adapter (Zhang et al. 2023, "LLaMA-Adapter", section 3.3): the image enters as a
condition on the adaption prompts rather than as tokens in the text.

The frozen encoder's tokens are pooled into one global feature (their mean: what CLIP's pooled output or a CNN's
average pool gives), a learned projection maps it to the decoder's width, and the result is added to every
adaption prompt of the top layers (`AdaptionPrompt.visual`). The prompts reach the tokens only through the
zero-initialised gates, so at step 0 the model's output is exactly the text-only model's, whatever the image.
Trainable: the prompts, the gates and the projection (`VisionLanguageModel.trains_with_adapters`).
"""

from __future__ import annotations

import torch
from torch import nn

from mightylm.adapters.llama_adapter import apply_llama_adapter


def apply_multimodal_adapter(vlm, layers: int | None = None, length: int = 10, seed: int = 0) -> list[str]:
    """Add LLaMA-Adapter prompts to `vlm.language` and the visual projection; the model then takes its images
    through the prompts (no placeholders in the text). Returns the adapted module names."""
    converted = apply_llama_adapter(vlm.language, layers=layers, length=length, seed=seed)
    add_visual_prompt(vlm)
    return converted


def add_visual_prompt(vlm) -> None:
    """The projection from the pooled image feature to the decoder's width (for a decoder already adapted)."""
    projection = nn.Linear(vlm.vision.width, vlm.config.dim).to(dtype=vlm.language.dtype, device=vlm.language.device)
    with torch.no_grad():  # the visual term starts at the prompts' scale (the gates are what start at zero)
        nn.init.normal_(projection.weight, std=vlm.vision.width ** -0.5)
        nn.init.zeros_(projection.bias)
    vlm.visual_prompt = projection
    vlm.projector = None


def adaption_modules(vlm) -> list[nn.Module]:
    return [block.attn.adaption for block in vlm.language.layers if getattr(block.attn, "adaption", None) is not None]


def visual_terms(vlm, features: torch.Tensor) -> torch.Tensor:
    """The images' encoder features (N, T, width) -> each image's term for the prompts (N, 1, dim): the projected
    global feature."""
    pooled = features.float().mean(dim=1).to(vlm.visual_prompt.weight.dtype)  # (N, width) global feature
    return vlm.visual_prompt(pooled)[:, None, :]


def set_visual(vlm, features: torch.Tensor | None) -> None:
    """Condition every adapted layer on the images' encoder features (B, T, width), one image per row, or clear it
    (None)."""
    _set(vlm, None if features is None else visual_terms(vlm, features))


def set_visual_rows(vlm, terms: list[torch.Tensor | None]) -> None:
    """Condition each row of the next forward pass on its own image (a term from `visual_terms`, (1, dim)) or on
    none (None: a zero term, which is the text-only prompt exactly): a server's batch mixes requests."""
    if all(t is None for t in terms):
        _set(vlm, None)
        return
    dim = next(t for t in terms if t is not None).shape[-1]
    zero = vlm.visual_prompt.weight.new_zeros(1, dim)
    _set(vlm, torch.stack([zero if t is None else t.reshape(1, dim) for t in terms]))  # (B, 1, dim)


def _set(vlm, visual: torch.Tensor | None) -> None:
    for adaption in adaption_modules(vlm):
        adaption.visual = visual
