"""Projectors: image tokens of the encoder's width -> embeddings of the decoder's width.

    mlp2x_gelu      Linear, GELU, Linear (LLaVA-1.5, Liu et al. 2023, "Improved Baselines"): the default
    linear          one Linear (the first LLaVA)
    pixel_shuffle   groups of r x r neighbouring tokens concatenated (r^2 times wider, r^2 times fewer), then one
                    Linear (nanoVLM / Idefics3): fewer image tokens in the decoder's context for the same image

Leaf names follow transformers' `LlavaMultiModalProjector` (`linear_1`, `linear_2`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("mlp2x_gelu", "linear", "pixel_shuffle")


class Projector(nn.Module):
    def __init__(self, kind: str, vision_width: int, text_width: int, *, shuffle: int = 2, bias: bool = True):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"projector {kind!r} is not one of {', '.join(KINDS)}")
        self.kind, self.shuffle = kind, shuffle if kind == "pixel_shuffle" else 1
        width_in = vision_width * self.shuffle ** 2
        self.linear_1 = nn.Linear(width_in, text_width, bias=bias)
        if kind == "mlp2x_gelu":
            self.linear_2 = nn.Linear(text_width, text_width, bias=bias)

    def tokens(self, image_tokens: int) -> int:
        """Image tokens after projection, from the encoder's count per image."""
        return image_tokens // self.shuffle ** 2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, T, vision_width) -> (N, T / r^2, text_width)."""
        if self.shuffle > 1:
            features = pixel_shuffle(features, self.shuffle)
        x = self.linear_1(features.to(self.linear_1.weight.dtype))
        if self.kind == "mlp2x_gelu":
            x = self.linear_2(F.gelu(x))
        return x


def pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """(N, G*G, D) tokens of a G x G grid, row-major -> (N, (G/r)^2, r*r*D): each output token is an r x r block
    of neighbours, concatenated (space-to-depth)."""
    N, T, D = x.shape
    G = math.isqrt(T)
    if G * G != T or G % r:
        raise ValueError(f"pixel shuffle by {r} needs a square grid whose side divides by {r}; got {T} tokens")
    x = x.view(N, G // r, r, G // r, r, D).permute(0, 1, 3, 2, 4, 5)  # (N, G/r, G/r, r, r, D)
    return x.reshape(N, (G // r) ** 2, r * r * D)
