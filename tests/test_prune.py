"""Pruning: masks on hand-made cases where the answer is known (an outlier input column, uncorrelated inputs), exact
sparsity and N:M groups, the layer-by-layer transform, zeros kept through training and LoRA merges, structured
pruning to a smaller config that transformers loads with our logits, the 2:4 decode kernel, bad input."""

import json

import pytest
import torch

import conftest
import mightylm
from mightylm import kernels
from mightylm.kernels import ops
from mightylm.compress.prune import (PruningError, check_request, nm_mask, parse_pattern, prune_,
                                     sparsegpt_prune, sparsity_of, unstructured_mask, wanda_score)
from mightylm.compress.sparse24 import Sparse24Linear, is_24, pack_24, pack_24_, unpack_24
from mightylm.compress.structured import Importance, measure, prune_structured


def calib(model, n=4, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (1, T), generator=g) for _ in range(n)]


# ---- masks ----


def test_an_outlier_input_column_flips_what_magnitude_and_wanda_keep():
    """Column 0's weights are the smallest of each row, but its input is 100x larger than the others: magnitude
    prunes column 0, Wanda keeps it (|W| * ||X||) and prunes a column of large weights instead."""
    torch.manual_seed(0)
    W = torch.rand(8, 8) + 1.0  # |W| in [1, 2)
    W[:, 0] = 0.5  # the smallest weights
    X = torch.randn(64, 8)
    X[:, 0] *= 100
    col_sq_norm = X.pow(2).sum(0)
    by_magnitude = unstructured_mask(W.abs(), 0.25, per_row=True)
    by_wanda = unstructured_mask(wanda_score(W, col_sq_norm), 0.25, per_row=True)
    assert not by_magnitude[:, 0].any()
    assert by_wanda[:, 0].all()
    # and what Wanda keeps changes the layer's output less on these inputs
    err = lambda keep: (X @ (W * keep).T - X @ W.T).pow(2).mean()
    assert err(by_wanda) < err(by_magnitude) / 10


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7])
def test_unstructured_sparsity_is_exact_per_row_and_per_layer(sparsity):
    score = torch.randn(16, 40)
    rows = unstructured_mask(score, sparsity, per_row=True)
    assert ((~rows).sum(1) == int(40 * sparsity)).all()
    layer = unstructured_mask(score, sparsity, per_row=False)
    assert int((~layer).sum()) == int(16 * 40 * sparsity)


def test_ties_are_broken_by_position():
    keep = unstructured_mask(torch.ones(2, 8), 0.5, per_row=True)
    assert keep.tolist() == [[False] * 4 + [True] * 4] * 2


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_groups_prune_exactly_n_of_every_m(n, m):
    score = torch.randn(8, 32)
    keep = nm_mask(score, n, m)
    groups = keep.view(8, -1, m)
    assert ((~groups).sum(-1) == n).all()
    # the pruned ones are the lowest of their group
    lowest = score.view(8, -1, m).sort(-1).values[..., n - 1:n]
    assert (score.view(8, -1, m)[~groups].view(8, -1, n) <= lowest).all()


def test_sparsegpt_with_uncorrelated_inputs_is_magnitude_pruning():
    """With H = c I every column is independent: the OBS update moves nothing, and w^2 / [H^-1]_jj^2 ranks like
    |w|, so SparseGPT keeps the largest weights of each block unchanged."""
    torch.manual_seed(0)
    W = torch.randn(6, 256)
    pruned = sparsegpt_prune(W, 2 * torch.eye(256), 0.5, None)
    for b in (slice(0, 128), slice(128, 256)):
        keep = unstructured_mask(W[:, b].abs(), 0.5, per_row=False)
        assert torch.allclose(pruned[:, b], W[:, b] * keep, atol=1e-5)


