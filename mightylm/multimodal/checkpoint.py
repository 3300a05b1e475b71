"""Vision-language models built from parts and stored as directories.

Two layouts:
    a Hugging Face LLaVA directory (llava.py): a CLIP/SigLIP tower and the mlp2x_gelu projector, all in one
        model.safetensors, loadable by transformers;
    ours, for any encoder and projector (EfficientNet-Lite0, pixel shuffle, the multimodal LLaMA-Adapter):
        vlm.json          the parts: the decoder (an embedded name or a directory), the encoder, the projector's
                          settings, the image token, the feature layer, the system message it was trained with
        projector.safetensors   or visual_prompt.safetensors (the adapter way in)
        adapter/          the decoder's adapter (LoRA or LLaMA-Adapter), when trained
    The decoder and encoder are referenced, not copied: a trained model is a few MB over its parts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mightylm.checkpoint import CheckpointError, load
from mightylm.multimodal.images import ImageProcessor
from mightylm.multimodal.projector import Projector
from mightylm.multimodal.vlm import IMAGE_TOKEN, VisionLanguageModel
from mightylm.tokenizer import Tokenizer

ENCODERS = ("efficientnet-lite0",)  # or a CLIPVisionModel / SiglipVisionModel directory
FORMAT = "mightylm-vlm"


def is_vlm(path: str | Path) -> bool:
    from mightylm.multimodal.llava import is_llava

    path = Path(path)
    return path.is_dir() and ((path / "vlm.json").is_file() or is_llava(path))


def with_image_token(tokenizer: Tokenizer, token: str = IMAGE_TOKEN) -> int:
    """The id of the image placeholder, added to the tokenizer as a special token when it has none (an id past
    the embedding table: `VisionLanguageModel.embed` never looks it up)."""
    found = tokenizer.token_to_id(token)
    if found is not None:
        return found
    from tokenizers import AddedToken

    tokenizer.backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    return tokenizer.token_to_id(token)


def load_encoder(name: str):
    """(encoder, its ImageProcessor) for an encoder name or a CLIPVisionModel / SiglipVisionModel directory."""
    if name == "efficientnet-lite0":
        from mightylm.multimodal.efficientnet import MEAN, STD, efficientnet_lite0

        return efficientnet_lite0(), ImageProcessor.for_size(224, MEAN, STD)
    path = Path(name)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"vision encoder {name!r}: expected one of {', '.join(ENCODERS)} or a directory with a "
                              "CLIPVisionModel / SiglipVisionModel config.json and model.safetensors")
    from mightylm.checkpoint.hf import _read_safetensors, _safetensors_files
    from mightylm.multimodal.llava import read_processor
    from mightylm.multimodal.vit import VisionConfig, VisionTransformer

    config = json.loads((path / "config.json").read_text())
    vision = VisionTransformer(VisionConfig.from_hf(config.get("vision_config", config)))
    tensors = {k.removeprefix("vision_model."): t for f in _safetensors_files(path) for k, t in _read_safetensors(f).items()
               if not k.removeprefix("vision_model.").startswith("head.")}
    missing, unexpected = vision.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: vision tensors do not match its config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    processor = read_processor(path) or ImageProcessor.for_size(vision.config.image_size, (0.5,) * 3, (0.5,) * 3)
    return vision.eval(), processor


def build_vlm(language: str, vision: str = "efficientnet-lite0", projector: str = "mlp2x_gelu", *, shuffle: int = 2,
              feature_layer: int = -2, strategy: str | None = None, seed: int = 0, dtype=torch.float32):
    """(VisionLanguageModel, tokenizer) from a decoder (path or embedded name) and an encoder, with a freshly
    initialised projector (or, with projector="adapter", the multimodal LLaMA-Adapter's parts added later)."""
    model, tokenizer = load(language, dtype=dtype, need_tokenizer=True)
    encoder, processor = load_encoder(vision)
    strategy = strategy or ("full" if vision in ENCODERS or getattr(encoder.config, "kind", "") == "siglip" else "default")
    torch.manual_seed(seed)
    head = None if projector == "adapter" else Projector(projector, encoder.width, model.config.dim, shuffle=shuffle).to(dtype)
    vlm = VisionLanguageModel(encoder, head, model, image_token_id=with_image_token(tokenizer),
                              feature_layer=feature_layer, strategy=strategy, processor=processor, vision_name=vision)
    vlm.language_name = language
    return vlm, tokenizer


def save_vlm(vlm: VisionLanguageModel, path: str | Path, *, language: str | None = None) -> Path:
    """Write our layout (see the module's docstring): the trained parts and references to the rest."""
    from safetensors.torch import save_file

    from mightylm.adapters import present, save_adapter

    language = language or getattr(vlm, "language_name", None)
    if not language or not vlm.vision_name:
        raise CheckpointError("save_vlm needs the decoder's and the encoder's names or paths (build the model with "
                              "build_vlm, or pass language=)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    trained = vlm.visual_prompt if vlm.mode == "adapter" else vlm.projector
    file = "visual_prompt.safetensors" if vlm.mode == "adapter" else "projector.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in trained.state_dict().items()}, str(path / file))
    if present(vlm.language):
        save_adapter(vlm.language, path / "adapter", base_model=str(language))
    spec = {"format": FORMAT, "language": str(language), "vision": vlm.vision_name, "mode": vlm.mode,
            "feature_layer": vlm.feature_layer, "strategy": vlm.strategy, "image_token": IMAGE_TOKEN,
            "image_tokens": vlm.image_tokens}
    if vlm.projector is not None:
        spec["projector"] = {"kind": vlm.projector.kind, "shuffle": vlm.projector.shuffle}
    if vlm.system:
        spec["system"] = vlm.system
    (path / "vlm.json").write_text(json.dumps(spec, indent=2) + "\n")
    return path


def load_vlm(path: str | Path, *, dtype=torch.float32):
    """(VisionLanguageModel, tokenizer) from a LLaVA directory or our layout; dtype a torch dtype or its name."""
    from mightylm.multimodal.llava import is_llava, load_llava

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    path = Path(path)
    if is_llava(path):
        vlm, tokenizer = load_llava(path, dtype=dtype)
        if tokenizer is None:
            raise CheckpointError(f"{path}: has no tokenizer.json, so prompts cannot be encoded")
        return vlm, tokenizer
    spec_file = path / "vlm.json"
    try:
        spec = json.loads(spec_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{spec_file}: cannot read the model's parts ({e})") from None
    if spec.get("format") != FORMAT:
        raise CheckpointError(f"{spec_file}: not a mightylm vision-language model (format {spec.get('format')!r})")
    adapter_mode = spec.get("mode") == "adapter"
    projector = spec.get("projector", {})
    vlm, tokenizer = build_vlm(spec["language"], spec["vision"], "adapter" if adapter_mode else projector.get("kind"),
                               shuffle=projector.get("shuffle", 2), feature_layer=spec["feature_layer"],
                               strategy=spec["strategy"], dtype=dtype)
    from safetensors.torch import load_file

    from mightylm.adapters import load_adapter

    if adapter_mode:
        from mightylm.multimodal.adapter import add_visual_prompt

        load_adapter(vlm.language, path / "adapter")  # the LLaMA-Adapter prompts and gates
        add_visual_prompt(vlm)
        vlm.visual_prompt.load_state_dict(load_file(str(path / "visual_prompt.safetensors")))
    else:
        vlm.projector.load_state_dict(load_file(str(path / "projector.safetensors")))
        if (path / "adapter").is_dir():
            load_adapter(vlm.language, path / "adapter")
    vlm.system = spec.get("system")
    if spec.get("image_tokens") is not None and spec["image_tokens"] != vlm.image_tokens:
        raise CheckpointError(f"{spec_file}: records {spec['image_tokens']} image tokens, the parts give "
                              f"{vlm.image_tokens}")
    return vlm.eval(), tokenizer
