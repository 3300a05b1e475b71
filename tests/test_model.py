import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mightylm.config import ConfigError, ModelConfig
from mightylm.model import KVCache, Transformer

from conftest import tiny


def test_model_import_pulls_no_heavy_packages():
    code = ("import sys, mightylm.model; bad = [m for m in ('transformers', 'peft', 'bitsandbytes', 'fastapi', "
            "'tokenizers', 'safetensors') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 5}, {"qkv_bias": True, "tie_embeddings": True},
                                       {"rope_scaling": {"type": "linear", "factor": 4.0}}])
def test_kv_cache_decode_equals_full_forward(overrides):
    model = tiny(**overrides)
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, 2, 24)
        steps = [model(idx[:, :10], cache=cache, start=0)]
        steps += [model(idx[:, t:t + 1], cache=cache, start=t) for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_rows_match_unpadded():
    model = tiny()
    a, b = torch.randint(0, 256, (1, 12)), torch.randint(0, 256, (1, 7))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], dim=1)])
    with torch.no_grad():
        cache = KVCache(model.config, 2, 12)
        padded = model(batch, cache=cache, start=0, pad=torch.tensor([0, 5]))
        alone = model(b)
    torch.testing.assert_close(padded[1, 5:], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[0], model(a)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [  # dynamic NTK trained at 11: the chunk's table differs from the rows'
    {}, {"rope_scaling": {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 11}}])
def test_segments_in_one_pass_equal_each_batch_alone(overrides):
    """A padded decode step of 3 rows and a 5-token chunk of a prompt on its own cache, in one pass (`Segments`):
    the same logits and cache contents as the two forward passes apart."""
    from mightylm.model import Segment, Segments

    model = tiny(**overrides)
    rows, prompt = torch.randint(0, 256, (3, 9)), torch.randint(0, 256, (1, 14))
    pad = torch.tensor([0, 4, 2])
    with torch.no_grad():
        caches = [[KVCache(model.config, 3, 12), KVCache(model.config, 1, 16)] for _ in range(2)]
        for pool, own in caches:  # history: the rows' prompts (left-padded), the chunk's first 9 tokens
            model(rows, cache=pool, start=0, pad=pad)
            model(prompt[:, :9], cache=own, start=0)
        (pool, own), (pool2, own2) = caches
        step = torch.randint(0, 256, (3, 1))
        apart = [model(step, cache=pool, start=9, pad=pad)[:, 0], model(prompt[:, 9:], cache=own, start=9)[0]]
        x = model.embed(torch.cat([step[:, 0], prompt[0, 9:]]))[:, None]  # (3 + 5, 1, dim)
        segments = Segments([Segment(pool2, 9, 3, 1, pad), Segment(own2, 9, 1, 5)])
        together = model.head(model.trunk(x, cache=segments))[:, 0]
    torch.testing.assert_close(together, torch.cat(apart), atol=1e-5, rtol=1e-5)
    for a, b in zip(pool.k + pool.v + own.k + own.v, pool2.k + pool2.v + own2.k + own2.v):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(8, 1, dim\)"):
        model.trunk(x[:, 0][None], cache=segments)
    from mightylm.model import SinkKVCache

    with pytest.raises(ValueError, match="full caches"):  # a sink cache has positions of its own
        model.trunk(x[:1], cache=Segments([Segment(SinkKVCache(model.config, 1, 16), 0, 1, 1)]))


def test_embeds_input_equals_token_input():
    model = tiny()
    idx = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(embeds=model.embed(idx)), model(idx))
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_tied_embeddings_share_storage_and_param_count():
    model = tiny(tie_embeddings=True)
    assert model.lm_head.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) == model.config.n_params