def test_on_correlated_inputs_with_an_outlier_sparsegpt_beats_wanda_beats_magnitude():
    torch.manual_seed(0)
    mix = torch.randn(64, 64) * 0.3 + torch.eye(64)
    X = torch.randn(512, 64) @ mix  # correlated inputs
    X[:, 3] *= 10  # and an outlier channel, as LLM activations have
    W = torch.randn(32, 64)
    H = 2 / len(X) * X.T @ X
    err = lambda Wp: (X @ Wp.T - X @ W.T).pow(2).mean().item()
    for pattern, sparsity in ((None, 0.5), ((2, 4), None)):
        sgpt = sparsegpt_prune(W, H, sparsity, pattern)
        score = wanda_score(W, X.pow(2).mean(0))
        wanda = W * (nm_mask(score, 2, 4) if pattern else unstructured_mask(score, 0.5, per_row=True))
        magnitude = W * (nm_mask(W.abs(), 2, 4) if pattern else unstructured_mask(W.abs(), 0.5, per_row=False))
        assert (sgpt == 0).float().mean().item() == pytest.approx(0.5)
        if pattern:
            assert ((sgpt.view(32, -1, 4) == 0).sum(-1) == 2).all()
        assert err(sgpt) < 0.9 * err(wanda) and err(wanda) < 0.7 * err(magnitude)  # the papers' ordering


# ---- the transform ----


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("kw", [{"sparsity": 0.5}, {"pattern": (2, 4)}])
def test_prune_model_records_what_it_pruned(method, kw):
    model = conftest.tiny(0)
    names = prune_(model, method, batches=calib(model), **kw)
    assert len(names) == 2 * 7 and sparsity_of(model, names) == pytest.approx(0.5)
    if "pattern" in kw:
        assert all(is_24(model.get_submodule(n).weight) for n in names)
    record = model.applied("prune")
    assert record["method"] == method and record["modules"] == names
    assert model.embed.weight.ne(0).all()  # the embedding and head are not pruned


def test_wanda_goes_block_by_block_on_the_pruned_blocks_outputs():
    """Block 1's statistics come from block 0 after pruning: pruning block by block differs from measuring every
    block on the unpruned model first."""
    model = conftest.tiny(0)
    one_pass = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: one_pass.setdefault(n, a[0].pow(2).sum((0, 1))))
             for n, m in model.named_modules() if n == "layers.1.mlp.down_proj"]
    model(calib(model)[0])
    hooks[0].remove()
    pruned = conftest.tiny(0)
    prune_(pruned, "wanda", sparsity=0.5, batches=calib(model)[:1])
    w = model.get_submodule("layers.1.mlp.down_proj").weight
    unpruned_stats_mask = unstructured_mask(wanda_score(w, one_pass["layers.1.mlp.down_proj"]), 0.5, per_row=True)
    assert not torch.equal(pruned.get_submodule("layers.1.mlp.down_proj").weight != 0, unpruned_stats_mask)


def test_pruned_checkpoint_round_trips_with_its_record(tmp_path, bpe_tokenizer):
    model = conftest.tiny(0, vocab_size=bpe_tokenizer.vocab_size)
    prune_(model, "magnitude", pattern=(2, 4))
    mightylm.save(model, bpe_tokenizer, tmp_path)
    loaded, _ = mightylm.load(tmp_path)
    assert loaded.applied("prune")["pattern"] == "2:4"
    ids = calib(model)[0] % bpe_tokenizer.vocab_size
    assert torch.equal(loaded(ids), model(ids))


def test_training_keeps_the_zeros(tmp_path):
    from mightylm.config import TrainConfig
    from mightylm.data.loader import Loader
    from mightylm.train import fit

    model = conftest.tiny(0)
    names = prune_(model, "magnitude", sparsity=0.5)
    zeros = {n: model.get_submodule(n).weight == 0 for n in names}
    windows = [torch.randint(0, 256, (33,)) for _ in range(8)]
    data = [{"input_ids": w[:-1], "labels": w[1:]} for w in windows]
    fit(model, Loader(data, 4), tmp_path, TrainConfig(steps=3, lr=1e-2, warmup=1, log_every=1, eval_every=10,
                                                      save_every=10, weight_decay=0.1), progress=False)
    for n in names:
        w = model.get_submodule(n).weight
        assert (w[zeros[n]] == 0).all()
        assert not torch.equal(w[~zeros[n]], conftest.tiny(0).get_submodule(n).weight[~zeros[n]])  # others trained


