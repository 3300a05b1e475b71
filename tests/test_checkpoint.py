import json

import pytest
import torch

import mightylm
from mightylm.checkpoint import CheckpointError
from mightylm.generate import Sampling, generate

from conftest import make_hf_model


def test_logits_match_transformers(hf_dir):
    arch, path, hf = hf_dir
    model, tokenizer = mightylm.load(path)
    assert model.config.arch == arch
    idx = torch.randint(0, model.config.vocab_size, (2, 40))  # longer than mistral's window and llama3's 16
    with torch.no_grad():
        diff = (model(idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4


def test_greedy_generation_matches_transformers(hf_dir):
    _, path, hf = hf_dir
    model, _ = mightylm.load(path)
    prompt = [5, 17, 42, 99, 3, 8]
    ours = generate(model, [prompt], Sampling(max_new_tokens=24))[0]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref


def test_save_loads_in_transformers_with_same_logits(hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path, _ = hf_dir
    model, tokenizer = mightylm.load(path)
    mightylm.save(model, tokenizer, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    idx = torch.randint(0, model.config.vocab_size, (1, 30))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-4
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "To be, or not to be: naïve 🙂"
    assert hf_tok(text).input_ids == tokenizer.encode(text)
    reloaded, _ = mightylm.load(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx), model(idx), rtol=0, atol=0)


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_model("llama", vocab_size=320)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model, tokenizer = mightylm.load(tmp_path)
    assert tokenizer is None
    idx = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-4


@pytest.fixture
def llama_dir(tmp_path):
    make_hf_model("llama", vocab_size=320).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_missing_path_and_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        mightylm.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json: not found"):
        mightylm.load(tmp_path / "empty")


def test_unsupported_architecture_lists_supported(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'gpt_neox' is not supported; supported model types: llama, mistral, qwen2"):
        mightylm.load(llama_dir)


def test_pickled_checkpoints_are_refused(llama_dir, tmp_path):
    (llama_dir / "model.safetensors").rename(llama_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickled .* arbitrary code.*safe_serialization"):
        mightylm.load(llama_dir)
    (tmp_path / "weights.pt").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="weights.pt: pickled"):
        mightylm.load(tmp_path / "weights.pt")


def test_truncated_safetensors(llama_dir):
    file = llama_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot be read as safetensors"):
        mightylm.load(llama_dir)


def test_shape_mismatch_names_tensor_and_file(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config["intermediate_size"] = 128
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.\d.mlp.\w+_proj.weight' has shape \((96, 64|64, 96)\), but the config asks for \((128, 64|64, 128)\)"):
        mightylm.load(llama_dir)


def test_missing_tensors_and_missing_shard(llama_dir, tmp_path):
    config = json.loads((llama_dir / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing tensors \['layers.2"):
        mightylm.load(llama_dir)
    sharded = tmp_path / "sharded"
    make_hf_model("llama").save_pretrained(sharded, max_shard_size="100KB")
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="lists shard files that are missing"):
        mightylm.load(sharded)


def test_corrupt_tokenizer_json_names_file(llama_dir, bpe_tokenizer):
    bpe_tokenizer.save(llama_dir)
    (llama_dir / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="tokenizer.json: cannot be read as a tokenizer"):
        mightylm.load(llama_dir)


def test_load_in_bfloat16_stays_close(hf_dir):
    _, path, hf = hf_dir
    model, _ = mightylm.load(path, dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    idx = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        diff = (model(idx).float() - hf(idx).logits).abs().max().item()
    assert diff < 0.1


def test_name_maps_are_data_with_named_placeholders():
    from mightylm.checkpoint.names import (GGUF_TENSOR_TRANSFORMS, GGUF_TO_OURS, HF_TO_OURS, OURS_TO_HF, rename,
                                           rename_quantized, tensor_transform, unpermute_qk)

    assert rename("model.layers.17.self_attn.q_proj.weight", HF_TO_OURS) == "layers.17.attn.q_proj.weight"
    assert rename("layers.3.mlp.down_proj.weight", OURS_TO_HF) == "model.layers.3.mlp.down_proj.weight"
    assert rename("blk.0.attn_k.bias", GGUF_TO_OURS) == "layers.0.attn.k_proj.bias"
    assert rename("model.layers.2.something_else.weight", HF_TO_OURS) is None
    assert rename_quantized("layers.4.attn.o_proj.weight_scale", OURS_TO_HF) == \
        "model.layers.4.self_attn.o_proj.weight_scale"
    # Two placeholders, in another order on each side (how the MoE maps will read): filled by name.
    experts = {"blk.{layer}.ffn_gate.{expert}.weight": "layers.{layer}.mlp.experts.{expert}.gate_proj.weight"}
    assert rename("blk.5.ffn_gate.12.weight", experts) == "layers.5.mlp.experts.12.gate_proj.weight"
    swapped = {"e.{expert}.l.{layer}.w": "layers.{layer}.experts.{expert}.w"}
    assert rename("e.7.l.2.w", swapped) == "layers.2.experts.7.w"
    assert tensor_transform("layers.9.attn.q_proj.weight", GGUF_TENSOR_TRANSFORMS) == (unpermute_qk, "n_heads")
    assert tensor_transform("layers.9.attn.v_proj.weight", GGUF_TENSOR_TRANSFORMS) is None


def test_loading_builds_without_initialising_and_stays_off_dynamo(tmp_path, bpe_tokenizer):
    """A checkpoint's model is built on the meta device with nn.init skipped: the first meta-device init of a
    process imports torch._dynamo (~2.5 s of a cold `mighty generate`); loading must not."""
    import subprocess
    import sys

    from conftest import tiny

    mightylm.save(tiny(vocab_size=bpe_tokenizer.vocab_size), bpe_tokenizer, tmp_path / "m")
    code = (f"import sys, mightylm\nmodel, _ = mightylm.load({str(tmp_path / 'm')!r})\n"
            "print('torch._dynamo' in sys.modules, float(model.embed.weight.abs().sum()) > 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
