"""RoPE scaling (issue 22, first part): every type's inverse frequencies and attention factor equal transformers'
modeling_rope_utils, whole-model logits equal LlamaForCausalLM at 3x the original length, both config spellings
round-trip, and a scaling set on a loaded model really changes it."""

import json

import pytest
import torch

import mightylm
from mightylm.config import ConfigError, ModelConfig
from mightylm.model import rope_frequencies, set_rope_scaling

ORIGINAL = 32  # the trained length of the tiny models here; sequences run to 3x it
HEAD_DIM = 16  # 8 frequencies per head

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn-attention-beta-untruncated": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": ORIGINAL,
                                        "attention_factor": 1.2, "beta_fast": 16.0, "beta_slow": 2.0,
                                        "truncate": False},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIGINAL, "mscale": 0.8,
                    "mscale_all_dim": 0.5},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                 "long_factor": [1.0 + 0.7 * i for i in range(8)], "original_max_position_embeddings": ORIGINAL},
    "longrope-factor": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0 + i for i in range(8)],
                        "original_max_position_embeddings": ORIGINAL, "factor": 6.0},
}


def hf_model(scaling: dict, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
                         max_position_embeddings=max_positions, rope_scaling=dict(scaling), rope_theta=10000.0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def max_positions(scaling: dict) -> int:
    """max_position_embeddings as such models ship it: the trained length for dynamic NTK, the context otherwise."""
    return ORIGINAL if scaling["rope_type"] == "dynamic" else 4 * ORIGINAL


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_frequencies_and_attention_factor_equal_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = SCALINGS[name]
    hf = hf_model(scaling, max_positions(scaling))
    ours = ModelConfig.from_hf(hf.config.to_dict())
    for seq_len in (ORIGINAL // 2, ORIGINAL, 3 * ORIGINAL):
        theirs, their_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf.config, "cpu", seq_len=seq_len)
        mine, my_factor = rope_frequencies(ours, seq_len)
        torch.testing.assert_close(mine, theirs.float(), rtol=1e-6, atol=0)
        assert my_factor == pytest.approx(their_factor, rel=1e-6), seq_len


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_logits_equal_transformers_at_three_times_the_original_length(name, tmp_path):
    scaling = SCALINGS[name]
    hf = hf_model(scaling, max_positions(scaling))
    hf.save_pretrained(tmp_path)
    model, _ = mightylm.load(tmp_path)
    idx = torch.randint(0, 128, (2, 3 * ORIGINAL))
    with torch.no_grad():
        expected = hf(idx).logits
        torch.testing.assert_close(model(idx), expected, rtol=1e-4, atol=1e-4)
        short = idx[:, :ORIGINAL // 2]  # inside the original length (LongRoPE's short factors; dynamic unscaled)
        torch.testing.assert_close(model(short), hf(short).logits, rtol=1e-4, atol=1e-4)
    if scaling["rope_type"] == "dynamic":
        assert model.config.max_seq_len == 3 * ORIGINAL  # the context dynamic NTK reaches: factor x trained length


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_both_spellings_round_trip(name):
    scaling = SCALINGS[name]
    base = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "intermediate_size": 96, "head_dim": HEAD_DIM,
            "max_position_embeddings": max_positions(scaling)}
    old = {k if k != "rope_type" else "type": v for k, v in scaling.items()}
    configs = [ModelConfig.from_hf({**base, "rope_scaling": scaling}),
               ModelConfig.from_hf({**base, "rope_scaling": old}),
               ModelConfig.from_hf({**base, "rope_parameters": {**scaling, "rope_theta": 10000.0}})]
    assert configs[0] == configs[1] == configs[2]
    assert ModelConfig.from_hf(json.loads(json.dumps(configs[0].to_hf()))) == configs[0]


def test_phi3_original_length_outside_the_scaling_wins():
    config = ModelConfig.from_hf({"model_type": "phi3", "vocab_size": 128, "hidden_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 4, "intermediate_size": 96, "max_position_embeddings": 128,
                                  "original_max_position_embeddings": 16,
                                  "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8,
                                                   "long_factor": [2.0] * 8}})
    assert config.rope_scaling["original_max_position_embeddings"] == 16


def test_scaling_set_on_a_loaded_model_changes_it_and_says_so():
    from conftest import tiny

    model = tiny(max_seq_len=ORIGINAL)
    idx = torch.randint(0, 256, (1, 2 * ORIGINAL))
    with torch.no_grad():
        before = model(idx)
        said = set_rope_scaling(model, "yarn:4")
        after = model(idx)
    assert said == f"RoPE scaling none -> yarn x4 (trained length {ORIGINAL}); context {ORIGINAL} -> {4 * ORIGINAL} tokens"
    assert model.config.max_seq_len == 4 * ORIGINAL
    assert not torch.allclose(before, after, atol=1e-3)  # the tables were made again
    fresh = tiny(max_seq_len=4 * ORIGINAL, rope_scaling={"type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": ORIGINAL})
    with torch.no_grad():
        torch.testing.assert_close(after, fresh(idx))  # same weights (same seed), same scaling: same logits
        assert "yarn x4 -> none" in set_rope_scaling(model, "none")
        torch.testing.assert_close(model(idx), before)