def test_a_lora_merge_into_a_pruned_base_keeps_its_zeros(tmp_path, bpe_tokenizer):
    from mightylm.adapters.lora import apply_lora, save_lora
    from mightylm.adapters.merge import merge_into_base

    base = conftest.tiny(0, vocab_size=bpe_tokenizer.vocab_size)
    prune_(base, "magnitude", sparsity=0.5)
    mightylm.save(base, bpe_tokenizer, tmp_path / "base")
    adapted, _ = mightylm.load(tmp_path / "base")
    apply_lora(adapted, targets=("q_proj", "down_proj"), r=4)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.normal_()  # lora_B non-zero: the merge moves every weight
    save_lora(adapted, tmp_path / "lora")
    merged, _ = mightylm.load(tmp_path / "base")
    merge_into_base(merged, bpe_tokenizer, tmp_path / "lora", log=lambda s: None)
    w, before = merged.layers[0].attn.q_proj.weight, base.layers[0].attn.q_proj.weight
    assert torch.equal(w == 0, before == 0) and not torch.equal(w, before)


# ---- structured ----


def test_structured_pruning_that_keeps_everything_changes_nothing():
    model = conftest.tiny(0)
    batches = calib(model)
    small = prune_structured(model, measure(model, batches))
    assert small.config == model.config
    assert torch.equal(small(batches[0]), model(batches[0]))


def test_structured_pruning_keeps_gqa_groups_whole():
    model = conftest.tiny(0)  # 4 query heads in 2 groups of 2, head_dim 16
    c = model.config
    imp = Importance(neurons=[torch.arange(c.ffn_dim, dtype=torch.float)] * 2,
                     groups=[torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])],
                     channels=torch.ones(c.dim), influence=torch.ones(2))
    small = prune_structured(model, imp, heads=0.5, ffn=0.5)
    assert (small.config.n_heads, small.config.n_kv_heads, small.config.ffn_dim) == (2, 1, 64)
    hd = c.head_dim
    old0, new0 = model.layers[0].attn, small.layers[0].attn  # layer 0 keeps group 1: query heads 2 and 3
    assert torch.equal(new0.q_proj.weight, old0.q_proj.weight[2 * hd:4 * hd])
    assert torch.equal(new0.k_proj.weight, old0.k_proj.weight[hd:2 * hd])
    assert torch.equal(new0.o_proj.weight, old0.o_proj.weight[:, 2 * hd:4 * hd])
    old1, new1 = model.layers[1].attn, small.layers[1].attn  # layer 1 keeps group 0: query heads 0 and 1
    assert torch.equal(new1.v_proj.weight, old1.v_proj.weight[:hd])
    assert torch.equal(new1.q_proj.weight, old1.q_proj.weight[:2 * hd])
    # the most active half of the neurons: the upper half
    assert torch.equal(small.layers[0].mlp.down_proj.weight, model.layers[0].mlp.down_proj.weight[:, 64:])


