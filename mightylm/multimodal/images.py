"""Images in: decoding untrusted bytes with limits, and preparing pixels as a model's processor says.

`ImageProcessor` reads a Hugging Face `preprocessor_config.json` and does what `CLIPImageProcessor` and
`SiglipImageProcessor` do with it (their PIL backend): convert to RGB, resize (shortest edge, keeping the aspect
ratio, or to a fixed height x width), centre-crop, rescale to [0, 1], normalise per channel. Training, `mighty
generate --image` and the server all go through it, so a model sees the same pixels everywhere.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mightylm.errors import MightyError

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000  # decompression bombs: a small file that decodes to gigabytes
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


class ImageError(MightyError, ValueError):
    """An image we cannot use; the message says which and why."""


def open_image(data: bytes | str | Path, *, name: str = "image", max_bytes: int = MAX_IMAGE_BYTES):
    """A PIL RGB image from bytes or a file path, refusing what is not an image, too large, or a bomb."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        if path.stat().st_size > max_bytes:
            raise ImageError(f"{path}: {path.stat().st_size / 2**20:.1f} MiB is over the {max_bytes / 2**20:.0f} MiB "
                             "limit for an image")
        name, data = str(path), path.read_bytes()
    if len(data) > max_bytes:
        raise ImageError(f"{name}: {len(data) / 2**20:.1f} MiB is over the {max_bytes / 2**20:.0f} MiB limit")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in FORMATS:
                raise ImageError(f"{name}: {image.format} images are not accepted ({', '.join(FORMATS)})")
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(f"{name}: {image.width}x{image.height} pixels is over the limit of {MAX_PIXELS:,}")
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: not a readable image ({e.__class__.__name__})") from None


def decode_data_url(url: str, *, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL."""
    head, _, payload = url.partition(",")
    if not head.startswith("data:image/") or not head.endswith(";base64") or not payload:
        raise ImageError("an image URL must be a data URL: data:image/png;base64,... (or image/jpeg)")
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageError(f"the image is over the {max_bytes / 2**20:.0f} MiB limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data URL's base64 payload is not valid base64") from None


FETCH_TIMEOUT = 10.0  # seconds for a remote image (connect, and each read)


def fetch_image_url(url: str, *, max_bytes: int = MAX_IMAGE_BYTES, timeout: float = FETCH_TIMEOUT) -> bytes:
    """The bytes of an http(s) image URL (for a server started with --allow_image_urls): redirects followed by
    urllib, the body read up to `max_bytes` and refused past it, failures said in one line."""
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise ImageError(f"{url[:60]!r}: not an http(s) or data: URL")
    request = urllib.request.Request(url, headers={"User-Agent": "mightylm", "Accept": "image/*"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            data = reply.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise ImageError(f"{url[:100]}: the server answered {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ImageError(f"{url[:100]}: could not be fetched ({getattr(e, 'reason', e)})") from None
    if len(data) > max_bytes:
        raise ImageError(f"{url[:100]}: the image is over the {max_bytes / 2**20:.0f} MiB limit")
    return data


@dataclass
class ImageProcessor:
    size: dict = field(default_factory=lambda: {"shortest_edge": 224})  # or {"height": H, "width": W}
    crop_size: dict | None = field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = 3  # PIL.Image.BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)  # CLIP's
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)
    kind: str = "CLIPImageProcessor"

    @classmethod
    def from_config(cls, c: dict, source: str = "preprocessor_config.json") -> "ImageProcessor":
        kind = c.get("image_processor_type", "CLIPImageProcessor").removesuffix("Fast").removesuffix("Pil")
        if kind not in ("CLIPImageProcessor", "SiglipImageProcessor"):
            raise ImageError(f"{source}: image processor {kind!r} is not supported "
                             "(CLIPImageProcessor or SiglipImageProcessor)")
        size = c.get("size", {"shortest_edge": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size} if kind == "CLIPImageProcessor" else {"height": size, "width": size}
        crop = c.get("crop_size") if c.get("do_center_crop", kind == "CLIPImageProcessor") else None
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        return cls(size=size if c.get("do_resize", True) else {}, crop_size=crop, resample=int(c.get("resample", 3)),
                   rescale_factor=c.get("rescale_factor", 1 / 255) if c.get("do_rescale", True) else 1.0,
                   image_mean=tuple(c.get("image_mean", cls.image_mean)) if c.get("do_normalize", True) else (0.0,) * 3,
                   image_std=tuple(c.get("image_std", cls.image_std)) if c.get("do_normalize", True) else (1.0,) * 3,
                   kind=kind)

    @classmethod
    def from_dir(cls, path: Path) -> "ImageProcessor":
        file = Path(path) / "preprocessor_config.json"
        try:
            return cls.from_config(json.loads(file.read_text()), str(file))
        except (OSError, json.JSONDecodeError) as e:
            raise ImageError(f"{file}: cannot read the image processor's settings ({e})") from None

    @classmethod
    def for_size(cls, side: int, mean, std) -> "ImageProcessor":
        """Resize the shortest edge to `side` and centre-crop a square (ImageNet's evaluation transform)."""
        return cls(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_mean=tuple(mean),
                   image_std=tuple(std))

    def to_config(self) -> dict:
        return {"image_processor_type": self.kind, "do_convert_rgb": True, "do_resize": bool(self.size),
                "size": self.size, "resample": self.resample, "do_center_crop": self.crop_size is not None,
                "crop_size": self.crop_size, "do_rescale": True, "rescale_factor": self.rescale_factor,
                "do_normalize": True, "image_mean": list(self.image_mean), "image_std": list(self.image_std)}

    def __call__(self, images) -> torch.Tensor:
        """(N, 3, H, W) float32 pixels from PIL images (or one image)."""
        images = images if isinstance(images, (list, tuple)) else [images]
        return torch.stack([self._one(image) for image in images])

    def _one(self, image) -> torch.Tensor:
        image = image.convert("RGB")
        if "shortest_edge" in self.size:
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_short = self.size["shortest_edge"]
            new_long = int(new_short * long / short)  # transformers' rounding (down)
            image = image.resize((new_short, new_long) if w <= h else (new_long, new_short), self.resample)
        elif self.size:
            image = image.resize((self.size["width"], self.size["height"]), self.resample)
        x = np.asarray(image)  # (H, W, 3) uint8
        if self.crop_size:
            ch, cw = self.crop_size["height"], self.crop_size["width"]
            h, w = x.shape[:2]
            if h < ch or w < cw:  # transformers pads with zeros around the image, then crops
                padded = np.zeros((max(h, ch), max(w, cw), 3), dtype=x.dtype)
                top, left = (max(h, ch) - h) // 2, (max(w, cw) - w) // 2
                padded[top:top + h, left:left + w] = x
                x, h, w = padded, *padded.shape[:2]
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[top:top + ch, left:left + cw]
        x = x.astype(np.float32) * np.float32(self.rescale_factor)
        x = (x - np.asarray(self.image_mean, dtype=np.float32)) / np.asarray(self.image_std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
