"""Speculative decoding: the exact rule keeps the target's distribution (statistically, vLLM's protocol), greedy
speculation equals plain greedy decoding token for token for every draft kind (with LoRA on the target too), and
bad input is refused."""

import re

import pytest
import torch

import conftest
from mightylm.errors import UsageError
from mightylm.generate import Sampling, generate, logits_to_probs
from mightylm.speculative import (DraftModel, History, PromptLookup, Stats, accept, check_draft, make_draft, self_draft,
                                  speculative_tokens)


def first_tokens(p, q, n, seed=0):
    """n independent runs of the rule with one drafted token x ~ q: the first emitted token of each."""
    g = torch.Generator().manual_seed(seed)
    x = torch.multinomial(q, n, replacement=True, generator=g)  # (n,)
    P = p[None, None].expand(n, 2, -1)
    Q = q[None, None].expand(n, 1, -1)
    accepted, resampled = accept(P, Q, x[:, None], g)
    return torch.where(accepted > 0, x, resampled)


def l1(counts, dist):
    return (counts / counts.sum() - dist).abs().sum().item()


def chi_square_p(counts, dist):
    expected = dist * counts.sum()
    keep = expected > 0
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat.double() / 2))


@pytest.mark.parametrize("settings", [
    Sampling(temperature=1.0), Sampling(temperature=0.7), Sampling(temperature=1.3, top_k=6),
    Sampling(temperature=1.0, top_p=0.8), "same"])
def test_the_rule_samples_the_targets_distribution(settings):
    """vLLM's protocol: vocabulary 10, random draft and target distributions; the empirical distribution of what
    the rule emits approaches the target's (its distance shrinks ~10x from 1,000 to 100,000 draws) and stays far
    from random references, and a chi-square test does not reject."""
    g = torch.Generator().manual_seed(1)
    s = Sampling(temperature=1.0) if settings == "same" else settings
    p = logits_to_probs(torch.randn(1, 10, generator=g) * 2, s)[0]
    q = p.clone() if settings == "same" else logits_to_probs(torch.randn(1, 10, generator=g) * 2, s)[0]
    refs = [torch.distributions.Dirichlet(torch.ones(10)).sample() for _ in range(5)]
    small = torch.bincount(first_tokens(p, q, 1_000), minlength=10).float()
    large = torch.bincount(first_tokens(p, q, 100_000, seed=2), minlength=10).float()
    assert l1(large, p) < l1(small, p) / 3
    assert l1(large, p) * 20 < min(l1(large, r) for r in refs)
    assert chi_square_p(large, p) > 1e-3
    # and a rule that always accepted the draft would follow q instead: the test can tell
    if settings != "same":
        draws = torch.multinomial(q, 100_000, replacement=True, generator=torch.Generator().manual_seed(3))
        assert chi_square_p(torch.bincount(draws, minlength=10).float(), p) < 1e-6


