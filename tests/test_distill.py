"""Distillation: the divergences against TRL's generalized_jsd_loss and transcriptions of their definitions, the
chunked loss against the unchunked one, the offline top-k cache against the teacher restricted to the same k,
vocabulary checks, the loss_fn on the one training loop, `mighty distill` end to end, bad input."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import conftest
import mightylm
from mightylm.compress.distill import (DistillationError, Distiller, check_settings, check_vocabularies,
                                       divergence, teacher_top_k)
from mightylm.compress.teacher_cache import TeacherCache, WithTeacher
from mightylm.data.loader import Loader, collate


def logits(seed, shape=(2, 6, 40), scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def labels_for(shape=(2, 6)):
    labels = torch.randint(0, 40, shape, generator=torch.Generator().manual_seed(9))
    labels[0, :2] = -100
    return labels


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_equals_trl(beta, temperature):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer", reason="trl is the reference (test extra)")
    s, t, labels = logits(0), logits(1), labels_for()
    ref = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=temperature)
    m = labels != -100
    ours = divergence(F.log_softmax(s[m] / temperature, -1), F.log_softmax(t[m] / temperature, -1), "jsd",
                      beta=beta).mean()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def transcribed(loss, q, p, beta=0.5, skew=0.1):
    """The definitions written out in probabilities (DistiLLM eqs. 4-5 for the skews, GKD eq. 1 for JSD)."""
    kl = lambda a, b: (a * (a / b).log()).sum(-1)
    return {"fkl": lambda: kl(p, q), "rkl": lambda: kl(q, p), "skl": lambda: kl(p, skew * p + (1 - skew) * q),
            "srkl": lambda: kl(q, skew * q + (1 - skew) * p),
            "jsd": lambda: beta * kl(p, beta * p + (1 - beta) * q) + (1 - beta) * kl(q, beta * p + (1 - beta) * q)}[loss]()


@pytest.mark.parametrize("loss", ["fkl", "rkl", "skl", "srkl", "jsd"])
def test_divergences_equal_their_definitions(loss):
    q, p = logits(0).flatten(0, 1).double().softmax(-1), logits(1).flatten(0, 1).double().softmax(-1)
    torch.testing.assert_close(divergence(q.log(), p.log(), loss), transcribed(loss, q, p))
    assert (divergence(q.log(), q.log(), loss).abs() < 1e-12).all()  # zero at q = p


def test_forward_kl_is_cross_entropy_minus_teacher_entropy():
    q, p = logits(0).flatten(0, 1).softmax(-1), logits(1).flatten(0, 1).softmax(-1)
    ce = -(p * q.log()).sum(-1)
    entropy = -(p * p.log()).sum(-1)
    torch.testing.assert_close(divergence(q.log(), p.log(), "fkl"), ce - entropy, rtol=1e-5, atol=1e-5)


def test_a_probability_that_underflowed_gives_no_nan():
    lq = torch.tensor([[0.0, -math.inf]]).requires_grad_()
    lp = torch.tensor([[-math.inf, 0.0]])
    for loss in ("fkl", "rkl", "skl", "srkl", "jsd"):
        value = divergence(lq.log_softmax(-1), lp, loss).sum()
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(lq.grad).all()


def models(vocab=64):
    teacher = conftest.tiny(1, vocab_size=vocab, n_layers=2)
    student = conftest.tiny(2, vocab_size=vocab, n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64)
    return teacher, student


def batch(vocab=64, B=3, T=10, seed=0):
    ids = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    labels = ids[:, 1:].clone()
    labels[0, :3] = -100
    return {"input_ids": ids[:, :-1], "labels": labels}


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd"])
def test_chunked_equals_unchunked_in_value_and_gradient(loss):
    teacher, student = models()
    student.train()
    grads = []
    for chunk_rows in (None, 4):
        student.zero_grad()
        d = Distiller(teacher, loss=loss, temperature=2.0, kd_ratio=1.0, chunk_rows=chunk_rows or 10**6)
        value, parts = d(student, batch())
        value.backward()
        grads.append((value.detach(), student.lm_head.weight.grad.clone(), student.embed.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_one_pass_head_loss_equals_ce_plus_the_checkpointed_kd():
    """A plain head takes CE and KD from one head product with their gradients in the same pass; the fallback (for
    a replaced head) computes them apart: same value, same gradients."""
    teacher, student = models()
    student.train()
    b = batch()
    d = Distiller(teacher, loss="srkl", temperature=1.5, kd_ratio=0.4, chunk_rows=7)
    grads = []
    for fused in (True, False):
        student.zero_grad()
        if fused:
            value, _ = d(student, b)
        else:
            h = student.trunk(student.inputs(b["input_ids"]))
            m = b["labels"] != -100
            value = 0.6 * student.loss(h, b["labels"]) + 0.4 * d.kd(student.head, h[m], teacher.trunk(
                teacher.inputs(b["input_ids"]))[m].detach(), vocab=64)
        value.backward()
        grads.append([value.detach()] + [p.grad.clone() for p in student.parameters()])
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


def test_the_distiller_mixes_ce_and_kd_and_matches_full_logits():
    teacher, student = models()
    student.train()
    b = batch()
    d = Distiller(teacher, loss="fkl", temperature=2.0, kd_ratio=0.3)
    value, parts = d(student, b)
    m = b["labels"] != -100
    with torch.no_grad():
        s_logits, t_logits = student(b["input_ids"]), teacher(b["input_ids"])
    kd = 4 * divergence(F.log_softmax(s_logits[m] / 2, -1), F.log_softmax(t_logits[m] / 2, -1), "fkl").mean()
    ce = F.cross_entropy(s_logits[m], b["labels"][m])
    assert parts["kd"] == pytest.approx(float(kd), rel=1e-5) and parts["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert float(value.detach()) == pytest.approx(0.7 * float(ce) + 0.3 * float(kd), rel=1e-5)
    student.eval()  # validation: the student's CE alone
    assert float(d(student, b).detach()) == pytest.approx(float(ce), rel=1e-5)


def test_a_padded_teacher_vocabulary_is_sliced():
    teacher, student = models()
    padded = conftest.tiny(1, vocab_size=80, n_layers=2)
    with torch.no_grad():  # the same teacher with 16 extra (padding) rows in its embedding and head
        for name, p in padded.named_parameters():
            src = dict(teacher.named_parameters())[name]
            p[tuple(slice(0, n) for n in src.shape)] = src
    student.train()
    b = batch()
    v1, _ = Distiller(teacher, kd_ratio=1.0)(student, b)
    v2, _ = Distiller(padded, kd_ratio=1.0)(student, b)
    torch.testing.assert_close(v1, v2)


def sequences(vocab=64, n=6):
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (7 + i,), generator=g)
        labels = torch.randint(0, vocab, (7 + i,), generator=g)
        labels[:2] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_the_topk_cache_gives_the_loss_of_the_teacher_restricted_to_k(tmp_path):
    teacher, student = models()
    student.train()
    data = sequences()
    cache = TeacherCache.build(teacher, data, tmp_path / "cache", k=8, vocab=64, progress=False)
    cached = WithTeacher(data, cache)
    for loss in ("fkl", "srkl", "jsd"):
        live = Distiller(teacher, loss=loss, temperature=2.0, kd_ratio=1.0, top_k=8)
        offline = Distiller(None, loss=loss, temperature=2.0, kd_ratio=1.0, top_k=8)
        items = [0, 3, 5]
        v_live, _ = live(student, collate([data[i] for i in items]))
        v_cached, _ = offline(student, collate([cached[i] for i in items]))
        torch.testing.assert_close(v_live, v_cached, rtol=1e-5, atol=1e-6)
    # and restricting to k is a real restriction: the full distribution gives another value
    full, _ = Distiller(teacher, kd_ratio=1.0)(student, collate(data[:3]))
    restricted, _ = Distiller(teacher, kd_ratio=1.0, top_k=8)(student, collate(data[:3]))
    assert abs(float(full) - float(restricted)) > 1e-3


def test_a_cache_build_resumes_and_refuses_other_data(tmp_path):
    teacher, _ = models()
    data = sequences()
    TeacherCache.build(teacher, data[:6], tmp_path / "c", k=4, vocab=64, progress=False, every=2)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    meta["done"] = 2  # as if stopped after two items: the rest is written by the next build
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DistillationError, match="incomplete"):
        TeacherCache(tmp_path / "c")
    cache = TeacherCache.build(teacher, data, tmp_path / "c", k=4, vocab=64, progress=False)
    ids, lp = teacher_top_k(teacher, data[5]["input_ids"][None], 4, 64)
    assert torch.equal(cache[5][0], ids[0]) and torch.allclose(cache[5][1], lp[0])
    other = sequences(n=6)
    other[2] = {**other[2], "input_ids": other[2]["input_ids"].flip(0)}  # another tokenizer / other data
    with pytest.raises(DistillationError, match="made from other token ids"):
        TeacherCache(tmp_path / "c", other)
    with pytest.raises(DistillationError, match="other data, tokenizer or k"):
        TeacherCache.build(teacher, data, tmp_path / "c", k=8, vocab=64, progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "ids.bin").write_text("a user's file")
    with pytest.raises(DistillationError, match="not a teacher cache"):
        TeacherCache.build(teacher, data, mine, k=4, vocab=64, progress=False)
    assert (mine / "ids.bin").read_text() == "a user's file"


def test_distillation_trains_through_fit_and_moves_the_student_toward_the_teacher(tmp_path):
    from mightylm.config import TrainConfig
    from mightylm.train import fit

    teacher, student = models()
    data = sequences(n=8)
    d = Distiller(teacher, loss="fkl", kd_ratio=1.0)

    def kd_now():
        student.train()
        with torch.no_grad():
            return float(d(student, collate(data))[1]["kd"])

    before = kd_now()
    fit(student, Loader(data, 4), tmp_path, TrainConfig(steps=30, lr=1e-2, warmup=2, log_every=5, eval_every=100,
                                                        save_every=100), loss_fn=d, progress=False)
    assert kd_now() < 0.7 * before
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"ce", "kd"} <= set(rows[0])


def test_bad_settings_and_vocabularies(bpe_tokenizer, tmp_path):
    for args, message in (((("mse", 1.0, 0.5, 0.5, 0.1)), "unknown distillation loss"),
                          (("fkl", 0.0, 0.5, 0.5, 0.1), "temperature"), (("fkl", 1.0, 1.5, 0.5, 0.1), "kd_ratio"),
                          (("jsd", 1.0, 0.5, 1.5, 0.1), "beta")):
        with pytest.raises(DistillationError, match=message):
            check_settings(*args)
    with pytest.raises(DistillationError, match="fewer than the student"):
        check_vocabularies(bpe_tokenizer, bpe_tokenizer, "T", "S", 100, 200)
    from mightylm.tokenizer import train_bpe

    other = train_bpe(vocab_size=bpe_tokenizer.vocab_size, texts=["completely different text " * 50])
    with pytest.raises(DistillationError, match="tokenize differently.*sequence-level"):
        check_vocabularies(bpe_tokenizer, other, "teacher-dir", "student-dir", 400, 400)
    check_vocabularies(bpe_tokenizer, bpe_tokenizer, "T", "S", bpe_tokenizer.vocab_size, bpe_tokenizer.vocab_size)


def test_mighty_distill_end_to_end_with_a_cache_and_a_pruned_student(tmp_path, bpe_tokenizer):
    from mightylm.cli import main
    from mightylm.compress.prune import prune_

    vocab = bpe_tokenizer.vocab_size
    teacher = conftest.tiny(1, vocab_size=vocab)
    mightylm.save(teacher, bpe_tokenizer, tmp_path / "teacher")
    student = conftest.tiny(2, vocab_size=vocab)
    prune_(student, "magnitude", pattern=(2, 4))
    mightylm.save(student, bpe_tokenizer, tmp_path / "student")
    text = tmp_path / "corpus.txt"
    text.write_text(conftest.SAMPLE_TEXT * 40)
    args = ["distill", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
            "--data", str(text), "--out", str(tmp_path / "run"), "--seq_len", "32", "--loss", "jsd",
            "--teacher_cache", str(tmp_path / "cache"), "--top_k", "8", "--train.steps", "4",
            "--train.batch_size", "2", "--train.eval_every", "2", "--train.log_every", "1"]
    assert main(args) == 0
    out, _ = mightylm.load(tmp_path / "run")
    w = out.layers[0].mlp.up_proj.weight
    assert ((w.view(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()  # the student stayed 2:4
    assert out.applied("prune")["pattern"] == "2:4"
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["k"] == 8
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("kd" in r for r in rows) and any("val_loss" in r for r in rows)


def test_mighty_prune_writes_a_smaller_checkpoint(tmp_path, bpe_tokenizer, capsys):
    from mightylm.cli import main

    model = conftest.tiny(0, vocab_size=bpe_tokenizer.vocab_size, n_layers=3)
    mightylm.save(model, bpe_tokenizer, tmp_path / "m")
    text = tmp_path / "calib.txt"
    text.write_text(conftest.SAMPLE_TEXT * 20)
    assert main(["prune", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "s"), "--structured", "true",
                 "--ffn", "0.5", "--layers", "2", "--calib", str(text), "--calib_windows", "2"]) == 0
    small, _ = mightylm.load(tmp_path / "s")
    assert (small.config.n_layers, small.config.ffn_dim) == (2, 64)
    assert main(["prune", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "w"), "--method", "sparsegpt",
                 "--pattern", "2:4", "--calib", str(text), "--calib_windows", "2"]) == 0
    assert "50.0% zero" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # refused when parsed, with the option's name
        main(["prune", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "x"), "--sparsity", "1.5"])
    assert main(["prune", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "x"), "--structured", "true",
                 "--sparsity", "0.5"]) != 0
    assert not (tmp_path / "x").exists()


def test_distill_data_erases_the_instruction_the_teacher_answered_under(tmp_path, bpe_tokenizer):
    from mightylm.cli import main
    from mightylm.compress.explanations import STYLES, explanation_data
    from mightylm.generate import Sampling, generate

    tok = bpe_tokenizer
    teacher = conftest.tiny(1, vocab_size=tok.vocab_size)
    mightylm.save(teacher, tok, tmp_path / "teacher")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [{"prompt": "What is 2 + 3?"},
                                                         {"instruction": "Name a colour.", "input": "not red"},
                                                         {"messages": [{"role": "user", "content": "Hi there"}]}]))
    assert main(["distill-data", "--teacher", str(tmp_path / "teacher"), "--prompts", str(prompts), "--out",
                 str(tmp_path / "out.jsonl"), "--max_new_tokens", "6", "--style", "mixed"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["style"] for r in rows] == list(STYLES)
    assert [m["role"] for m in rows[0]["messages"]] == ["user", "assistant"]  # no system message left
    assert rows[1]["messages"][0]["content"] == "Name a colour.\n\nnot red"
    # the answer is what the teacher wrote under the system instruction
    ids = tok.encode_chat([{"role": "system", "content": STYLES["step_by_step"]}, {"role": "user", "content": "What is 2 + 3?"}])
    expected = generate(teacher, [ids], Sampling(max_new_tokens=6, temperature=0, top_p=None,
                                                  stop_token_ids=tok.stop_token_ids))[0]
    assert rows[0]["messages"][1]["content"] == tok.decode([t for t in expected if t not in tok.stop_token_ids]).strip()
    assert main(["distill-data", "--teacher", str(tmp_path / "teacher"), "--prompts", str(prompts), "--out",
                 str(tmp_path / "out.jsonl")]) != 0  # exists: not overwritten
    records = list(explanation_data(teacher, tok, ["a", "b"], style="direct", max_new_tokens=2, progress=False))
    assert all(r["style"] == "direct" for r in records)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_a_quantized_teacher_gives_nearly_the_float_teachers_loss(method):
    from mightylm.compress.quantize import quantize_

    teacher, student = models()
    student.train()
    b = batch()
    exact, _ = Distiller(teacher, kd_ratio=1.0)(student, b)
    quantize_(teacher, method)
    approx, _ = Distiller(teacher, kd_ratio=1.0)(student, b)
    assert float(approx) == pytest.approx(float(exact), rel=0.05) and float(approx) != float(exact)


def test_the_distill_recipe_parses():
    """recipes/distill-half.yaml is read by the verb's parser (a typo in it would fail here, not after a prune)."""
    from pathlib import Path

    from mightylm.cli import main

    recipe = Path(__file__).parent.parent / "recipes" / "distill-half.yaml"
    with pytest.raises(SystemExit) as e:
        main(["distill", "--config", str(recipe), "--print_config"])
    assert e.value.code == 0


def test_mighty_distill_from_a_preset_on_chat_jsonl(tmp_path, bpe_tokenizer):
    from mightylm.cli import main

    mightylm.save(conftest.tiny(1, vocab_size=bpe_tokenizer.vocab_size), bpe_tokenizer, tmp_path / "teacher")
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i} {i} {i}"}) for i in range(12)))
    args = ["distill", "--teacher", str(tmp_path / "teacher"), "--student_config", "tiny", "--data", str(data),
            "--out", str(tmp_path / "run"), "--loss", "rkl", "--train.steps", "3", "--train.batch_size", "2",
            "--train.eval_every", "3", "--sft.max_len", "64"]
    assert main(args) == 0
    student, _ = mightylm.load(tmp_path / "run")
    assert student.config.vocab_size == bpe_tokenizer.vocab_size and student.config.dim == 64
    assert main(args) != 0  # the run directory is not overwritten without --overwrite or --resume
    assert main([*args[:3], "--student", str(tmp_path / "teacher"), *args[3:], "--overwrite", "true"]) != 0  # both
