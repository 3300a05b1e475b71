"""End-to-end runs through the CLI: pretrain, resume, report, fine-tune, and loading the result."""

import json
from pathlib import Path

import pytest
import torch

import mightylm
from mightylm.cli import main

from conftest import SAMPLE_TEXT

TINY = ["--preset", "tiny", "--dim", "32", "--n_layers", "2", "--n_heads", "2", "--n_kv_heads", "1", "--ffn_dim", "64",
        "--vocab_size", "300", "--seq_len", "32", "--val_fraction", "0.1", "--sample_prompts", "[To be]",
        "--train.batch_size", "4", "--train.lr", "3e-3", "--train.warmup", "2", "--train.eval_every", "5",
        "--train.save_every", "5", "--train.log_every", "1"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(SAMPLE_TEXT * 40)
    return path


def test_pretrain_resume_report_and_load(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(corpus), "--out", str(out), "--train.steps", "6", *TINY]) == 0
    assert main(["pretrain", "--data", str(corpus), "--out", str(out), "--train.steps", "6", *TINY]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(corpus), "--out", str(out), "--train.steps", "10", "--resume", "true",
                 *TINY]) == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 11))
    report = (out / "report.md").read_text()
    assert "final validation loss" in report and "To be" in report and (out / "report.png").stat().st_size > 10_000
    model, tokenizer = mightylm.load(out)  # the run directory is a normal checkpoint
    assert model.config.n_layers == 2 and tokenizer.vocab_size == 300
    assert main(["report", "--run-dir", str(out)]) == 0


@pytest.fixture
def reverse_jsonl(tmp_path):
    """Eight alpaca-shape examples of reversing a word."""
    rows = [{"instruction": "Reverse the word.", "input": w, "output": w[::-1]}
            for w in ["stressed", "drawer", "reward", "parts", "lived", "stop", "knits", "spot"]]
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data


