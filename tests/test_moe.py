"""Sparse mixture of experts (moe.py): router statistics and losses against transformers, upcycling, training
metrics, errors. Logits, greedy generation and save -> transformers load of the three families run with every other
family in test_checkpoint.py (the `hf_dir` fixture covers mixtral, qwen2_moe and olmoe)."""

import pytest
import torch

import mightylm
from mightylm.config import ConfigError, ModelConfig
from mightylm.model import MLP, Transformer
from mightylm.moe import (MoE, balancing_loss, hf_balancing_loss, router_logits, router_losses, upcycle_, usage,
                          z_loss)

from conftest import make_hf_model, serve_all

MOE_FAMILIES = ["mixtral", "qwen2_moe", "olmoe"]


@pytest.mark.parametrize("arch", MOE_FAMILIES)
def test_router_logits_and_hf_balancing_loss_equal_transformers_on_a_padded_batch(arch, tmp_path):
    """A right-padded batch with its attention mask: each sparse layer's router logits at the real tokens, and the
    Hugging Face balancing loss of ours equals the model's `aux_loss` and `load_balancing_loss_func` (1e-5)."""
    import importlib

    hf = make_hf_model(arch)
    hf.save_pretrained(tmp_path)
    ours, _ = mightylm.load(tmp_path)
    ids = torch.randint(0, 320, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        out = hf(ids, attention_mask=mask, output_router_logits=True)
        logits = ours(ids)
    real = mask.bool()
    torch.testing.assert_close(logits[real], out.logits[real], atol=1e-5, rtol=1e-5)
    mine = router_logits(ours)
    assert len(mine) == len(out.router_logits) == sum(ours.config.sparse_layer(i) for i in range(ours.config.n_layers))
    for a, b in zip(mine, out.router_logits):
        torch.testing.assert_close(a[real.reshape(-1)], b[real.reshape(-1)], atol=1e-5, rtol=1e-5)
    reference = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}").load_balancing_loss_func
    c = ours.config
    theirs = reference(out.router_logits, c.n_experts, c.experts_per_token, mask)
    mine_hf = hf_balancing_loss(mine, c.n_experts, c.experts_per_token, mask)
    torch.testing.assert_close(mine_hf, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine_hf, out.aux_loss, atol=1e-5, rtol=1e-5)


def test_z_loss_equals_switch_transformers():
    from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

    logits = torch.randn(2, 9, 6) * 3
    torch.testing.assert_close(z_loss([logits.reshape(-1, 6)]), router_z_loss_func(logits), atol=1e-5, rtol=1e-6)


