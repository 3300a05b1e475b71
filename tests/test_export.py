"""GGUF export (`mighty export`): our quantizers against the `gguf` package's byte for byte, exported files read by
gguf's own reader, by our loader and by transformers' GGUF loader with the source's logits, the tokenizer and
chat template inside, LoRA adapters as llama.cpp's adapter GGUF against PEFT, and the refusals."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize

import mightylm
from mightylm.checkpoint import CheckpointError
from mightylm.adapters.gguf import export_gguf_lora
from mightylm.checkpoint.gguf_export import export_gguf
from mightylm.checkpoint.names import permute_qk
from mightylm.cli import main
from mightylm.compress.gguf_blocks import BF16, F16, F32, Q4_0, Q4_1, Q8_0, dequantize_blocks, quantize_blocks

from conftest import SAMPLE_TEXT, make_hf_model, random_lora

Q = GGMLQuantizationType
OURS = {Q.F32: F32, Q.F16: F16, Q.BF16: BF16, Q.Q8_0: Q8_0, Q.Q4_0: Q4_0, Q.Q4_1: Q4_1}


def awkward_rows(seed: int = 0) -> torch.Tensor:
    """Random rows with the cases quantizers get wrong: all-zero blocks, constant blocks, exact rounding ties (values
    on the half steps of their block's scale), a block whose largest magnitude is negative, and equal +-maxima."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(67, 128, generator=g) * torch.logspace(-3, 2, 67)[:, None]
    x[0] = 0
    x[1, :32] = 0.75
    x[2, :32] = (torch.arange(32) - 16) / 8  # Q4_0: d = -2 / -8 = 0.25, x / d + 8.5 lands on .5 ties
    x[3, :32] = torch.arange(32) * 0.5  # Q8_0: x / d = k * 127 / 31 / 2 ... many halves; Q4_1: (x - m) / d ties
    x[4, :32] = -x[4, :32].abs()
    x[5, :32], x[5, 7], x[5, 9] = 0.1, 3.0, -3.0  # equal magnitudes: the first wins
    x[6] = torch.round(x[6] * 8) / 8
    return x


@pytest.mark.parametrize("qtype", list(OURS), ids=[q.name for q in OURS])
def test_quantizers_write_the_gguf_packages_bytes(qtype):
    for seed in range(3):
        x = awkward_rows(seed)
        ours = quantize_blocks(x, OURS[qtype]).numpy()
        reference = quantize(x.numpy(), qtype).view(np.uint8).reshape(x.shape[0], -1)
        if qtype == Q.Q4_1:  # a block of +0.0 and -0.0 has either as its minimum (numpy's reduction order decides):
            for q in (ours, reference):  # the same value; the sign of a zero m (fp16 bytes 2-3 of a block) aside
                m = q.reshape(-1, 20)[:, 2:4]
                m[(m[:, 0] == 0) & (m[:, 1] == 0x80)] = 0
        assert np.array_equal(ours, reference), f"{(ours != reference).sum()} bytes differ"
        back = dequantize_blocks(torch.from_numpy(ours), OURS[qtype], x.shape)
        assert torch.equal(back, torch.from_numpy(dequantize(reference, qtype).astype(np.float32)))


def test_a_type_we_cannot_write_is_refused_by_name():
    with pytest.raises(ValueError, match="cannot write ggml type Q6_K; writable: F32, F16, BF16, Q8_0, Q4_0, Q4_1"):
        quantize_blocks(torch.zeros(2, 256), 14)
    with pytest.raises(ValueError, match="blocks of 32 values; these rows have 48"):
        quantize_blocks(torch.zeros(2, 48), Q8_0)


def load_ours_and_transformers(path):
    from transformers import AutoModelForCausalLM

    ours, tokenizer = mightylm.load(path)
    theirs = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return ours, tokenizer, theirs


# llama: GQA and a tied head; qwen2: q/k/v biases and no permutation; mistral: multi-query, untied head. transformers'
# GGUF loader reads neither llama.cpp's rope_freqs nor a sliding window, so those are tested with our reader below.
FAMILIES = {"llama": dict(rope_scaling=None), "qwen2": {}, "mistral": dict(sliding_window=None)}


@pytest.mark.parametrize("arch", sorted(FAMILIES))
@pytest.mark.parametrize("kind", ["f32", "q8_0", "q4_1"])
def test_exported_files_have_llama_cpps_layout_and_the_source_logits(arch, kind, tmp_path, bpe_tokenizer):
    hf = make_hf_model(arch, vocab_size=bpe_tokenizer.vocab_size, **FAMILIES[arch])
    hf.save_pretrained(tmp_path / "src")
    bpe_tokenizer.save(tmp_path / "src")
    model, tokenizer = mightylm.load(tmp_path / "src")
    path = tmp_path / "m.gguf"
    # (named "tiny": transformers takes a llama file whose general.name says "mistral" for a mistral one it cannot read)
    report = export_gguf(model, tokenizer, path, kind=kind, head_kind="q8_0" if kind != "f32" else None, name="tiny")

    reader = GGUFReader(path)  # the gguf package's own reader
    fields = {name: f.contents() for name, f in reader.fields.items()}
    gguf_arch = "llama" if arch == "mistral" else arch
    c = model.config
    assert fields["general.architecture"] == gguf_arch
    assert fields[f"{gguf_arch}.block_count"] == c.n_layers and fields[f"{gguf_arch}.embedding_length"] == c.dim
    assert fields[f"{gguf_arch}.attention.head_count_kv"] == c.n_kv_heads
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.chat_template"] == bpe_tokenizer.chat_template
    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) == (not c.tie_embeddings)
    assert ("blk.0.attn_q.bias" in tensors) == (arch == "qwen2")
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    assert tensors["blk.1.ffn_down.weight"].tensor_type == Q[kind.upper()]
    assert tensors["token_embd.weight"].tensor_type == (Q.F32 if kind == "f32" else Q.Q8_0)
    assert list(tensors["blk.0.attn_k.weight"].shape) == [c.dim, c.n_kv_heads * c.head_dim]  # GGUF: fastest first
    if kind == "f32":  # the stored q rows are the source's, permuted for llama-type RoPE (not for qwen2)
        q = model.layers[0].attn.q_proj.weight.detach()
        expected = q if arch == "qwen2" else permute_qk(q, c.n_heads)
        assert np.array_equal(np.asarray(tensors["blk.0.attn_q.weight"].data), expected.numpy())

    ours, tokenizer_back, theirs = load_ours_and_transformers(path)
    idx = torch.randint(0, c.vocab_size, (2, 24))
    with torch.no_grad():
        source, back, reference = model(idx), ours(idx), theirs(idx).logits
    assert (back - reference).abs().max() <= 1e-4  # the two readers decode the same bytes
    if kind == "f32":
        assert (back - source).abs().max() <= 1e-5
    else:  # within the quantization error: the report's weight error bounds the logits' relative change
        change = ((back - source).pow(2).mean().sqrt() / source.pow(2).mean().sqrt()).item()
        assert 0 < report.weight_error < (0.01 if kind == "q8_0" else 0.1) and change < 10 * report.weight_error
    assert tokenizer_back.encode(SAMPLE_TEXT) == bpe_tokenizer.encode(SAMPLE_TEXT)
    messages = [{"role": "user", "content": "Héllo 東京"}]
    assert tokenizer_back.apply_chat_template(messages) == bpe_tokenizer.apply_chat_template(messages)


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}),  # llama3 RoPE scaling, written as rope_freqs
    ("mistral", {}),  # a sliding window of 8
    ("mixtral", {}),
    ("qwen2_moe", dict(decoder_sparse_step=1)),  # llama.cpp's qwen2moe has experts in every layer
    ("olmoe", {}),
])
def test_what_transformers_cannot_read_round_trips_through_our_reader(arch, overrides, tmp_path, bpe_tokenizer):
    hf = make_hf_model(arch, vocab_size=bpe_tokenizer.vocab_size, **overrides)
    hf.save_pretrained(tmp_path / "src")
    model, _ = mightylm.load(tmp_path / "src")
    export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf", kind="f32")
    back, _ = mightylm.load(tmp_path / "m.gguf")
    idx = torch.randint(0, model.config.vocab_size, (1, 48))  # past the llama3 original length and the window
    with torch.no_grad():
        assert (back(idx) - hf(idx).logits).abs().max() <= 1e-4
    if model.config.n_experts:
        names = {t.name for t in GGUFReader(tmp_path / "m.gguf").tensors}
        assert "blk.1.ffn_gate_exps.weight" in names and "blk.1.ffn_gate_inp.weight" in names


