"""Recurrent Memory Transformer (issue 22): the wrapper's semantics, BPTT, generation and its saved state."""

import pytest
import torch

from conftest import tiny
from mightylm.errors import UsageError
from mightylm.generate import Sampling
from mightylm.model import IGNORE_INDEX
from mightylm.rmt import RecurrentMemory, generate_rmt, load_memory, save_memory


def test_no_memory_and_one_segment_is_the_base_model():
    base = tiny()
    rmt = RecurrentMemory(base, segment=32, memory=0)
    idx = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(rmt(idx), base(idx))


def test_memory_carries_information_across_segments():
    """With memory, segment 2's logits depend on segment 1's tokens; without, they do not."""
    idx = torch.randint(0, 256, (1, 24))
    other = idx.clone()
    other[0, :4] = (other[0, :4] + 1) % 256  # change only the first segment
    for memory, depends in ((4, True), (0, False)):
        rmt = RecurrentMemory(tiny(), segment=8, memory=memory)
        with torch.no_grad():
            a, b = rmt(idx)[0, 8:], rmt(other)[0, 8:]
        assert (not torch.allclose(a, b, atol=1e-6)) == depends, memory


@pytest.mark.parametrize("bptt,reaches", [(1, False), (2, False), (3, True), (None, True)])
def test_the_gradient_reaches_segment_zero_exactly_when_the_bptt_window_covers_it(bptt, reaches):
    """Three segments; the loss on the last one only. Segment 0's token embeddings get a gradient iff the window
    spans all three segments."""
    rmt = RecurrentMemory(tiny(), segment=8, memory=4, bptt=bptt)
    idx = torch.randint(10, 256, (1, 24))
    idx[0, :8] = 3  # a token that appears only in segment 0
    labels = torch.full_like(idx, IGNORE_INDEX)
    labels[0, 16:] = torch.randint(0, 256, (8,))
    rmt(idx, labels=labels).backward()
    grad = rmt.base.embed.weight.grad[3]
    assert bool(grad.abs().sum() > 0) == reaches
    assert rmt.memory.grad is not None and (rmt.memory.grad.abs().sum() > 0) == reaches  # through segment 0 only