def test_balancing_losses_read_one_when_balanced_and_tell_the_layers_apart():
    """Ours is 1.0 for a fair router and E for a collapsed one, per layer; Hugging Face's pooled loss reads a model
    whose two layers each send everything to a different expert as far better balanced than either layer is."""
    E, k, n = 4, 1, 400
    fair = torch.eye(E).repeat(n // E, 1) * 10  # each expert gets a quarter of the tokens, confidently
    collapsed_0 = torch.zeros(n, E)
    collapsed_0[:, 0] = 10
    collapsed_1 = torch.zeros(n, E)
    collapsed_1[:, 1] = 10
    assert balancing_loss([fair], k).item() == pytest.approx(1.0, abs=1e-3)
    assert balancing_loss([collapsed_0], k).item() == pytest.approx(E, rel=1e-3)
    assert balancing_loss([collapsed_0, collapsed_1], k).item() == pytest.approx(E, rel=1e-3)
    pooled = hf_balancing_loss([collapsed_0, collapsed_1], E, k).item()
    assert pooled == pytest.approx(E / 2, rel=1e-3)  # looks twice as balanced as it is
    util = usage([fair, collapsed_0], k)
    assert util[0].tolist() == pytest.approx([1.0] * E) and util[1].tolist() == pytest.approx([E, 0, 0, 0])
    # Hugging Face's balanced value is k, not 1
    assert hf_balancing_loss([torch.eye(E).repeat(n // E, 1) * 10], E, 2).item() == pytest.approx(2.0, rel=0.05)


@pytest.mark.parametrize("renormalise", [True, False])
def test_upcycled_llama_gives_the_dense_logits_at_step_zero(renormalise):
    """Sparse upcycling copies each MLP into E experts behind a fresh router: with renormalised top-k weights the
    model is the dense model; without (Qwen2-MoE's and OLMoE's default) the k weights sum to less than 1 and the
    outputs move, which is why upcycle_ sets it."""
    torch.manual_seed(0)
    dense = Transformer(ModelConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        expected = dense(ids)
        upcycle_(dense, n_experts=4, top_k=2, expert=MLP)
        assert dense.config.arch == "mixtral" and sum(isinstance(m, MoE) for m in dense.modules()) == 2
        if not renormalise:
            for m in dense.modules():
                if isinstance(m, MoE):
                    m.norm_topk_prob = False
        got = dense(ids)
    if renormalise:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    else:
        assert not torch.allclose(got, expected, atol=1e-3)


def test_an_upcycled_model_saves_as_mixtral_that_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).eval()
    upcycle_(model, n_experts=4, top_k=2, expert=MLP)
    mightylm.save(model, None, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)


def test_training_adds_the_router_losses_and_logs_expert_usage(tmp_path):
    """fit with the default loss on a model with experts: the step's loss is CE + 0.01 x per-layer balancing +
    0.001 x z-loss, and
    metrics.jsonl carries the CE, the balancing and z losses and the experts' lowest and highest utilisation."""
    import json

    from mightylm.data.loader import Loader
    from mightylm.train import TrainConfig, cross_entropy, fit

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-moe"))
    ids = torch.randint(0, 256, (16, 17))
    batch = {"input_ids": ids[:4, :-1], "labels": ids[:4, 1:]}
    model.train()
    loss, parts = cross_entropy(model, batch)
    assert loss.item() == pytest.approx(parts["ce"] + 0.01 * parts["moe_balance"] + 0.001 * parts["moe_z"], rel=1e-5)
    model.eval()
    assert torch.is_tensor(cross_entropy(model, batch))  # validation: the language-model loss alone
    loader = Loader([{"input_ids": row[:-1], "labels": row[1:]} for row in ids], 4, seed=0)
    fit(model, loader, tmp_path, TrainConfig(steps=3, batch_size=4, log_every=1, eval_every=100, save_every=100,
                                              warmup=1), progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    assert train and all({"ce", "moe_balance", "moe_z", "moe_util_min", "moe_util_max"} <= r.keys() for r in train)
    assert all(0.0 <= r["moe_util_min"] <= 1.0 <= r["moe_util_max"] <= 4.0 for r in train)


def test_lora_and_int8_reach_the_experts_and_the_router():
    from mightylm.adapters.lora import LoRALinear, apply_lora
    from mightylm.compress.quantize import quantize_

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-moe")).eval()
    apply_lora(model, ("gate", "gate_proj", "down_proj"), r=2, alpha=4)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert "layers.0.mlp.gate" in wrapped and "layers.1.mlp.experts.3.down_proj" in wrapped
    assert len(wrapped) == 2 * (1 + 4 * 2)
    dense = Transformer(ModelConfig.from_preset("tiny-moe")).eval()
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        before = dense(ids)
        converted = quantize_(dense, "int8")
        after = dense(ids)
    assert any("experts.2.up_proj" in name for name in converted)
    assert (after - before).abs().max() < 0.05 * before.abs().max()


@pytest.mark.parametrize("overrides, message", [
    (dict(n_experts=4, experts_per_token=5), "between 1 and n_experts=4"),
    (dict(n_experts=1), "0 \\(a dense model\\) or at least 2"),
    (dict(n_experts=0), "needs n_experts >= 2"),
])
def test_expert_settings_that_make_no_sense_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_preset("tiny-moe", **overrides)


def test_an_unknown_moe_model_type_lists_the_supported_ones():
    with pytest.raises(ConfigError, match="supported model types: .*mixtral, qwen2_moe, olmoe"):
        ModelConfig.from_hf({"model_type": "deepseek_v2", "vocab_size": 10})


def test_router_losses_refuse_an_unknown_balancing():
    model = Transformer(ModelConfig.from_preset("tiny-moe"))
    model(torch.randint(0, 256, (1, 5)))
    with pytest.raises(ValueError, match="per_layer, hf or off"):
        router_losses(model, balance="pooled")


@pytest.mark.parametrize("hf_dir", ["llama", "qwen2"], indirect=True)
def test_mighty_upcycle_writes_a_mixtral_with_the_dense_logits(hf_dir, tmp_path, capsys):
    """`mighty upcycle` on a dense directory: a Mixtral (or Qwen2-MoE) directory that loads with the dense model's
    logits; a top-k above the expert count is refused before anything is read."""
    from mightylm.cli import main

    arch, path, _ = hf_dir
    assert main(["upcycle", "--model", str(path), "--out", str(tmp_path / "moe"), "--experts", "4", "--top_k", "2"]) == 0
    assert "4 experts, top-2" in capsys.readouterr().out
    dense, _ = mightylm.load(path)
    moe, _ = mightylm.load(tmp_path / "moe")
    assert moe.config.arch == {"llama": "mixtral", "qwen2": "qwen2_moe"}[arch] and moe.config.n_experts == 4
    ids = torch.randint(0, dense.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids), dense(ids), atol=1e-5, rtol=1e-5)
    assert main(["upcycle", "--model", str(path), "--out", str(tmp_path / "x"), "--experts", "2", "--top_k", "3"]) == 2
    assert "more than --experts 2" in capsys.readouterr().err


def test_experts_stored_as_fused_3d_tensors_load_too(tmp_path):
    """transformers 5 holds a layer's experts as two 3-D parameters (`mlp.experts.gate_up_proj`, `down_proj`); a
    checkpoint written from that state dict as it is loads with the same logits as the per-expert layout."""
    import json

    from safetensors.torch import save_file

    hf = make_hf_model("mixtral")
    state = hf.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state  # the installed transformers' own layout
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    ours, _ = mightylm.load(tmp_path)
    ids = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_one_token_at_a_time_equals_the_whole_sequence():
    """Batch-1 decoding takes the one-token path (its k experts directly); the logits equal the grouped path's."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-moe", shared_expert_ffn_dim=32, arch="qwen2_moe",
                                                norm_topk_prob=False)).eval()
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        whole = model(ids)
        cache = model.make_cache(1, 8)
        steps = [model(ids[:, t:t + 1], cache=cache, start=t)[:, -1] for t in range(8)]
    torch.testing.assert_close(torch.stack(steps, dim=1), whole, atol=1e-5, rtol=1e-5)


def test_training_warns_about_dead_experts():
    """A router that sends every token to the same two of four experts: after WATCH_STEPS steps the other two are
    reported dead, once."""
    import mightylm.moe as moe

    model = Transformer(ModelConfig.from_preset("tiny-moe"))
    with torch.no_grad():
        for layer in moe.moe_layers(model):
            layer.gate.weight.zero_()
            layer.gate.weight[0] += 5.0  # every token (all the same) scores the experts alike but for 0 and 1
            layer.gate.weight[1] -= 5.0
    model.train()
    ids = torch.ones(2, 6, dtype=torch.long)
    with pytest.warns(UserWarning, match=r"expert\(s\) \[\d, \d\] received no tokens for 50"):
        for _ in range(moe.WATCH_STEPS):
            model(ids)
            moe.router_losses(model)


@pytest.mark.parametrize("balance, balanced_value", [("per_layer", 1.0), ("hf", 2.0)])
def test_pretraining_a_mixture_takes_the_router_options(tmp_path, balance, balanced_value):
    """`mighty pretrain --preset tiny-moe --router.balance ...`: the run logs the chosen balancing loss (ours reads
    about 1 for a near-uniform router, transformers' about k = 2) and the result loads as a Mixtral."""
    import json

    from mightylm.cli import main

    from conftest import SAMPLE_TEXT

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT * 40)
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(corpus), "--out", str(out), "--preset", "tiny-moe", "--dim", "32",
                 "--vocab_size", "300", "--seq_len", "32", "--sample_prompts", "[To be]", "--train.steps", "3",
                 "--train.batch_size", "4", "--train.warmup", "1", "--train.log_every", "1",
                 "--train.eval_every", "100", "--train.save_every", "100", "--router.balance", balance,
                 "--router.z_coef", "0"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"moe_balance"' in line]
    assert rows and all(r["moe_balance"] == pytest.approx(balanced_value, rel=0.15) for r in rows)
    # the report draws each layer's experts over training, keyed as moe.UTIL_PREFIX says
    from mightylm import moe, report

    assert report.UTIL_PREFIX == moe.UTIL_PREFIX and {"moe_util.L0.E0", "moe_util.L1.E3"} <= rows[0].keys()
    assert (out / "experts.png").stat().st_size > 0 and "experts.png" in (out / "report.md").read_text()
    assert "final moe_util.L" not in (out / "report.md").read_text()
    model, _ = mightylm.load(out)
    assert model.config.arch == "mixtral" and model.config.n_experts == 4


@pytest.mark.parametrize("renormalise", [True, False])
def test_the_native_decode_block_runs_the_router_and_experts(renormalise):
    """fuse_projections_ on a mixture: the router and every expert go into the native decode block (C: softmax,
    top-k, the k experts' GEMVs); decoding gives the eager model's logits."""
    from mightylm.fuse import fuse_projections_
    from mightylm.kernels import gemv_library

    if gemv_library() is None:
        pytest.skip("no native kernels here (no compiler or no AVX2)")
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny-moe", norm_topk_prob=renormalise, arch="mixtral" if renormalise
                                     else "qwen2_moe", qkv_bias=not renormalise)
    model = Transformer(config).eval()
    ids = torch.randint(0, 256, (1, 10))

    def decode(m):
        cache = m.make_cache(1, 10)
        with torch.no_grad():
            return torch.cat([m(ids[:, t:t + 1], cache=cache, start=t)[:, -1] for t in range(10)])

    expected = decode(model)
    converted = fuse_projections_(model)
    assert "layers.0.native" in converted and "layers.1.native" in converted
    torch.testing.assert_close(decode(model), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch, targets, leaves", [
    ("phi", ["dense", "fc1", "fc2"], {"o_proj", "up_proj", "down_proj"}),
    ("phi3", ["qkv_proj", "gate_up_proj"], {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}),
    ("mixtral", ["w1", "w2"], {"gate_proj", "down_proj"}),
])
def test_lora_takes_each_familys_own_layer_names(arch, targets, leaves, tmp_path):
    """Phi-2's dense/fc1/fc2, Phi-3's fused qkv_proj/gate_up_proj and Mixtral's w1/w2/w3 name our layers."""
    from mightylm.adapters.lora import LoRALinear, apply_lora

    hf = make_hf_model(arch)
    hf.save_pretrained(tmp_path)
    model, _ = mightylm.load(tmp_path)
    converted = apply_lora(model, targets, r=2, alpha=4)
    assert {name.rpartition(".")[2] for name in converted} == leaves
    assert all(isinstance(model.get_submodule(name), LoRALinear) for name in converted)


def test_a_peft_adapter_on_phi3s_fused_layers_applies_to_our_separate_ones(tmp_path):
    """PEFT on transformers' Phi3 adapts qkv_proj and gate_up_proj as single layers; loaded here, each of our q/k/v
    (gate/up) layers takes the whole A and its rows of B: the logits equal PEFT's."""
    from peft import LoraConfig, get_peft_model

    from mightylm.adapters.lora import load_lora

    hf = make_hf_model("phi3")
    hf.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj", "o_proj"],
                                               init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "lora")
    ours, _ = mightylm.load(tmp_path / "base")
    load_lora(ours, tmp_path / "lora")
    ids = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), peft_model(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["phi", "phi3"])
