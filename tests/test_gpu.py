"""The model, decoding and training on a CUDA device: the same answers as transformers and as the CPU. Marked `gpu`:
skipped where CUDA is not available (conftest), as in CI. Each check is a function of the device, so the same
bodies can be read (and were exercised) on the CPU."""

import pytest
import torch

import mightylm
from mightylm.generate import Sampling, generate
from mightylm.model import KVCache

from conftest import serve_all, tiny
from test_serve import _reference, served_model
from test_train import config, dataset, tiny_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def served(bpe_tokenizer, tmp_path_factory):
    return served_model(bpe_tokenizer, tmp_path_factory.mktemp("adapters"))


def logits_equal_transformers(path, hf, device: str) -> None:
    model, _ = mightylm.load(path)
    model, hf = model.to(device), hf.to(device)
    idx = torch.randint(0, model.config.vocab_size, (2, 40), device=device)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=1e-4)


def cached_decoding_equals_the_full_forward(device: str) -> None:
    model = tiny(qkv_bias=True).to(device)
    idx = torch.randint(0, 256, (2, 24), device=device)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, 2, 24, device=device)
        steps = [model(idx[:, :10], cache=cache, start=0)]
        steps += [model(idx[:, t:t + 1], cache=cache, start=t) for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def greedy_tokens_equal_the_cpus(device: str) -> None:
    model = tiny(seed=3)
    prompts = [[5, 17, 42, 99, 3, 8], [7, 7, 1]]  # two rows, one left-padded
    s = Sampling(max_new_tokens=16)
    assert generate(model.to(device), prompts, s) == generate(model.cpu(), prompts, s)


def graphed_decoding_equals_the_dynamic_step(device: str) -> None:
    """Each decoded token one CUDA graph replay (static_decode.py): the same logits as the step launched op by op,
    the same tokens, and the graph's buffers reused from token to token."""
    from test_static_decode import steps_both_ways

    model = tiny(seed=4, qkv_bias=True, sliding_window=6).to(device)
    prompts = [[5, 17, 42, 99, 3, 8, 11, 12, 13], [7, 7, 1]]
    dynamic, static = steps_both_ways(model, prompts, steps=12)
    torch.testing.assert_close(torch.stack(static), torch.stack(dynamic), atol=1e-4, rtol=1e-4)
    s = Sampling(max_new_tokens=24)
    assert generate(model, prompts, s, cuda_graphs=True) == generate(model, prompts, s, cuda_graphs=False)


def compiled_graphs_equal_the_dynamic_step(device: str) -> None:
    """The graph of a step whose block torch.compile fused (static_decode.compile_blocks): the same logits as the
    step launched op by op, and the same tokens through `generate`."""
    from test_static_decode import steps_both_ways

    from mightylm import static_decode

    model = tiny(seed=4, qkv_bias=True, sliding_window=6).to(device)
    prompts = [[5, 17, 42, 99, 3, 8, 11, 12, 13], [7, 7, 1]]
    dynamic, static = steps_both_ways(model, prompts, steps=12, compiled=True)
    torch.testing.assert_close(torch.stack(static), torch.stack(dynamic), atol=1e-4, rtol=1e-4)
    s = Sampling(max_new_tokens=24)
    static_decode.compile_blocks(model)
    assert generate(model, prompts, s, cuda_graphs=True) == generate(model, prompts, s, cuda_graphs=False)


def cli_generate_equals_the_cpus(path, device: str, capsys, compile: bool = False) -> None:
    """`mighty generate --device DEVICE` (and with --compile) prints the greedy text the CPU does (float32)."""
    from mightylm.cli import main

    argv = ["generate", "--model", str(path), "--prompt", "To be", "--temperature", "0", "--max-new-tokens", "12"]
    assert main(argv) == 0
    on_cpu = capsys.readouterr().out
    assert main([*argv, "--device", device]) == 0
    assert capsys.readouterr().out == on_cpu
    if compile:
        assert main([*argv, "--device", device, "--compile"]) == 0
        assert capsys.readouterr().out == on_cpu


def served_rows_equal_each_alone(served, device: str) -> None:
    """The server's engine with its model and KV-cache pool on `device`: requests for the base model, a LoRA and
    a soft prompt, prefilled together and decoded in one batch, each get the greedy text `generate` gives them
    alone on the CPU."""
    import copy

    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.engine import Engine

    model, tokenizer, root = served
    bank = AdapterBank(copy.deepcopy(model).to(device))
    bank.add("lora", root / "lora")
    bank.add("prompt", root / "prompt")
    engine = Engine(bank.model, tokenizer, bank, max_batch=8, max_len=256)
    assert engine.pool.k[0].device.type == torch.device(device).type
    texts = ["To be", "The quick brown fox jumps over", "Héllo", "whether 'tis nobler in the mind to suffer"]
    jobs = [(text, adapter) for text in texts for adapter in (None, "lora", "prompt")][:8]
    s = Sampling(max_new_tokens=10)
    seqs = serve_all(engine, [(tokenizer.encode(text), s, bank.ids.get(adapter, 0)) for text, adapter in jobs])
    for seq, (text, adapter) in zip(seqs, jobs):
        got = tokenizer.decode([t for t in seq.generated if t not in tokenizer.stop_token_ids])
        assert got == _reference(model, tokenizer, adapter and root / adapter, text, 10), (text, adapter)


def bf16_training_learns(tmp_path, device: str) -> None:
    from mightylm.data.loader import Loader
    from mightylm.train import evaluate, fit

    model = tiny_model().to(device)
    val = Loader(dataset(16, seed=1), 8, shuffle=False)
    before = evaluate(model, val)
    summary = fit(model, Loader(dataset(), 4), tmp_path, config(steps=40, bf16=True), val=val, progress=False)
    assert summary["val_loss"] < before - 0.5
    assert model.embed.weight.dtype == torch.float32 and model.embed.weight.device.type == device


def test_logits_on_the_gpu_equal_transformers(hf_dir):
    _, path, hf = hf_dir
    try:
        logits_equal_transformers(path, hf, "cuda")
    finally:
        hf.cpu()  # the fixture's model is shared with the CPU tests


def test_cached_decoding_on_the_gpu_equals_the_full_forward():
    cached_decoding_equals_the_full_forward("cuda")


def test_greedy_tokens_on_the_gpu_equal_the_cpus():
    greedy_tokens_equal_the_cpus("cuda")


def test_graphed_decoding_on_the_gpu_equals_the_dynamic_step():
    graphed_decoding_equals_the_dynamic_step("cuda")


def test_compiled_graphs_on_the_gpu_equal_the_dynamic_step():
    compiled_graphs_equal_the_dynamic_step("cuda")


def test_cli_generate_on_the_gpu_equals_the_cpus(hf_dir, capsys):
    cli_generate_equals_the_cpus(hf_dir[1], "cuda", capsys, compile=hf_dir[0] == "llama")  # one compile


def test_served_rows_on_the_gpu_equal_each_alone(served):
    served_rows_equal_each_alone(served, "cuda")


def test_bf16_training_on_the_gpu_learns(tmp_path):
    bf16_training_learns(tmp_path, "cuda")
