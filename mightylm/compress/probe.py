"""How far a transform moved a model's outputs, measured on a fixed probe text: merging, quantizing and
re-quantizing print it, so the cost of each step is seen, not assumed."""

from __future__ import annotations

import torch

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. To be, or not to be, that is the question."


def probe_ids(tokenizer) -> torch.Tensor:
    """(1, T) token ids of the probe text (the first 32 ids when there is no tokenizer)."""
    return torch.tensor([tokenizer.encode(PROBE_TEXT)]) if tokenizer is not None else torch.arange(32)[None]


def output_change(logits: torch.Tensor, reference: torch.Tensor) -> str:
    """How far `logits` are from `reference`: max abs difference, relative RMS, greedy-token agreement."""
    rms = ((logits - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return (f"max |dlogit| {(logits - reference).abs().max().item():.4f}, relative RMS {rms:.2e}, "
            f"same argmax at {agree:.0%} of positions")