def test_depth_pruning_drops_the_least_influential_block():
    model = conftest.tiny(0, n_layers=3)
    imp = measure(model, calib(model))
    small = prune_structured(model, imp, layers=2)
    dropped = int(imp.influence.argmin())
    kept = [i for i in range(3) if i != dropped]
    assert small.applied("structured_prune")["kept_blocks"] == kept
    for new, old in zip(small.layers, kept):
        assert torch.equal(new.mlp.up_proj.weight, model.layers[old].mlp.up_proj.weight)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_structurally_pruned_checkpoint_loads_in_transformers_with_our_logits(tmp_path, bpe_tokenizer, arch):
    transformers = pytest.importorskip("transformers")
    model = conftest.tiny(0, arch=arch, vocab_size=bpe_tokenizer.vocab_size, qkv_bias=arch == "qwen2", n_layers=3,
                          dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256)
    small = prune_structured(model, measure(model, calib(model)), ffn=0.5, heads=0.5, dim=0.75, layers=2)
    c = small.config
    assert (c.n_layers, c.ffn_dim, c.n_kv_heads, c.n_heads) == (2, 128, 1, 2) and c.dim % c.n_heads == 0
    mightylm.save(small, bpe_tokenizer, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = calib(model)[0]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, small(ids), atol=1e-4, rtol=1e-4)
    assert c.n_params < 0.6 * model.config.n_params


# ---- 2:4 storage and kernel ----


