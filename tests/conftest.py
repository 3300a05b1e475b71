"""Fixtures: tiny random `transformers` models saved with save_pretrained (no download), and a
small byte-level BPE tokenizer trained here, so every test builds what it checks."""

import pytest
import torch

SAMPLE_TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles. "
    "Héllo wörld, naïve café! 東京 and emoji 🙂 too. The quick brown fox jumps over the lazy dog.\n"
)


def tiny(seed: int = 0, **overrides):
    """The one tiny random model of the tests: the "tiny" preset (every architectural axis, milliseconds to run)
    with `overrides`, seeded, in eval mode."""
    from mightylm.config import ModelConfig
    from mightylm.model import Transformer

    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny", **overrides)).eval()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def emulated_avx512_library():
    """The kernels built with tests/emulated_avx512.h forced in: their AVX-512 paths, intrinsic by intrinsic in
    portable code, runnable on any AVX2 CPU (correctness only, not speed). None without a compiler or AVX2."""
    from pathlib import Path

    from mightylm import kernels

    return kernels.build_library(include=Path(__file__).with_name("emulated_avx512.h"))


@pytest.fixture(params=["avx2", "avx512", "avx512-emulated"])
def kernel_path(request, monkeypatch):
    """Each kernel path in turn, made current; its name is returned. "avx512" runs where the CPU has the flags
    (skipped, saying so, elsewhere); "avx512-emulated" runs the same AVX-512 code through the emulation library on
    any AVX2 CPU (the library and the CPU's flags swapped for the test). The previous path is restored after."""
    from mightylm import kernels

    if kernels.gemv_library() is None:
        pytest.skip("no native kernels here (no compiler or no AVX2)")
    path = request.param
    if path == "avx512-emulated":
        lib = request.getfixturevalue("emulated_avx512_library")
        flags = kernels.cpu_flags() | kernels.ISA_FLAGS["avx512"]
        monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
        monkeypatch.setattr(kernels, "_lib", lib)
        path = "avx512"
    elif path not in kernels.available_isas():
        pytest.skip(f"this CPU lacks the {path} path's flags {sorted(kernels.ISA_FLAGS[path])}")
    before = kernels.kernel_isa()
    kernels.set_kernel_isa(path)
    yield path
    kernels.set_kernel_isa(before)


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
    from mightylm.tokenizer import train_bpe

    corpus = tmp_path_factory.mktemp("corpus") / "text.txt"
    corpus.write_text(SAMPLE_TEXT * 20)
    return train_bpe([corpus], vocab_size=320, show_progress=False)


HF_CONFIGS = {
    # llama: GQA, tied embeddings, llama3 RoPE scaling with a short original context so it bites
    "llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
    ),
    # mistral: multi-query attention, untied head, a sliding window shorter than the test sequences
    "mistral": dict(
        model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, tie_word_embeddings=False, sliding_window=8, max_position_embeddings=512,
    ),
    # qwen2: q/k/v bias, tied embeddings, a different rope theta
    "qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=512,
    ),
    # phi (Phi-2): LayerNorm, parallel attention + GELU MLP, partial rotary (0.5), biases everywhere, untied
    "phi": dict(
        model_type="phi", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, partial_rotary_factor=0.5, tie_word_embeddings=False, max_position_embeddings=512,
    ),
    # phi3: q/k/v and gate/up stored fused, partial rotary embeddings (Phi-4-mini's 0.75), a sliding window
    "phi3": dict(
        model_type="phi3", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=512, sliding_window=8,
        partial_rotary_factor=0.75, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    # mixtral: 4 experts, top-2 renormalised, untied head
    "mixtral": dict(
        model_type="mixtral", hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
        max_position_embeddings=512,
    ),
    # qwen2_moe: layer 0 dense (decoder_sparse_step 2), layer 1 sparse with a gated shared expert, top-2 not
    # renormalised, q/k/v bias
    "qwen2_moe": dict(
        model_type="qwen2_moe", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, decoder_sparse_step=2, norm_topk_prob=False, tie_word_embeddings=False,
        max_position_embeddings=512,
    ),
    # olmoe: q/k RMSNorm over the whole projections, 4 experts top-2 not renormalised
    "olmoe": dict(
        model_type="olmoe", hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, tie_word_embeddings=False,
        max_position_embeddings=512, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    ),
}