def test_our_lora_on_phi_loads_in_peft_with_the_same_logits(arch, tmp_path):
    """save_lora on Phi-2 writes its own names (dense, fc1, fc2); on Phi-3 the q/k/v (gate/up) adapters become one
    of rank 3r (2r) on the stacked layer with a block-diagonal B and PEFT's rank/alpha patterns. PEFT loads either
    onto transformers' model with our logits, and we read our file back unchanged."""
    from peft import PeftModel

    from mightylm.adapters.lora import apply_lora, load_lora, save_lora

    hf = make_hf_model(arch)
    hf.save_pretrained(tmp_path / "base")
    ours, _ = mightylm.load(tmp_path / "base")
    apply_lora(ours, ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"), r=2, alpha=6)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_lora(ours, tmp_path / "lora")
    ids = torch.randint(0, 320, (1, 10))
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "lora").eval()
    again, _ = mightylm.load(tmp_path / "base")
    load_lora(again, tmp_path / "lora")
    with torch.no_grad():
        expected = ours(ids)
        torch.testing.assert_close(peft_model(ids).logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(again(ids), expected, atol=1e-5, rtol=1e-5)


def test_the_server_batches_a_mixture_of_experts(bpe_tokenizer):
    """`mighty serve` on a mixture: requests batched together (prefill grouped by expert, decode rows side by side)
    each get the tokens the model generates for them alone."""
    from mightylm.generate import Sampling, generate
    from mightylm.serve.adapters import AdapterBank
    from mightylm.serve.engine import Engine

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-moe", vocab_size=bpe_tokenizer.vocab_size)).eval()
    prompts = [bpe_tokenizer.encode(t) for t in ("To be", "The quick brown fox jumps", "whether 'tis nobler")]
    seqs = serve_all(Engine(model, bpe_tokenizer, AdapterBank(model), max_batch=4, max_len=64),
                     [(p, Sampling(max_new_tokens=6), 0) for p in prompts])
    with torch.no_grad():
        for seq, p in zip(seqs, prompts):
            assert seq.generated == generate(model, [p], Sampling(max_new_tokens=6))[0]
