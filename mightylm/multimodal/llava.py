"""Hugging Face `LlavaForConditionalGeneration` directories, read and written: config.json (`model_type: llava`
with `vision_config` and `text_config`), model.safetensors, the tokenizer, and the processor's two files
(`preprocessor_config.json`: how images are prepared; `processor_config.json`: the image token and how many
copies of it stand for one image).

Tensor names, as data: transformers writes the legacy spelling (`language_model.model.*`,
`language_model.lm_head.weight`, `vision_tower.*`, `multi_modal_projector.*`) and reads it back; newer
checkpoints spell the same tensors `model.language_model.*`, `lm_head.weight`, `model.vision_tower.*`,
`model.multi_modal_projector.*`, and older CLIP towers add `vision_model.`. All are read; the legacy one is written.
A SigLIP tower's attention-pooling head is not used by LLaVA and is not kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mightylm.checkpoint.build import CheckpointError, assign, build
from mightylm.checkpoint.hf import _read_safetensors, _safetensors_files
from mightylm.checkpoint.names import hf_to_ours, ours_to_hf, rename
from mightylm.config import ConfigError, ModelConfig
from mightylm.multimodal.images import ImageProcessor
from mightylm.multimodal.projector import Projector
from mightylm.multimodal.vit import VisionConfig, VisionTransformer
from mightylm.multimodal.vlm import IMAGE_TOKEN, VisionLanguageModel
from mightylm.tokenizer import Tokenizer

# stored prefix -> (part, prefix in our module), first match wins
PREFIXES = (
    ("language_model.model.", "language", "model."), ("model.language_model.", "language", "model."),
    ("language_model.lm_head.", "language", "lm_head."), ("lm_head.", "language", "lm_head."),
    ("vision_tower.vision_model.", "vision", ""), ("model.vision_tower.vision_model.", "vision", ""),
    ("vision_tower.", "vision", ""), ("model.vision_tower.", "vision", ""),
    ("multi_modal_projector.", "projector", ""), ("model.multi_modal_projector.", "projector", ""),
)
ACTIVATIONS = {"gelu": "mlp2x_gelu"}


def is_llava(path: Path) -> bool:
    """A LLaVA directory; anything unreadable is not (its own loader then says what is wrong)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):  # missing, not UTF-8, not JSON
        return False
    return isinstance(config, dict) and config.get("model_type") == "llava"


def load_llava(path: str | Path, *, dtype=torch.float32) -> tuple[VisionLanguageModel, Tokenizer | None]:
    path = Path(path)
    config_file = path / "config.json"
    hf = json.loads(config_file.read_text())
    if hf.get("projector_hidden_act", "gelu") not in ACTIVATIONS:
        raise CheckpointError(f"{config_file}: projector activation {hf.get('projector_hidden_act')!r} is not "
                              "supported (gelu: LLaVA-1.5's mlp2x_gelu)")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise CheckpointError(f"{config_file}: vision_feature_layer {layer!r}: several layers concatenated are not "
                              "supported; one layer index is")
    try:
        text = ModelConfig.from_hf(hf.get("text_config") or {})
        vision_config = VisionConfig.from_hf(hf.get("vision_config") or {})
    except (ConfigError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {e}") from None
    language = build(text)
    vision = VisionTransformer(vision_config)
    projector = Projector("mlp2x_gelu", vision_config.hidden_size, text.dim, bias=hf.get("multimodal_projector_bias", True))
    text_names = hf_to_ours(text.arch)
    state, vision_state, projector_state = {}, {}, {}
    for file in _safetensors_files(path):
        for name, tensor in _read_safetensors(file).items():
            part, local = _split(name)
            if part == "language":
                ours = rename(local, text_names)
                if ours is None:
                    raise CheckpointError(f"{file}: unexpected tensor {name!r} for the {text.arch} language model")
                if not (ours == "lm_head.weight" and language.head_shares_embedding):
                    state[ours] = (tensor, file, name)
            elif part == "vision":
                if not local.startswith("head."):  # SigLIP's pooling head: unused by LLaVA
                    vision_state[local] = tensor
            elif part == "projector":
                projector_state[local] = tensor
            else:
                raise CheckpointError(f"{file}: tensor {name!r} is not part of a LLaVA model")
    assign(language, state, dtype, "cpu", source=path)
    for module, tensors, what in ((vision, vision_state, "vision tower"), (projector, projector_state, "projector")):
        missing, unexpected = module.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path}: the {what}'s tensors do not match config.json "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        module.to(dtype)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
    processor = read_processor(path)
    vlm = VisionLanguageModel(vision, projector, language, image_token_id=hf.get("image_token_index", hf.get("image_token_id")),
                              feature_layer=layer, strategy=hf.get("vision_feature_select_strategy", "default"),
                              processor=processor)
    return vlm.eval(), tokenizer