def make_hf_model(arch: str, vocab_size: int = 320, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**HF_CONFIGS[arch], **overrides}
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # biases start at zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session", params=sorted(HF_CONFIGS))
def hf_dir(request, tmp_path_factory, bpe_tokenizer):
    """(arch, directory, transformers model) for each architecture, with our tokenizer files."""
    arch = request.param
    model = make_hf_model(arch, vocab_size=bpe_tokenizer.vocab_size)
    path = tmp_path_factory.mktemp(f"hf-{arch}")
    model.save_pretrained(path)
    bpe_tokenizer.save(path)
    return arch, path, model


def serve_all(engine, jobs, timeout: float = 60):
    """Submit (prompt ids, Sampling, adapter id[, more Sequence fields]) jobs to a serve Engine together, run it until all are done, stop
    it; returns their Sequences (`.generated` holds each one's tokens)."""
    import threading

    from mightylm.serve.engine import Sequence

    finished, done = set(), threading.Event()

    def emit_for(i):
        def emit(ev):  # called in the engine thread
            if ev["type"] == "done":
                finished.add(i)
                if len(finished) == len(jobs):
                    done.set()
        return emit

    seqs = [Sequence(prompt, sampling, emit_for(i), adapter=adapter, **(more[0] if more else {}))
            for i, (prompt, sampling, adapter, *more) in enumerate(jobs)]
    for seq in seqs:
        engine.submit(seq)
    engine.start()
    try:
        assert done.wait(timeout)
    finally:
        engine.stop()
    return seqs


def random_lora(base, targets, out, base_model: str):
    """A copy of `base` with LoRA (r 4) on `targets` whose B matrices are random, so that it changes the outputs,
    saved in PEFT's format to `out`; returns the copy (the adapter applied, unmerged)."""
    import copy

    from mightylm.adapters.lora import apply_lora, save_lora

    lora = copy.deepcopy(base)
    apply_lora(lora, targets, r=4, alpha=8)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_lora(lora, out, base_model=base_model)
    return lora.eval()


def serve_with_and_without_lora(served, tokenizer, lora_dir, dense, lora, max_new_tokens: int = 8):
    """Three prompts, each with and without the adapter in `lora_dir`, served in one batch by an Engine over
    `served`; every request gets the tokens its reference (`lora` or `dense`) gives it alone. Returns the
    Sequences, in the order (prompt 1 without, prompt 1 with, prompt 2 without, ...)."""
    from mightylm.generate import Sampling, generate
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.engine import Engine

    bank = AdapterBank(served.eval())
    bank.add("lora", lora_dir)
    prompts = [tokenizer.encode(text) for text in ("To be", "The quick brown fox", "whether 'tis nobler")]
    jobs = [(p, adapter) for p in prompts for adapter in (None, "lora")]
    seqs = serve_all(Engine(served, tokenizer, bank, max_batch=8, max_len=64),
                     [(p, Sampling(max_new_tokens=max_new_tokens), bank.ids.get(a, 0)) for p, a in jobs])
    for seq, (p, adapter) in zip(seqs, jobs):
        with torch.no_grad():
            expected = generate(lora if adapter else dense, [p], Sampling(max_new_tokens=max_new_tokens))[0]
        assert seq.generated == expected, adapter
    return seqs


def run_app(app):
    """Serve an ASGI app with uvicorn on a free loopback port in a daemon thread: (base URL, a stop function)."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)

    def stop():
        server.should_exit = True
        thread.join(10)

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def run_http(handler):
    """Serve a http.server request handler class on a free loopback port in a daemon thread (a stub for clients
    under test): (base URL, a stop function)."""
    import threading
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop():
        server.shutdown()
        server.server_close()

    return f"http://127.0.0.1:{server.server_address[1]}", stop


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's chromium, chromium-driver


@pytest.fixture
def browser(tmp_path):
    import os

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian chromium + chromium-driver are not installed; `make test` installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=900,700", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