def test_the_embedded_model_exported_at_q4_1_gives_back_the_shipped_bytes(tmp_path):
    """SmolLM2 as shipped is Q4_1 with a Q8_0 embedding: dequantized and exported at q4_1 (head q8_0 by default),
    every tensor's bytes come back as they were, and the pre-tokenizer is named by llama.cpp's probe hash."""
    from mightylm.checkpoint import resolve
    from mightylm.checkpoint.gguf_file import GGUFFile

    model, tokenizer = mightylm.load("smollm2-135m-instruct")
    export_gguf(model, tokenizer, tmp_path / "m.gguf", kind="q4_1")
    shipped, written = GGUFFile(resolve("smollm2-135m-instruct")), GGUFFile(tmp_path / "m.gguf")
    ours = {t.name: t for t in written.tensors}
    assert sorted(ours) == sorted(t.name for t in shipped.tensors)
    for t in shipped.tensors:
        assert ours[t.name].type == t.type and np.array_equal(ours[t.name].data, t.data), t.name
    assert written.meta["tokenizer.ggml.pre"] == shipped.meta["tokenizer.ggml.pre"] == "smollm"
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.chat_template",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert written.meta[key] == shipped.meta[key], key


def test_a_lora_adapter_as_gguf_applies_like_peft(tmp_path, bpe_tokenizer):
    from peft import PeftModel

    from mightylm.adapters import load_adapter

    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    hf.save_pretrained(tmp_path / "base")
    bpe_tokenizer.save(tmp_path / "base")
    base, _ = mightylm.load(tmp_path / "base")
    random_lora(base, ("q_proj", "k_proj", "v_proj", "down_proj"), tmp_path / "lora", base_model=str(tmp_path / "base"))
    report = export_gguf_lora(base, tmp_path / "lora", tmp_path / "lora.gguf")
    assert "LoRA rank 4, alpha 8" in report.summary()

    reader = GGUFReader(tmp_path / "lora.gguf")
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0
    shapes = {t.name: list(t.shape) for t in reader.tensors}
    c = base.config
    assert shapes["blk.0.attn_q.weight.lora_a"] == [c.dim, 4] and shapes["blk.0.attn_k.weight.lora_b"] == [4, 32]
    assert shapes["blk.1.ffn_down.weight.lora_a"] == [c.ffn_dim, 4]
    assert len(shapes) == 2 * 4 * c.n_layers

    idx = torch.randint(0, c.vocab_size, (2, 20))
    with torch.no_grad():
        plain = base(idx)
        load_adapter(base, tmp_path / "lora.gguf")
        peft = PeftModel.from_pretrained(hf, str(tmp_path / "lora")).eval()
        assert (base(idx) - peft(idx).logits).abs().max() <= 1e-5
        assert (base(idx) - plain).abs().max() > 1e-3  # the adapter matters


