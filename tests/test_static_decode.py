"""The fixed-shape decode step (static_decode.py) computes what decode_one_token does: the same logits step by step,
with left padding, GQA, biases, a sliding window over a full cache and partial rotary embeddings, and the same
tokens through `generate`. On the CPU it runs without a graph; test_gpu.py replays it as a CUDA graph."""

import copy

import pytest
import torch

from mightylm.generate import Sampling, decode_one_token, generate, prefill
from mightylm.model import KVCache
from mightylm import static_decode
from mightylm.static_decode import StaticDecode

from conftest import tiny

VARIANTS = {
    "plain": {},
    "bias, multi-query": dict(qkv_bias=True, n_kv_heads=1),
    "sliding window": dict(sliding_window=6),
    "partial rotary, untied": dict(partial_rotary_factor=0.5, tie_embeddings=False),
}


def steps_both_ways(model, prompts: list[list[int]], steps: int, compiled: bool = False) -> tuple[list, list]:
    """Logits of `steps` decoded tokens after one prefill: decode_one_token's and StaticDecode's (its block
    compiled by torch.compile with `compiled`), each on its own copy of the cache, fed the same (greedy) tokens."""
    width = max(len(p) for p in prompts)
    idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=model.device)
    pad = torch.tensor([width - len(p) for p in prompts], device=model.device)
    pad = pad if bool(pad.any()) else None
    with torch.inference_mode():
        cache = model.make_cache(len(prompts), width + steps)
        token = prefill(model, idx, cache, pad).argmax(-1)
        other = copy.deepcopy(cache)
        fixed = StaticDecode(model, other, pad, compiled)
        dynamic, static = [], []
        for t in range(steps):
            dynamic.append(decode_one_token(model, token, cache, width + t, pad))
            static.append(fixed(token, width + t).clone())
            token = dynamic[-1].argmax(-1)
    return dynamic, static


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_fixed_step_equals_the_dynamic_one(variant):
    model = tiny(seed=5, **VARIANTS[variant])
    prompts = [[5, 17, 42, 99, 3, 8, 11, 12, 13], [7, 7, 1]]  # the second row left-padded by six
    dynamic, static = steps_both_ways(model, prompts, steps=10)  # past the window of 6, and past the padding
    torch.testing.assert_close(torch.stack(static), torch.stack(dynamic), atol=1e-5, rtol=1e-5)


def test_the_compiled_block_equals_the_dynamic_step():
    """`compile_blocks`: one torch.compile'd function runs every block (inductor's C++ on the CPU, Triton on a GPU):
    the same logits within float32 rounding, with padding and a sliding window, compiled once for all blocks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny(seed=5, qkv_bias=True, sliding_window=6, n_layers=3)
    prompts = [[5, 17, 42, 99, 3, 8, 11, 12, 13], [7, 7, 1]]
    dynamic, static = steps_both_ways(model, prompts, steps=8, compiled=True)
    torch.testing.assert_close(torch.stack(static), torch.stack(dynamic), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for the three blocks: the weights are its inputs


def test_compile_blocks_marks_the_models_next_decoders():
    model = tiny(seed=1)
    plain = static_decode.take(model, 1, 40, None)
    static_decode.give_back(model, plain)
    static_decode.compile_blocks(model)
    compiled = static_decode.take(model, 1, 40, None)
    assert compiled is not plain and compiled.compiled  # not the kept plain one
    static_decode.give_back(model, compiled)
    static_decode.compile_blocks(model, on=False)
    assert not static_decode.take(model, 1, 40, None).compiled


def test_generate_with_the_fixed_step_gives_the_same_tokens():
    model = tiny(seed=2, qkv_bias=True)
    prompts = [[5, 17, 42, 99, 3, 8], [7, 7, 1], [9]]
    s = Sampling(max_new_tokens=20)
    assert generate(model, prompts, s, cuda_graphs=True) == generate(model, prompts, s, cuda_graphs=False)
    sampled = Sampling(max_new_tokens=12, temperature=0.8, top_k=20, seed=3)
    assert generate(model, prompts, sampled, cuda_graphs=True) == generate(model, prompts, sampled, cuda_graphs=False)


def test_the_fixed_step_is_refused_where_the_step_changes_shape():
    from mightylm.adapters.prompt import apply_prompt_tuning

    moe = tiny(n_experts=4)
    assert static_decode.take(moe, 1, 16, None) is None  # routing picks experts on the CPU
    dynamic_ntk = tiny(rope_scaling={"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8})
    assert static_decode.take(dynamic_ntk, 1, 16, None) is None  # the RoPE table changes with the length
    assert static_decode.take(dynamic_ntk, 1, 8, None) is not None  # within the trained length it does not
    prompted = tiny()
    apply_prompt_tuning(prompted, n_tokens=4)
    assert static_decode.take(prompted, 1, 16, None) is None
    plain = tiny()
    with pytest.raises(ValueError, match="overflow"):
        StaticDecode(plain, KVCache(plain.config, 1, 16), None)(torch.tensor([3]), 16)


def test_a_model_keeps_its_decoder_until_its_layout_changes():
    from mightylm.adapters.lora import apply_lora
    from mightylm.model import set_rope_scaling

    model = tiny(seed=1)
    first = static_decode.take(model, 2, 40, None)
    assert first.cache.max_len == static_decode.ROUND
    assert static_decode.take(model, 2, 40, None) is not first  # taken: a second generation at once gets its own
    static_decode.give_back(model, first)
    again = static_decode.take(model, 2, 100, torch.tensor([0, 3]))
    assert again is first and again.pad.tolist() == [0, 3]  # same rows and rounded length: kept, new padding
    static_decode.give_back(model, again)
    assert static_decode.take(model, 3, 40, None) is not first  # another batch size
    static_decode.give_back(model, first)
    set_rope_scaling(model, "linear:2")
    assert static_decode.take(model, 2, 40, None) is not first  # other RoPE tables
    model = tiny(seed=1)
    first = static_decode.take(model, 2, 40, None)
    static_decode.give_back(model, first)
    apply_lora(model, r=2)
    assert static_decode.take(model, 2, 40, None) is not first  # new modules: the old graph would not see them


def test_generate_reuses_the_decoder_and_stays_exact():
    """Three generations through one kept decoder (shorter prompts after longer ones leave stale slots behind the
    new prompt; padding changes between calls): each the same tokens as the dynamic step."""
    model = tiny(seed=6, qkv_bias=True)
    s = Sampling(max_new_tokens=9)
    for prompts in ([[5, 17, 42, 99, 3, 8, 1, 2], [7, 7, 1]], [[4, 4], [9, 8, 7, 6, 5]], [[3], [2]]):
        assert generate(model, prompts, s, cuda_graphs=True) == generate(model, prompts, s, cuda_graphs=False)
