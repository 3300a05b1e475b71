import subprocess
import sys

import pytest

import mightylm
from mightylm.cli import main
from mightylm.generate import Sampling, generate


def test_help_explains_every_verb(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "chat" in out
    for verb in ("generate", "chat"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert "--max_new_tokens" in capsys.readouterr().out


def test_greedy_generate_prints_only_the_completion(hf_dir, capsys):
    arch, path, _ = hf_dir
    model, tokenizer = mightylm.load(path)
    expected = tokenizer.decode(generate(model, [tokenizer.encode("To be")], Sampling(max_new_tokens=12,
                                stop_token_ids=tokenizer.stop_token_ids))[0])
    assert main(["generate", "--model", str(path), "--prompt", "To be", "--temperature", "0",
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_errors_exit_2_with_a_message(tmp_path, hf_dir, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "nope: no such file or directory" in capsys.readouterr().err
    mightylm.save(mightylm.load(hf_dir[1])[0], None, tmp_path / "no-tokenizer")  # weights without tokenizer.json
    for argv in (["generate", "--prompt", "x"], ["eval", "perplexity", "--out", str(tmp_path / "ev")]):
        assert main([*argv, "--model", str(tmp_path / "no-tokenizer")]) == 2
        assert "no-tokenizer: has no tokenizer.json, so text cannot be encoded" in capsys.readouterr().err


def test_chat_reads_turns_from_a_pipe(hf_dir):
    _, path, _ = hf_dir
    result = subprocess.run(
        [sys.executable, "-m", "mightylm.cli", "chat", "--model", str(path), "--temperature", "0",
         "--max-new-tokens", "5"],
        input="hello\n/reset\nagain\n", capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 2
    assert "you> hello" in result.stdout and "you> again" in result.stdout
