import pytest
import torch

from mightylm.config import ModelConfig
from mightylm.fuse import fuse_projections_, unfuse_projections_
from mightylm.generate import Sampling, generate
from mightylm.model import Transformer


def test_fused_layout_keeps_outputs_state_and_memory():
    for overrides in ({"qkv_bias": True, "tie_embeddings": True}, {}):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_preset("tiny", **overrides)).eval()
        idx = torch.randint(0, 256, (2, 17))
        with torch.no_grad():
            before = model(idx)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        n_params = sum(p.numel() for p in model.parameters())
        tokens = generate(model, [[1, 2, 3]], Sampling(max_new_tokens=12))

        converted = fuse_projections_(model)
        assert "layers.0.attn.qkv" in converted and "layers.1.mlp.gate_up" in converted
        assert fuse_projections_(model) == []  # idempotent: nothing left to convert
        attn = model.layers[0].attn
        assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.fused_qkv.weight.untyped_storage().data_ptr()
        assert sum(p.numel() for p in model.parameters()) == n_params
        with torch.no_grad():
            torch.testing.assert_close(model(idx), before, atol=1e-5, rtol=1e-5)
        assert generate(model, [[1, 2, 3]], Sampling(max_new_tokens=12)) == tokens
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, state[k], atol=0, rtol=0)

        # in-place updates of a projection are seen by the fused path
        with torch.no_grad():
            attn.k_proj.weight.mul_(0.5)
            changed = model(idx)
        undone = unfuse_projections_(model)
        assert "lm_head" in undone and "layers.0.attn.q_proj" in undone
        assert attn.fused_qkv is None and attn.q_proj.weight.is_contiguous()
        assert all(type(m) is torch.nn.Linear and m.weight.is_contiguous()
                   for m in model.modules() if isinstance(m, torch.nn.Linear))
        with torch.no_grad():
            torch.testing.assert_close(model(idx), changed, atol=1e-5, rtol=1e-5)


def test_int8_projections_fuse_with_the_same_outputs():
    from mightylm.compress.quantize import DEFAULT_TARGETS, quantize_

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", tie_embeddings=True)).eval()
    quantize_(model, "int8", targets=DEFAULT_TARGETS + ("lm_head",))
    _fusing_keeps_outputs(model)


def _fusing_keeps_outputs(model):
    """fuse_projections_ fuses q/k/v and gate/up and keeps the logits of several rows and the generated tokens."""
    prompts = [[5, 17, 9, 33, 2, 8], [40, 41]]
    s = Sampling(max_new_tokens=8)
    idx = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        before, tokens = model(idx), generate(model, prompts, s)
        converted = fuse_projections_(model)
        assert "layers.0.attn.qkv" in converted and "layers.1.mlp.gate_up" in converted
        torch.testing.assert_close(model(idx), before, atol=1e-5, rtol=1e-5)
    assert generate(model, prompts, s) == tokens


@pytest.mark.parametrize("method", ["nf4", "int4"])
def test_4bit_projections_fuse_with_the_same_outputs(method):
    """NF4 or int4 q/k/v and gate/up stacked into one projection each (codes as views, nothing stored twice): the
    same logits for several rows (dequantized) and for single-token decoding (the 4-bit kernels)."""
    from mightylm.compress.quantize import QUANTIZED, quantize_

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", qkv_bias=True)).eval()
    quantize_(model, method)
    codes = sum(m.weight.numel() for m in model.modules() if isinstance(m, QUANTIZED))
    _fusing_keeps_outputs(model)
    attn = model.layers[0].attn
    assert attn.q_proj.weight.data_ptr() == attn.fused_qkv.weight.data_ptr()  # a view, not a copy
    assert sum(m.weight.numel() for m in model.modules() if isinstance(m, QUANTIZED)) == codes


def _decode_logits(model, prompt, steps):
    """Prefill, then `steps` single-token decode calls feeding back the greedy token; all logits."""
    cache = model.make_cache(1, prompt.shape[1] + steps)
    out = [model(prompt, cache=cache, start=0)[:, -1]]
    for t in range(prompt.shape[1], prompt.shape[1] + steps):
        out.append(model(out[-1].argmax(-1)[:, None], cache=cache, start=t)[:, -1])
    return torch.cat(out)


