"""mightylm.lite: GGUF files decoded by the native kernels over numpy arrays, without torch. Its logits and greedy
tokens against the torch path's on the same files (written with the `gguf` package's writer, as in test_gguf.py),
its sampling against generate.logits_to_probs, and `mighty generate` in a fresh process that never imports torch."""

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from mightylm.generate import Sampling, load_for_generation, logits_to_probs, stream_tokens
from mightylm.kernels import gemv_library

from conftest import make_hf_model
from test_gguf import write_gguf

pytestmark = pytest.mark.skipif(gemv_library() is None, reason="the native kernels are not available here")


def _load_lite(path):
    from mightylm.lite import load_lite

    return load_lite(str(path), log=io.StringIO())


def _logits_side_by_side(lite, model, prompt: list[int], steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The logits after `prompt` and after each of `steps` tokens decoded greedily by the torch model: (lite's, the
    torch model's), each (steps + 1, vocab); both read the same tokens."""
    cache, reference_cache = lite.cache(len(prompt) + steps), model.make_cache(1, len(prompt) + steps)
    ours = [lite.forward(prompt, cache, 0)]
    with torch.inference_mode():
        theirs = [model(torch.tensor([prompt]), cache=reference_cache, start=0, last_only=True)[0, -1].numpy()]
        for step in range(steps):
            token = int(theirs[-1].argmax())
            ours.append(lite.forward([token], cache, len(prompt) + step))
            theirs.append(model(torch.tensor([[token]]), cache=reference_cache, start=len(prompt) + step)[0, -1].numpy())
    return np.stack(ours), np.stack(theirs)


@pytest.mark.parametrize("arch, tied", [("llama", True), ("qwen2", False)], ids=["llama-tied", "qwen2-untied"])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.F16, Q.BF16], ids=lambda q: q.name)
def test_the_lite_path_computes_the_torch_paths_logits(arch, tied, qtype, tmp_path, bpe_tokenizer):
    """A 20-token prompt (two passes of NATIVE_ROWS and 4) and eight decoded tokens: the logits after each equal the
    kept-blocks torch model's (load_for_generation, the native stack) within float32 rounding, and so do the greedy
    tokens; llama's permuted q/k rows, qwen2's q/k/v biases and an untied head included."""
    from mightylm.lite import stream_tokens as lite_tokens

    hf = make_hf_model(arch, vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None, tie_word_embeddings=tied)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", qtype)
    lite, tokenizer = _load_lite(tmp_path / "m.gguf")
    model, _ = load_for_generation(str(tmp_path / "m.gguf"), keep_blocks=True, log=io.StringIO())
    assert model.fused_decode is not None  # the torch path compared with is the native stack
    prompt = torch.randint(0, lite.config.vocab_size, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    ours, theirs = _logits_side_by_side(lite, model, prompt, 8)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))
    s = Sampling(max_new_tokens=12, temperature=0)
    assert list(lite_tokens(lite, prompt, s)) == list(stream_tokens(model, prompt, s))
    with pytest.raises(ValueError, match="KV cache overflow"):
        lite.forward(prompt, lite.cache(10), 0)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0], ids=lambda q: q.name)
