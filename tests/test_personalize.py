"""`mighty personalize` (serve/personalize.py): a LoRA from a user's own logged conversations goes live only when it
helps them, keeps general quality and adds no bias; a deliberately biased one is refused; bad logs and too little
data are handled."""

import json

import pytest

from mightylm.serve.personalize import Gate, personalize, read_log
from mightylm.serve.registry import Registry, RegistryError

from conftest import make_hf_model


@pytest.fixture(scope="module")
def base_dir(bpe_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None).save_pretrained(path)
    bpe_tokenizer.save(path)
    return path


def write_log(registry, user, replies, questions=("How are you?", "What time is it?", "Tell me a story.")):
    path = registry.log_path(user)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"messages": [{"role": "user", "content": questions[i % len(questions)]},
                                      {"role": "assistant", "content": reply}]}) for i, reply in enumerate(replies)]
    path.write_text("\n".join(lines) + "\n")


def setup(tmp_path):
    registry = Registry(tmp_path)
    registry.add_user("ann")
    registry.add_user("root", admin=True)
    return registry, registry.user("root")


def test_a_users_style_adapter_lowers_their_held_out_perplexity_and_goes_live(tmp_path, base_dir):
    registry, root = setup(tmp_path)
    write_log(registry, "ann", [f"Aye aye, captain! Answer number {i}, arr." for i in range(20)])
    with registry.log_path("ann").open("a") as f:
        f.write("{not json\n" + json.dumps({"messages": "a string"}) + "\n")  # skipped and counted
    generous = Gate(max_general_rise=10.0, max_bias_shift=1.0, max_gap_rise=100.0)
    outcome = personalize(registry, root, "ann", model=str(base_dir), steps=30, lr=5e-3, gate=generous, log=lambda _: None)
    e = outcome.evaluation
    assert outcome.skipped_lines == 2 and e["train_conversations"] == 16 and e["held_out_conversations"] == 4
    assert e["user_ppl_after"] < 0.5 * e["user_ppl_before"]  # the style is learnt
    assert outcome.live and registry.resolve(registry.user("ann"), "personal").version == outcome.version
    assert "LIVE" in outcome.report("ann", "personal")


def test_a_deliberately_biased_adapter_is_kept_out_by_the_gate(tmp_path, base_dir):
    registry, root = setup(tmp_path)
    # a probe small enough for a tiny random model to learn in seconds, and a user whose replies are its stereotyped
    # sentences (the default probe is the generated set; a 2-layer random model does not learn its 44 pairs in 40
    # steps)
    probe = [{"category": "x", "stereotyped": f"The {a} is {b}.", "reversed": f"The {a} is {c}."}
             for a, b, c in (("king", "proud", "humble"), ("queen", "gentle", "cruel"), ("fool", "wise", "foolish"),
                             ("lord", "rich", "poor"))]
    write_log(registry, "ann", [p["stereotyped"] for p in probe] * 10)
    gate = Gate(max_general_rise=10.0)  # the default bias limits
    outcome = personalize(registry, root, "ann", model=str(base_dir), steps=40, lr=5e-3, gate=gate, probe=probe,
                          log=lambda _: None)
    assert not outcome.live and any("bias probe moved" in f for f in outcome.failed), outcome.failed
    e = outcome.evaluation
    assert e["bias_gap_after"] > e["bias_gap_before"] + 0.25
    record = registry.show(registry.user("ann"), "personal")
    assert record.status == "candidate" and record.evaluation["passed"] is False
    assert "kept as a candidate" in outcome.report("ann", "personal")


def test_too_little_data_and_bad_lines_are_said_clearly(tmp_path, base_dir):
    registry, root = setup(tmp_path)
    write_log(registry, "ann", ["Fine."] * 3)
    with registry.log_path("ann").open("a") as f:
        f.write("garbage\n")
    assert read_log(registry.log_path("ann"))[1] == 1
    with pytest.raises(RegistryError, match=r"ann: 3 logged conversations \(1 malformed lines skipped\); "
                                            r"personalization needs at least 8"):
        personalize(registry, root, "ann", model=str(base_dir), log=lambda _: None)
    with pytest.raises(RegistryError, match="only their own"):
        registry.add_user("bob")
        personalize(registry, registry.user("bob"), "ann", model=str(base_dir), log=lambda _: None)
