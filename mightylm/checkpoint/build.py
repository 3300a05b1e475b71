"""Building a model from stored tensors, shared by the Hugging Face and GGUF readers: the error every
checkpoint problem raises (defined in mightylm.errors), the meta-device build, replaying recorded transforms, and
the checked assignment (`load_state_dict(assign=True)`, so the weights exist in memory once)."""

from __future__ import annotations

from pathlib import Path

import torch

from mightylm.config import ModelConfig
from mightylm.errors import CheckpointError
from mightylm.model import Transformer


class _NoInit(torch.overrides.TorchFunctionMode):
    """Skip torch.nn.init calls (nn.Linear and nn.Embedding initialise themselves when built): on the meta device
    they compute nothing, yet the first one in a process imports torch._dynamo (~2.5 s of a cold start)."""

    SKIPPED = {torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_, torch.nn.init.zeros_,
               torch.nn.init.ones_, torch.nn.init.trunc_normal_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def build(config: ModelConfig) -> Transformer:
    """The model's modules on the meta device (no memory, no initialisation), for a checkpoint's tensors."""
    with torch.device("meta"), _NoInit():
        return Transformer(config)


# Transforms whose record is kept with the model and whose modules stay plain: replaying them is recording them.
RECORD_ONLY = ("prune", "structured_prune")


def replay(model: Transformer, transforms: list[dict], file: Path) -> None:
    """Apply a checkpoint's recorded transforms to the freshly built (meta) model, so that its stored tensors
    have their modules to go into. A full checkpoint holds only transforms that change what is stored
    (quantization) or that only describe it (pruning: the zeros are in the tensors; the record says which layers,
    so that training keeps them); adapters are saved as adapter directories."""
    for record in transforms:
        if record.get("kind") in RECORD_ONLY:
            model.record_transform(**record)
            continue
        if record.get("kind") != "quantize":
            raise CheckpointError(f"{file}: records a {record.get('kind')!r} transform, which a full checkpoint "
                                  "cannot hold (merge or strip adapters before saving)")
        from mightylm.compress.quantize import build_quantized_

        build_quantized_(model, record)


def assign(model: Transformer, state: dict, dtype, device, *, source) -> None:
    """Check names and shapes against the model, convert, and assign in place."""
    expected = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and model.head_shares_embedding)}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    tensors = {}
    for name, (tensor, file, stored_as) in state.items():
        if name not in expected:
            raise CheckpointError(f"{file}: tensor {stored_as!r} has no place in this model")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{file}: tensor {stored_as!r} has shape {tuple(tensor.shape)}, "
                f"but the config asks for {tuple(expected[name].shape)}"
            )
        # Integer codes and quantization scales keep their stored types.
        keep = not tensor.is_floating_point() or ".weight_" in name
        tensors[name] = tensor.to(device=device, dtype=tensor.dtype if keep else dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    model.eval()