def test_int8_activations_on_the_lite_path_are_the_torch_paths_arithmetic(qtype, tmp_path, bpe_tokenizer):
    """With int8 activations every product (the tied head too) runs on tiles, and the logits equal the torch path's
    int8 model's once both read the same RoPE table. (Each computes its table with its own library's cosine, which
    differ in the last bit for ~10 % of entries; rounding activations to 8 bits can amplify that, so on their own
    tables the two can part at near-ties, as both do from llama.cpp.) Greedy tokens, taken from the head's own
    argmax, are the logits' argmax, with prompt lookup too."""
    from mightylm.kernels import Projection
    from mightylm.lite import load_lite, speculative_tokens
    from mightylm.lite import stream_tokens as lite_tokens
    from mightylm.lookup import Lookup
    from mightylm.model import rope_cos_sin

    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", qtype)
    lite, _ = load_lite(str(tmp_path / "m.gguf"), log=io.StringIO(), int8_activations=True)
    model, _ = load_for_generation(str(tmp_path / "m.gguf"), keep_blocks=True, int8_activations=True,
                                   log=io.StringIO())
    assert {b.qkv.kind for b in lite.blocks} == {Projection.GGML_Q8X} and lite.head_layout == "int8"
    cos, sin = rope_cos_sin(model.config, 256)
    lite.cos, lite.sin = cos.numpy().copy(), sin.numpy().copy()
    prompt = torch.randint(0, lite.config.vocab_size, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    ours, theirs = _logits_side_by_side(lite, model, prompt, 6)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # greedy decoding takes each token from the head's own argmax (LiteModel.greedy): the logits' argmax
    greedy = Sampling(max_new_tokens=10, temperature=0)
    cache = lite.cache(30)
    expected = [int(lite.forward(prompt, cache, 0).argmax())]
    for step in range(9):
        expected.append(int(lite.forward(expected[-1:], cache, len(prompt) + step).argmax()))
    assert list(lite_tokens(lite, prompt, greedy)) == expected
    assert list(speculative_tokens(lite, prompt + expected[:6], greedy, Lookup(), 4, every_draft=True)) == \
        list(lite_tokens(lite, prompt + expected[:6], greedy))
    plain, _ = load_lite(str(tmp_path / "m.gguf"), log=io.StringIO())
    assert not np.allclose(plain.forward(prompt, plain.cache(30), 0), ours[0], atol=1e-3)  # the rounding is there


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_the_weights_move_into_one_buffer_after_loading(kernel_path, int8, tmp_path, bpe_tokenizer, monkeypatch):
    """Every weight the model copied (tiles or fields, the tied head's too where it is one) lies in one buffer, in
    pass order on 64-byte boundaries, and the logits are those of the weights where loading made them."""
    from mightylm.lite import LiteModel, load_lite

    hf = make_hf_model("qwen2", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)  # (biases: not moved)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", Q.Q4_1)
    packed, _ = load_lite(str(tmp_path / "m.gguf"), log=io.StringIO(), int8_activations=int8)
    monkeypatch.setattr(LiteModel, "_pack_weights", lambda self: None)
    loose, _ = load_lite(str(tmp_path / "m.gguf"), log=io.StringIO(), int8_activations=int8)
    buffer = packed.keep[-1]
    start, end = buffer.ctypes.data, buffer.ctypes.data + buffer.nbytes
    weights = [getattr(b, name).w for b in packed.blocks for name in ("qkv", "o", "gate_up", "down")]
    if packed.head_layout != "stored":  # (a head multiplied as the file stores it is read in place: it stays)
        weights.append(packed.head_weight.ctypes.data)
    assert weights == sorted(weights) and all(start <= w < end and w % 64 == 0 for w in weights)
    assert not any(start <= getattr(b, name).w < end for b in loose.blocks for name in ("qkv", "o", "gate_up", "down"))
    prompt = torch.randint(0, packed.config.vocab_size, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    np.testing.assert_array_equal(packed.forward_rows(prompt[:9], packed.cache(20), 0),
                                  loose.forward_rows(prompt[:9], loose.cache(20), 0))


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=0.7), dict(temperature=1.3, top_k=5),
                                      dict(temperature=0.9, top_p=0.6), dict(temperature=1.0, top_k=12, top_p=0.8)],
                         ids=["greedy", "temperature", "top-k", "top-p", "top-k-and-top-p"])
def test_lite_sampling_draws_from_the_distribution_logits_to_probs_gives(settings):
    """The numpy rule equals generate.logits_to_probs (temperature, then top-k, then top-p), and draws follow it:
    tokens outside it never come, frequencies sit within 6 standard errors of it, the same seed repeats them."""
    from mightylm.lite import draw, probabilities

    s = Sampling(**settings)
    logits = np.random.default_rng(0).normal(0, 2, 50).astype(np.float32)
    probs = probabilities(logits, s)
    np.testing.assert_allclose(probs, logits_to_probs(torch.from_numpy(logits)[None], s)[0].numpy(), atol=1e-6)
    n = 20_000
    draws = np.array([draw(probs, np.random.default_rng(7)) for _ in range(3)] +
                     [draw(probs, rng) for rng in [np.random.default_rng(1)] for _ in range(n)])
    assert len(set(draws[:3].tolist())) == 1  # the same seed, the same token
    counts = np.bincount(draws[3:], minlength=len(probs)) / n
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(probs))
    assert np.all(np.abs(counts - probs) <= 6 * np.sqrt(probs * (1 - probs) / n) + 1e-9)