def test_bad_scalings_are_refused_clearly():
    with pytest.raises(ConfigError, match="unsupported rope scaling 'ntk'; supported: linear, dynamic, yarn, llama3, "
                                          "longrope"):
        ModelConfig.from_preset("tiny", rope_scaling={"type": "ntk", "factor": 2.0})
    with pytest.raises(ConfigError, match="'yarn' does not take alpha"):
        ModelConfig.from_preset("tiny", rope_scaling={"type": "yarn", "factor": 2.0, "alpha": 1,
                                                      "original_max_position_embeddings": 64})
    with pytest.raises(ConfigError, match="needs original_max_position_embeddings"):
        ModelConfig.from_preset("tiny", rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(ConfigError, match="short_factor has 3 entries; the rotary dimension 16 needs 8"):
        ModelConfig.from_preset("tiny", rope_scaling={"type": "longrope", "short_factor": [1.0] * 3,
                                                      "long_factor": [1.0] * 8, "original_max_position_embeddings": 8})
    model = mightylm.Transformer(ModelConfig.from_preset("tiny"))
    with pytest.raises(ConfigError, match="must exceed 1 to extend"):
        set_rope_scaling(model, "yarn:0.5")
    with pytest.raises(ConfigError, match="write linear:F, dynamic:F or yarn:F"):
        set_rope_scaling(model, "llama3:8")
    with pytest.raises(ConfigError, match="must be a number"):
        set_rope_scaling(model, "yarn:four")


def test_mighty_generate_takes_a_rope_scaling(tmp_path, bpe_tokenizer, capsys):
    from conftest import tiny

    from mightylm.cli import main

    mightylm.save(tiny(vocab_size=bpe_tokenizer.vocab_size, max_seq_len=64), bpe_tokenizer, tmp_path / "m")
    args = ["generate", "--model", str(tmp_path / "m"), "--prompt", "To be", "--max_new_tokens", "4",
            "--temperature", "0"]
    assert main(args + ["--rope_scaling", "yarn:4"]) == 0
    assert "RoPE scaling none -> yarn x4 (trained length 64); context 64 -> 256 tokens" in capsys.readouterr().err
    assert main(args + ["--rope_scaling", "yarn:1"]) != 0
    assert "must exceed 1" in capsys.readouterr().err


def test_passkey_prompts_have_the_asked_length_and_depth(bpe_tokenizer):
    from conftest import SAMPLE_TEXT

    from mightylm.evaluate.longctx import INTRO, NEEDLE, QUESTION, first_number, passkey, passkey_items

    items = passkey_items(bpe_tokenizer, SAMPLE_TEXT * 40, [200, 400], [0.0, 0.5, 1.0], samples=2, seed=1)
    assert len(items) == 12 and len({i["key"] for i in items}) > 1
    for item in items:
        assert len(item["ids"]) == item["length"]
        text = bpe_tokenizer.decode(item["ids"])
        assert NEEDLE.format(key=item["key"]) in text and text.endswith(QUESTION)
        intro, needle = bpe_tokenizer.encode(INTRO), bpe_tokenizer.encode(NEEDLE.format(key=item["key"]))
        room = item["length"] - len(intro) - len(needle) - len(bpe_tokenizer.encode(QUESTION))  # filler tokens
        where = next(i for i in range(len(item["ids"])) if item["ids"][i:i + len(needle)] == needle)
        assert where - len(intro) == round(item["depth"] * room)  # filler tokens before the needle
    assert first_number(" 71432. Remember") == 71432 and first_number("no digits") is None

    class Oracle:  # answers every prompt's key: the bookkeeping must then say 100 %
        def __init__(self, items):
            self.keys = {tuple(i["ids"]): i["key"] for i in items}

    import mightylm.evaluate.longctx as longctx

    oracle = Oracle(items[:6])
    original = longctx.greedy
    longctx.greedy = lambda model, ids, n: bpe_tokenizer.encode(f" {oracle.keys.get(tuple(ids), 12345)}.")
    try:
        result = passkey(None, bpe_tokenizer, items)
    finally:
        longctx.greedy = original
    assert result["accuracy"] == 0.5 and result["by_length_depth"]["200"] == {"0": 1.0, "0.5": 1.0, "1": 1.0}
    assert result["by_length_depth"]["400"] == {"0": 0.0, "0.5": 0.0, "1": 0.0}


def test_perplexity_by_position_averages_the_token_losses(bpe_tokenizer):
    from conftest import SAMPLE_TEXT, tiny

    from mightylm.evaluate.longctx import position_perplexity

    model = tiny(vocab_size=bpe_tokenizer.vocab_size, max_seq_len=64)
    result = position_perplexity(model, bpe_tokenizer, SAMPLE_TEXT * 20, length=128, bucket=32, windows=2)
    ids = torch.tensor([bpe_tokenizer.encode(SAMPLE_TEXT * 20)[:256]]).view(2, 128)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                                reduction="none").view(2, 127).mean(0)
    assert [b["positions"] for b in result["buckets"]] == ["1-32", "33-64", "65-96", "97-127"]
    assert result["buckets"][1]["nll"] == pytest.approx(float(nll[32:64].mean()), rel=1e-5)
    assert result["nll"] == pytest.approx(float(nll.mean()), rel=1e-5)


