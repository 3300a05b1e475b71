"""Prompt tuning and P-tuning: the prefix seam (cache, padding, batching), PEFT's format both ways,
initialisation, trainable counts and errors."""

import pytest
import torch

import mightylm
from mightylm.adapters import mark_trainable
from mightylm.adapters import AdapterError, load_adapter, save_adapter
from mightylm.adapters.prompt import apply_prompt_tuning, init_embeddings
from mightylm.generate import Sampling, generate

from conftest import make_hf_model

from conftest import tiny


def test_prefix_equals_feeding_the_prompt_embeddings_in_front():
    model = tiny()
    prompt = apply_prompt_tuning(model, 5, init=torch.randn(5, model.config.dim) * 0.1)
    idx = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        ours = model(idx)
        model_prefix, model.prefix = model.prefix, None
        full = model(embeds=torch.cat([prompt().expand(2, 5, -1), model.embed(idx)], dim=1))
        model.prefix = model_prefix
    assert ours.shape == (2, 9, model.config.vocab_size)
    torch.testing.assert_close(ours, full[:, 5:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("encoder", ["none", "mlp", "lstm"])
def test_cached_decoding_and_left_padded_batches_match_the_full_forward(encoder):
    model = tiny()
    apply_prompt_tuning(model, 4, encoder=encoder, hidden=32, init=torch.randn(4, model.config.dim) * 0.1)
    if encoder != "none":  # make the encoder matter
        with torch.no_grad():
            for p in model.prefix.head.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    prompts = [[5, 17, 9, 33, 2, 8], [40, 41]]
    s = Sampling(max_new_tokens=6)
    batched = generate(model, prompts, s)
    alone = [generate(model, [p], s)[0] for p in prompts]
    assert batched == alone
    # greedy decoding with the cache == argmax of the full forward over prompt + generated tokens
    seq = list(prompts[0])
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert seq[len(prompts[0]):] == alone[0]


def test_text_initialisation_and_trainable_counts():
    model = tiny()
    ids = [3, 4, 5]
    init = init_embeddings(model, 7, ids)
    torch.testing.assert_close(init, model.embed.weight[[3, 4, 5, 3, 4, 5, 3]])
    apply_prompt_tuning(model, 7, init_ids=ids)
    torch.testing.assert_close(model.prefix(), init)
    mark_trainable(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prefix.embedding"]

    ptuned = tiny()
    apply_prompt_tuning(ptuned, 7, encoder="mlp", hidden=16, init_ids=ids)
    torch.testing.assert_close(ptuned.prefix(), init)  # residual encoder: text init holds at step 0
    dim = ptuned.config.dim
    expected = 7 * dim + (dim * 16 + 16) + (16 * 16 + 16) + (16 * dim + dim)
    assert mark_trainable(ptuned) == expected
    assert sum(p.numel() for p in ptuned.parameters() if p.requires_grad) == expected


@pytest.mark.parametrize("encoder", ["none", "mlp"])
def test_the_prompt_trains_and_the_base_does_not(encoder):
    model = tiny().train()
    with torch.no_grad():  # at GPT-2 init (std 0.02) a random model barely reacts to any input; sharpen it
        for p in model.parameters():
            p.mul_(5 if p.dim() == 2 else 1)
    apply_prompt_tuning(model, 4, encoder=encoder, hidden=16)
    mark_trainable(model)
    base = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("prefix")}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    idx = torch.randint(0, 256, (1, 12)).repeat(4, 1)  # one sequence to fit: the prompt can steer towards it
    losses = []
    for _ in range(30):
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


@pytest.mark.parametrize("encoder", ["none", "mlp"])
def test_peft_loads_our_soft_prompt_with_the_same_logits(tmp_path, encoder):
    from peft import PeftModel

    hf = make_hf_model("qwen2", vocab_size=320)
    hf.save_pretrained(tmp_path / "base")
    model, _ = mightylm.load(tmp_path / "base")
    apply_prompt_tuning(model, 6, encoder=encoder, hidden=16, init=torch.randn(6, model.config.dim) * 0.3)
    if encoder == "mlp":
        with torch.no_grad():
            for p in model.prefix.head.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    save_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    idx = torch.randint(0, 320, (2, 10))
    with torch.no_grad():
        theirs = peft_model(input_ids=idx).logits[:, 6:]  # PEFT returns the virtual positions too
        assert (model(idx) - theirs).abs().max().item() <= 1e-4


def test_we_load_a_peft_trained_p_tuning_prompt_with_the_same_logits(tmp_path):
    from peft import PromptEncoderConfig, get_peft_model

    hf = make_hf_model("llama", vocab_size=320)
    hf.save_pretrained(tmp_path / "base")
    config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=32,
                                 encoder_reparameterization_type="LSTM")
    peft_model = get_peft_model(hf, config)
    peft_model.save_pretrained(tmp_path / "peft")
    idx = torch.randint(0, 320, (1, 11))
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=idx).logits[:, 5:]
    model, _ = mightylm.load(tmp_path / "base")
    assert load_adapter(model, tmp_path / "peft") == "p tuning: 5 virtual tokens"
    with torch.no_grad():
        assert (model(idx) - theirs).abs().max().item() <= 1e-4


def test_bad_soft_prompts_are_refused(tmp_path):
    model = tiny()
    with pytest.raises(AdapterError, match="between 1 and the context"):
        apply_prompt_tuning(model, 0)
    with pytest.raises(AdapterError, match="unknown prompt encoder"):
        apply_prompt_tuning(tiny(), 4, encoder="gru")
    apply_prompt_tuning(model, 4)
    with pytest.raises(AdapterError, match="already has 4 virtual tokens"):
        apply_prompt_tuning(model, 4)
    save_adapter(model, tmp_path / "p")
    other = tiny(dim=96, n_heads=4, n_kv_heads=2)
    with pytest.raises(AdapterError, match="dim 96"):
        load_adapter(other, tmp_path / "p")
    (tmp_path / "p" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(AdapterError, match="corrupt"):
        load_adapter(tiny(), tmp_path / "p")
    m = tiny()
    apply_prompt_tuning(m, 250)
    with pytest.raises(ValueError, match=r"\+ 250 virtual tokens exceeds the model's context of 256"):
        generate(m, [[1] * 5], Sampling(max_new_tokens=5))