@pytest.mark.parametrize("shape", [(40, 576), (7, 72), (3, 8), (64, 1536)])
def test_the_24_kernel_equals_the_masked_dense_product_on_every_path(shape, kernel_path):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    w *= nm_mask(w.abs(), 2, 4)
    w[0, :4] = 0  # a group with no non-zero and one with one
    w[0, 5] = 0
    values, index = pack_24(w)
    assert values.shape == (shape[0], shape[1] // 2) and index.shape == (shape[0], shape[1] // 8)
    assert torch.equal(unpack_24(values, index), w)
    x = torch.randn(1, shape[1])
    torch.testing.assert_close(ops.gemv_sparse24(x, values, index, shape[0]), x @ w.T, rtol=1e-5, atol=1e-4)
    rows = torch.randn(2, 5, shape[1])  # a short prompt: several rows, each weight row read once
    torch.testing.assert_close(ops.gemv_sparse24(rows, values, index, shape[0]), rows @ w.T, rtol=1e-5, atol=1e-4)
    assert ops.gemv_sparse24(torch.randn(ops.SPARSE24_ROWS + 1, shape[1]), values, index, shape[0]) is None


def test_a_24_model_decodes_the_same_tokens_packed(bpe_tokenizer):
    from mightylm.fuse import fuse_projections_
    from mightylm.generate import Sampling, generate

    model = conftest.tiny(0, vocab_size=bpe_tokenizer.vocab_size, dim=128, ffn_dim=256)
    prune_(model, "magnitude", pattern=(2, 4))
    prompt = [[5, 9, 30, 7, 11]]
    s = Sampling(max_new_tokens=12, temperature=0)
    expected = generate(model, prompt, s)
    packed = pack_24_(model)
    assert len(packed) == 14 and all(isinstance(model.get_submodule(n), Sparse24Linear) for n in packed)
    fuse_projections_(model)
    if kernels.gemv_library() is not None:
        assert model.layers[0].fused_decode is not None  # the native block runs the 2:4 projections
    assert generate(model, prompt, s) == expected


def test_packing_needs_a_24_record():
    model = conftest.tiny(0)
    prune_(model, "magnitude", sparsity=0.5)
    assert pack_24_(model) == []
    assert pack_24_(conftest.tiny(0)) == []


# ---- bad input ----


@pytest.mark.parametrize("args,message", [
    (("wanda", 1.0, None), "from 0 up to"), (("wanda", -0.1, None), "from 0 up to"),
    (("wanda", None, None), "exactly one"), (("wanda", 0.5, (2, 4)), "exactly one"),
    (("wanda", None, (4, 4)), "0 < n < m"), (("movement", 0.5, None), "unknown pruning method"),
])
def test_bad_requests_are_refused_before_any_work(args, message):
    with pytest.raises(PruningError, match=message):
        check_request(*args)


def test_bad_patterns_and_shapes():
    with pytest.raises(PruningError, match="N:M"):
        parse_pattern("2-4")
    model = conftest.tiny(0, ffn_dim=100)  # down_proj has 100 inputs: 8 does not divide them
    with pytest.raises(PruningError, match="does not divide the inputs of layers.0.mlp.down_proj"):
        prune_(model, "magnitude", pattern=(4, 8))
    assert not model.applied("prune")
    with pytest.raises(PruningError, match="needs calibration text"):
        prune_(conftest.tiny(0), "wanda", sparsity=0.5)
    pruned = conftest.tiny(0)
    prune_(pruned, "magnitude", sparsity=0.5)
    with pytest.raises(PruningError, match="already pruned"):
        prune_(pruned, "magnitude", sparsity=0.3)
    with pytest.raises(PruningError, match="fraction kept"):
        prune_structured(model, measure(model, calib(model)), ffn=0)
    with pytest.raises(PruningError, match="number of blocks kept"):
        prune_structured(model, measure(model, calib(model)), layers=5)


def test_calibration_text_too_short_is_refused(tmp_path, bpe_tokenizer):
    from mightylm.compress import QuantizationError
    from mightylm.compress.calibration import calibration_batches

    short = tmp_path / "short.txt"
    short.write_text("To be.")
    with pytest.raises(QuantizationError, match="short.txt: .* tokens of calibration text; wanda needs at least 64"):
        calibration_batches(str(short), bpe_tokenizer, 4, method="wanda")


def test_structured_pruning_refuses_what_it_cannot_shrink():
    moe = conftest.tiny(0, arch="mixtral", n_experts=4)
    with pytest.raises(PruningError, match="dense float Llama"):
        measure(moe, calib(moe))


def test_the_native_block_over_several_tokens_equals_the_eager_block():
    """A few consecutive tokens of one sequence (a speculative verification pass, a short prompt) go through the
    native block when its projections read their weights once for all rows (2:4 here)."""
    from mightylm.fuse import fuse_projections_

    if kernels.gemv_library() is None:
        pytest.skip("no native kernels here")
    model = conftest.tiny(0, dim=128, ffn_dim=256)
    prune_(model, "magnitude", pattern=(2, 4))
    pack_24_(model)
    fuse_projections_(model)
    assert model.layers[0].fused_decode.max_rows > 1
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    outs = []
    for native in (True, False):
        saved = [b.fused_decode for b in model.layers]
        if not native:
            for b in model.layers:
                b.fused_decode = None
        cache = model.make_cache(1, 16)
        with torch.no_grad():
            first = model(ids[:, :3], cache=cache, start=0)
            rest = model(ids[:, 3:], cache=cache, start=3)  # 6 rows at positions 3..8
        outs.append((first, rest, cache.k[1][:, :, :9].clone()))
        for b, f in zip(model.layers, saved):
            b.fused_decode = f
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_server_serves_a_24_model_packed_with_and_without_a_lora(tmp_path, bpe_tokenizer):
    """`mighty serve` packs a 2:4 checkpoint: a batch of mixed requests (with and without a per-request LoRA)
    gets the tokens of the dense masked model, one by one."""
    from conftest import random_lora, serve_with_and_without_lora

    model = conftest.tiny(0, vocab_size=bpe_tokenizer.vocab_size, dim=128, ffn_dim=256)
    prune_(model, "magnitude", pattern=(2, 4))
    mightylm.save(model, bpe_tokenizer, tmp_path / "m")
    dense, _ = mightylm.load(tmp_path / "m")
    lora = random_lora(dense, ("q_proj", "down_proj"), tmp_path / "lora", str(tmp_path / "m"))
    served, tok = mightylm.load(tmp_path / "m")
    assert len(pack_24_(served)) == 14
    seqs = serve_with_and_without_lora(served, tok, tmp_path / "lora", dense, lora)
    assert any(a.generated != b.generated for a, b in zip(seqs[::2], seqs[1::2]))  # the adapter mattered
    assert isinstance(served.layers[0].attn.q_proj.base, Sparse24Linear)  # LoRA composed over the packed base
