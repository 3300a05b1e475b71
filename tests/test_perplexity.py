"""Perplexity: every token but the first scored once, equal to transformers' loss on the same windows."""

import math

import pytest
import torch

import mightylm
from mightylm.evaluate.perplexity import perplexity

from conftest import SAMPLE_TEXT


@pytest.mark.parametrize("stride", [None, 16])
def test_perplexity_equals_transformers_on_the_same_windows(hf_dir, stride):
    _, path, hf = hf_dir
    model, tok = mightylm.load(path)
    text = SAMPLE_TEXT * 3
    ids = tok.encode(text)
    ours = perplexity(model, tok, text, window=64, stride=stride, batch_size=3)
    total, count, pos = 0.0, 0, 1
    with torch.no_grad():
        while pos < len(ids):  # the same windows, scored by transformers' own loss
            end = min(pos + (stride or 63 if count else 63), len(ids))
            start = max(0, end - 64)
            chunk = torch.tensor([ids[start:end]])
            labels = chunk.clone()
            labels[0, :pos - start] = -100
            total += hf(chunk, labels=labels).loss.item() * (end - pos)
            count, pos = count + end - pos, end
    assert ours["tokens"] == count == len(ids) - 1
    assert ours["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert ours["bits_per_byte"] == pytest.approx(total / math.log(2) / len(tok.decode(ids[1:]).encode()), rel=1e-4)


def test_perplexity_refuses_what_it_cannot_measure(hf_dir):
    _, path, _ = hf_dir
    model, tok = mightylm.load(path)
    with pytest.raises(ValueError, match="0 < stride < window"):
        perplexity(model, tok, SAMPLE_TEXT, window=32, stride=32)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(model, tok, "a", window=32)
