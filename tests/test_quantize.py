"""Quantization: NF4 against bitsandbytes, error budgets, the NF4-vs-int4 data-type comparison,
quantized checkpoints (save/load, metadata, the CLI), SmoothQuant on outlier channels, errors."""

import json

import pytest

import conftest
import torch
from torch import nn

import mightylm
from mightylm.adapters import mark_trainable
from mightylm.compress.nf4 import NF4Linear, _blockwise, dequantize_nf4, dynamic_map, nf4_bits_per_param, quantize_nf4
from mightylm.compress.quantize import (Int4Linear, Int8Linear, QuantizationError, dequantize_, model_bytes,
                                        quantize_)
from mightylm.compress.smoothquant import W8A8Linear, smooth_, activation_maxima, smooth_quantize_

bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the NF4 reference (test extra)")


def gaussian_linear(out=256, inp=512, std=0.02, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=False)
    nn.init.normal_(lin.weight, std=std)
    return lin


def rel_error(q, w):
    return ((q - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()


def tiny(seed=0, **kw):
    model = conftest.tiny(seed, **kw)
    with torch.no_grad():  # GPT-2 init leaves a random model nearly constant; give it some contrast
        for p in model.parameters():
            p.mul_(5 if p.dim() == 2 else 1)
    return model


def test_nf4_tables_equal_bitsandbytes():
    from mightylm.compress.nf4 import NF4_LEVELS

    assert torch.equal(NF4_LEVELS, bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb.create_dynamic_map(signed=True))


@pytest.mark.parametrize("shape", [(256, 128), (300, 70), (33, 17)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_dequantization_matches_bitsandbytes_element_for_element(shape, double_quant):
    torch.manual_seed(sum(shape))
    w = torch.randn(shape) * 0.05
    packed, st = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    reference = bnb.dequantize_4bit(packed, st)
    theirs = {"weight": packed.reshape(-1), "weight_absmax": st.absmax}
    if double_quant:
        theirs.update(weight_absmax_scale=st.state2.absmax, weight_absmax_offset=st.offset.reshape(1))
    assert torch.equal(dequantize_nf4(theirs, shape, 64), reference)  # their codes through our dequantization

    ours = quantize_nf4(w, 64, double_quant)
    assert torch.equal(ours["weight"], packed.reshape(-1))  # the same 4-bit codes, padding nibble included
    if not double_quant:
        assert torch.equal(ours["weight_absmax"], st.absmax)
        assert torch.equal(dequantize_nf4(ours, shape, 64), reference)
        return
    assert torch.equal(ours["weight_absmax_scale"], st.state2.absmax) and torch.equal(ours["weight_absmax_offset"][0], st.offset)
    # 8-bit absmax codes: equal, except near the midpoint of two codes, where bitsandbytes' CPU library
    # can take the farther one (nearer by < 1e-5 of the [-1, 1] range); ours is always the nearest
    differ = (ours["weight_absmax"] != st.absmax).nonzero().flatten()
    assert len(differ) <= 0.02 * st.absmax.numel()
    _, absmax = _blockwise(w, 64)
    code, x = dynamic_map(), (absmax - absmax.mean())
    for i in differ.tolist():
        scaled = float(x[i] / st.state2.absmax[i // 256])
        a, b = float(code[ours["weight_absmax"][i].long()]), float(code[st.absmax[i].long()])
        assert abs(abs(scaled - a) - abs(scaled - b)) < 1e-5  # a near-tie
        assert abs(scaled - a) <= abs(scaled - b)


def test_bits_per_parameter_with_and_without_double_quantization():
    assert nf4_bits_per_param(64, False) == 4.5
    assert nf4_bits_per_param(64, True) == pytest.approx(4.127, abs=1e-3)
    lin = gaussian_linear(512, 1024)
    for dq, bits in ((False, 4.5), (True, 4.127)):
        m = NF4Linear.from_linear(lin, 64, dq)
        assert model_bytes(m) * 8 / lin.weight.numel() == pytest.approx(bits, abs=2e-3)


def test_error_budgets_on_gaussian_weights():
    lin = gaussian_linear()
    w = lin.weight.detach()
    assert rel_error(Int8Linear.from_linear(lin).dequantize(), w) < 0.01
    assert rel_error(Int4Linear.from_linear(lin, 64).dequantize(), w) < 0.10
    assert rel_error(Int4Linear.from_linear(lin, 32).dequantize(), w) < rel_error(Int4Linear.from_linear(lin, 128).dequantize(), w)
    assert rel_error(NF4Linear.from_linear(lin).dequantize(), w) < 0.10


@pytest.mark.parametrize("block", [32, 64, 128])
def test_nf4_beats_int4_with_the_same_blockwise_absmax(block):
    """QLoRA section 3: as a 4-bit data type under the same block-wise absmax scaling, NF4 (the normal
    distribution's quantiles) has lower error than evenly spaced int4 levels on Gaussian weights."""
    w = gaussian_linear().weight.detach()
    scaled, absmax = _blockwise(w, block)
    int4 = ((scaled * 7).round() / 7).view(-1, block) * absmax[:, None]  # levels -7..7 / 7 times the absmax
    nf4 = dequantize_nf4(quantize_nf4(w, block, double_quant=False), tuple(w.shape), block)
    assert rel_error(nf4, w) < 0.9 * rel_error(int4.view(w.shape), w)


@pytest.mark.parametrize("method", ["nf4", "int8", "int4"])
def test_quantized_layers_compute_with_their_dequantized_weight(method):
    lin = gaussian_linear(96, 128)
    lin.bias = nn.Parameter(torch.randn(96) * 0.1)
    m = {"nf4": NF4Linear.from_linear, "int8": Int8Linear.from_linear, "int4": Int4Linear.from_linear}[method](lin)
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, m.dequantize(), lin.bias)
        torch.testing.assert_close(m(x), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(m(x[:1, :1]), expected[:1, :1], atol=1e-4, rtol=1e-4)  # the batch-1 path


@pytest.mark.parametrize("method,budget", [("int8", 0.02), ("int4", 0.25), ("nf4", 0.25)])
def test_quantized_model_save_load_round_trip_and_metadata(tmp_path, method, budget, bpe_tokenizer):
    model = tiny(vocab_size=bpe_tokenizer.vocab_size)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        reference = model(idx)
    converted = quantize_(model, method)
    assert len(converted) == 2 * 7
    with torch.no_grad():
        quantized = model(idx)
    assert rel_error(quantized, reference) < budget
    mightylm.save(model, bpe_tokenizer, tmp_path / "q")
    loaded, _ = mightylm.load(tmp_path / "q")
    assert loaded.quantization["method"] == method and loaded.quantization["modules"] == converted
    assert type(loaded.layers[0].attn.q_proj) is type(model.layers[0].attn.q_proj)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), quantized, atol=0, rtol=0)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["mightylm_quantization"]["method"] == method
    assert model_bytes(loaded) < 0.6 * model_bytes(tiny(vocab_size=bpe_tokenizer.vocab_size))


def test_quantize_errors():
    with pytest.raises(QuantizationError, match="unknown quantization method 'int3'"):
        quantize_(tiny(), "int3")
    with pytest.raises(QuantizationError, match="group size must be 32, 64, 128 or 256"):
        quantize_(tiny(), "int4", group_size=48)
    with pytest.raises(QuantizationError, match="does not divide the inputs of layers.0.attn.q_proj"):
        quantize_(tiny(dim=96, n_heads=3, n_kv_heads=1), "int4", group_size=256)
    model = tiny()
    quantize_(model, "int8")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize_(model, "nf4")
    with pytest.raises(QuantizationError, match="no linear layer named"):
        quantize_(tiny(), "int8", targets=("fc1",))
    with pytest.raises(QuantizationError, match="needs some text"):
        smooth_quantize_(tiny(), [])


def test_dequantize_restores_float_layers_with_the_same_outputs():
    model = tiny()
    quantize_(model, "nf4")
    idx = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        before = model(idx)
        assert len(dequantize_(model)) == 14
        assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("proj"))
        torch.testing.assert_close(model(idx), before, atol=1e-5, rtol=1e-5)


def outlier_model():
    """A tiny model whose normed activations have a few channels 40x larger than the rest (as LLMs
    do), with the weights compensating so that the float model computes the same function."""
    model = tiny()
    with torch.no_grad():
        for block in model.layers:
            for norm, linears in ((block.attn_norm, [block.attn.q_proj, block.attn.k_proj, block.attn.v_proj]),
                                  (block.mlp_norm, [block.mlp.gate_proj, block.mlp.up_proj])):
                norm.weight[[3, 17, 40]] *= 40
                for m in linears:
                    m.weight[:, [3, 17, 40]] /= 40
    return model


def test_smoothing_leaves_the_float_model_unchanged():
    model = outlier_model()
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(idx)
        assert smooth_(model, activation_maxima(model, [idx]), alpha=0.5) == 4
        torch.testing.assert_close(model(idx), before, atol=1e-4, rtol=1e-4)


def test_smoothquant_recovers_what_naive_w8a8_loses_on_outlier_channels():
    calib = [torch.randint(0, 256, (4, 32)) for _ in range(4)]
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        reference = outlier_model()(idx)
        errors = {}
        for name, smooth in (("naive", False), ("smoothquant", True)):
            model = outlier_model()
            smooth_quantize_(model, calib, alpha=0.5, per_token=False, smooth=smooth)
            assert isinstance(model.layers[0].attn.q_proj, W8A8Linear)
            errors[name] = rel_error(model(idx), reference)
    assert errors["smoothquant"] < 0.5 * errors["naive"], errors


def test_qlora_trains_saves_loads_and_merges(tmp_path, capsys, bpe_tokenizer):
    """NF4 base + LoRA: only the adapters train; the adapter file rebuilds the NF4 base on load;
    merging goes through a dequantized copy, and re-quantizing after the merge is measured."""
    from mightylm.adapters.lora import apply_lora, save_lora
    from mightylm.adapters import load_adapter
    from mightylm.cli import main

    base_dir = tmp_path / "base"
    mightylm.save(tiny(vocab_size=bpe_tokenizer.vocab_size), bpe_tokenizer, base_dir)
    model, _ = mightylm.load(base_dir)
    quantize_(model, "nf4")
    apply_lora(model, ("q_proj", "v_proj", "gate_proj"), r=4, alpha=8)
    mark_trainable(model)
    model.train()
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(params, lr=1e-2)
    idx = torch.randint(0, 256, (1, 16)).repeat(4, 1)
    losses = []
    for _ in range(12):
        loss = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers())  # the NF4 codes never change
    model.eval()
    save_lora(model, tmp_path / "adapter", base_model=str(base_dir))

    fresh, _ = mightylm.load(base_dir)  # float: loading the adapter quantizes it as in training
    load_adapter(fresh, tmp_path / "adapter")
    assert isinstance(fresh.layers[0].attn.q_proj.base_layer, NF4Linear)
    probe = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(fresh(probe), model(probe), atol=0, rtol=0)

    assert main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "merged"), "--requantize", "true"]) == 0
    printed = capsys.readouterr().out
    float_change = float(printed.split("dequantized float copy: outputs change by max |dlogit| ")[1].split(",")[0])
    requant_change = float(printed.split("after merging: outputs change by max |dlogit| ")[1].split(",")[0])
    assert float_change < 1e-3 < requant_change  # merging into float is exact; re-quantizing is not
    merged, _ = mightylm.load(tmp_path / "merged")
    assert merged.quantization["method"] == "nf4"


