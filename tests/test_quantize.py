"""Quantization: NF4 against bitsandbytes, error budgets, the NF4-vs-int4 data-type comparison,
quantized checkpoints (save/load, metadata, the CLI), SmoothQuant on outlier channels, errors."""

import json

import pytest
import torch
from torch import nn

import mightylm
from mightylm.compress.nf4 import NF4Linear, _blockwise, dequantize_nf4, dynamic_map, nf4_bits_per_param, quantize_nf4
from mightylm.compress.quantize import (Int4Linear, Int8Linear, QuantizationError, dequantize_, model_bytes,
                                        quantize_)
from mightylm.compress.smoothquant import W8A8Linear, smooth_, activation_maxima, smooth_quantize_
from mightylm.config import ModelConfig
from mightylm.model import Transformer

bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is the NF4 reference (test extra)")


def gaussian_linear(out=256, inp=512, std=0.02, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(inp, out, bias=False)
    nn.init.normal_(lin.weight, std=std)
    return lin


def rel_error(q, w):
    return ((q - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", **kw)).eval()
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
