import pytest
import torch

from mightylm.config import ModelConfig
from mightylm.generate import Sampling, generate, sample, stream_text
from mightylm.model import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=320)).eval()


def test_batched_generation_equals_one_by_one(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [4] * 13, [300]]
    s = Sampling(max_new_tokens=16)
    assert generate(model, prompts, s) == [generate(model, [p], s)[0] for p in prompts]


def test_sampling_is_seeded_and_batch_independent(model):
    s = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    a = generate(model, [[1, 2, 3]], s)
    assert a == generate(model, [[1, 2, 3]], s)
    assert a != generate(model, [[1, 2, 3]], Sampling(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=8))


def test_top_k_one_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, [[5, 6, 7]], Sampling(max_new_tokens=10))
    assert generate(model, [[5, 6, 7]], Sampling(max_new_tokens=10, temperature=2.0, top_k=1, seed=0)) == greedy
    assert generate(model, [[5, 6, 7]], Sampling(max_new_tokens=10, temperature=2.0, top_p=1e-6, seed=0)) == greedy


def test_top_k_restricts_support():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, Sampling(temperature=5.0, top_k=2), g)) for _ in range(200)}
    assert draws == {2, 3}
    draws = {int(sample(logits, Sampling(temperature=1.0, top_p=0.7), g)) for _ in range(200)}
    assert draws == {2, 3}  # p = [.03, .09, .24, .64]: 0.64 < 0.7 so the nucleus needs token 2 too


def test_stop_tokens_end_each_row(model):
    free = generate(model, [[1, 2], [3, 4, 5]], Sampling(max_new_tokens=12))
    stop = free[0][3]
    out = generate(model, [[1, 2], [3, 4, 5]], Sampling(max_new_tokens=12, stop_token_ids=(stop,)))
    assert out[0] == free[0][: free[0].index(stop) + 1]
    assert out[1] == (free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1])


def test_stream_text_equals_decoded_generation_and_honours_stop_strings(model, bpe_tokenizer):
    ids = bpe_tokenizer.encode("To be, or not")
    s = Sampling(max_new_tokens=30, stop_token_ids=(-1,))
    full = bpe_tokenizer.decode(generate(model, [ids], s)[0])
    streamed = "".join(stream_text(model, bpe_tokenizer, ids, s))
    assert streamed == full
    cut = full[5:8]
    stopped = "".join(stream_text(model, bpe_tokenizer, ids, Sampling(**{**s.__dict__, "stop": (cut,)})))
    assert stopped == full[: full.index(cut)]


def test_bad_settings_and_overflow(model):
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sampling(max_new_tokens=-1)
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        generate(model, [[1] * 200], Sampling(max_new_tokens=100))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], Sampling())
    assert generate(model, [[1, 2]], Sampling(max_new_tokens=0)) == [[]]