def test_greedy_generation_equals_the_forward_and_saved_memory_continues_it(tmp_path):
    """Greedy tokens from generate_rmt (a KV cache per segment, memory written when a segment fills) are the
    argmax of the wrapper's own forward over prompt + tokens, across two segment boundaries; a saved state
    continues the same way."""
    rmt = RecurrentMemory(tiny(), segment=8, memory=3).eval()
    prompt = torch.randint(0, 256, (13,)).tolist()
    s = Sampling(max_new_tokens=12)
    state = {}
    got = list(generate_rmt(rmt, prompt, s, state=state))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(rmt(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]
    save_memory(state["memory"], tmp_path / "memory.safetensors", state["tail"])
    memory, tail = load_memory(tmp_path / "memory.safetensors")
    more = list(generate_rmt(rmt, tail + [5], Sampling(max_new_tokens=4), memory=memory))
    again = list(generate_rmt(rmt, state["tail"] + [5], Sampling(max_new_tokens=4), memory=state["memory"]))
    assert more == again


def test_bad_settings_are_refused():
    with pytest.raises(UsageError, match="shorter than its 16 memory slots"):
        RecurrentMemory(tiny(), segment=8, memory=16)
    with pytest.raises(UsageError, match="at least 1"):
        RecurrentMemory(tiny(), segment=8, memory=2, bptt=0)
    with pytest.raises(UsageError, match="exceeds the decoder's context"):
        RecurrentMemory(tiny(max_seq_len=32), segment=30, memory=4)


def test_fit_trains_the_wrapper_whole_or_lora_plus_memory(tmp_path):
    """The one training loop trains the wrapper (it calls rmt(input_ids, labels=...)): every weight and the memory
    (the validation loss falls by more than a nat on a toy language split across two segments), or LoRA on the
    decoder plus the memory slots with everything else frozen."""
    from test_train import config, dataset

    from mightylm.adapters import mark_trainable
    from mightylm.adapters.lora import apply_lora
    from mightylm.data.loader import Loader
    from mightylm.train import evaluate, fit

    val = Loader(dataset(16, seed=1), 8, shuffle=False)
    whole = RecurrentMemory(tiny(vocab_size=64, n_layers=2), segment=8, memory=2, bptt=2)
    before = evaluate(whole, val)
    summary = fit(whole, Loader(dataset(), 4), tmp_path / "whole", config(steps=80), val=val, progress=False)
    assert summary["val_loss"] < before - 1.0

    rmt = RecurrentMemory(tiny(vocab_size=64, n_layers=2), segment=8, memory=2, bptt=2)
    apply_lora(rmt.base, targets=("q_proj", "v_proj", "down_proj"), r=4)
    assert mark_trainable(rmt) == sum(p.numel() for n, p in rmt.named_parameters() if "lora" in n) + 2 * 64
    frozen = rmt.base.layers[0].mlp.up_proj.weight.detach().clone()
    memory = rmt.memory.detach().clone()
    before = evaluate(rmt, val)
    summary = fit(rmt, Loader(dataset(), 4), tmp_path / "lora", config(steps=20, lr=3e-2), val=val, progress=False)
    assert summary["val_loss"] < before
    assert torch.equal(rmt.base.layers[0].mlp.up_proj.weight, frozen) and not torch.equal(rmt.memory, memory)


def test_mighty_finetune_rmt_and_generate_with_it(tmp_path, bpe_tokenizer, capsys):
    """`mighty finetune rmt` trains LoRA + memory over segments and writes adapter, settings and memory;
    `mighty generate --rmt DIR` decodes what generate_rmt over the loaded wrapper gives."""
    import json

    import mightylm
    from mightylm.cli import main
    from mightylm.rmt import generate_rmt, load_rmt

    mightylm.save(tiny(vocab_size=bpe_tokenizer.vocab_size, max_seq_len=128), bpe_tokenizer, tmp_path / "m")
    rows = [{"instruction": "Repeat the words.", "input": " ".join(["to be or not"] * 4), "output": "to be or not"}
            for _ in range(8)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "rmt"
    assert main(["finetune", "rmt", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--out",
                 str(out), "--segment", "16", "--memory", "4", "--r", "4", "--train.steps", "2",
                 "--train.batch_size", "2", "--train.warmup", "1"]) == 0
    printed = capsys.readouterr().out
    assert "4 memory slots over segments of 16 tokens" in printed and f"--rmt {out}" in printed
    assert {"adapter_config.json", "rmt.json", "rmt_memory.safetensors"} <= {p.name for p in out.iterdir()}
    prompt = "to be or not to be, that is the question"
    assert main(["generate", "--model", str(tmp_path / "m"), "--rmt", str(out), "--prompt", prompt,
                 "--temperature", "0", "--max_new_tokens", "20"]) == 0
    text = capsys.readouterr().out
    base, tok = mightylm.load(tmp_path / "m")
    wrapped = load_rmt(base, out)
    ids = [t for t in generate_rmt(wrapped, tok.encode(prompt), Sampling(max_new_tokens=20, stop_token_ids=tok.stop_token_ids))
           if t not in tok.stop_token_ids]
    assert text.rstrip("\n") == tok.decode(ids)
    assert main(["generate", "--model", str(tmp_path / "m"), "--rmt", str(tmp_path / "m"), "--prompt", "x"]) != 0
    assert "not a recurrent-memory run" in capsys.readouterr().err
    # `mighty eval longctx --rmt DIR`: the fact prompts read through the memory, answered as generate_rmt does
    from conftest import SAMPLE_TEXT

    from mightylm.evaluate.longctx import fact_items

    (tmp_path / "text.txt").write_text(SAMPLE_TEXT * 20)
    assert main(["eval", "longctx", "--model", str(tmp_path / "m"), "--rmt", str(out), "--tasks", "qa1",
                 "--lengths", "256", "--samples", "2", "--text", str(tmp_path / "text.txt"), "--bucket", "32",
                 "--out", str(tmp_path / "eval")]) == 0
    assert "recurrent memory: 4 slots over segments of 16 tokens" in capsys.readouterr().out
    summary = json.loads((tmp_path / "eval" / "longctx" / "summary.json").read_text())
    assert summary["settings"]["rmt"] == str(out) and summary["settings"]["adapter"] == str(out)
    items = fact_items(tok, SAMPLE_TEXT * 20, [256], "qa1", 2, seed=0)
    expected = [tok.decode(list(generate_rmt(wrapped, i["ids"], Sampling(max_new_tokens=6, temperature=0.0))))
                for i in items]
    assert [a["answer"] for a in summary["answers"]] == expected