def read_processor(path: Path) -> ImageProcessor | None:
    """The image settings: inside processor_config.json (transformers 5) or in preprocessor_config.json."""
    nested = path / "processor_config.json"
    if nested.exists():
        try:
            settings = json.loads(nested.read_text()).get("image_processor")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{nested}: not valid JSON ({e})") from None
        if settings:
            return ImageProcessor.from_config(settings, str(nested))
    return ImageProcessor.from_dir(path) if (path / "preprocessor_config.json").exists() else None


def _split(name: str) -> tuple[str | None, str]:
    for prefix, part, local in PREFIXES:
        if name.startswith(prefix):
            return part, local + name[len(prefix):]
    return None, name


def save_llava(vlm: VisionLanguageModel, tokenizer: Tokenizer | None, path: str | Path) -> Path:
    """Write `vlm` (a ViT tower and the mlp2x_gelu projector) as a directory transformers' LlavaForConditionalGeneration
    and LlavaProcessor load."""
    from safetensors.torch import save_file

    if not isinstance(vlm.vision, VisionTransformer) or vlm.projector is None or vlm.projector.kind != "mlp2x_gelu":
        raise CheckpointError("a LLaVA directory holds a CLIP/SigLIP tower and an mlp2x_gelu projector; this model "
                              "has another encoder or projector: save it with multimodal.save_vlm")
    if vlm.language.transforms:
        raise CheckpointError("merge or strip the decoder's adapters before saving a LLaVA directory")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    names = ours_to_hf(vlm.language.config.arch)
    tensors = {}
    for name, t in vlm.language.state_dict().items():
        if name == "lm_head.weight" and vlm.language.head_shares_embedding:
            continue
        hf = rename(name, names)
        tensors["language_model." + hf] = t
    tensors.update({"vision_tower." + k: t for k, t in vlm.vision.state_dict().items()})
    tensors.update({"multi_modal_projector." + k: t for k, t in vlm.projector.state_dict().items()})
    tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "model.safetensors")
    text = vlm.language.config.to_hf()
    vision = vlm.vision.config.to_hf()
    config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": text,
              "vision_config": vision, "image_token_index": vlm.image_token_id,
              "vision_feature_layer": vlm.feature_layer, "vision_feature_select_strategy": vlm.strategy,
              "projector_hidden_act": "gelu", "multimodal_projector_bias": vlm.projector.linear_1.bias is not None,
              "image_seq_length": vlm.image_tokens, "tie_word_embeddings": text.get("tie_word_embeddings", False),
              "torch_dtype": str(vlm.language.embed.weight.dtype).removeprefix("torch.")}
    if tokenizer is not None:
        tokenizer.save(path)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    processor = vlm.processor or ImageProcessor.for_size(vlm.vision.config.image_size, (0.5,) * 3, (0.5,) * 3)
    (path / "preprocessor_config.json").write_text(json.dumps(processor.to_config(), indent=2) + "\n")  # older readers
    image_token = tokenizer.backend.id_to_token(vlm.image_token_id) if tokenizer is not None else IMAGE_TOKEN
    (path / "processor_config.json").write_text(json.dumps({
        "image_processor": processor.to_config(),
        "processor_class": "LlavaProcessor", "image_token": image_token, "patch_size": vlm.vision.config.patch_size,
        "vision_feature_select_strategy": vlm.strategy,
        "num_additional_image_tokens": int(vlm.vision.config.class_token)}, indent=2) + "\n")
    return path
