"""LLaMA-Adapter: zero-init equality, the paper's separate gated softmax, cache/batch equality,
training, save/load and errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from mightylm.adapters import mark_trainable
from mightylm.adapters import AdapterError, load_adapter, save_adapter
from mightylm.adapters.llama_adapter import apply_llama_adapter
from mightylm.generate import Sampling, generate

from conftest import tiny


def open_gates(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption.gate"):
                p.copy_(torch.randn(p.shape, generator=g))


def test_zero_init_leaves_the_model_unchanged_and_counts_trainables():
    model = tiny()
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(idx)
    assert apply_llama_adapter(model, layers=1, length=6) == ["layers.1.attn"]
    with torch.no_grad():
        torch.testing.assert_close(model(idx), before, atol=0, rtol=0)
    c = model.config
    mark_trainable(model)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layers.1.attn.adaption.prompt": 6 * c.dim, "layers.1.attn.adaption.gate": c.n_heads}


def test_adapter_attention_is_a_separate_gated_softmax():
    """Against the paper's equation written out by hand for one layer."""
    model = tiny()
    apply_llama_adapter(model, layers=1, length=3)
    open_gates(model)
    attn = model.layers[1].attn
    B, T, hs = 1, 5, attn.head_dim
    q, k, v = (torch.randn(B, attn.n_heads, T, hs) for _ in range(3))
    k, v = k[:, :attn.n_kv_heads], v[:, :attn.n_kv_heads]
    with torch.no_grad():
        got = attn.attend(q, k, v, None)
        kk, vv = (t.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1) for t in (k, v))
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        own = F.softmax((q @ kk.transpose(2, 3) / math.sqrt(hs)).masked_fill(~causal, -math.inf), -1) @ vv
        P = attn.adaption.prompt
        pk = attn.k_proj(P).view(3, attn.n_kv_heads, hs).transpose(0, 1).repeat_interleave(2, dim=0)  # (nh, K, hs)
        pv = attn.v_proj(P).view(3, attn.n_kv_heads, hs).transpose(0, 1).repeat_interleave(2, dim=0)
        gate = attn.adaption.gate.tanh()  # (1, nh, 1, 1)
        extra = gate * F.softmax(q @ pk.transpose(1, 2)[None] / math.sqrt(hs), -1) @ pv[None]
    torch.testing.assert_close(got, own + extra, atol=1e-5, rtol=1e-5)


def test_cached_batched_decoding_matches_alone_and_save_load_round_trips(tmp_path):
    model = tiny()
    apply_llama_adapter(model, layers=2, length=4)
    open_gates(model)
    prompts = [[5, 17, 9, 33, 2, 8], [40, 41]]
    s = Sampling(max_new_tokens=6)
    batched = generate(model, prompts, s)
    assert batched == [generate(model, [p], s)[0] for p in prompts]
    save_adapter(model, tmp_path / "a", base_model="tiny")
    fresh = tiny()
    assert load_adapter(fresh, tmp_path / "a") == "LLaMA-Adapter on 2 layers"
    idx = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), model(idx), atol=0, rtol=0)
    assert generate(fresh, prompts, s) == batched


def test_gates_and_prompts_train_while_the_base_stays_frozen():
    model = tiny().train()
    apply_llama_adapter(model, layers=2, length=4)
    mark_trainable(model)
    base = {n: p.clone() for n, p in model.named_parameters() if "adaption" not in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    idx = torch.randint(0, 256, (4, 12))
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(float(model.layers[i].attn.adaption.gate.detach().abs().max()) > 0 for i in (0, 1))
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


def test_bad_llama_adapters_are_refused(tmp_path):
    with pytest.raises(AdapterError, match="between 1 and the model's 2 blocks"):
        apply_llama_adapter(tiny(), layers=3)
    with pytest.raises(AdapterError, match="prompt length"):
        apply_llama_adapter(tiny(), length=0)
    model = tiny()
    apply_llama_adapter(model, layers=1, length=2)
    save_adapter(model, tmp_path / "a", base_model="tiny-64")
    with pytest.raises(AdapterError, match="made for tiny-64"):
        load_adapter(tiny(dim=96, n_heads=4, n_kv_heads=2), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(tiny(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(AdapterError, match="'IA3' is not one mightylm applies"):
        load_adapter(tiny(), tmp_path / "a")