def test_preset_param_counts_match_published_sizes():
    assert abs(ModelConfig.from_preset("smollm2-135m").n_params - 134.5e6) < 0.1e6
    assert abs(ModelConfig.from_preset("qwen2.5-0.5b").n_params - 494.0e6) < 0.5e6
    assert abs(ModelConfig.from_preset("tinyllama-1.1b").n_params - 1100.0e6) < 1e6
    assert abs(ModelConfig.from_preset("llama-3.2-1b").n_params - 1235.8e6) < 0.5e6


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="supported model types: llama, mistral, qwen2"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ConfigError, match="missing required field 'hidden_size'"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 10})
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.from_preset("nope")
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama",\n oops}')
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON \(line 2\)"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="not divisible"):
        ModelConfig(dim=10, n_heads=3)
    with pytest.raises(ConfigError, match="rope scaling 'yarn' needs factor"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "intermediate_size": 8, "rope_scaling": {"rope_type": "yarn"}})
    with pytest.raises(ConfigError, match="supported: default, linear, dynamic, yarn, llama3, longrope"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "intermediate_size": 8, "rope_scaling": {"rope_type": "su"}})


def test_config_round_trips_through_hf():
    for name in ("smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b", "mistral-7b"):
        config = ModelConfig.from_preset(name)
        assert ModelConfig.from_hf(config.to_hf()) == config


@pytest.mark.parametrize("chunk_elements", [256 * 7, 256 * 64, 1 << 24])  # 7 rows, 64 rows, all rows at once
@pytest.mark.parametrize("unscored", ["none", "a third", "most"])  # only scored rows reach the head
def test_linear_cross_entropy_equals_logits_then_cross_entropy(chunk_elements, unscored):
    from mightylm.model import IGNORE_INDEX, linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(50, 32, requires_grad=True)
    w = torch.randn(256, 32, requires_grad=True)
    labels = torch.randint(0, 256, (50,))
    if unscored == "a third":
        labels[::3] = IGNORE_INDEX
    elif unscored == "most":  # a fine-tuning batch: the prompt's rows unscored, a few answer rows scored
        labels[torch.arange(50) % 10 < 8] = IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(h @ w.T, labels, ignore_index=IGNORE_INDEX)
    grads = torch.autograd.grad(expected * 2.5, (h, w))  # a scale after the loss reaches both gradients
    loss = linear_cross_entropy(h, w, labels, chunk_elements)
    torch.testing.assert_close(loss, expected)
    for got, want in zip(torch.autograd.grad(loss * 2.5, (h, w)), grads):
        torch.testing.assert_close(got, want)
    with torch.no_grad():  # validation: no gradients computed, same loss
        torch.testing.assert_close(linear_cross_entropy(h, w, labels, chunk_elements), expected)


def test_linear_cross_entropy_reuses_the_buffers_its_workspace_keeps():
    from mightylm.model import IGNORE_INDEX, linear_cross_entropy

    torch.manual_seed(2)
    w = torch.randn(256, 32, requires_grad=True)
    workspace = {}
    held = []
    for rows, scored in ((30, 30), (30, 12), (60, 45), (60, 60)):  # fewer rows fit the kept buffers, more grow them
        h = torch.randn(rows, 32, requires_grad=True)
        labels = torch.randint(0, 256, (rows,))
        labels[scored:] = IGNORE_INDEX
        expected = torch.nn.functional.cross_entropy(h @ w.T, labels, ignore_index=IGNORE_INDEX)
        loss = linear_cross_entropy(h, w, labels, 256 * 40, workspace=workspace)
        torch.testing.assert_close(loss, expected)
        for got, want in zip(torch.autograd.grad(loss, (h, w)), torch.autograd.grad(expected, (h, w))):
            torch.testing.assert_close(got, want)
        held.append(workspace["chunks"][0].data_ptr())
    assert held[0] == held[1] and held[2] == held[3] and held[1] != held[2]
    assert workspace["chunks"][0].shape == (40, 256)  # 45 scored rows: chunks of 40


def test_fit_keeps_the_loss_buffers_while_it_trains_and_drops_them_after(tmp_path):
    from mightylm.data.loader import Loader
    from mightylm.train import TrainConfig, cross_entropy, fit

    model = tiny()
    seen = []

    def loss_fn(net, batch):
        seen.append(net.loss_workspace.get("chunks", (None,))[0] if net.loss_workspace is not None else "none")
        return cross_entropy(net, batch)

    ids = torch.randint(0, 256, (8, 17))
    items = [{"input_ids": r[:-1], "labels": r[1:]} for r in ids]
    fit(model, Loader(items, 4, shuffle=False), tmp_path, TrainConfig(steps=3, batch_size=4, warmup=1,
        eval_every=10**9, save_every=10**9, log_every=1), loss_fn=loss_fn, progress=False)
    assert seen[0] is None and seen[1] is seen[2] is not None  # made by the first step, the same tensor after
    assert model.loss_workspace is None