@pytest.mark.parametrize("optimizer", ["adamw", "lomo"])
def test_finetune_full_on_jsonl(tmp_path, hf_dir, optimizer, reverse_jsonl):
    data = reverse_jsonl
    _, path, _ = hf_dir
    out = tmp_path / "ft"
    assert main(["finetune", "full", "--model", str(path), "--data", str(data), "--out", str(out),
                 "--val_fraction", "0.25", "--train.steps", "4", "--train.batch_size", "2", "--train.warmup", "1",
                 "--train.eval_every", "2", "--train.log_every", "1", "--optimizer", optimizer,
                 "--train.lr", "1e-2" if optimizer == "lomo" else "2e-5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 4 and "val_loss" in summary and summary["samples"]
    tuned, _ = mightylm.load(out)
    base, _ = mightylm.load(path)
    assert not torch.equal(tuned.layers[0].attn.q_proj.weight, base.layers[0].attn.q_proj.weight)


def test_bad_training_input_is_reported(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    assert main(["pretrain", "--data", str(bad), "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "bad.jsonl:1: expected an object with a string field 'text'" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r2"), *TINY]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["report", "--run-dir", str(tmp_path)]) == 2
    assert "metrics.jsonl: not found" in capsys.readouterr().err


def test_pretrain_under_torchrun(tmp_path, corpus):
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "mightylm.cli", "pretrain", "--data", str(corpus), "--out", str(out), "--train.steps", "4", *TINY]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4
    assert summary["tokens"] == 4 * 2 * 4 * 32  # steps x ranks x per-rank batch x window
    model, _ = mightylm.load(out)
    assert model.config.dim == 32


def test_yaml_recipe_with_command_line_overrides(tmp_path, corpus):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "recipe"
    recipe = str(Path(__file__).parent.parent / "recipes" / "pretrain-shakespeare.yaml")
    assert main(["pretrain", "--config", recipe, "--data", str(corpus), "--out", str(out),
                 "--n_layers", "1", "--dim", "32", "--ffn_dim", "64", "--vocab_size", "300", "--seq_len", "32",
                 "--train.steps", "2", "--train.eval_every", "1", "--train.batch_size", "2"]) == 0
    args = json.loads((out / "run_args.json").read_text())
    assert args["train"]["lr"] == 2e-3 and args["train"]["steps"] == 2  # from the YAML, and overridden
    assert args["model"]["n_heads"] == 4 and args["model"]["n_layers"] == 1
    hf = AutoModelForCausalLM.from_pretrained(out)  # the run directory is a transformers checkpoint too
    assert hf.config.num_hidden_layers == 1


def test_lora_finetune_generate_with_adapter_and_merge(tmp_path, hf_dir, capsys, reverse_jsonl):
    data = reverse_jsonl
    from transformers import AutoModelForCausalLM

    from mightylm.adapters.lora import load_lora
    from mightylm.generate import Sampling, generate

    _, path, _ = hf_dir
    out = tmp_path / "lora"
    assert main(["finetune", "lora", "--model", str(path), "--data", str(data), "--out", str(out), "--r", "4",
                 "--targets", "[q_proj, v_proj, down_proj]", "--train.steps", "4", "--train.batch_size", "2",
                 "--train.lr", "1e-2", "--train.warmup", "1", "--train.eval_every", "2"]) == 0
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    base, tok = mightylm.load(path)
    targeted = sum(name.rpartition(".")[2] in ("q_proj", "v_proj", "down_proj") for name, _ in base.named_modules())
    assert targeted >= 6 and f"LoRA on {targeted} layers" in capsys.readouterr().out  # experts' down_proj too

    load_lora(base, out)
    prompt = tok.encode("To be")
    expected = tok.decode(generate(base, [prompt], Sampling(max_new_tokens=8, stop_token_ids=tok.stop_token_ids))[0])
    assert main(["generate", "--model", str(path), "--adapter", str(out), "--prompt", "To be", "--temperature", "0",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected + "\n"

    assert main(["merge", "--model", str(path), "--adapter", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    idx = torch.tensor([prompt])
    with torch.no_grad():
        assert (merged(idx).logits - base(idx)).abs().max().item() <= 1e-4


def test_lora_bad_target_is_refused_before_training(tmp_path, hf_dir, capsys):
    _, path, _ = hf_dir
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    assert main(["finetune", "lora", "--model", str(path), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--targets", "[attn]"]) == 2
    assert "unknown LoRA target module(s) ['attn']" in capsys.readouterr().err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


RECIPES = Path(__file__).parent.parent / "recipes"


@pytest.mark.parametrize("verb,options", [
    ("prompt", ["--n_tokens", "4", "--init_text", "Reverse"]),
    ("ptuning", ["--n_tokens", "4", "--encoder", "lstm", "--hidden", "16"]),
    ("adapter", ["--layers", "2", "--length", "3"]),
])
def test_soft_prompt_and_adapter_verbs_train_resume_and_generate(tmp_path, verb, options, reverse_jsonl, capsys):
    """Each adapter verb through its YAML recipe: train, resume, then `generate --adapter` == the Python API."""
    from conftest import make_hf_model

    from mightylm.adapters import load_adapter
    from mightylm.generate import Sampling, generate
    from mightylm.tokenizer import train_bpe

    base = tmp_path / "base"
    tok = train_bpe(texts=[SAMPLE_TEXT * 20], vocab_size=300, show_progress=False)
    make_hf_model("qwen2", vocab_size=tok.vocab_size).save_pretrained(base)
    tok.save(base)
    out = tmp_path / verb
    common = ["finetune", verb, "--config", str(RECIPES / f"finetune-{verb}.yaml"), "--model", str(base),
              "--data", str(reverse_jsonl), "--out", str(out), *options, "--val_fraction", "0.25",
              "--train.batch_size", "2", "--train.warmup", "1", "--train.eval_every", "2", "--train.save_every", "2",
              "--train.log_every", "1"]
    assert main([*common, "--train.steps", "2"]) == 0
    assert main([*common, "--train.steps", "4", "--resume", "true"]) == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    args = json.loads((out / "run_args.json").read_text())
    assert args["max_len"] == 128 and args["adapter"]  # from the recipe, and the adapter settings
    capsys.readouterr()

    model, tok = mightylm.load(base)
    load_adapter(model, out)
    prompt = tok.encode("To be")
    expected = tok.decode(generate(model, [prompt], Sampling(max_new_tokens=8, stop_token_ids=tok.stop_token_ids))[0])
    assert main(["generate", "--model", str(base), "--adapter", str(out), "--prompt", "To be", "--temperature", "0",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["merge", "--model", str(base), "--adapter", str(out), "--out", str(tmp_path / "m")]) == 2
    assert "cannot be merged" in capsys.readouterr().err


def test_qlora_verb_trains_over_nf4_and_generate_rebuilds_the_base(tmp_path, reverse_jsonl, capsys):
    from conftest import make_hf_model

    from mightylm.adapters import load_adapter
    from mightylm.compress.nf4 import NF4Linear
    from mightylm.generate import Sampling, generate
    from mightylm.tokenizer import train_bpe

    base = tmp_path / "base"
    tok = train_bpe(texts=[SAMPLE_TEXT * 20], vocab_size=300, show_progress=False)
    make_hf_model("llama", vocab_size=tok.vocab_size).save_pretrained(base)
    tok.save(base)
    out = tmp_path / "qlora"
    assert main(["finetune", "qlora", "--config", str(RECIPES / "finetune-qlora.yaml"), "--model", str(base),
                 "--data", str(reverse_jsonl), "--out", str(out), "--r", "4", "--val_fraction", "0.25",
                 "--train.steps", "3", "--train.batch_size", "2", "--train.warmup", "1", "--train.lr", "1e-2"]) == 0
    assert "QLoRA (NF4 base) on 14 layers" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["mightylm_base_quantization"]["method"] == "nf4"
    model, tok = mightylm.load(base)
    load_adapter(model, out)
    assert isinstance(model.layers[1].mlp.down_proj.base_layer, NF4Linear)
    prompt = tok.encode("To be")
    expected = tok.decode(generate(model, [prompt], Sampling(max_new_tokens=8, stop_token_ids=tok.stop_token_ids))[0])
    assert main(["generate", "--model", str(base), "--adapter", str(out), "--prompt", "To be", "--temperature", "0",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_packed_lora_finetune_trains_and_a_packed_soft_prompt_is_refused(tmp_path, hf_dir, capsys, reverse_jsonl):
    _, path, _ = hf_dir
    common = ["--model", str(path), "--data", str(reverse_jsonl), "--sft.pack", "true", "--sft.max_len", "128",
              "--train.steps", "2", "--train.batch_size", "2", "--train.warmup", "1", "--train.eval_every", "2",
              "--train.log_every", "1"]
    assert main(["finetune", "lora", *common, "--out", str(tmp_path / "lora")]) == 0
    rows = [json.loads(l) for l in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and all(r["loss"] == r["loss"] for r in rows if "loss" in r)
    capsys.readouterr()
    assert main(["finetune", "prompt", *common, "--out", str(tmp_path / "prompt")]) == 2
    assert "--sft.pack true cannot train a soft prompt" in capsys.readouterr().err


def test_pretrain_goes_on_from_a_model_and_extends_its_context(tmp_path, corpus, capsys):
    """--init trains a made model further: here on windows four times its trained length under YaRN x4; the result
    records the scaling and the new context, and the shape options are refused beside --init."""
    base = tmp_path / "base"
    assert main(["pretrain", "--data", str(corpus), "--out", str(base), "--train.steps", "3", *TINY]) == 0
    before, _ = mightylm.load(base)
    trained = before.config.max_seq_len
    out = tmp_path / "long"
    assert main(["pretrain", "--data", str(corpus), "--out", str(out), "--init", str(base), "--seq_len",
                 str(4 * trained), "--rope_scaling", "yarn:4", "--train.steps", "2", "--train.batch_size", "2"]) == 0
    model, tokenizer = mightylm.load(out)
    assert model.config.rope_scaling["type"] == "yarn" and model.config.max_seq_len == 4 * trained
    assert model.config.rope_scaling["original_max_position_embeddings"] == trained
    assert tokenizer.vocab_size == 300 and not torch.equal(model.embed.weight, before.embed.weight)
    assert main(["pretrain", "--data", str(corpus), "--out", str(tmp_path / "x"), "--init", str(base),
                 "--dim", "64"]) == 2
    assert "drop the shape options" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(corpus), "--out", str(tmp_path / "y"), "--init", str(base), "--seq_len",
                 str(2 * trained)]) == 2
    assert "extend it with --rope_scaling" in capsys.readouterr().err
