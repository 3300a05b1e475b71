"""Merging a LoRA adapter into its base (the work behind `mighty merge`): the adapter is applied unmerged as
trained, merged, and stripped to plain linear layers; a QLoRA adapter's NF4 base is dequantized first (and,
if asked, the merged model is quantized again the same way). Each step's change in outputs is measured on
a probe text and reported."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from mightylm.adapters.files import AdapterError, read_adapter_config, warn_if_other_base
from mightylm.adapters.lora import load_lora, lora_modules, strip_lora


def check_mergeable(adapter: str | Path) -> dict:
    """The adapter's config, or an AdapterError when its kind adds inputs or attention rather than weights."""
    cfg = read_adapter_config(adapter)
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{adapter}: a {cfg.get('peft_type')} adapter adds inputs or attention, not weight updates, "
                           "so it cannot be merged into the weights; apply it with --adapter instead")
    return cfg


@torch.no_grad()
def merge_into_base(base, tokenizer, adapter: str | Path, *, requantize: bool = False,
                    log: Callable[[str], None] = print) -> int:
    """Merge the LoRA adapter in `adapter` into `base` in place; returns the number of merged layers."""
    from mightylm.compress.probe import output_change, probe_ids
    from mightylm.compress.quantize import dequantize_, quantize_like_

    from mightylm.compress.prune import pruned_masks, reapply_mask_

    cfg = check_mergeable(adapter)
    warn_if_other_base(base, cfg, adapter)
    masks = pruned_masks(base)  # a pruned base stays pruned: its zeros are put back after the merge
    n = len(load_lora(base, adapter, cfg))
    record = base.quantization
    if requantize and not record:
        raise AdapterError(f"--requantize: {adapter} is a LoRA adapter over a float base; nothing to re-quantize")
    probe = probe_ids(tokenizer)
    reference = base(probe)  # the adapter as trained: unmerged, over the (quantized) base
    for m in lora_modules(base).values():
        m.dequantize_base()
    strip_lora(base)
    if masks:
        reapply_mask_(base, masks)
        log(f"the base is pruned ({base.applied('prune')['method']}): its zeros re-applied after merging; outputs "
            f"change by {output_change(base(probe), reference)}")
    if record:
        dequantize_(base)  # the quantized layers LoRA did not adapt become float too
        log(f"merged into a dequantized float copy: outputs change by {output_change(base(probe), reference)}")
        if requantize:
            quantize_like_(base, record)
            log(f"re-quantized to {record['method']} after merging: outputs change by "
                f"{output_change(base(probe), reference)}")
    return n
