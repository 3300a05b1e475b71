"""A CLIP/SigLIP-style vision transformer (Radford et al. 2021; Zhai et al. 2023): the image cut into
patches, each patch a token, pre-norm blocks with full (non-causal) attention.

The two families differ only on real axes, read from the config: CLIP puts a learned class token in front
and a LayerNorm ("pre_layrnorm", sic) before the blocks, its patch convolution has no bias and its MLP uses
quick-GELU; SigLIP has no class token and no pre-norm, a biased patch convolution and tanh-GELU. Module
and leaf names follow transformers' `CLIPVisionModel` / `SiglipVisionModel` (`embeddings.patch_embedding`,
`encoder.layers.{i}.self_attn.q_proj`, ...), so their weights load by stripping a prefix.

A LLaVA-style model reads the hidden states of one layer (`feature_layer`, -2 in LLaVA-1.5: the
penultimate block, which keeps more local detail than the last) and drops the class token ("default"
strategy) or keeps every token ("full"). `features` computes only the blocks it needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VisionConfig:
    kind: str = "clip"  # "clip" | "siglip"
    hidden_size: int = 768
    intermediate_size: int = 3072
    layers: int = 12
    heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    eps: float = 1e-5
    act: str = "quick_gelu"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def class_token(self) -> bool:
        return self.kind == "clip"

    @classmethod
    def from_hf(cls, hf: dict) -> "VisionConfig":
        """From a `vision_config` (CLIPVisionConfig / SiglipVisionConfig as a dict)."""
        kind = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}.get(hf.get("model_type"))
        if kind is None:
            raise ValueError(f"vision model type {hf.get('model_type')!r} is not supported "
                             "(clip_vision_model or siglip_vision_model)")
        return cls(kind=kind, hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                   layers=hf["num_hidden_layers"], heads=hf["num_attention_heads"], image_size=hf["image_size"],
                   patch_size=hf["patch_size"], channels=hf.get("num_channels", 3),
                   eps=hf.get("layer_norm_eps", 1e-6 if kind == "siglip" else 1e-5),
                   act=hf.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh"))

    def to_hf(self) -> dict:
        return {"model_type": f"{self.kind}_vision_model", "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "image_size": self.image_size, "patch_size": self.patch_size,
                "num_channels": self.channels, "layer_norm_eps": self.eps, "hidden_act": self.act}


ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP's approximation (OpenAI's code)
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class Embeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(c.channels, c.hidden_size, c.patch_size, stride=c.patch_size,
                                         bias=not c.class_token)
        if c.class_token:
            self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.position_embedding = nn.Embedding(c.grid ** 2 + c.class_token, c.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, grid*grid, D), row-major patches
        if hasattr(self, "class_embedding"):
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1)  # (B, 1 + N, D)
        return x + self.position_embedding.weight.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.heads, self.head_dim = c.heads, c.hidden_size // c.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c.hidden_size, c.hidden_size)
                                                                for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                                       self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(self.head_dim))  # (B, nh, T, hs), no mask
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c.hidden_size, c.intermediate_size), nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = ACTIVATIONS[c.act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.eps), nn.LayerNorm(c.hidden_size, eps=c.eps)
        self.self_attn, self.mlp = SelfAttention(c), MLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.layers))


class VisionTransformer(nn.Module):
    """pixels (B, C, H, W), normalised as the model's processor says -> hidden states of a chosen layer."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.act not in ACTIVATIONS:
            raise ValueError(f"vision activation {config.act!r} is not supported ({', '.join(ACTIVATIONS)})")
        self.config = config
        self.embeddings = Embeddings(config)
        if config.class_token:
            self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.eps)  # transformers' spelling
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.eps)  # pooled output only; kept to load/save

    @property
    def width(self) -> int:
        return self.config.hidden_size

    def hidden_states(self, pixels: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """The output of block `layer` as transformers counts hidden states: 0 is the embeddings (after CLIP's
        pre-norm), i the output of block i, -1 the last block's, -2 the penultimate's."""
        n = self.config.layers
        index = layer if layer >= 0 else n + 1 + layer
        if not 0 <= index <= n:
            raise ValueError(f"feature layer {layer} is outside this encoder's {n} blocks")
        x = self.embeddings(pixels.to(self.embeddings.patch_embedding.weight.dtype))
        if self.config.class_token:
            x = self.pre_layrnorm(x)
        for block in self.encoder.layers[:index]:
            x = block(x)
        return x

    def features(self, pixels: torch.Tensor, layer: int = -2, strategy: str = "default") -> torch.Tensor:
        """(B, tokens, D) image tokens: `layer`'s hidden states with the first token dropped ("default": CLIP's
        class token) or kept ("full"). As in transformers' LLaVA, "default" drops the first token whatever the
        encoder, so a SigLIP tower (no class token) is used with "full"."""
        if strategy not in ("default", "full"):
            raise ValueError(f"feature select strategy {strategy!r}: expected 'default' or 'full'")
        x = self.hidden_states(pixels, layer)
        return x[:, 1:] if strategy == "default" else x

    def tokens(self, strategy: str = "default") -> int:
        """How many image tokens `features` gives per image."""
        return self.config.grid ** 2 + self.config.class_token - (strategy == "default")