def test_speculative_decoding_on_the_lite_path(tmp_path, bpe_tokenizer):
    """Prompt lookup (with and without a history of an earlier answer) on the lite path: greedy, the tokens of plain
    decoding with drafts taken and accepted, and a pass over several rows gives each row the logits one-row passes
    give; sampled with a seed, the same text twice and tokens within the rule's reach."""
    from mightylm.lite import speculative_tokens
    from mightylm.lite import stream_tokens as lite_tokens
    from mightylm.lookup import History, Lookup, Stats

    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", Q.Q8_0)
    lite, tokenizer = _load_lite(tmp_path / "m.gguf")
    prompt = tokenizer.encode("the cat sat on the mat, the cat sat on the")
    greedy = Sampling(max_new_tokens=24, temperature=0)
    plain = list(lite_tokens(lite, prompt, greedy))
    history = History()
    history.add(list(lite_tokens(lite, tokenizer.encode("a dog"), greedy)) + plain[:12])
    for lookup in (Lookup(), Lookup(history=history)):
        for gamma in (1, 4):
            for every_draft in (False, True):  # the widths chosen from timing, or every draft (counts to assert)
                stats = Stats()
                assert list(speculative_tokens(lite, prompt, greedy, lookup, gamma, stats, every_draft=every_draft)
                            ) == plain
                assert stats.tokens == len(plain)
            assert stats.target_passes < len(plain) - 1 and stats.drafted > 0 and stats.accepted > 0
    ids = plain[:5]
    cache, one_cache = lite.cache(len(prompt) + 8), lite.cache(len(prompt) + 8)
    lite.forward(prompt, cache, 0), lite.forward(prompt, one_cache, 0)
    rows = lite.forward_rows(ids, cache, len(prompt))
    alone = np.stack([lite.forward([t], one_cache, len(prompt) + i) for i, t in enumerate(ids)])
    np.testing.assert_allclose(rows, alone, rtol=1e-5, atol=1e-5)
    stats, every = Stats(), Stats()
    for seed in range(3):  # sampled with a seed: plain decoding's text, however much is drafted and accepted
        sampled = Sampling(max_new_tokens=24, temperature=0.3, top_k=8, seed=seed)
        text = list(lite_tokens(lite, prompt, sampled))
        assert list(speculative_tokens(lite, prompt, sampled, Lookup(history=history), 4, stats)) == text
        assert list(speculative_tokens(lite, prompt, sampled, Lookup(), 4, every, every_draft=True)) == text
        assert len(text) == 24
    assert every.drafted > 0 and every.accepted > 0


