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


def test_sample_is_probabilities_then_a_draw():
    from mightylm.generate import logits_to_probs, sample_from_probs

    logits = torch.randn(3, 50)
    for s in (Sampling(temperature=0.7), Sampling(temperature=1.3, top_k=5), Sampling(temperature=1.0, top_p=0.6)):
        probs = logits_to_probs(logits, s)
        torch.testing.assert_close(probs.sum(-1), torch.ones(3))
        a, b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        assert torch.equal(sample(logits, s, a), sample_from_probs(probs, b))
        if s.top_k:
            assert int((probs[0] > 0).sum()) == 5
    greedy = logits_to_probs(logits, Sampling(temperature=0))
    assert torch.equal(greedy.argmax(-1), logits.argmax(-1)) and torch.equal(greedy.sum(-1), torch.ones(3))


def test_text_stream_holds_back_stop_prefixes_and_cuts_at_stops(bpe_tokenizer):
    from mightylm.streaming import TextStream

    text = "To be, or not to be, that is the question: whether 'tis nobler"
    ids = bpe_tokenizer.encode(text)
    whole = TextStream(bpe_tokenizer)
    assert "".join(whole.push(t) for t in ids) + whole.finish() == text and not whole.stopped
    cut = TextStream(bpe_tokenizer, stop=("that is", "nobler"))
    given = ""
    for t in ids:
        given += cut.push(t)
        assert not given.endswith("that") or cut.stopped  # "that" could begin "that is": held back
        if cut.stopped:
            break
    assert cut.stopped and given == cut.text == "To be, or not to be, " and cut.finish() == ""
    tail = TextStream(bpe_tokenizer, stop=("question?",))  # a prefix of a stop string at the end is given at finish
    assert "".join(tail.push(t) for t in bpe_tokenizer.encode("the question")) + tail.finish() == "the question"


def test_prefill_takes_embeddings():
    from mightylm.config import ModelConfig
    from mightylm.generate import prefill
    from mightylm.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).eval()
    idx = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        by_ids = prefill(model, idx, model.make_cache(2, 16))
        by_embeds = prefill(model, None, model.make_cache(2, 16), embeds=model.embed(idx))
    assert torch.equal(by_ids, by_embeds)


def test_greedy_is_torch_argmax():
    """generate.greedy (numpy's argmax on the CPU, much faster than torch's there) picks what torch.argmax picks:
    the first of equal values, a NaN as the largest, for any number of leading dimensions and strided rows."""
    from mightylm.generate import greedy

    torch.manual_seed(0)
    x = torch.randn(3, 5, 700)
    x[0, 0, 10] = x[0, 0, 20] = 1e4  # a tie: the first
    x[1, 2, 30] = float("nan")  # a NaN wins
    x[2, 4] = 0.0  # all equal: index 0
    for logits in (x, x[0], x[0, 0], x[:, 1:3, ::2], x.to(torch.float64)):
        got = greedy(logits)
        assert got.dtype == torch.int64 and torch.equal(got, logits.argmax(-1))


def test_a_chat_session_reads_only_each_turns_new_tokens():
    """generate.Session (mighty chat through torch): a prompt that begins with tokens the session's cache holds is
    read from where they end, the cache grown with its kept slots (a soft prompt's virtual tokens in front) copied;
    its keys and values are then those of reading the prompt whole. A generation on a cache that does not keep
    every position (attention sinks) reads the prompt whole and leaves the session as it was."""
    import conftest

    from mightylm.adapters.prompt import apply_prompt_tuning
    from mightylm.generate import Session, prefill, stream_tokens

    for soft in (False, True):
        model = conftest.tiny(0)
        if soft:
            apply_prompt_tuning(model, n_tokens=3)
        greedy = Sampling(max_new_tokens=6, temperature=0)
        session, first = Session(model), [5, 9, 30, 7, 11]
        reply = list(stream_tokens(model, first, greedy, session=session))
        assert session.ids == first + reply[:-1] and session.reused == 0
        second = first + reply + [40, 41, 42, 43, 44, 45, 46, 47, 48, 49]
        list(stream_tokens(model, second, greedy, session=session))
        assert session.reused == len(first) + len(reply) - 1
        assert session.cache.max_len >= len(second) + 6 + model.prefix_len  # grown
        whole = model.make_cache(1, len(second))
        with torch.inference_mode():
            prefill(model, torch.tensor([second]), whole)
        end = model.prefix_len + len(second)
        for kept, fresh in zip(session.cache.k + session.cache.v, whole.k + whole.v):
            torch.testing.assert_close(kept[:, :, :end], fresh[:, :, :end], atol=1e-5, rtol=1e-5)
        context = model.config.max_seq_len  # growing by doubling stops at the context
        session.cache = model.make_cache(1, context * 3 // 4)
        session.start(second, context * 3 // 4 + 1)
        assert session.cache.max_len == context + model.prefix_len
    held = list(session.ids)
    sinks = Sampling(max_new_tokens=4, temperature=0, attention_sinks=(64, 4))
    plain = conftest.tiny(0)
    skipped = Session(plain)
    list(stream_tokens(plain, second, sinks, session=skipped))
    assert skipped.ids == [] and skipped.cache is None and session.ids == held