def test_native_decode_block_equals_the_eager_block(kernel_path):
    """fuse_projections_ gives each block one native call for single-token decoding (kernels/gemv.c);
    it must give the eager block's logits on every kernel path: float32 and int8, grouped and multi-query
    attention, q/k/v bias, a soft prompt shifting the cache slots, and the last slot of the cache."""
    from mightylm.adapters.prompt import apply_prompt_tuning
    from mightylm.compress.quantize import DEFAULT_TARGETS, quantize_

    cases = [({"qkv_bias": True}, None, False), ({"n_kv_heads": 1}, None, True), ({}, "int8", False),
             ({}, "nf4", False), ({"qkv_bias": True}, "nf4", True), ({"qkv_bias": True}, "int4", False),
             ({"dim": 128, "n_heads": 2, "n_kv_heads": 1}, None, False),  # head_dim 64: attention 64 at a time
             ({"dim": 72, "n_heads": 6, "n_kv_heads": 2}, None, False)]  # head_dim 12: 8, then one at a time
    for overrides, method, soft_prompt in cases:
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_preset("tiny", **overrides)).eval()
        if method:
            quantize_(model, method, targets=DEFAULT_TARGETS)
        if soft_prompt:
            apply_prompt_tuning(model, n_tokens=3)
        converted = fuse_projections_(model)
        assert "layers.0.native" in converted and all(b.fused_decode is not None for b in model.layers)
        prompt = torch.randint(0, 256, (1, 9))
        with torch.no_grad():
            native = _decode_logits(model, prompt, 12)
            saved = [block.fused_decode for block in model.layers]
            for block in model.layers:
                block.fused_decode = None
            eager = _decode_logits(model, prompt, 12)
        torch.testing.assert_close(native, eager, atol=2e-5, rtol=1e-4)
        for block, native_block in zip(model.layers, saved):
            block.fused_decode = native_block
        assert "layers.1.native" in unfuse_projections_(model) and model.layers[1].fused_decode is None


def test_one_native_call_runs_every_block_as_the_blocks_do():
    """fuse_projections_ also sets Transformer.fused_decode: every block in one native call (mighty_decode_blocks)
    for a decoded token. It gives exactly the logits of the blocks' own native calls one by one, with each new
    cache (its pointers are not kept from the last), and steps aside (the blocks run as they are) when a block's
    own native call is taken away; unfuse_projections_ removes it."""
    from mightylm.compress.quantize import DEFAULT_TARGETS, quantize_
    from mightylm.fuse import NativeDecodeStack
    from mightylm.kernels import gemv_library

    if gemv_library() is None:
        pytest.skip("no C compiler or no AVX2/FMA here: the native kernels are not built")
    for method in (None, "int8"):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_preset("tiny", qkv_bias=True)).eval()
        if method:
            quantize_(model, method, targets=DEFAULT_TARGETS)
        assert "layers.native" in fuse_projections_(model)
        stack = model.fused_decode
        assert isinstance(stack, NativeDecodeStack)
        ran = []

        def counted(*args):
            y = stack(*args)
            ran.append(y is not None)
            return y

        model.fused_decode = counted
        prompt = torch.randint(0, 256, (1, 9))
        with torch.no_grad():
            stacked = _decode_logits(model, prompt, 8)
            assert ran == [False] + [True] * 8  # the prompt's 9 rows run block by block (eager here)
            assert torch.equal(_decode_logits(model, prompt, 8), stacked)  # a second cache
            model.fused_decode = None
            one_by_one = _decode_logits(model, prompt, 8)
            assert torch.equal(stacked, one_by_one)
            model.fused_decode, ran[:] = counted, []
            model.layers[1].fused_decode = None
            mixed = _decode_logits(model, prompt, 8)
            assert not any(ran)
        torch.testing.assert_close(mixed, one_by_one, atol=2e-5, rtol=1e-4)
        model.fused_decode = stack
        assert "layers.native" in unfuse_projections_(model) and model.fused_decode is None