def test_the_lite_loop_stops_checking_drafts_that_do_not_pay(tmp_path, bpe_tokenizer):
    """Where a pass over more rows costs what that many one-row passes cost, no draft pays for its rows: the loop
    checks only a whole draft every RECHECK_EVERY cut ones (and the text stays plain decoding's); where extra rows
    are nearly free, every draft is checked whole."""
    from mightylm.draft_width import RECHECK_EVERY, PassCost
    from mightylm.lite import speculative_tokens
    from mightylm.lite import stream_tokens as lite_tokens
    from mightylm.lookup import Lookup, Stats

    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", Q.Q8_0)
    lite, tokenizer = _load_lite(tmp_path / "m.gguf")
    prompt = tokenizer.encode("the cat sat on the mat, " * 6)
    greedy = Sampling(max_new_tokens=60, temperature=0)
    plain = list(lite_tokens(lite, prompt, greedy))
    every, chosen = Stats(), Stats()
    assert list(speculative_tokens(lite, prompt, greedy, Lookup(), 4, every, every_draft=True)) == plain

    class Fixed(PassCost):  # the pass times the loop measures are replaced by these, whatever it observes
        def __init__(self, extra_row: float):
            super().__init__()
            self.extra_row = extra_row

        def observe(self, rows, seconds):
            super().observe(rows, 1 + self.extra_row * (rows - 1))

    lite.pass_cost = Fixed(1.0)
    lite.pass_cost.observe(1, 0), lite.pass_cost.observe(3, 0)
    assert list(speculative_tokens(lite, prompt, greedy, Lookup(), 4, chosen)) == plain
    assert every.drafted >= 20 and 0 < chosen.drafted <= 4 * (chosen.target_passes // (RECHECK_EVERY + 1) + 1)
    lite.pass_cost = Fixed(0.01)
    lite.pass_cost.observe(1, 0), lite.pass_cost.observe(3, 0)
    cheap = Stats()
    assert list(speculative_tokens(lite, prompt, greedy, Lookup(), 4, cheap)) == plain
    assert cheap.drafted == every.drafted and cheap.target_passes == every.target_passes


@pytest.mark.parametrize("qtype, int8", [(Q.Q8_0, True), (Q.Q8_0, False), (Q.Q5_0, False), (Q.Q6_K, False),
                                         (Q.F16, False)], ids=["Q8_0-int8", "Q8_0", "Q5_0", "Q6_K", "F16"])
def test_a_pass_gives_each_row_the_bits_it_gets_alone(kernel_path, qtype, int8, tmp_path, bpe_tokenizer):
    """Every product gives a row the bits it gets alone, on each kernel path, in llama.cpp's arithmetic (int8
    activations) and in float32's (the int24 tiles, and the stored blocks and our layouts that float32 keeps for
    Q8_0 and Q5_0 on AVX2 and for Q6_K and F16 everywhere: each several-row loop sums every row as the one-row loop
    does), and so does attention (its stretches of 128 slots sit at fixed places). Past 128 positions a 5-row pass
    equals five one-row passes bit for bit, a prompt read in two parts gives the logits of reading it whole, and
    greedy prompt lookup reproduces plain decoding token for token by construction, not by rounding luck (a first
    version of kernels/attention.c sized its stretches by the pass and tipped an int8 near-tie on the embedded model;
    Q4_K's several-row loop did on Qwen2.5-Coder's Q4_K_M)."""
    from mightylm.lite import load_lite, speculative_tokens
    from mightylm.lite import stream_tokens as lite_tokens
    from mightylm.lookup import Lookup

    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None,
                       **({"hidden_size": 256, "intermediate_size": 512} if qtype == Q.Q6_K else {}))  # 256: its unit
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", qtype)
    lite, tokenizer = load_lite(str(tmp_path / "m.gguf"), log=io.StringIO(), int8_activations=int8)
    prompt = tokenizer.encode("the cat sat on the mat, and the dog lay by the door; " * 12)[:150]
    assert len(prompt) == 150
    ids = prompt[-5:]
    cache, one_cache, parts = (lite.cache(len(prompt) + 8) for _ in range(3))
    whole = lite.forward(prompt, cache, 0)
    lite.forward(prompt, one_cache, 0)
    rows = lite.forward_rows(ids, cache, len(prompt))
    alone = np.stack([lite.forward([t], one_cache, len(prompt) + i) for i, t in enumerate(ids)])
    assert np.array_equal(rows, alone)
    lite.forward(prompt[:97], parts, 0)  # a prompt read in two parts (a chat Session's turns): other passes of 16
    assert np.array_equal(lite.forward(prompt[97:], parts, 97), whole)
    greedy = Sampling(max_new_tokens=24, temperature=0)
    assert list(speculative_tokens(lite, prompt, greedy, Lookup(), 4)) == list(lite_tokens(lite, prompt, greedy))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype, int8", [(Q.Q8_0, True), (Q.Q4_1, True), (Q.Q4_1, False), (Q.Q8_0, False)],
                         ids=["Q8_0-int8", "Q4_1-int8", "Q4_1-float", "Q8_0-float"])