def test_export_refuses_what_it_cannot_write(tmp_path, bpe_tokenizer):
    from mightylm.adapters import AdapterError

    phi = make_hf_model("phi", vocab_size=bpe_tokenizer.vocab_size)
    phi.save_pretrained(tmp_path / "phi")
    with pytest.raises(CheckpointError, match="cannot export a phi model to GGUF yet; supported: llama, mistral"):
        export_gguf(mightylm.load(tmp_path / "phi")[0], bpe_tokenizer, tmp_path / "p.gguf")
    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size)
    hf.save_pretrained(tmp_path / "a")
    model = mightylm.load(tmp_path / "a")[0]
    with pytest.raises(CheckpointError, match="cannot write GGUF type 'q5_k'"):
        export_gguf(model, bpe_tokenizer, tmp_path / "x.gguf", kind="q5_k")
    moe = make_hf_model("qwen2_moe", vocab_size=bpe_tokenizer.vocab_size)  # layer 0 dense
    moe.save_pretrained(tmp_path / "moe")
    with pytest.raises(CheckpointError, match="experts in every layer"):
        export_gguf(mightylm.load(tmp_path / "moe")[0], bpe_tokenizer, tmp_path / "m.gguf")
    # an adapter trained on another base of the same shape
    other = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, seed=1)
    other.save_pretrained(tmp_path / "b")
    from mightylm.adapters.files import stamp_base

    b = mightylm.load(tmp_path / "b")[0]
    random_lora(b, ("q_proj",), tmp_path / "lora", base_model="b")
    stamp_base(b, tmp_path / "lora")  # as save_adapter records it
    with pytest.raises(AdapterError, match="trained on another base"):
        export_gguf_lora(model, tmp_path / "lora", tmp_path / "l.gguf")
    # a model carrying an adapter is merged first, not written half-adapted
    from mightylm.adapters.lora import apply_lora

    apply_lora(model, ("q_proj",), r=2)
    with pytest.raises(CheckpointError, match="carries a lora adapter; merge"):
        export_gguf(model, bpe_tokenizer, tmp_path / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf" or ".partial" in p.name) == []


def test_an_interrupted_export_leaves_nothing_behind(tmp_path, bpe_tokenizer, monkeypatch):
    import mightylm.checkpoint.gguf_export as export

    hf = make_hf_model("qwen2", vocab_size=bpe_tokenizer.vocab_size)
    hf.save_pretrained(tmp_path / "src")
    model = mightylm.load(tmp_path / "src")[0]
    (tmp_path / "out").mkdir()
    calls = []

    def failing(values, kind):
        calls.append(kind)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return quantize_blocks(values, kind)

    monkeypatch.setattr(export, "quantize_blocks", failing)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(model, bpe_tokenizer, tmp_path / "out" / "m.gguf", kind="q8_0")
    assert list((tmp_path / "out").iterdir()) == []


def test_mighty_export_writes_checks_and_refuses_to_overwrite(tmp_path, bpe_tokenizer, capsys):
    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    hf.save_pretrained(tmp_path / "src")
    bpe_tokenizer.save(tmp_path / "src")
    base = mightylm.load(tmp_path / "src")[0]
    random_lora(base, ("q_proj", "v_proj"), tmp_path / "lora", base_model=str(tmp_path / "src"))
    out = tmp_path / "merged.gguf"
    assert main(["export", "--model", str(tmp_path / "src"), "--adapter", str(tmp_path / "lora"), "--type", "f32",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "merged 4 LoRA layers" in printed and "read back: max |dlogit| 0.0000" in printed
    merged = mightylm.load(out)[0]
    adapted = mightylm.load(tmp_path / "src")[0]
    from mightylm.adapters import load_adapter

    load_adapter(adapted, tmp_path / "lora")
    idx = torch.randint(0, base.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert (merged(idx) - adapted(idx)).abs().max() <= 1e-5
    assert main(["export", "--model", str(tmp_path / "src"), "--out", str(out)]) == 2
    assert "a file of that name exists" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "src"), "--out", str(tmp_path / "m.bin")]) == 2
    assert "ending in .gguf" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "src"), "--adapter", str(tmp_path / "lora"),
                 "--format", "gguf-lora", "--out", str(tmp_path / "lora.gguf")]) == 0
    assert "read back onto" in capsys.readouterr().out
    assert main(["export", "--model", str(out), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    with torch.no_grad():
        assert (mightylm.load(tmp_path / "hf")[0](idx) - merged(idx)).abs().max() <= 1e-6


def test_a_model_quantized_our_way_is_requantized_and_the_report_says_so(tmp_path, bpe_tokenizer):
    from mightylm.compress.quantize import quantize_

    hf = make_hf_model("qwen2", vocab_size=bpe_tokenizer.vocab_size)
    hf.save_pretrained(tmp_path / "src")
    model = mightylm.load(tmp_path / "src")[0]
    quantize_(model, "int8")
    report = export_gguf(model, bpe_tokenizer, tmp_path / "m.gguf", kind="q8_0")
    assert len(report.requantized) == 7 * model.config.n_layers
    assert "written from their dequantized weights" in report.summary()
    back = mightylm.load(tmp_path / "m.gguf")[0]
    idx = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():  # int8 then Q8_0: close to the int8 model, which is what was exported
        change = (back(idx) - model(idx)).pow(2).mean().sqrt() / model(idx).pow(2).mean().sqrt()
    assert change < 0.05


def test_exporting_a_small_update_onto_its_bases_grid_warns_that_it_was_erased(tmp_path, bpe_tokenizer, capsys):
    """A base stored as Q4_1, a LoRA update smaller than half a Q4_1 step, merged and written at q4_1: every weight
    rounds back onto the base's grid, so the file is the base again. The check says so (seen on the tour's adapter
    over the embedded Q4_1 model: exact match 90 % merged, 0 % at q4_1)."""
    from mightylm.adapters.lora import apply_lora, save_lora

    hf = make_hf_model("qwen2", vocab_size=bpe_tokenizer.vocab_size)
    hf.save_pretrained(tmp_path / "src")
    bpe_tokenizer.save(tmp_path / "src")
    export_gguf(mightylm.load(tmp_path / "src")[0], bpe_tokenizer, tmp_path / "base.gguf", kind="q4_1")
    base = mightylm.load(tmp_path / "base.gguf")[0]
    apply_lora(base, ("q_proj", "v_proj", "gate_proj"), r=4, alpha=4)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-4)
    save_lora(base, tmp_path / "lora")
    for kind, warned in (("q4_1", True), ("f32", False)):
        assert main(["export", "--model", str(tmp_path / "base.gguf"), "--adapter", str(tmp_path / "lora"),
                     "--type", kind, "--out", str(tmp_path / f"tuned-{kind}.gguf")]) == 0
        assert ("erased most of the adapter's update" in capsys.readouterr().err) == warned


def test_a_sentencepiece_style_tokenizer_is_written_with_scores_and_byte_tokens(tmp_path):
    """A Llama 2 / Mistral style vocabulary (BPE with byte fallback, "\u2581" for spaces) is written as llama.cpp's
    "llama" model: merges as scores, <0xXX> typed as bytes. Read back by our loader and by transformers' GGUF
    tokenizer, it encodes as the source does."""
    from transformers import AutoTokenizer

    from mightylm.config import ModelConfig
    from mightylm.model import Transformer
    from mightylm.tokenizer import from_gguf_metadata

    pieces = ["\u2581", "t", "h", "e", "o", "\u2581t", "he", "\u2581the", "\u2581to", "r", "\u2581th", "er", "\u2581o"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    source = from_gguf_metadata(meta, "spm")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=288, dim=64, n_layers=1, n_heads=4, ffn_dim=64, max_seq_len=64))
    report = export_gguf(model, source, tmp_path / "m.gguf", kind="f32")
    assert "SentencePiece-style" in report.summary()
    fields = {name: f.contents() for name, f in GGUFReader(tmp_path / "m.gguf").fields.items()}
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.token_type"][3] == 6
    ours = mightylm.load(tmp_path / "m.gguf")[1]
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ["the other", "to the three", " hot tea", "théo ©"]:
        assert ours.encode(text) == source.encode(text) == theirs(text).input_ids, text
