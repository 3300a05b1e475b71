import subprocess
import sys

import pytest
import torch

import mightylm
from mightylm.cli import main
from mightylm.generate import Sampling, generate


def test_help_explains_every_verb(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    from mightylm.cli import _verbs

    # the overview is written from the verbs' docstrings without building their parsers: every verb, its first line
    assert all(f"  {verb} " in out for verb in _verbs()) and "Stream the completion of a prompt" in out
    assert "`mighty finetune KIND --help`" in out
    for verb in ("generate", "chat"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert "--max_new_tokens" in capsys.readouterr().out


def test_every_option_of_every_verb_has_its_description_in_help(capsys):
    """jsonargparse takes each option's help from the verb's docstring (docstring_parser, Google style): one stray
    line at the margin (a "\\n" written as a newline) ends the Args section and every option of the verb loses its
    description. Checked the way jsonargparse parses, and in one --help."""
    import dataclasses
    import inspect
    import typing

    import docstring_parser

    from mightylm.cli import _verbs

    def walk(verbs, path=()):
        for name, verb in verbs.items():
            if isinstance(verb, dict):
                yield from walk(verb, (*path, name))
            elif name != "_help":
                yield (*path, name), verb

    undocumented = {}
    for path, verb in walk(_verbs()):
        doc = docstring_parser.parse(verb.__doc__ or "", style=docstring_parser.DocstringStyle.AUTO)
        described = {p.arg_name for p in doc.params if p.description}
        hints = typing.get_type_hints(verb)
        missing = [n for n in inspect.signature(verb).parameters
                   if n not in described and not dataclasses.is_dataclass(hints.get(n))]  # groups: their own docs
        if missing:
            undocumented[" ".join(path)] = missing
    assert not undocumented
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "Generate at most this many tokens." in capsys.readouterr().out


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
def test_the_device_option_is_checked_before_loading(capsys):
    for verb in (["generate", "--prompt", "x", "--engine", "torch"], ["chat", "--engine", "torch"], ["serve"]):
        for device, said in (("cuda", "this PyTorch"), ("gpu0", "not a device; use cpu, cuda or cuda:N"),
                             ("meta", "decoding runs on cpu or cuda")):
            assert main([*verb, "--device", device]) == 2
            assert f"--device {device}: {said}" in capsys.readouterr().err


def test_serve_on_a_gpu_refuses_what_runs_on_the_cpu_only(monkeypatch, capsys):
    import mightylm.generate

    monkeypatch.setattr(mightylm.generate, "generation_device", lambda device: torch.device("cuda"))
    assert main(["serve", "--device", "cuda", "--draft", "prompt-lookup", "--int8_activations", "true"]) == 2
    assert "--device cuda: --draft, --int8_activations not yet on a GPU" in capsys.readouterr().err


def test_lookup_history_needs_prompt_lookup(capsys):
    for argv in (["serve", "--lookup_history", "true"], ["serve", "--lookup_history", "true", "--draft", "x.gguf"]):
        assert main(argv) == 2
        assert "--lookup_history feeds prompt lookup's drafts: add --draft prompt-lookup" in capsys.readouterr().err


def test_gamma_defaults_to_8_for_prompt_lookup_in_int8(capsys):
    """--gamma left out: 8 for prompt lookup with int8 activations (extra rows cheap), 4 otherwise; given: as given.
    `--help` says so."""
    from mightylm.cli import _gamma

    assert _gamma(None, "prompt-lookup", True) == 8 and _gamma(None, "prompt-lookup:4", True) == 8
    assert _gamma(None, "prompt-lookup", False) == 4 and _gamma(None, "draft.gguf", True) == 4
    assert _gamma(None, None, True) == 4 and _gamma(3, "prompt-lookup", True) == 3
    for verb in ("generate", "chat"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert "8 for prompt lookup" in " ".join(capsys.readouterr().out.split())


def test_compile_is_refused_on_the_cpu(hf_dir, capsys):
    for verb in (["generate", "--prompt", "x"], ["chat"]):
        assert main([*verb, "--model", str(hf_dir[1]), "--compile"]) == 2
        assert "--compile compiles the decode step that --device cuda replays" in capsys.readouterr().err


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


def test_group_options_may_be_given_without_the_group_name():
    """The fine-tune verbs share option groups (dataclasses: --lora.r, --sft.max_len, --train.steps); a group's
    option without its group's name is that option when no parameter and no other group of the verb has the name."""
    from dataclasses import dataclass

    from mightylm.cli import _group_fields, _underscore_options

    argv = ["finetune", "qlora", "--r", "4", "--block-size=128", "--targets", "q_proj", "--targets", "v_proj",
            "--max_len", "64", "--steps", "3", "--lora.alpha", "8", "--out", "o"]
    assert _underscore_options(argv) == ["finetune", "qlora", "--lora.r", "4", "--nf4.block_size=128",
                                         "--lora.targets+", "q_proj", "--lora.targets+", "v_proj", "--sft.max_len",
                                         "64", "--train.steps", "3", "--lora.alpha", "8", "--out", "o"]

    @dataclass
    class A:
        size: int = 1
        rate: float = 0.1

    @dataclass
    class B:
        size: int = 2

    def verb(rate: float = 0.0, a: A = A(), b: B = B()) -> None:
        """A verb whose groups share a name and one field clashes with a parameter."""

    assert _group_fields(verb) == {}  # size is in two groups, rate is the verb's own


def test_a_yes_no_option_alone_means_yes():
    """`--stats` as well as `--stats true`: a verb's bool parameter given without a value (at the end, or before the
    next option) is true; one given a value keeps it."""
    from mightylm.cli import _underscore_options

    assert _underscore_options(["generate", "--prompt", "hi", "--stats"]) == ["generate", "--prompt", "hi", "--stats",
                                                                               "true"]
    assert _underscore_options(["generate", "--stats", "--chat", "false", "--prompt", "hi"]) == [
        "generate", "--stats", "true", "--chat", "false", "--prompt", "hi"]
    assert _underscore_options(["generate", "--stats=false", "--int8-activations"]) == [
        "generate", "--stats=false", "--int8_activations", "true"]
    assert _underscore_options(["generate", "--prompt", "--stats"]) == ["generate", "--prompt", "--stats", "true"]


def test_fine_tune_help_lists_every_grouped_option(capsys):
    import dataclasses

    from mightylm.recipes import LoRA, NF4, SFTData

    with pytest.raises(SystemExit):
        main(["finetune", "qlora", "--help"])
    text = capsys.readouterr().out
    for group, cls in (("lora", LoRA), ("nf4", NF4), ("sft", SFTData)):
        for f in dataclasses.fields(cls):
            assert f"--{group}.{f.name}" in text


@pytest.mark.parametrize("hf_dir", ["llama"], indirect=True)
def test_generate_stats_report_prefill_and_decode_speed(hf_dir, capsys):
    import re

    _, path, _ = hf_dir
    assert main(["generate", "--model", str(path), "--prompt", "To be or not", "--temperature", "0",
                 "--max-new-tokens", "6", "--stats", "true"]) == 0
    captured = capsys.readouterr()
    line = captured.err.strip().splitlines()[-1]
    match = re.fullmatch(r"prefill: (\d+) tokens in [\d.]+ s \([\d.]+ tokens/s\); decode: (\d+) tokens in [\d.]+ s "
                         r"\(([\d.]+ tokens/s|-)\)", line)
    assert match, line
    model, tok = mightylm.load(path)
    assert int(match[1]) == len(tok.encode("To be or not"))
    generated = generate(model, [tok.encode("To be or not")], Sampling(max_new_tokens=6,
                                                                      stop_token_ids=tok.stop_token_ids))[0]
    assert int(match[2]) == len(generated) - 1  # the first token comes out of the prefill
    assert "prefill" not in captured.out


def test_env_says_which_kernel_path_runs(capsys):
    from mightylm import kernels

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("kernels:"))
    expected = kernels.kernel_isa() or "unavailable"
    assert line.split()[1] == expected
    assert "torch:" in out and "CPU flags:" in out


def test_attention_sinks_option_is_checked_and_generates(hf_dir, capsys):
    arch, path, _ = hf_dir
    for bad, said in (("x", "give SIZE or SIZE:SINKS"), ("4:4", "more slots than sinks + 1")):
        assert main(["generate", "--model", str(path), "--prompt", "To be", "--attention_sinks", bad]) == 2
        assert said in capsys.readouterr().err
    assert main(["generate", "--model", str(path), "--prompt", "To be", "--temperature", "0", "--max-new-tokens", "8",
                 "--attention_sinks", "16:2"]) == 0
