import json

import pytest
import torch

import mightylm
from mightylm.adapters import mark_trainable
from mightylm.adapters import AdapterError
from mightylm.adapters.lora import apply_lora, load_lora, merge_lora, save_lora, strip_lora

from conftest import make_hf_model

from conftest import tiny

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_zero_init_leaves_the_model_unchanged_and_counts_trainables():
    model = tiny()
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(idx)
    converted = apply_lora(model, TARGETS + ("lm_head",), r=4, alpha=8)
    assert len(converted) == 2 * 7 + 1
    with torch.no_grad():
        torch.testing.assert_close(model(idx), before, atol=0, rtol=0)
    mark_trainable(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    c = model.config
    per_layer = 4 * ((c.dim + c.n_heads * c.head_dim) * 2 + (c.dim + c.n_kv_heads * c.head_dim) * 2
                     + (c.dim + c.ffn_dim) * 3)
    assert trainable == c.n_layers * per_layer + 4 * (c.dim + c.vocab_size)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_equals_unmerged_and_unmerge_restores(rslora):
    model = tiny()
    apply_lora(model, TARGETS, r=4, alpha=16, rslora=rslora)
    randomize_b(model)
    idx = torch.randint(0, 256, (2, 12))
    base = model.layers[0].attn.q_proj.weight.clone()
    with torch.no_grad():
        unmerged = model(idx)
        assert merge_lora(model) == 14
        torch.testing.assert_close(model(idx), unmerged, atol=1e-5, rtol=1e-5)
        for m in model.modules():
            if hasattr(m, "unmerge"):
                m.unmerge()
        torch.testing.assert_close(model.layers[0].attn.q_proj.weight, base, atol=1e-6, rtol=0)
    assert model.layers[0].attn.q_proj.scaling == (16 / 2 if rslora else 16 / 4)


def test_peft_loads_our_adapter_with_the_same_logits(tmp_path):
    from peft import PeftModel

    hf = make_hf_model("llama", vocab_size=320)
    hf.save_pretrained(tmp_path / "base")
    model, _ = mightylm.load(tmp_path / "base")
    apply_lora(model, ("q_proj", "v_proj", "down_proj"), r=4, alpha=8)
    randomize_b(model)
    save_lora(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    idx = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        assert (model(idx) - peft_model(idx).logits).abs().max().item() <= 1e-4


def test_we_load_a_peft_adapter_with_the_same_logits(tmp_path):
    from peft import LoraConfig, get_peft_model

    hf = make_hf_model("qwen2", vocab_size=320)
    hf.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "up_proj"],
                                               use_rslora=True, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    model, _ = mightylm.load(tmp_path / "base")
    assert len(load_lora(model, tmp_path / "peft")) == 2 * 3
    idx = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        assert (model(idx) - peft_model.eval()(idx).logits).abs().max().item() <= 1e-4
        reference = model(idx)
    strip_lora(model)  # merged into plain linears: a checkpoint transformers can load
    mightylm.save(model, None, tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(idx).logits - reference).abs().max().item() <= 1e-4


def test_adapter_on_an_eval_model_has_no_dropout():
    model = tiny()
    apply_lora(model, TARGETS, r=4, dropout=0.5)
    randomize_b(model)
    idx = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), model(idx), atol=0, rtol=0)
    model.train()
    assert model.layers[0].attn.q_proj.dropout.training


def test_our_adapter_survives_save_and_load(tmp_path):
    model = tiny()
    apply_lora(model, TARGETS, r=2, alpha=4)
    randomize_b(model)
    save_lora(model, tmp_path / "a")
    fresh = tiny()
    load_lora(fresh, tmp_path / "a")
    idx = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), model(idx), atol=0, rtol=0)


def test_bad_adapters_and_settings_are_refused(tmp_path):
    with pytest.raises(AdapterError, match=r"unknown LoRA target module\(s\) \['qkv'\]; this model has: .*q_proj"):
        apply_lora(tiny(), ("qkv",))
    with pytest.raises(AdapterError, match="rank r must be >= 1"):
        apply_lora(tiny(), r=0)
    with pytest.raises(AdapterError, match="rank 999 exceeds"):
        apply_lora(tiny(), r=999)
    model = tiny()
    apply_lora(model, ("q_proj",), r=2)
    save_lora(model, tmp_path / "a", base_model="tiny-64")
    with pytest.raises(AdapterError, match=r"made for tiny-64, not for this llama model \(dim 96\)"):
        load_lora(tiny(dim=96, n_heads=4), tmp_path / "a")
    with pytest.raises(AdapterError, match="adapter_config.json: not found"):
        load_lora(tiny(), tmp_path / "nothing")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterError, match="adapter_model.safetensors: cannot be read"):
        load_lora(tiny(), tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="peft_type 'IA3' is not LORA"):
        load_lora(tiny(), tmp_path / "a")



@pytest.mark.parametrize("trained", ["adapter", "everything"])
@pytest.mark.parametrize("bias", [False, True])
def test_training_product_gives_autograds_values_and_gradients(bias, trained):
    """LoRALinear trains through one autograd function (x's gradient gy W with (s gy B) A added in place, only the
    gradients asked for): its output and every gradient equal the plain formula's through autograd."""
    from mightylm.adapters.lora import LoRALinear, _LoRAProduct
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(24, 40, bias=bias), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(40, 4))
    layer.weight.requires_grad_(trained == "everything")
    if bias:
        layer.bias.requires_grad_(trained == "everything")
    x = torch.randn(3, 5, 24, requires_grad=True)
    gy = torch.randn(3, 5, 40)
    params = [x, layer.lora_A.weight, layer.lora_B.weight] + [p for p in (layer.weight, layer.bias)
                                                                if p is not None and p.requires_grad]
    calls = []
    original = _LoRAProduct.backward
    _LoRAProduct.backward = staticmethod(lambda ctx, g: calls.append(1) or original(ctx, g))
    try:
        y = layer(x)
        ours = torch.autograd.grad(y, params, gy)
    finally:
        _LoRAProduct.backward = staticmethod(original)
    assert calls == [1]  # the function ran, not the module's eager path
    plain = torch.nn.functional.linear(x, layer.weight, layer.bias) + \
        layer.scaling * (x @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
    torch.testing.assert_close(y, plain, atol=1e-5, rtol=1e-5)
    for got, want in zip(ours, torch.autograd.grad(plain, params, gy)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # inference takes the eager path: the same values
        torch.testing.assert_close(layer(x), y.detach(), atol=0, rtol=0)