def test_mighty_eval_longctx_runs_past_the_context(tmp_path, bpe_tokenizer, capsys):
    from conftest import SAMPLE_TEXT, tiny

    from mightylm.cli import main

    mightylm.save(tiny(vocab_size=bpe_tokenizer.vocab_size, max_seq_len=128), bpe_tokenizer, tmp_path / "m")
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT * 30)
    assert main(["eval", "longctx", "--model", str(tmp_path / "m"), "--text", str(tmp_path / "text.txt"),
                 "--lengths", "256", "--lengths", "384", "--samples", "1", "--bucket", "64",
                 "--rope_scaling", "yarn:2", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "passkey accuracy by length" in printed and "321-383" in printed
    summary = json.loads((tmp_path / "out" / "longctx" / "summary.json").read_text())
    assert len(summary["answers"]) == 2 * 3 + 2 + 2 and summary["settings"]["rope_scaling"] == "yarn:2"
    assert set(summary["metrics"]) == {"passkey_accuracy", "qa1_accuracy", "qa2_accuracy", "nll"}
    assert "qa2 accuracy by length: 256" in printed


def test_context_extension_by_fine_tuning_keeps_the_scaling(tmp_path, bpe_tokenizer, capsys):
    """`mighty finetune full|lora --rope_scaling yarn:2` trains under the new scaling: a full fine-tune's checkpoint
    holds it (transformers reads it back), a LoRA run says to use the adapter with it."""
    from conftest import tiny

    from mightylm.cli import main

    mightylm.save(tiny(vocab_size=bpe_tokenizer.vocab_size, max_seq_len=64), bpe_tokenizer, tmp_path / "m")
    rows = [{"instruction": "Repeat the words.", "input": " ".join(["to be or not"] * 6), "output": "to be or not " * 6}
            for _ in range(8)]
    (tmp_path / "long.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = ["--model", str(tmp_path / "m"), "--data", str(tmp_path / "long.jsonl"), "--rope_scaling", "yarn:2",
              "--sft.max_len", "128", "--train.steps", "2", "--train.batch_size", "2", "--train.warmup", "1"]
    assert main(["finetune", "full", *common, "--out", str(tmp_path / "full")]) == 0
    assert "context 64 -> 128 tokens" in capsys.readouterr().out
    tuned, _ = mightylm.load(tmp_path / "full")
    assert tuned.config.rope_scaling["type"] == "yarn" and tuned.config.max_seq_len == 128
    assert json.loads((tmp_path / "full" / "config.json").read_text())["rope_scaling"]["factor"] == 2.0
    assert main(["finetune", "lora", *common, "--out", str(tmp_path / "lora")]) == 0
    assert f"--adapter {tmp_path / 'lora'} --rope_scaling yarn:2" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["qa1", "qa2"])
def test_fact_questions_hide_a_consistent_story(task, bpe_tokenizer):
    """The story's facts sit in order inside the filler, the question ends the prompt, and the expected room is the
    one the facts imply (recomputed here from the prompt's text)."""
    import re

    from conftest import SAMPLE_TEXT

    from mightylm.evaluate.longctx import facts, fact_items, first_place

    items = fact_items(bpe_tokenizer, SAMPLE_TEXT * 60, [600, 900], task, samples=3, seed=2)
    assert len(items) == 6
    for item in items:
        text = bpe_tokenizer.decode(item["ids"])
        assert len(item["ids"]) == item["length"] and text.rstrip().endswith("is in the")
        moves = re.findall(r"(\w+) went to the (\w+)\.", text)
        where = dict(moves)  # the last move of each person wins
        if task == "qa1":
            person = re.search(r"Where is (\w+)\?", text).group(1)
        else:
            person = re.search(r"(\w+) picked up the", text).group(1)
        assert item["key"] == where[person]
    assert first_place(" office, then the kitchen") == "office" and first_place("nowhere") is None

    import mightylm.evaluate.longctx as longctx

    original = longctx.greedy
    longctx.greedy = lambda model, ids, n: bpe_tokenizer.encode(" " + next(i["key"] for i in items if i["ids"] == ids))
    try:
        assert facts(None, bpe_tokenizer, items)["accuracy"] == 1.0
    finally:
        longctx.greedy = original
