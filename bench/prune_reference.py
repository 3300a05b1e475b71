"""Our Wanda and SparseGPT against llm-compressor's pure functions (`wanda_sparsify`, `sgpt_sparsify`), mask for mask.

llm-compressor pins an older transformers than the test stack, so it lives in its own environment; this script
runs twice, once there (writing their results and the inputs to a safetensors file) and once here (comparing);
`-P` keeps bench/ off the import path (bench/peft.py would shadow the peft package llm-compressor imports):

    python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 && \
        /tmp/llmc/bin/pip install llmcompressor -c <(echo torch==2.13.0)
    /tmp/llmc/bin/python -P bench/prune_reference.py --reference /tmp/prune_reference.safetensors
    .venv/bin/python bench/prune_reference.py --compare /tmp/prune_reference.safetensors

Inputs: a (96, 512) weight and 4 calibration samples of 128 tokens with correlated inputs and one outlier
channel; 50 % unstructured and 2:4, the same statistics accumulated sample by sample on both sides.
"""

from __future__ import annotations

import argparse

import torch


def inputs():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 512, generator=g)
    mix = torch.randn(512, 512, generator=g) * 0.05 + torch.eye(512)
    X = [torch.randn(128, 512, generator=g) @ mix for _ in range(4)]
    for x in X:
        x[:, 7] *= 20
    return W, X


def reference(path: str) -> None:
    from safetensors.torch import save_file
    from llmcompressor.modifiers.pruning.sparsegpt import sgpt_sparsify
    from llmcompressor.modifiers.pruning.wanda import wanda_sparsify

    W, X = inputs()
    layer = torch.nn.Linear(512, 96, bias=False)
    layer.weight.data = W.clone()
    out = {"W": W, **{f"X{i}": x for i, x in enumerate(X)}}
    for name, (n, m, sparsity) in {"u50": (0, 0, 0.5), "nm24": (2, 4, 0.5)}.items():
        H, count = sgpt_sparsify.make_empty_hessian(layer), 0
        S, count_s = wanda_sparsify.make_empty_row_scalars(layer), 0
        for x in X:
            H, count = sgpt_sparsify.accumulate_hessian(x[None], layer, H, count)
            S, count_s = wanda_sparsify.accumulate_row_scalars(x[None], layer, S, count_s)
        out[f"H_{name}"], out[f"S_{name}"] = H.clone(), S.clone()
        _, out[f"sparsegpt_{name}"] = sgpt_sparsify.sparsify_weight(layer, {layer: H}, sparsity, n, m, 128, 0.01, False)
        out[f"wanda_{name}"] = wanda_sparsify.sparsify_weight(layer, {layer: S}, sparsity, n, m)
    save_file({k: v.contiguous() for k, v in out.items()}, path)
    print(f"wrote {path}")


def compare(path: str) -> None:
    from safetensors.torch import load_file

    from mightylm.compress.prune import _Statistics, nm_mask, sparsegpt_prune, unstructured_mask, wanda_score

    ref = load_file(path)
    W = ref["W"]
    X = [ref[f"X{i}"] for i in range(4)]
    for name, pattern in (("u50", None), ("nm24", (2, 4))):
        hessian, norms = _Statistics(512, "sparsegpt"), _Statistics(512, "wanda")
        for x in X:
            hessian.add(x[None])
            norms.add(x[None])
        print(f"\n{name}: Hessian max |diff| {(hessian.value - ref[f'H_{name}']).abs().max():.2e}, "
              f"column norms max |diff| {(norms.value - ref[f'S_{name}']).abs().max():.2e}")
        score = wanda_score(W, norms.value)
        ours = W * (nm_mask(score, *pattern) if pattern else unstructured_mask(score, 0.5, per_row=True))
        theirs = ref[f"wanda_{name}"]
        print(f"  wanda: masks equal {torch.equal(ours == 0, theirs == 0)}, weights equal {torch.equal(ours, theirs)}")
        ours = sparsegpt_prune(W, hessian.value, None if pattern else 0.5, pattern)
        theirs = ref[f"sparsegpt_{name}"]
        differ = int(((ours == 0) != (theirs == 0)).sum())
        kept = (ours != 0) & (theirs != 0)
        rel = ((ours - theirs)[kept].norm() / theirs[kept].norm()).item()
        print(f"  sparsegpt: zeros ours {int((ours == 0).sum())} / theirs {int((theirs == 0).sum())} of {W.numel()}, "
              f"mask entries that differ {differ}, kept weights relative difference {rel:.2e}")
        if pattern is None:  # their block mask is `score <= the (n * sparsity)-th smallest`: one weight more per block
            import mightylm.compress.prune as prune

            exact = prune.unstructured_mask
            prune.unstructured_mask = lambda score, sparsity, per_row: ~(
                score <= torch.sort(score.flatten())[0][int(score.numel() * sparsity)])
            try:
                same_rule = sparsegpt_prune(W, hessian.value, 0.5, None)
            finally:
                prune.unstructured_mask = exact
            print(f"  sparsegpt with their threshold rule: weights equal {torch.equal(same_rule, theirs)} "
                  f"(max |diff| {(same_rule - theirs).abs().max():.2e})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference")
    ap.add_argument("--compare")
    args = ap.parse_args()
    reference(args.reference) if args.reference else compare(args.compare)