def test_linear_cross_entropy_under_bf16_autocast_and_with_nothing_scored():
    from mightylm.model import IGNORE_INDEX, linear_cross_entropy

    torch.manual_seed(1)
    h = torch.randn(40, 32, requires_grad=True)
    w = torch.randn(256, 32, requires_grad=True)
    labels = torch.randint(0, 256, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # products in bf16 (as nn.Linear's would be), softmax in fp32
        expected = torch.nn.functional.cross_entropy((h @ w.T).float(), labels)
        loss = linear_cross_entropy(h, w, labels, 256 * 16)
    want = torch.autograd.grad(expected, (h, w))
    torch.testing.assert_close(loss, expected, atol=2e-2, rtol=1e-2)
    for got, ref in zip(torch.autograd.grad(loss, (h, w)), want):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    nothing = torch.full((40,), IGNORE_INDEX)
    loss = linear_cross_entropy(h, w, nothing)
    assert float(loss) == 0 and all(not g.any() for g in torch.autograd.grad(loss, (h, w)))


@pytest.mark.parametrize("overrides", [{"tie_embeddings": True}, {"tie_embeddings": False}])
def test_forward_with_labels_returns_the_loss_and_its_gradients(overrides):
    model = tiny(**overrides).train()
    idx = torch.randint(0, 256, (2, 16))
    labels = torch.randint(0, 256, (2, 16))
    labels[0, :5] = -100
    reference = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), labels.flatten(), ignore_index=-100)
    want = torch.autograd.grad(reference, list(model.parameters()))
    loss = model(idx, labels=labels)
    torch.testing.assert_close(loss, reference)
    for got, w in zip(torch.autograd.grad(loss, list(model.parameters())), want):
        torch.testing.assert_close(got, w, atol=1e-6, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the products in bf16 as nn.Linear's would be
        ours = model(idx, labels=labels)
        theirs = torch.nn.functional.cross_entropy(model(idx).float().flatten(0, 1), labels.flatten())
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("prompt_tokens", [0, 3])
def test_forward_is_head_of_trunk_of_inputs(prompt_tokens):
    """The named parts compose to forward exactly: plain, left-padded, with a KV cache, with virtual tokens
    (prompt tuning), and for the loss."""
    from mightylm.adapters.prompt import apply_prompt_tuning

    model = tiny()
    if prompt_tokens:
        apply_prompt_tuning(model, prompt_tokens, init=torch.randn(prompt_tokens, model.config.dim))
    idx = torch.randint(0, 256, (2, 12))
    pad = torch.tensor([0, 4])
    labels = torch.randint(0, 256, (2, 12))

    def parts(idx, *, cache=None, start=0, pad=None, last_only=False):
        x = model.inputs(idx, pad=pad, start=start)
        assert x.shape[1] == idx.shape[1] + (prompt_tokens if start == 0 else 0)
        return model.trunk(x, cache=cache, start=start, pad=pad, last_only=last_only)

    with torch.no_grad():
        assert torch.equal(model(idx), model.head(parts(idx)))
        assert torch.equal(model(idx, pad=pad), model.head(parts(idx, pad=pad)))
        assert torch.equal(model(idx, last_only=True), model.head(parts(idx, last_only=True)))
        assert torch.equal(model(idx, labels=labels), model.loss(parts(idx), labels))
        a, b = model.make_cache(2, 16), model.make_cache(2, 16)
        assert torch.equal(model(idx, cache=a, pad=pad), model.head(parts(idx, cache=b, pad=pad)))
        step = torch.randint(0, 256, (2, 1))
        assert torch.equal(model(step, cache=a, start=12, pad=pad), model.head(parts(step, cache=b, start=12, pad=pad)))
    assert parts(idx).shape == (2, 12, model.config.dim)


def test_rope_scalings_are_a_table_and_init_finds_residual_projections_by_name():
    from mightylm.model import RESIDUAL_PROJECTIONS, ROPE_SCALINGS, rope_frequencies

    assert set(ROPE_SCALINGS) == {"linear", "dynamic", "yarn", "llama3", "longrope"}
    base, _ = rope_frequencies(ModelConfig.from_preset("tiny"))
    scaled, _ = rope_frequencies(ModelConfig.from_preset("tiny", rope_scaling={"type": "linear", "factor": 4.0}))
    torch.testing.assert_close(scaled, base / 4)
    model = Transformer(ModelConfig.from_preset("tiny", n_layers=8))
    stds = {name.rpartition(".")[2]: module.weight.std().item() for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith("layers.0.")}
    for leaf, std in stds.items():  # N(0, 0.02), residual writers scaled by 1/sqrt(2 * n_layers) = 1/4
        assert std == pytest.approx(0.02 / 4 if leaf in RESIDUAL_PROJECTIONS else 0.02, rel=0.15), leaf


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True}, {"sliding_window": 6}], ids=["llama", "qwen2", "window"])
def test_a_packed_row_computes_exactly_its_documents_one_by_one(overrides):
    """Packing with `documents`: attention never crosses a document and positions restart with each, so the loss
    and every gradient equal those of the documents run as separate (right-padded) rows."""
    from mightylm.data.loader import IGNORE

    torch.manual_seed(0)
    lengths = (5, 9, 4)
    docs = [torch.randint(0, 256, (n,)) for n in lengths]
    labels = [torch.where(torch.rand(n) < 0.6, torch.randint(0, 256, (n,)), IGNORE) for n in lengths]
    width = max(lengths)
    rows = torch.zeros(len(docs), width, dtype=torch.long)
    row_labels = torch.full((len(docs), width), IGNORE)
    for i, (d, l) in enumerate(zip(docs, labels)):
        rows[i, :len(d)], row_labels[i, :len(l)] = d, l
    packed, packed_labels = torch.cat(docs)[None], torch.cat(labels)[None]
    documents = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]

    results = []
    for how in ("one by one", "packed", "packed without documents"):
        model = tiny(**overrides).train()
        if how == "one by one":
            loss = model(rows, labels=row_labels)
        else:
            loss = model(packed, labels=packed_labels, documents=documents if how == "packed" else None)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (alone, alone_grads), (together, together_grads), (crossing, _) = results
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    for name, grad in alone_grads.items():
        torch.testing.assert_close(together_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.allclose(crossing, alone, rtol=1e-4)  # without `documents` the packed row attends across

    model = tiny(**overrides)
    with torch.no_grad():  # and the logits of each document, position by position
        logits = model(packed, documents=documents)[0].split(lengths)
        for i, d in enumerate(docs):
            torch.testing.assert_close(logits[i], model(d[None])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from Linux's /proc")
def test_a_kv_cache_holds_memory_for_the_slots_written_not_its_size():
    """A server's pool is max_batch x max_len slots; the pages of slots never written stay unmapped (an anonymous
    memory map, zero-filled on first touch), so a 1 GiB cache costs little until filled; what is read is zeros."""
    def resident_mib():
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
        return int(line.split()[1]) / 1024

    config = ModelConfig(vocab_size=256, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=128, max_seq_len=4096)
    before = resident_mib()
    cache = KVCache(config, batch_size=16, max_len=2048)  # 8 layers x 2 x 16 x 8 x 2048 x 64 x 4 bytes = 1 GiB
    assert sum(t.numel() * t.element_size() for t in cache.k + cache.v) == 2**30
    k, v = cache.update(0, 0, torch.ones(16, 8, 10, 64), torch.ones(16, 8, 10, 64))
    assert k.shape == (16, 8, 10, 64) and float(cache.k[0][:, :, 10:20].abs().sum()) == 0.0
    assert resident_mib() - before < 200


@pytest.mark.parametrize("prompt_len", [3, 6, 13])  # inside the window, equal to it, past it
def test_a_rolling_cache_decodes_like_the_full_window_forward(prompt_len):
    """A sliding-window model (window 6) with a RollingKVCache of 6 slots: prompt, then a 5-token chunk, then one
    token at a time to 30 positions, each step's logits equal the full forward with the window mask; the cache's
    memory never grows."""
    from mightylm.model import RollingKVCache

    model = tiny(sliding_window=6)
    idx = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        full = model(idx)
        cache = model.make_cache(2, 30, rolling=True)
        assert isinstance(cache, RollingKVCache) and cache.k[0].shape[2] == 6
        steps = [model(idx[:, :prompt_len], cache=cache, start=0)]
        steps.append(model(idx[:, prompt_len:prompt_len + 5], cache=cache, start=prompt_len))
        steps += [model(idx[:, t:t + 1], cache=cache, start=t) for t in range(prompt_len + 5, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.k[0].shape[2] == 6


def test_generation_with_a_rolling_cache_equals_the_full_cache():
    from mightylm.generate import Sampling, generate

    model = tiny(sliding_window=8)
    prompt = torch.randint(0, 256, (12,)).tolist()
    s = Sampling(max_new_tokens=40)
    made = []
    original = model.make_cache
    model.make_cache = lambda *a, **k: made.append(original(*a, **k)) or made[-1]
    rolling = generate(model, [prompt], s)  # one unpadded row past its window: the rolling cache
    assert type(made[0]).__name__ == "RollingKVCache"
    with torch.no_grad():
        ids = list(prompt)
        for _ in range(40):  # the full forward each step, window mask and all
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert rolling[0] == ids[len(prompt):]
    with pytest.raises(ValueError, match="for sliding-window models"):
        tiny().make_cache(1, 10, rolling=True)


def test_a_sink_cache_equals_the_full_cache_while_the_text_fits():
    from mightylm.model import SinkKVCache

    model = tiny(sliding_window=None)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        full = model(idx)
        cache = SinkKVCache(model.config, 2, 16, sinks=4)
        steps = [model(idx[:, :5], cache=cache, start=0)] + [model(idx[:, t:t + 1], cache=cache, start=t)
                                                             for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceed the cache's 16"):
        model(idx[:, :3], cache=cache, start=15)


def test_past_its_size_a_sink_cache_sees_the_sinks_and_the_latest_tokens_at_positions_within_the_cache():
    """One layer, so a token's key and value depend on the token alone: once the cache is full, each step's logits
    equal a fresh forward over [the 2 sinks, the latest 6 tokens] at positions 0..7 (StreamingLLM's rule); memory
    stays 8 slots."""
    from mightylm.model import SinkKVCache

    model = tiny(sliding_window=None, n_layers=1)
    ids = torch.randint(0, 256, (1, 30))
    cache = SinkKVCache(model.config, 1, 8, sinks=2)
    with torch.no_grad():
        model(ids[:, :8], cache=cache, start=0)
        for t in range(8, 30):
            step = model(ids[:, t:t + 1], cache=cache, start=t)[0, -1]
            kept = torch.cat([ids[:, :2], ids[:, t - 5:t + 1]], dim=1)
            torch.testing.assert_close(step, model(kept)[0, -1], atol=1e-5, rtol=1e-5)
    assert cache.k[0].shape[2] == 8


def test_generation_with_attention_sinks_runs_past_the_context_and_starts_like_the_full_cache():
    from mightylm.generate import Sampling, generate

    model = tiny(sliding_window=None, max_seq_len=32)
    prompt = torch.randint(0, 256, (6,)).tolist()
    with pytest.raises(Exception, match="exceeds the model's context of 32"):
        generate(model, [prompt], Sampling(max_new_tokens=60))
    sinks = generate(model, [prompt], Sampling(max_new_tokens=60, attention_sinks=(16, 4)))[0]
    assert len(sinks) == 60
    assert sinks[:10] == generate(model, [prompt], Sampling(max_new_tokens=10))[0]  # 16 positions: all fit
    long_prompt = torch.randint(0, 256, (40,)).tolist()  # longer than the cache: the rest fed one by one
    assert len(generate(model, [long_prompt], Sampling(max_new_tokens=5, attention_sinks=(16, 4)))[0]) == 5
