"""Calibration text for the methods that measure activations (SmoothQuant, pruning's Wanda, SparseGPT and
structured importance): token windows from a text file, a directory, JSONL or an embedded corpus, with clear errors when there
is too little."""

from __future__ import annotations

import torch

from mightylm.compress import QuantizationError


def calibration_batches(calib: str, tokenizer, windows: int, length: int = 256,
                        method: str = "SmoothQuant") -> list[torch.Tensor]:
    """Up to `windows` token windows (1, length) from the calibration text; `method` names who needs them in the
    error for too little text."""
    from mightylm.data.pretrain import collect_files, read_documents

    ids: list[int] = []
    for file in collect_files([calib]):
        for doc in read_documents(file):
            ids += tokenizer.encode(doc)
            if len(ids) >= windows * length:
                break
    if len(ids) < 64:
        raise QuantizationError(f"{calib}: {len(ids)} tokens of calibration text; {method} needs at least 64 "
                                "(a few paragraphs of ordinary text)")
    n = min(windows, max(1, len(ids) // length))
    size = min(length, len(ids))
    return [torch.tensor(ids[i * size:(i + 1) * size])[None] for i in range(n)]