def test_one_region_for_all_blocks_gives_the_bits_of_block_by_block(kernel_path, arch, qtype, int8, tmp_path,
                                                                     bpe_tokenizer):
    """With every product in the tiles, a pass of two threads runs all its blocks in one parallel region
    (kernels/gemv.c's blocks_in_region: the rounding, norms, RoPE, SwiGLU and residual adds shared by the threads, a
    barrier between steps); one thread runs block by block (mighty_decode_block). A prompt's passes of 16 and 4
    rows, a 5-row pass and single rows give the same logits bit for bit, in llama.cpp's arithmetic and in float32's
    (the 24-bit tiles; Q8_0 on AVX2 multiplies in our float layout, block by block), qwen2's biases and untied head
    included, on each kernel path (AVX2's loops read the rows in
    another order, which the region's rounding writes in place)."""
    from mightylm.lite import load_lite

    hf = make_hf_model(arch, vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", qtype)
    lite, tokenizer = load_lite(str(tmp_path / "m.gguf"), log=io.StringIO(), int8_activations=int8)
    n = lite.config.n_layers
    tiles = int8 or qtype != Q.Q8_0 or kernel_path == "avx512"  # (float32 keeps Q8_0 in our layout on AVX2)
    assert lite.lib.mighty_one_region(lite.args, n, None, 2) == tiles  # the region is taken with two threads
    assert lite.lib.mighty_one_region(lite.args, n, None, 1) == 0  # and not with one
    prompt = tokenizer.encode("the cat sat on the mat, and the dog lay by the door; " * 3)[:20]
    logits = {}
    for threads in (2, 1):
        lite.threads = threads
        cache = lite.cache(32)
        logits[threads] = [lite.forward(prompt, cache, 0), lite.forward_rows(prompt[3:8], cache, 20)]
        logits[threads] += [lite.forward([t], cache, 25 + i) for i, t in enumerate(prompt[:3])]
    for region, blocks in zip(logits[2], logits[1]):
        assert np.array_equal(region, blocks)


def test_a_chat_session_reads_only_each_turns_new_tokens(tmp_path, bpe_tokenizer):
    """mighty chat sends the whole conversation every turn; on a lite.Session the tokens its cache already holds are
    not read again (the prompt's pass starts where they end, the cache grown with its kept slots copied), and in
    llama.cpp's arithmetic the tokens are those of reading the prompt whole, plain and speculative; a prompt that
    parts from the cache keeps only the common prefix; a generation stopped early leaves what it fed."""
    from mightylm.lite import Session, load_lite, speculative_tokens
    from mightylm.lite import stream_tokens as lite_tokens
    from mightylm.lookup import Lookup

    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", Q.Q8_0)
    lite, tokenizer = load_lite(str(tmp_path / "m.gguf"), log=io.StringIO(), int8_activations=True)
    greedy = Sampling(max_new_tokens=8, temperature=0)
    session, read = Session(lite), []
    hidden = lite.hidden
    lite.hidden = lambda ids, cache, start: read.append((start, len(ids))) or hidden(ids, cache, start)
    first = tokenizer.encode("the cat sat on the mat")
    reply = list(lite_tokens(lite, first, greedy, session=session))
    assert session.ids == first + reply[:-1] and read[0] == (0, len(first))
    second = first + reply + tokenizer.encode(" and then the dog came in through the door")
    read.clear()
    again = list(lite_tokens(lite, second, greedy, session=session))
    assert session.reused == len(first) + len(reply) - 1 and read[0] == (session.reused, len(second) - session.reused)
    assert session.cache.length >= len(second) + 8  # grown from the first turn's
    lite.hidden = hidden
    assert again == list(lite_tokens(lite, second, greedy))  # as if read whole
    third = second[:5] + tokenizer.encode(" a bird")  # parts from the cache at token 5
    assert list(speculative_tokens(lite, third, greedy, Lookup(), 4, session=session)) == \
        list(lite_tokens(lite, third, greedy))
    assert session.reused == 5
    stopped = lite_tokens(lite, second, greedy, session=session)
    taken = [next(stopped) for _ in range(3)]
    stopped.close()
    assert session.ids == second + taken[:2]
    context = lite.config.max_seq_len  # growing by doubling stops at the context
    session.cache = lite.cache(context * 3 // 4)
    session.start(second, context * 3 // 4 + 1)
    assert session.cache.length == context


def test_mighty_chat_on_the_lite_path_keeps_its_cache_between_turns(tmp_path, bpe_tokenizer):
    """`mighty chat` on a GGUF file: each turn after the first reads only its new tokens (the stats line says how many
    came from the cache), and the replies are those of `--engine torch` (its own generate.Session)."""
    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", Q.Q8_0)
    outs = {}
    for engine in ("auto", "torch"):
        result = subprocess.run([sys.executable, "-m", "mightylm.cli", "chat", "--model", str(tmp_path / "m.gguf"),
                                 "--temperature", "0", "--max-new-tokens", "8", "--stats", "true", "--engine", engine],
                                input="hello there\nand the cat\nagain\n", capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        outs[engine] = result
    assert outs["auto"].stdout == outs["torch"].stdout and outs["auto"].stdout.count("assistant>") == 3
    reused = [int(line.split()[2]) for line in outs["auto"].stderr.splitlines() if "were in the cache" in line]
    assert len(reused) == 3 and reused[0] == 0 and 0 < reused[1] < reused[2]


def test_the_copied_draft_rule_keeps_the_target_distribution():
    """lite.accept_copied: with a drafted token x (q one-hot at x) the next token is distributed as p, whatever x
    is (accepted with p(x), else drawn from p without x); the bonus token after full acceptance comes from the
    next row. 40,000 draws per case within 6 standard errors of p, x accepted as often as p(x), and with top-k
    applied no token outside the k. p(x) = 1: always accepted, then the bonus row's draw."""
    from mightylm.lite import accept_copied, probabilities

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10)).astype(np.float32)
    rows = np.log(np.stack([p, rng.dirichlet(np.ones(10)).astype(np.float32)]))  # logits whose softmax is p
    n = 40_000
    for settings in (Sampling(temperature=1.0), Sampling(temperature=1.0, top_k=4)):
        target = probabilities(rows[0], settings)
        for x in (int(p.argmax()), int(p.argmin())):
            tokens, accepted = [], 0
            for _ in range(n):
                k, nxt = accept_copied(rows, settings, [x], rng)
                tokens.append(x if k == 1 else nxt)
                accepted += k
            counts = np.bincount(tokens, minlength=10) / n
            assert np.all(np.abs(counts - target) <= 6 * np.sqrt(target * (1 - target) / n) + 1e-9), (x, counts)
            assert abs(accepted / n - target[x]) <= 6 * np.sqrt(target[x] * (1 - target[x]) / n) + 1e-9
    sure = np.log(np.stack([np.eye(10)[3], p]).astype(np.float32))
    assert accept_copied(sure, Sampling(temperature=1.0), [3], rng)[0] == 1


def _generate(path, *options) -> subprocess.CompletedProcess:
    """`mighty generate` in a fresh process, reporting whether torch was imported."""
    code = ("import sys\nfrom mightylm.cli import main\n"
            f"code = main(['generate', '--model', {str(path)!r}, '--prompt', 'the cat', '--max-new-tokens', '12', "
            f"'--temperature', '0', '--stats', 'true', *{list(options)!r}])\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)\nsys.exit(code)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_mighty_generate_on_a_gguf_file_never_imports_torch(tmp_path, bpe_tokenizer):
    """`mighty generate` (engine auto) decodes a kept GGUF file without importing torch, and prints what
    `--engine torch` prints; the stats line is there on both paths."""
    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", Q.Q8_0)
    lite, through_torch = _generate(tmp_path / "m.gguf"), _generate(tmp_path / "m.gguf", "--engine", "torch")
    assert lite.returncode == 0 and through_torch.returncode == 0, lite.stderr + through_torch.stderr
    assert "no torch" in lite.stderr and "without torch" in lite.stderr and "decode:" in lite.stderr
    assert "torch imported" in through_torch.stderr
    assert lite.stdout == through_torch.stdout and lite.stdout.strip()
    history = tmp_path / "answers.txt"
    for n in (1, 2):  # prompt lookup, with a history file: still no torch, the same text, the answer appended
        speculative = _generate(tmp_path / "m.gguf", "--draft", "prompt-lookup", "--lookup_history", str(history))
        assert speculative.returncode == 0, speculative.stderr
        assert "no torch" in speculative.stderr and "tokens per target pass" in speculative.stderr
        assert speculative.stdout == lite.stdout and history.read_text().count("\n\n\n") == n
    wide = _generate(tmp_path / "m.gguf", "--draft", "prompt-lookup", "--gamma", "16")  # past a lite pass: torch
    assert wide.returncode == 0 and "torch imported" in wide.stderr and wide.stdout == lite.stdout, wide.stderr


def test_files_the_native_blocks_cannot_run_go_through_torch(tmp_path, bpe_tokenizer, capsys):
    """A file with products in a type the native block does not keep (F32 here) is refused with the reason, and
    `mighty generate` then decodes it through torch; a model directory is not a GGUF file at all."""
    from mightylm.cli import main
    from mightylm.lite import load_lite

    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", Q.F32)
    log = io.StringIO()
    assert load_lite(str(tmp_path / "m.gguf"), log=log) is None
    assert "F32" in log.getvalue() and "loading through torch" in log.getvalue()
    assert load_lite(str(tmp_path)) is None and load_lite(str(tmp_path / "missing.gguf")) is None
    # a file that lacks one of its model's tensors: the file and the tensor named, not a KeyError
    from mightylm.checkpoint import CheckpointError, gguf_config, gguf_metadata
    from mightylm.kernels import gemv_library
    from mightylm.lite import LiteModel

    write_gguf(hf, bpe_tokenizer, tmp_path / "q8.gguf", Q.Q8_0)
    file, meta = gguf_metadata(tmp_path / "q8.gguf")
    file.tensors = [t for t in file.tensors if t.name != "blk.1.ffn_norm.weight"]
    with pytest.raises(CheckpointError, match=r"q8.gguf: missing tensor 'blk.1.ffn_norm.weight'"):
        LiteModel(tmp_path / "q8.gguf", file, gguf_config(meta, file, source=tmp_path / "q8.gguf"), gemv_library())
    assert main(["generate", "--model", str(tmp_path / "m.gguf"), "--prompt", "the", "--max-new-tokens", "3",
                 "--temperature", "0"]) == 0
    assert "loading through torch" in capsys.readouterr().err


def test_a_float16_cache_on_the_lite_path(tmp_path, bpe_tokenizer):
    """kv_cache="float16" keeps the keys and values as float16 (half the bytes, as llama.cpp's default cache): the
    logits after a 20-token prompt (two passes) and eight decoded tokens are the float32 cache's within float16's
    rounding of the keys and values, with the same greedy tokens; another type is refused, and `mighty generate
    --kv_cache float16` where the model must go through torch says why instead of ignoring it."""
    from mightylm.errors import UsageError
    from mightylm.lite import load_lite
    from mightylm.lite import stream_tokens as lite_tokens

    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", Q.Q8_0)
    full, _ = load_lite(str(tmp_path / "m.gguf"), log=io.StringIO())
    half, _ = load_lite(str(tmp_path / "m.gguf"), log=io.StringIO(), kv_cache="float16")
    small, large = half.cache(28), full.cache(28)
    assert small.keys[0].dtype == np.float16 and 2 * small.keys[0].nbytes == large.keys[0].nbytes
    prompt = torch.randint(0, full.config.vocab_size, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    ours, theirs = [half.forward(prompt, small, 0)], [full.forward(prompt, large, 0)]
    for step in range(8):
        token = int(theirs[-1].argmax())
        ours.append(half.forward([token], small, len(prompt) + step))
        theirs.append(full.forward([token], large, len(prompt) + step))
    ours, theirs = np.stack(ours), np.stack(theirs)
    assert 0 < np.abs(ours - theirs).max() < 5e-4 * np.abs(theirs).max()  # rounded (here ~4e-5 of the scale)
    s = Sampling(max_new_tokens=12, temperature=0)
    assert list(lite_tokens(half, prompt, s)) == list(lite_tokens(full, prompt, s))
    with pytest.raises(UsageError, match="float8"):
        load_lite(str(tmp_path / "m.gguf"), log=io.StringIO(), kv_cache="float8")
    refused = _generate(tmp_path / "m.gguf", "--kv_cache", "float16", "--engine", "torch")
    assert refused.returncode != 0 and "torch-free path" in refused.stderr
    assert _generate(tmp_path / "m.gguf", "--kv_cache", "float16").returncode == 0
