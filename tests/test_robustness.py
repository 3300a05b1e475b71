"""The CLI as a careless or hostile user meets it: nothing of theirs is overwritten, every interrupted run has a
way on, and every user error is one line with exit 2, not a traceback (issue 16, classes 1 and 3 to 6)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mightylm
import mightylm.errors
from mightylm.cli import main

from conftest import SAMPLE_TEXT
from test_recipes import TINY

MIGHTY = str(Path(sys.executable).with_name("mighty"))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(SAMPLE_TEXT * 40)
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, bpe_tokenizer):
    """One tiny Llama directory (these tests are about the CLI, not the architectures)."""
    from conftest import make_hf_model

    path = tmp_path_factory.mktemp("hf-llama")
    make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size).save_pretrained(path)
    bpe_tokenizer.save(path)
    return "llama", path, None


@pytest.fixture
def chat_jsonl(tmp_path):
    rows = [{"instruction": "Reverse the word.", "input": w, "output": w[::-1]} for w in ["stressed", "drawer", "parts",
                                                                                         "lived", "stop", "spot"]]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _error(capsys) -> str:
    """The one stderr line that starts with 'error:' (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- 1. nothing of the user's is overwritten ----


def test_a_non_empty_out_that_is_not_the_verbs_own_is_refused_and_overwrite_replaces_it(tmp_path, hf_dir, chat_jsonl,
                                                                                          corpus, capsys):
    _, model, _ = hf_dir
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    finetune = ["finetune", "full", "--model", str(model), "--data", str(chat_jsonl), "--train.steps", "1",
                "--train.batch_size", "2", "--train.warmup", "1"]
    assert main([*finetune, "--out", str(model)]) == 2  # the base model itself
    assert "is the input" in _error(capsys)
    assert main([*finetune, "--out", str(model / "sub")]) == 2  # inside it
    assert "is the input" in _error(capsys)
    assert main(["pretrain", "--data", str(corpus), "--out", str(model), "--train.steps", "2", *TINY]) == 2
    assert "is the input" not in (message := _error(capsys)) and "not empty" in message and "config.json" in message
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(["pretrain", "--data", str(corpus), "--out", str(other), "--train.steps", "2", *TINY]) == 2
    assert "--overwrite true" in _error(capsys) and (other / "notes.txt").read_text() == "mine"
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before  # untouched
    assert main(["pretrain", "--data", str(corpus), "--out", str(other), "--train.steps", "2", "--overwrite", "true",
                 *TINY]) == 0
    assert not (other / "notes.txt").exists() and (other / "model.safetensors").exists()
    capsys.readouterr()
    assert main(["quantize", "--model", str(model), "--method", "int8", "--out", str(model)]) == 2
    assert "is the input" in _error(capsys)


def test_merge_refuses_another_model_and_writes_whole_or_nothing(tmp_path, hf_dir, chat_jsonl, capsys):
    from mightylm.adapters.lora import apply_lora, save_lora

    _, model, _ = hf_dir
    net, tok = mightylm.load(model)
    apply_lora(net, targets=("q_proj",), r=2)
    save_lora(net, tmp_path / "lora")
    other = tmp_path / "other-model"
    mightylm.save(mightylm.load(model)[0], tok, other)
    before = (other / "model.safetensors").read_bytes()
    assert main(["merge", "--model", str(model), "--adapter", str(tmp_path / "lora"), "--out", str(other)]) == 2
    assert "not empty" in _error(capsys) and (other / "model.safetensors").read_bytes() == before
    assert main(["merge", "--model", str(model), "--adapter", str(tmp_path / "lora"), "--out", str(tmp_path / "lora")]) == 2
    assert "is the input" in _error(capsys)
    assert main(["merge", "--model", str(model), "--adapter", str(tmp_path / "lora"), "--out", str(other),
                 "--overwrite", "true"]) == 0
    assert "mighty generate --model" in capsys.readouterr().out
    assert mightylm.load(other)[0].config.n_layers == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind


# ---- 3. every interrupted run has a way on ----


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([MIGHTY, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen, lines: int = 1, timeout: float = 120) -> None:
    """Until `path` has `lines` complete lines (training has begun logging)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().count("\n") >= lines):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_a_run_killed_before_its_first_checkpoint_proceeds_and_sigterm_exits_143(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(corpus), "--out", str(out), *TINY, "--train.save_every", "100000"]
    run = _start([*args, "--train.steps", "100000"])
    _wait_for(out / "metrics.jsonl", run)
    run.kill()  # SIGKILL: nothing is saved
    run.wait()
    assert not (out / "checkpoint").exists() and (out / "run_args.json").exists()
    assert main([*args, "--train.steps", "3"]) == 0  # a plain rerun starts it again
    assert "stopped before its first checkpoint; starting it again" in capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # nothing of the killed attempt appended
    assert json.loads((out / "summary.json").read_text())["finished"] is True

    other = tmp_path / "run2"
    args = [a if a != str(out) else str(other) for a in args]
    run = _start([*args, "--train.steps", "100000"])
    _wait_for(other / "metrics.jsonl", run)
    run.kill()
    run.wait()
    assert main([*args, "--train.steps", "2", "--resume", "true"]) == 0  # --resume with no checkpoint starts afresh
    assert "has no checkpoint yet; starting the run from step 0" in capsys.readouterr().err

    logged = (other / "metrics.jsonl").read_text().count("\n")
    run = _start([*args, "--train.steps", "100000", "--resume", "true", "--train.log_every", "1"])
    _wait_for(other / "metrics.jsonl", run, lines=logged + 2)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 143, err  # stopped by SIGTERM, after saving
    summary = json.loads((other / "summary.json").read_text())
    assert summary["interrupted"] and not summary["finished"] and (other / "checkpoint" / "state.json").exists()


def test_a_torn_metrics_line_is_tolerated_and_a_resume_on_other_data_or_shape_is_refused(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(corpus), "--out", str(out), *TINY]
    assert main([*args, "--train.steps", "5"]) == 0
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "tokens": 7')  # what a kill mid-write leaves
    assert main(["report", "--run-dir", str(out)]) == 0
    assert main([*args, "--train.steps", "7", "--resume", "true"]) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == 7
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:2] + ["{broken"] + lines[2:]) + "\n")
    capsys.readouterr()
    assert main(["report", "--run-dir", str(out)]) == 2
    assert f"{out / 'metrics.jsonl'}:3:" in _error(capsys)
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    changed = tmp_path / "changed.txt"
    changed.write_text(SAMPLE_TEXT * 41)
    assert main([a if a != str(corpus) else str(changed) for a in args] + ["--train.steps", "9", "--resume", "true"]) == 2
    assert "was trained on other data" in _error(capsys)
    wider = [a if a != "32" or args[i - 1] != "--dim" else "48" for i, a in enumerate(args)]
    assert main([*wider, "--train.steps", "9", "--resume", "true"]) == 2
    assert "another model shape" in (message := _error(capsys)) and "dim 32 -> 48" in message


def test_a_checkpoint_that_cannot_be_written_keeps_the_previous_one(tmp_path, corpus, capsys, monkeypatch):
    import errno

    import safetensors.torch

    out = tmp_path / "run"
    args = ["pretrain", "--data", str(corpus), "--out", str(out), *TINY]
    assert main([*args, "--train.steps", "5"]) == 0
    before = (out / "checkpoint" / "model.safetensors").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main([*args, "--train.steps", "10", "--resume", "true"]) == 2
    message = _error(capsys)
    assert "No space left on device" in message and "is kept" in message and "--resume" in message
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == before
    assert not (out / "checkpoint.tmp").exists()


# ---- 4 and 5. user errors are messages; wrong input is refused before any work ----


@pytest.mark.parametrize("option, value, expected", [
    ("--train.steps", "0", "--train.steps must be at least 1"),
    ("--train.steps", "-3", "--train.steps must be at least 1"),
    ("--train.grad_accum", "0", "--train.grad_accum must be at least 1"),
    ("--train.batch_size", "0", "--train.batch_size must be at least 1"),
    ("--train.eval_every", "0", "--train.eval_every must be at least 1"),
    ("--train.save_every", "0", "--train.save_every must be at least 1"),
    ("--train.log_every", "0", "--train.log_every must be at least 1"),
    ("--train.lr", "-1", "--train.lr must be above 0"),
    ("--seq_len", "0", 'Parser key "seq_len"'),
    ("--val_fraction", "1.5", 'Parser key "val_fraction"'),
    ("--n_layers", "-2", 'Parser key "n_layers"'),
    ("--n_heads", "5", "dim 32 is not divisible by n_heads 5"),
    ("--preset", "nope", "unknown preset 'nope'"),
])
def test_bad_training_options_are_refused_before_any_work(tmp_path, corpus, option, value, expected, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(corpus), "--out", str(out), *TINY, option, value]
    try:
        code = main(args)
    except SystemExit as e:  # a value the parser refuses: its usage, the message, exit 2
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and "training a byte-level BPE" not in err
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("args, expected", [
    (["eval", "arithmetic", "--n", "0"], 'Parser key "n"'),
    (["eval", "humaneval", "--limit", "-1"], 'Parser key "limit"'),
    (["eval", "humaneval", "--timeout", "-1"], 'Parser key "timeout"'),
    (["eval", "humaneval", "--memory-mb", "1"], 'Parser key "memory_mb"'),
    (["eval", "humaneval", "--workers", "0"], 'Parser key "workers"'),
    (["serve", "--max-batch", "0"], 'Parser key "max_batch"'),
    (["serve", "--port", "99999"], 'Parser key "port"'),
    (["serve", "--dtype", "int3"], 'Parser key "dtype"'),
    (["generate", "--prompt", "x", "--temperature", "-1"], 'Parser key "temperature"'),
    (["finetune", "lora", "--model", "m", "--data", "d", "--r", "0"], 'Parser key "r"'),
])
def test_out_of_range_options_name_the_option(args, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and expected in err and f"see: mighty {args[0]}" in err and "Traceback" not in err


def test_environment_and_input_errors_are_one_line(tmp_path, hf_dir, corpus, capsys):
    _, model, _ = hf_dir
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["quantize", "--model", str(model), "--method", "int8", "--out", str(blocker / "q")]) == 2
    assert f"{blocker} is a file" in _error(capsys)
    assert main(["pretrain", "--data", str(corpus), "--out", str(blocker / "run"), "--train.steps", "2", *TINY]) == 2
    assert f"{blocker} is a file" in _error(capsys)
    assert main(["generate", "--model", str(model), "--prompt", "caf\udce9", "--max-new-tokens", "2"]) == 2
    assert "--prompt: not valid UTF-8" in _error(capsys)
    for text, expected in (("[1, 2]", "expected a JSON object"), ('{"model_type": "llama", "vocab_size": null, '
                           '"hidden_size": "64", "num_hidden_layers": 2, "num_attention_heads": 4, '
                           '"intermediate_size": 8}', "model sizes must be positive integers"),
                           ('{"model_type": "llama", "vocab_size": 8, "hidden_size": 64, "num_hidden_layers": 2, '
                            '"num_attention_heads": 4, "intermediate_size": 8, "rms_norm_eps": "x"}',
                            "norm_eps and rope_theta must be positive numbers, got norm_eps='x'")):
        bad = tmp_path / f"bad{len(text)}"
        bad.mkdir()
        (bad / "config.json").write_text(text)
        assert main(["generate", "--model", str(bad), "--prompt", "x"]) == 2
        assert f"{bad / 'config.json'}: " in (message := _error(capsys)) and expected in message
    with pytest.raises(mightylm.errors.MightyError):  # --debug shows the traceback of ours
        main(["--debug", "generate", "--model", str(bad), "--prompt", "x"])


def test_chat_refuses_non_utf8_input_naming_the_line(hf_dir):
    _, model, _ = hf_dir
    run = subprocess.run([MIGHTY, "chat", "--model", str(model), "--temperature", "0", "--max-new-tokens", "2"],
                         input=b"hello\n\xff\xfe bad\n", capture_output=True, timeout=120)
    assert run.returncode == 2 and b"standard input, line 2: not valid UTF-8" in run.stderr
    assert b"Traceback" not in run.stderr


def test_pretraining_refuses_binary_and_undecodable_text(tmp_path, capsys):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(os.urandom(4096))
    elf = tmp_path / "tool.txt"
    elf.write_bytes(Path(sys.executable).resolve().read_bytes()[:8192])
    latin = tmp_path / "latin.txt"
    latin.write_bytes(("Voilà ce qu'il a dit à son frère.\n" * 200).encode("latin-1"))
    for path, expected in ((binary, "looks like binary data"), (elf, "looks like an ELF executable"),
                           (latin, "not valid utf-8 at byte offset 4 (line 1")):
        out = tmp_path / f"run-{path.stem}"
        assert main(["pretrain", "--data", str(path), "--out", str(out), *TINY, "--train.steps", "1"]) == 2
        message = _error(capsys)
        assert str(path) in message and expected in message
    assert "--encoding" in message
    out = tmp_path / "run-latin1"
    assert main(["pretrain", "--data", str(latin), "--out", str(out), *TINY, "--train.steps", "2", "--encoding",
                 "latin-1", "--vocab_size", "260"]) == 0
    _, tokenizer = mightylm.load(out)
    assert "\ufffd" not in tokenizer.decode(tokenizer.encode("Voilà à frère"))
    assert tokenizer.decode(tokenizer.encode("Voilà à frère")) == "Voilà à frère"


def test_non_utf8_jsonl_and_a_broken_recipe_name_the_file(tmp_path, hf_dir, capsys):
    _, model, _ = hf_dir
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    assert main(["finetune", "lora", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert f"{data}:2: not valid UTF-8 (byte 0xe9 at column 21)" in _error(capsys)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  steps: 3\n  lr: [1\n")
    with pytest.raises(SystemExit):
        main(["pretrain", "--config", str(recipe), "--data", "x"])
    err = capsys.readouterr().err
    assert f"in {recipe}, line 3" in err and "<unicode string>" not in err


def test_an_adapter_on_another_base_of_the_same_shape_warns(tmp_path, hf_dir):
    from mightylm.adapters import load_adapter, save_adapter
    from mightylm.adapters.lora import apply_lora

    _, model, _ = hf_dir
    net, _ = mightylm.load(model)
    apply_lora(net, targets=("q_proj",), r=2)
    save_adapter(net, tmp_path / "lora", base_model=str(model))
    same, _ = mightylm.load(model)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(same, tmp_path / "lora")  # its own base: no warning
    other, _ = mightylm.load(model)
    with torch.no_grad():
        other.embed.weight.add_(0.01)
    with pytest.warns(UserWarning, match="this adapter was trained on .* a different base of the same shape"):
        load_adapter(other, tmp_path / "lora")


# ---- 6. small things a user notices ----


def test_help_describes_every_verb_and_usage_errors_show_the_verbs_usage(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Fine-tune a model on instruction or chat JSONL" in out and "Evaluate a model" in out
    with pytest.raises(SystemExit) as e:
        main(["merge", "--model", "x", "--out", "y"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "merge [--config CONFIG] --model MODEL --adapter" in err
    assert "merge.adapter" in err and "see: mighty merge --help" in err


def test_finetune_full_says_where_the_model_is(tmp_path, hf_dir, chat_jsonl, capsys):
    _, model, _ = hf_dir
    out = tmp_path / "ft"
    assert main(["finetune", "full", "--model", str(model), "--data", str(chat_jsonl), "--out", str(out),
                 "--train.steps", "1", "--train.batch_size", "2", "--train.warmup", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"the model is in {out}" in printed and f"mighty generate --model {out}" in printed


def test_pretraining_refuses_a_vocabulary_a_byte_level_bpe_cannot_have(tmp_path, capsys):
    from mightylm.cli import main

    corpus = tmp_path / "a.txt"
    corpus.write_text("To be, or not to be, that is the question. " * 50)
    assert main(["pretrain", "--data", str(corpus), "--out", str(tmp_path / "run"), "--vocab_size", "10"]) == 2
    err = capsys.readouterr().err
    assert "at least 259 tokens (256 bytes and 3 special tokens), got 10" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before the run directory is made
