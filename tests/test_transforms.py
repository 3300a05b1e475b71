"""One declared record of what was applied (Transformer.transforms): every in-place transform appends to it,
save writes it, load replays it, and adapters loaded onto a fresh base rebuild the same list."""

import pytest
import torch

import mightylm
from mightylm.adapters import AdapterError, load_adapter, save_adapter
from mightylm.adapters.llama_adapter import apply_llama_adapter
from mightylm.adapters.lora import apply_lora, save_lora, strip_lora
from mightylm.adapters.prompt import apply_prompt_tuning
from mightylm.compress.quantize import dequantize_, quantize_

from conftest import tiny


def kinds(model):
    return [t["kind"] for t in model.transforms]


@pytest.mark.parametrize("technique", ["qlora", "prompt", "ptuning", "llama_adapter"])
def test_adapter_transforms_survive_save_and_load(tmp_path, technique):
    model = tiny(vocab_size=320)
    if technique == "qlora":
        quantize_(model, "nf4", targets=("q_proj", "v_proj"))
        apply_lora(model, ("q_proj", "v_proj"), r=4, alpha=8)
    elif technique in ("prompt", "ptuning"):
        apply_prompt_tuning(model, 5, encoder="none" if technique == "prompt" else "mlp", hidden=16)
    else:
        apply_llama_adapter(model, layers=1, length=3)
    save_adapter(model, tmp_path / "a")
    fresh = tiny(vocab_size=320)
    assert fresh.transforms == []
    load_adapter(fresh, tmp_path / "a")
    assert kinds(fresh) == kinds(model) == {"qlora": ["quantize", "lora"], "prompt": ["prompt"],
                                            "ptuning": ["prompt"], "llama_adapter": ["llama_adapter"]}[technique]
    if technique == "ptuning":  # PEFT's format holds the encoder's output: it loads as a plain soft prompt
        assert fresh.transforms == [{"kind": "prompt", "n_tokens": 5, "encoder": "none"}]
    else:
        assert fresh.transforms == model.transforms
    idx = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), model(idx), atol=1e-5, rtol=1e-5)


def test_quantization_is_recorded_written_and_replayed(tmp_path, bpe_tokenizer):
    model = tiny(vocab_size=320)
    names = quantize_(model, "int4", group_size=32)
    assert model.transforms == [{"kind": "quantize", "method": "int4", "group_size": 32, "modules": names}]
    assert model.quantization == {"method": "int4", "group_size": 32, "modules": names}  # read from the record
    mightylm.save(model, bpe_tokenizer, tmp_path / "q")
    loaded, _ = mightylm.load(tmp_path / "q")
    assert loaded.transforms == model.transforms
    dequantize_(loaded)
    assert loaded.transforms == [] and loaded.quantization is None


def test_lora_settings_are_read_from_the_modules_not_a_stale_record(tmp_path):
    model = tiny(vocab_size=320)
    apply_lora(model, ("q_proj",), r=2, alpha=4)
    apply_lora(model, ("v_proj",), r=4, alpha=8)  # another rank on other layers: not one PEFT setting
    assert kinds(model) == ["lora", "lora"]
    with pytest.raises(AdapterError, match="differ in rank"):
        save_lora(model, tmp_path / "bad")
    one = tiny(vocab_size=320)
    apply_lora(one, ("q_proj", "v_proj"), r=3, alpha=6)
    save_lora(one, tmp_path / "good")
    import json

    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (3, 6, ["q_proj", "v_proj"])
    strip_lora(one)
    assert one.transforms == []


def test_quantization_cannot_be_assigned_around_the_record():
    with pytest.raises(AttributeError):
        tiny(vocab_size=320).quantization = {"method": "int8"}


def test_trainability_is_marked_once_after_all_transforms(tmp_path):
    """A soft prompt applied after LoRA used to freeze the LoRA weights (each apply_* froze everything but its
    own); now the transforms only add modules and mark_trainable (called by fit) trains every adapter."""
    from mightylm.adapters import mark_trainable
    from mightylm.data.loader import Loader
    from mightylm.train import TrainConfig, fit

    model = tiny()
    apply_lora(model, ("q_proj", "v_proj"), r=2, alpha=4)
    apply_prompt_tuning(model, 3)
    c = model.config
    lora = c.n_layers * 2 * ((c.dim + c.n_heads * c.head_dim) + (c.dim + c.n_kv_heads * c.head_dim))
    assert mark_trainable(model) == lora + 3 * c.dim
    assert {n.split(".")[-2] if "lora_" in n else n for n, p in model.named_parameters() if p.requires_grad} == \
        {"lora_A", "lora_B", "prefix.embedding"}

    for p in model.parameters():  # as after apply_* alone: fit marks them itself
        p.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    items = [{"input_ids": row[:-1], "labels": row[1:]} for row in torch.randint(0, 256, (4, 9))]
    fit(model, Loader(items, 2, shuffle=False), tmp_path, TrainConfig(steps=2, batch_size=2, lr=1e-2, warmup=1,
        eval_every=10**9, save_every=10**9), progress=False)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_B" in n or "lora_A" in n or n == "prefix.embedding" for n in moved)
    assert "prefix.embedding" in moved and any("lora_B" in n for n in moved)