def test_mighty_quantize_writes_checkpoints_generate_loads(tmp_path, capsys, bpe_tokenizer):
    from conftest import SAMPLE_TEXT

    from mightylm.cli import main
    from mightylm.generate import Sampling, generate

    base = tmp_path / "base"
    mightylm.save(tiny(vocab_size=bpe_tokenizer.vocab_size), bpe_tokenizer, base)
    calib = tmp_path / "calib.txt"
    calib.write_text(SAMPLE_TEXT * 10)
    for method in ("nf4", "int8", "int4", "smoothquant"):
        out = tmp_path / method
        extra = ["--calib", str(calib)] if method == "smoothquant" else []
        assert main(["quantize", "--model", str(base), "--method", method, "--out", str(out), *extra]) == 0
        assert "MiB ->" in capsys.readouterr().out
        model, tok = mightylm.load(out)
        assert model.quantization["method"] == method
        prompt = tok.encode("To be")
        expected = tok.decode(generate(model, [prompt], Sampling(max_new_tokens=6, stop_token_ids=tok.stop_token_ids))[0])
        assert main(["generate", "--model", str(out), "--prompt", "To be", "--temperature", "0",
                     "--max-new-tokens", "6"]) == 0
        assert capsys.readouterr().out == expected + "\n"


def test_mighty_quantize_refuses_bad_input_and_leaves_nothing(tmp_path, capsys, bpe_tokenizer):
    from mightylm.cli import main

    base = tmp_path / "base"
    mightylm.save(tiny(vocab_size=bpe_tokenizer.vocab_size), bpe_tokenizer, base)
    (tmp_path / "short.txt").write_text("Too short.")
    (tmp_path / "empty.txt").write_text("")
    cases = [
        (["--method", "smoothquant", "--calib", str(tmp_path / "short.txt")], "tokens of calibration text"),
        (["--method", "smoothquant", "--calib", str(tmp_path / "empty.txt")], "0 tokens of calibration text"),
        (["--method", "smoothquant"], "smoothquant needs --calib"),
        (["--method", "int4", "--group_size", "48"], "group size must be 32, 64, 128 or 256"),
        (["--method", "int4", "--group_size", "256"], "does not divide the inputs"),
    ]
    for options, message in cases:
        out = tmp_path / "out"
        assert main(["quantize", "--model", str(base), "--out", str(out), *options]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    with pytest.raises(SystemExit):  # the parser refuses it, listing the methods
        main(["quantize", "--model", str(base), "--method", "int3", "--out", str(tmp_path / "x")])
    assert "Expected a typing.Literal['nf4', 'int8', 'int4', 'smoothquant']" in capsys.readouterr().err
    assert main(["quantize", "--model", str(base), "--method", "int8", "--out", str(tmp_path / "q8")]) == 0
    assert main(["quantize", "--model", str(tmp_path / "q8"), "--method", "nf4", "--out", str(tmp_path / "q4")]) == 2
    assert "already quantized (int8)" in capsys.readouterr().err and not (tmp_path / "q4").exists()
    assert main(["quantize", "--model", str(base), "--method", "int8", "--out", str(tmp_path / "q8")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_int8_matmul_is_exact_at_the_extremes():
    from mightylm.compress.smoothquant import _int8_matmul

    torch.manual_seed(0)
    a = torch.randint(-127, 128, (5, 2500), dtype=torch.int8)
    w = torch.randint(-127, 128, (7, 2500), dtype=torch.int8)
    a[0], w[0] = 127, 127  # the largest possible sum: 2500 * 127^2, beyond float32's exact integers
    a[1], w[1] = -127, 127
    exact = a.long() @ w.long().t()
    assert torch.equal(_int8_matmul(a, w).long(), exact)


def test_a_quantized_head_unties_from_the_embedding_and_round_trips(tmp_path, bpe_tokenizer):
    from mightylm.compress.quantize import DEFAULT_TARGETS

    model = tiny(vocab_size=bpe_tokenizer.vocab_size, tie_embeddings=True)
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        reference = model(idx)
    names = quantize_(model, "int8", targets=DEFAULT_TARGETS + ("lm_head",))
    assert "lm_head" in names and isinstance(model.lm_head, Int8Linear)
    assert model.embed.weight.dtype == torch.float32 and not model.head_shares_embedding
    with torch.no_grad():
        quantized = model(idx)
    assert rel_error(quantized, reference) < 0.02
    mightylm.save(model, bpe_tokenizer, tmp_path / "q")
    loaded, _ = mightylm.load(tmp_path / "q")
    assert isinstance(loaded.lm_head, Int8Linear) and loaded.config.tie_embeddings
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), quantized, atol=0, rtol=0)


def test_one_table_of_methods_serves_quantize_loading_and_the_cli():
    import typing

    from mightylm.cli import quantize as quantize_verb
    from mightylm.compress.quantize import METHODS

    assert typing.get_args(typing.get_type_hints(quantize_verb)["method"]) == tuple(METHODS)  # the CLI's choices
    for name, method in METHODS.items():
        defaults = method.check({})
        assert set(defaults) == set(method.options) and all(k in method.options for k in method.built_with)
        empty = method.empty(torch.nn.Linear(64, 32, device="meta"), defaults)
        assert isinstance(empty, method.module) and (empty.in_features, empty.out_features) == (64, 32)
    with pytest.raises(QuantizationError, match="nf4 block size must be 32, 64, .* or 4096, got 48"):
        METHODS["nf4"].check({"block_size": 48})
    with pytest.raises(QuantizationError, match="smoothquant alpha must be from 0 to 1"):
        METHODS["smoothquant"].check({"alpha": 2.0})