def test_the_rule_on_hand_built_cases():
    p = torch.tensor([[[0.0, 0.6, 0.4], [0.0, 0.6, 0.4], [0.0, 0.0, 1.0]]])  # (1, 3, V)
    q = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # (1, 2, V)
    # token 1: p/q = 0.6; token 2: p/q = 0.4
    counts = torch.zeros(3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        n, nxt = accept(p, q, torch.tensor([[1, 2]]), g)
        counts[n] += 1
    assert counts[0] / 2000 == pytest.approx(0.4, abs=0.04)  # first rejected: residual max(0, p - q) = token 2
    assert counts[2] / 2000 == pytest.approx(0.24, abs=0.04)  # both accepted: bonus from p[2] = token 2
    n, nxt = accept(p, q, torch.tensor([[0, 2]]), g)  # a draft the target gives 0: always rejected
    assert int(n) == 0 and int(nxt) in (1, 2)
    greedy_p = torch.nn.functional.one_hot(torch.tensor([[1, 2, 0]]), 3).float()
    greedy_q = torch.nn.functional.one_hot(torch.tensor([[1, 1]]), 3).float()
    n, nxt = accept(greedy_p, greedy_q, torch.tensor([[1, 1]]))
    assert (int(n), int(nxt)) == (1, 2)  # accept while the draft equals the argmax, then the target's argmax


def tiny_pair(vocab=96):
    target = conftest.tiny(0, vocab_size=vocab, n_layers=3)
    draft = conftest.tiny(1, vocab_size=vocab, n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64)
    return target, draft


def plain(target, prompt, s):
    return generate(target, [prompt], s)[0]


def earlier_answers(target, s) -> History:
    """The target's greedy answers to two other prompts, as a History."""
    history = History()
    for prompt in ([8, 1, 40, 3], [17, 17, 2, 60, 5]):
        history.add(plain(target, prompt, s))
    return history


@pytest.mark.parametrize("kind", ["model", "target-itself", "prompt-lookup", "prompt-lookup+history", "layers"])
@pytest.mark.parametrize("gamma,adaptive", [(1, False), (4, False), (3, True)])
def test_greedy_speculation_equals_plain_greedy(kind, gamma, adaptive):
    target, small = tiny_pair()
    prompt = [5, 9, 30, 7, 11, 5, 9, 30, 2]
    s = Sampling(max_new_tokens=24, temperature=0)
    draft = {"model": lambda: DraftModel(small), "target-itself": lambda: DraftModel(target),
             "prompt-lookup": lambda: PromptLookup(),
             "prompt-lookup+history": lambda: PromptLookup(history=earlier_answers(target, s)),
             "layers": lambda: self_draft(target, 1)}[kind]()
    stats = Stats()
    got = list(speculative_tokens(target, prompt, s, draft, gamma, adaptive=adaptive, stats=stats))
    assert got == plain(target, prompt, s)
    assert stats.tokens == 24 and stats.target_passes < 24 or kind != "target-itself"
    if kind == "target-itself":
        assert stats.acceptance == 1.0
    if kind == "prompt-lookup+history":  # the history drafted where the prompt had no match, and some was right
        lookup_alone, with_history = Stats(), Stats()  # (every draft checked: counts that do not depend on timing)
        list(speculative_tokens(target, prompt, s, PromptLookup(), gamma, adaptive=adaptive,
                                stats=lookup_alone, every_draft=True))
        assert list(speculative_tokens(target, prompt, s, draft, gamma, adaptive=adaptive, stats=with_history,
                                       every_draft=True)) == got
        assert with_history.drafted > lookup_alone.drafted and with_history.accepted > lookup_alone.accepted


@pytest.mark.parametrize("history", [False, True])
def test_seeded_sampled_prompt_lookup_gives_plain_decodings_text(history):
    """accept_copied draws each token as plain decoding draws it, so a seed gives plain decoding's text, with the
    widths chosen and with every draft checked; drafts were accepted (the draws agreed with them)."""
    target, _ = tiny_pair()
    with torch.no_grad():
        target.lm_head.weight.mul_(30)  # peaked distributions: text that repeats itself, so lookup finds drafts
    prompt = [5, 9, 30, 7, 11, 5, 9, 30, 7, 11, 5, 9]
    for seed in range(3):
        s = Sampling(max_new_tokens=32, temperature=0.3, top_k=8, seed=seed)
        draft = lambda: PromptLookup(history=earlier_answers(target, Sampling(temperature=0)) if history else None)
        chosen, every, text = Stats(), Stats(), plain(target, prompt, s)
        assert list(speculative_tokens(target, prompt, s, draft(), 4, stats=chosen)) == text
        assert list(speculative_tokens(target, prompt, s, draft(), 4, stats=every, every_draft=True)) == text
        assert every.accepted > 0


def test_history_drafts_what_followed_the_longest_context_most_often():
    history = History(max_order=3)
    history.add([1, 2, 3, 4, 5])
    history.add([9, 2, 3, 7, 5, 6])
    history.add([8, 3, 7, 1])
    assert history.tokens == 15
    assert history.follows[(2, 3)] == {4: 1, 7: 1} and history.follows[(3,)] == {4: 1, 7: 2}
    assert (5, 9) not in history.follows  # contexts stay inside one text
    # after [1, 2, 3] only 4 followed: 4, then after [2, 3, 4] 5, then after [3, 4, 5] nothing of order 3 or 2,
    # and [5] was followed by 6 once (of once): 6
    assert history.draft([0, 1, 2, 3], 8) == [4, 5, 6]
    assert history.draft([0, 1, 2, 3], 2) == [4, 5]
    # after [2, 3] (its longest context here): 4 and 7 once each: a tie still counts as half
    assert history.draft([6, 2, 3], 1) in ([4], [7])
    assert history.draft([42], 4) == []  # never seen
    for last in (1, 2, 9):
        history.add([0, 3, last])
    assert history.draft([5, 0, 3], 1) == []  # after [0, 3] (the longest seen) three tokens once each: under half
    history.share = 0.3  # a looser share drafts it: the first of the three, a third each
    assert history.draft([5, 0, 3], 1) == [1]
    history.share = 0.5
    look = PromptLookup(max_ngram=4, history=history)
    greedy = Sampling(temperature=0)
    assert look.propose([4, 7, 1, 2, 4, 7], 4, greedy)[0] == [1, 2]  # the text's own match comes first
    assert look.propose([10, 11, 2, 3, 4], 4, greedy)[0] == [5, 6]  # no match: the history, at most 2 tokens
    assert look.propose([10, 11, 2, 3, 4], 4, Sampling(temperature=0.7)) == ([5, 6], None)  # deterministic: no q


def test_prompt_lookup_copies_after_the_longest_agreement_as_much_as_it_supports():
    greedy, sampled = Sampling(temperature=0), Sampling(temperature=0.7)
    look = PromptLookup(max_ngram=4)
    # ... 1 2 3 -> 10 (agrees on 3 tokens) and later 9 2 3 -> 20 (only on 2): the longer agreement wins
    context = [1, 2, 3, 10, 11, 12, 13, 14, 9, 2, 3, 20, 21, 22, 23, 24, 1, 2, 3]
    assert look.match(context) == (3, 3)
    tokens, q = look.propose(context, 8, greedy)
    assert tokens == [10, 11, 12, 13, 14, 9] and q is None  # 8 * 3 // 4 tokens; greedy needs no distribution
    assert look.propose(context, 8, sampled) == (tokens, None)  # sampled the same (checked by accept_copied)
    # equal agreement: the latest occurrence; a full agreement drafts gamma tokens; two tokens at least one
    assert look.match([5, 6, 7, 8, 1, 5, 6, 7, 8, 2, 5, 6, 7, 8]) == (9, 4)
    assert look.propose([5, 6, 7, 8, 1, 5, 6, 7, 8, 2, 5, 6, 7, 8], 3, greedy)[0] == [2, 5, 6]
    assert look.propose([4, 7, 1, 2, 3, 4, 7], 4, greedy)[0] == [1, 2]  # agrees on 2 of 4: half of gamma
    assert look.propose([4, 7, 1, 2, 3, 4, 7], 1, greedy)[0] == [1]
    assert look.propose([1, 2, 3, 4], 4, greedy) == ([], None)  # nothing repeats
    assert look.propose([3, 1, 2, 3], 4, greedy) == ([], None)  # a single token is not enough (min_ngram 2)


def test_a_drafts_width_pays_for_its_rows():
    """draft_width: a source's acceptance is learnt as runs (its first token, then each later one), and a pass
    checks as many drafted tokens as maximise expected tokens per second of the measured pass cost."""
    from mightylm.draft_width import Acceptance, PassCost, draft_width

    look = PromptLookup(max_ngram=4, history=History())
    context = [1, 2, 3, 10, 11, 12, 13, 14, 9, 2, 3, 20, 21, 22, 23, 24, 1, 2, 3]
    assert look.draft(context, 8) == ([10, 11, 12, 13, 14, 9], 3)  # the source: 3 tokens agree
    look.history.add([7, 8, 9])
    assert look.draft([1, 7], 4) == ([8, 9], "history") and look.draft([1, 5], 4) == ([], None)
    runs = Acceptance()
    assert runs.rates("any") == (0.5, 0.8) and runs.expected("any", 0) == 1  # the prior; no drafts: one token
    for _ in range(30):
        runs.observe("long", 4, 4)  # whole runs accepted
        runs.observe("short", 4, 0)  # never the first token
        runs.observe("half", 4, 1)  # the first token only
    first, later = runs.rates("long")
    assert first > 0.9 and later > 0.9 and runs.expected("long", 4) > 4.5
    assert runs.rates("short")[0] < 0.1 and runs.rates("short")[1] == 0.8  # later tokens never tried: the prior
    assert runs.rates("half")[0] > 0.9 and runs.rates("half")[1] < 0.2
    cheap, costly = PassCost(), PassCost()
    for rows in (1, 2, 5):
        cheap.observe(rows, 1 + 0.1 * (rows - 1))
        costly.observe(rows, 1 + 0.6 * (rows - 1))
    assert cheap.fitted() and not PassCost().fitted()
    assert draft_width(4, "long", runs, cheap) == 4 and draft_width(4, "long", runs, costly) == 4
    assert draft_width(4, "short", runs, cheap) == 0 and draft_width(4, "half", runs, cheap) == 1
    assert draft_width(4, "half", runs, costly) == 1  # 1.9 tokens for 1.6 passes' time
    assert draft_width(4, "any", runs, cheap) == 4 and draft_width(4, "any", runs, costly) == 0
    # a convex cost (rows cheap up to 3, then dear, as on a CPU): each size seen lately is priced by its own passes,
    # where the line through all would put 3 rows at 1.5 and 9 at 3.9 and check all 8 drafts
    convex = PassCost()
    for _ in range(4):
        for rows, seconds in ((1, 1.0), (2, 1.1), (3, 1.2), (9, 4.0)):
            convex.observe(rows, seconds)
    assert convex.predict(3) == pytest.approx(1.2) and convex.predict(9) == pytest.approx(4.0)
    assert 1.2 < convex.predict(5) < 4.0  # a size not seen: the line
    assert draft_width(8, "long", runs, convex) == 2
    for _ in range(300):  # 9 rows not seen for long: the line again, fitted on what was seen since
        convex.observe(1, 1.0)
        convex.observe(2, 1.1)
    assert convex.predict(9) == pytest.approx(1.8, abs=0.05) and convex.predict(2) == pytest.approx(1.1)


def test_greedy_speculation_with_lora_on_the_target_and_stop_tokens():
    from mightylm.adapters.lora import apply_lora

    target, small = tiny_pair()
    apply_lora(target, targets=("q_proj", "v_proj"), r=4)
    with torch.no_grad():
        for name, p in target.named_parameters():
            if "lora_B" in name:
                p.normal_()
    target.eval()
    prompt = [3, 4, 5, 6]
    expected = plain(target, prompt, Sampling(max_new_tokens=20, temperature=0))
    stop = expected[7]
    s = Sampling(max_new_tokens=20, temperature=0, stop_token_ids=(stop,))
    got = list(speculative_tokens(target, prompt, s, DraftModel(small), 4))
    assert got == plain(target, prompt, s) and got[-1] == stop


def test_sampled_speculation_with_the_target_as_draft_accepts_everything():
    target, _ = tiny_pair()
    stats = Stats()
    s = Sampling(max_new_tokens=16, temperature=0.8, top_k=20, seed=3)
    tokens = list(speculative_tokens(target, [1, 2, 3], s, DraftModel(target), 4, stats=stats))
    assert len(tokens) == 16 and stats.acceptance == 1.0
    assert stats.tokens_per_pass > 3


def test_bad_drafts_and_settings():
    target, small = tiny_pair()
    other = conftest.tiny(1, vocab_size=64, n_layers=1)
    with pytest.raises(UsageError, match="vocabulary of 64 tokens and the target 96"):
        check_draft(target, other, "the target", "the draft")
    with pytest.warns(UserWarning, match="not smaller"):
        check_draft(small, target)
    with pytest.raises(UsageError, match="gamma"):
        list(speculative_tokens(target, [1, 2], Sampling(max_new_tokens=4), DraftModel(small), 0))
    with pytest.raises(UsageError, match="n-gram"):
        PromptLookup(max_ngram=0)
    for spec in ("prompt-lookup:1", "prompt-lookup:x"):
        with pytest.raises(UsageError, match=rf"--draft {spec}: .*\(a whole number, at least 2\)"):
            make_draft(spec, target)
    with pytest.raises(UsageError, match="1 <= N < 3"):
        self_draft(target, 3)


def test_mighty_generate_with_a_draft(tmp_path, bpe_tokenizer, capsys):
    import mightylm
    from mightylm.cli import main

    vocab = bpe_tokenizer.vocab_size
    mightylm.save(conftest.tiny(0, vocab_size=vocab, n_layers=3), bpe_tokenizer, tmp_path / "t")
    mightylm.save(conftest.tiny(1, vocab_size=vocab, n_layers=1), bpe_tokenizer, tmp_path / "d")
    outputs = []
    for extra in ([], ["--draft", str(tmp_path / "d")], ["--draft", "prompt-lookup"], ["--draft", "layers:2"]):
        assert main(["generate", "--model", str(tmp_path / "t"), "--prompt", "To be, or not to be", "--temperature",
                     "0", "--max_new_tokens", "12", "--stats", "true", *extra]) == 0
        captured = capsys.readouterr()
        outputs.append(captured.out)
        assert ("tokens per target pass" in captured.err) == bool(extra)
    assert len(set(outputs)) == 1


def test_mighty_generate_with_a_lookup_history(tmp_path, bpe_tokenizer, capsys, monkeypatch):
    """--lookup_history FILE: the same text as without; each answer appended to the file (created when missing),
    later runs read it back and draft from it; without --draft prompt-lookup it is refused, saying what to add."""
    import mightylm
    from mightylm import draft_width
    from mightylm.cli import main

    # every draft checked whole: drafted counts that do not depend on timing
    monkeypatch.setattr(draft_width, "draft_width", lambda drafted, *_: drafted)

    mightylm.save(conftest.tiny(0, vocab_size=bpe_tokenizer.vocab_size, n_layers=3), bpe_tokenizer, tmp_path / "t")
    history = tmp_path / "answers.txt"
    run = ["generate", "--model", str(tmp_path / "t"), "--temperature", "0", "--max_new_tokens", "12", "--stats",
           "true", "--draft", "prompt-lookup"]
    assert main([*run, "--prompt", "To be, or not to be"]) == 0
    plain = capsys.readouterr().out
    counts = []
    for n in (1, 2):
        assert main([*run, "--prompt", "To be, or not to be", "--lookup_history", str(history)]) == 0
        captured = capsys.readouterr()
        assert captured.out == plain and "tokens per target pass" in captured.err
        assert history.read_text() == (plain.strip("\n") + "\n\n\n") * n
        assert ("lookup history: 0 tokens" in captured.err) == (n == 1)  # created empty, then read back
        counts.append([int(v) for v in re.search(r"(\d+) of (\d+) drafted", captured.err).groups()])
    (accepted1, drafted1), (accepted2, drafted2) = counts
    assert drafted2 > drafted1 and accepted2 > accepted1  # the answer read back drafted the same answer again
    assert main(["generate", "--model", str(tmp_path / "t"), "--prompt", "x", "--lookup_history",
                 str(history)]) == 2
    assert "add --draft prompt-lookup" in capsys.readouterr().err
    for bad, said in ((tmp_path, "is a directory"), (tmp_path / "no" / "such.txt", "cannot append to it")):
        assert main([*run, "--prompt", "x", "--lookup_history", str(bad)]) == 2
        assert said in capsys.readouterr().err


def test_mighty_chat_with_a_draft_answers_as_without(tmp_path, bpe_tokenizer):
    import subprocess
    import sys

    import mightylm

    mightylm.save(conftest.tiny(0, vocab_size=bpe_tokenizer.vocab_size, n_layers=3), bpe_tokenizer, tmp_path / "t")
    outs = []
    for extra in ([], ["--draft", "layers:1", "--gamma", "3", "--stats", "true"]):
        result = subprocess.run([sys.executable, "-m", "mightylm.cli", "chat", "--model", str(tmp_path / "t"),
                                 "--temperature", "0", "--max-new-tokens", "8", *extra],
                                input="hello\nagain\n", capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        outs.append(result.stdout)
    assert outs[0] == outs[1] and "tokens per target pass" in result.stderr


def test_greedy_speculation_equals_transformers_assisted_generation(tmp_path):
    """The same target and draft (tiny random Llamas saved by transformers): our speculative greedy tokens equal
    transformers' generate(assistant_model=draft, do_sample=False), and both equal plain greedy decoding."""
    pytest.importorskip("transformers")
    import mightylm

    target_hf = conftest.make_hf_model("llama", vocab_size=128, seed=0, num_hidden_layers=3)
    draft_hf = conftest.make_hf_model("llama", vocab_size=128, seed=1, num_hidden_layers=1)
    target_hf.generation_config.pad_token_id = draft_hf.generation_config.pad_token_id = 0
    target_hf.save_pretrained(tmp_path / "t")
    draft_hf.save_pretrained(tmp_path / "d")
    target, _ = mightylm.load(tmp_path / "t")
    draft, _ = mightylm.load(tmp_path / "d")
    prompt = [5, 9, 30, 7, 11, 5, 9]
    with torch.no_grad():
        theirs = target_hf.generate(torch.tensor([prompt]), assistant_model=draft_hf, do_sample=False,
                                    max_new_tokens=20, min_new_tokens=20)[0, len(prompt):].tolist()
    ours = list(speculative_tokens(target, prompt, Sampling(max_new_tokens=20, temperature=0), DraftModel(draft), 4))
    assert ours == theirs == plain(target, prompt, Sampling(max_new_tokens=20, temperature=0))


def test_a_draft_with_its_own_adapter(tmp_path, bpe_tokenizer, capsys):
    """--draft_adapter puts an adapter on the draft model: the model with a LoRA, drafted for by its own base
    carrying that LoRA, accepts every drafted token; the bare base is accepted less; the text is the same."""
    import re

    import mightylm
    from mightylm.adapters.lora import apply_lora, save_lora
    from mightylm.cli import main

    base = conftest.tiny(0, vocab_size=bpe_tokenizer.vocab_size, n_layers=2)
    mightylm.save(base, bpe_tokenizer, tmp_path / "t")
    apply_lora(base, targets=("q_proj", "v_proj", "down_proj"), r=4)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_lora(base, tmp_path / "lora")
    common = ["generate", "--model", str(tmp_path / "t"), "--adapter", str(tmp_path / "lora"), "--prompt",
              "To be, or not to be", "--temperature", "0", "--max_new_tokens", "16", "--stats", "true"]
    outputs, rates = [], []
    for extra in ([], ["--draft", str(tmp_path / "t")],
                  ["--draft", str(tmp_path / "t"), "--draft_adapter", str(tmp_path / "lora")]):
        assert main(common + extra) == 0
        captured = capsys.readouterr()
        outputs.append(captured.out)
        found = re.search(r"accepted \((\d+)%\)", captured.err)
        rates.append(int(found.group(1)) if found else None)
    assert len(set(outputs)) == 1
    assert rates[2] == 100 and rates[1] < 100
    assert main(common + ["--draft", "prompt-lookup", "--draft_adapter", str(tmp_path / "lora")]) != 0
    assert "--draft_adapter applies to a draft model" in capsys.readouterr().err


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8-activations"])
def test_greedy_speculation_over_kept_gguf_blocks_equals_plain_greedy(int8, tmp_path, bpe_tokenizer,
                                                                        monkeypatch):
    """The decode layout over a GGUF file's kept Q4_1 blocks, as `mighty generate` runs it (and with
    --int8_activations, where a verification pass's rows are each rounded as a decoded token is): prompt lookup's
    verification passes go through the native blocks several rows at once, and the tokens are plain greedy's."""
    from gguf import GGMLQuantizationType

    import mightylm
    from mightylm.compress.gguf_blocks import int8_activations_
    from mightylm.fuse import fuse_projections_
    from test_gguf import make_hf_model, write_gguf

    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", GGMLQuantizationType.Q4_1)
    model, _ = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)
    if int8:
        assert int8_activations_(model)
    fuse_projections_(model)
    rows, native = [], type(model.fused_decode).__call__

    def counting(self, x, *args, **kwargs):  # the rows of each call the native stack took
        y = native(self, x, *args, **kwargs)
        rows.append(x.shape[1] if y is not None else 0)
        return y

    monkeypatch.setattr(type(model.fused_decode), "__call__", counting)
    prompt = [5, 9, 30, 7, 11, 5, 9, 30, 2, 5, 9, 30, 7, 11]
    s = Sampling(max_new_tokens=24, temperature=0)
    stats = Stats()
    with torch.no_grad():
        got = list(speculative_tokens(model, prompt, s, PromptLookup(), 4,
                                      stats=stats))
        assert stats.drafted and any(r > 1 for r in rows)  # verification passes went native, several rows at once
        assert got == plain(model, prompt, s)
