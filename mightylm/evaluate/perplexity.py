"""Perplexity and bits per byte of a model on a text, over fixed windows.

The text is tokenized once; every token but the first is scored exactly once. Windows hold up to
`window` tokens; each scores the `stride` tokens after the previous window's (the first scores
window - 1), with the window's earlier tokens as context. The default stride, window - 1, makes
windows overlap by the one token of context the next prediction needs; a smaller stride gives
every token more context (the sliding evaluation of transformers' perplexity guide) at more cost.
The same text, window and stride give the same figure for every model with the same tokenizer;
bits per byte divides by the UTF-8 bytes of the scored text, so it compares across tokenizers.
"""

from __future__ import annotations

import math

import torch

from mightylm.errors import UsageError
from mightylm.model import IGNORE_INDEX


@torch.no_grad()
def perplexity(model, tokenizer, text: str, window: int = 256, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int = 4) -> dict:
    """{"tokens", "bytes", "nll" (mean nats/token), "perplexity", "bits_per_byte"} of `model` on `text`.

    `model` is a Transformer, or an `Endpoint` whose server uses `tokenizer`: the same windows are then
    sent as token ids and scored there (echo with logprobs), so both figures compare exactly.
    """
    stride = stride or window - 1
    if not 0 < stride < window:
        raise UsageError(f"need 0 < stride < window, got stride={stride}, window={window}")
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise UsageError(f"the text has {len(ids)} tokens; perplexity needs at least 2")
    spans = []  # (start, end, first scored position within the window)
    pos = 1  # the next token to score; the first token has no context
    while pos < len(ids):
        end = min(pos + (stride if spans else window - 1), len(ids))
        start = max(0, end - window)
        spans.append((start, end, pos - start))
        pos = end
    score = _remote_nll if hasattr(model, "prompt_logprobs") else _local_nll
    total = sum(score(model, ids, spans[i:i + batch_size]) for i in range(0, len(spans), batch_size))
    count = len(ids) - 1  # every token but the first is scored once
    n_bytes = len(tokenizer.decode(ids[1:]).encode("utf-8"))  # the scored tokens are ids[1:]
    return {"tokens": count, "bytes": n_bytes, "nll": total / count, "perplexity": math.exp(total / count),
            "bits_per_byte": total / math.log(2) / n_bytes}


def _local_nll(model, ids: list[int], spans: list[tuple[int, int, int]]) -> float:
    """Summed negative log-likelihood of the scored tokens of `spans`, in one forward pass."""
    width = max(e - s for s, e, _ in spans)
    idx = torch.zeros(len(spans), width, dtype=torch.long)
    labels = torch.full((len(spans), width), IGNORE_INDEX, dtype=torch.long)
    for row, (s, e, first) in enumerate(spans):
        chunk = torch.tensor(ids[s:e])
        idx[row, :e - s] = chunk
        labels[row, first - 1:e - s - 1] = chunk[first:]  # position t predicts token t + 1
    device = model.device
    return model(idx.to(device), labels=labels.to(device)).item() * int((labels != IGNORE_INDEX).sum())


def _remote_nll(endpoint, ids: list[int], spans: list[tuple[int, int, int]]) -> float:
    """The same sum, from the server's log-probabilities of each window's tokens."""
    logprobs = endpoint.prompt_logprobs([ids[s:e] for s, e, _ in spans])
    return -sum(sum(lp[first:]) for lp, (_, _, first) in zip(logprobs, spans))
