"""Unstructured and N:M pruning as an in-place transform: `prune_(model, "wanda", sparsity=0.5, batches=...)`.

Scores say which weights of a linear layer (out, in) to zero:
- magnitude  |W_ij|, the lowest `sparsity` of the whole layer (the baseline of both papers below).
- wanda      |W_ij| * ||X_j||_2 (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language
             Models"): X_j is input column j over the calibration tokens; ||X_j||^2 is kept as the running mean over
             calibration samples of each sample's squared column norm (the authors' `scaler_row`). Weights are
             compared within each output row (their "per output" group), a stable sort breaking ties by column.
- sparsegpt  Frantar & Alistarh 2023 ("SparseGPT: Massive Language Models Can Be Accurately Pruned in
             One-Shot"): H = 2/n sum X^T X over the calibration tokens, damped by 0.01 of its mean diagonal;
             columns are visited in blocks of 128, the mask of a block chosen from w^2 / [H^-1]_jj^2 (its lowest
             `sparsity`), and each pruned weight's error is spread over the columns not yet visited by the
             optimal-brain-surgeon update with the Cholesky factor of H^-1. Unlike the other two it changes the
             weights it keeps.
An N:M pattern (`pattern=(2, 4)`) zeroes the n lowest-scoring of every m consecutive inputs of each row instead
(2:4 is what sparse tensor cores and our 2:4 decode kernel, compress/sparse24.py, run).

Wanda and SparseGPT go block by block: the calibration windows' hidden states enter block 0; each block's
targeted layers are measured on that block's inputs, pruned, and the block is run again (pruned) to give the next
block its inputs, as both papers do. The model records what was pruned (`record_transform("prune", ...)`), and
`keep_pruned_` keeps the zeros through later training.
"""

from __future__ import annotations

import torch
from torch import nn

from mightylm.compress import DEFAULT_TARGETS, QuantizationError, target_linears

METHODS = ("magnitude", "wanda", "sparsegpt")


class PruningError(QuantizationError):
    """A pruning request that cannot be carried out; the message says what and why."""


# ---- masks from scores ----


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """True where a weight is kept: the lowest `sparsity` of `score` pruned, exactly int(n * sparsity) of each
    row (per_row) or of the whole tensor; ties broken by position (stable sort)."""
    flat = score.reshape(score.shape[0], -1) if per_row else score.reshape(1, -1)
    drop = int(flat.shape[1] * sparsity)
    keep = torch.ones_like(flat, dtype=torch.bool)
    order = torch.sort(flat, dim=1, stable=True).indices[:, :drop]
    keep.scatter_(1, order, False)
    return keep.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where kept: in every group of m consecutive inputs of each row, the n lowest scores pruned."""
    out, cols = score.shape
    groups = score.reshape(out, cols // m, m)
    order = torch.sort(groups, dim=-1, stable=True).indices[..., :n]
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order, False)
    return keep.view(out, cols)


def check_request(method: str, sparsity: float | None, pattern: tuple[int, int] | None) -> None:
    """Refuse what cannot work before any model is loaded."""
    if method not in METHODS:
        raise PruningError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    if (sparsity is None) == (pattern is None):
        raise PruningError("give exactly one of a sparsity (e.g. 0.5: half of every layer's weights) or an N:M "
                           "pattern (e.g. 2:4)")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise PruningError(f"sparsity must be from 0 up to (not including) 1, got {sparsity}")
    if pattern is not None:
        n, m = pattern
        if not 0 < n < m:
            raise PruningError(f"an N:M pattern prunes n of every m inputs with 0 < n < m; got {n}:{m}")


def parse_pattern(text: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4)."""
    if text is None:
        return None
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise PruningError(f"pattern {text!r}: write it as N:M, e.g. 2:4 (2 of every 4 inputs pruned)") from None
    return n, m


# ---- the three methods, one layer each ----


def wanda_score(weight: torch.Tensor, column_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, from the running mean of each input column's squared norm."""
    return weight.abs().float() * column_sq_norm.sqrt()[None, :]


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None,
                    pattern: tuple[int, int] | None, block: int = 128, damp: float = 0.01) -> torch.Tensor:
    """The pruned weight (out, in), float32: zeros where pruned, the kept weights updated to make up for them.
    `hessian`: 2/n sum x x^T over the layer's calibration inputs (in, in)."""
    W = weight.detach().float().clone()
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1  # inputs never seen: their weights cannot matter, prune them first
    W[:, dead] = 0
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    cols = W.shape[1]
    n, m = pattern or (0, 0)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        d = torch.diag(Hinv1)
        keep = unstructured_mask(W1 ** 2 / d[None, :] ** 2, sparsity, per_row=False) if pattern is None \
            else torch.ones_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % m == 0:
                keep[:, i:i + m] = nm_mask(W1[:, i:i + m] ** 2 / d[None, i:i + m] ** 2, n, m)
            w = W1[:, i]
            q = torch.where(keep[:, i], w, torch.zeros_like(w))
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


class _Statistics:
    """What one layer's inputs tell Wanda (the running mean of squared column norms) or SparseGPT (the Hessian)."""

    def __init__(self, n_in: int, method: str):
        self.method, self.samples = method, 0
        self.value = torch.zeros(n_in, n_in) if method == "sparsegpt" else torch.zeros(n_in)

    def add(self, x: torch.Tensor) -> None:
        """One calibration window's inputs (..., n_in)."""
        x = x.detach().float().reshape(-1, x.shape[-1])
        self.value *= self.samples / (self.samples + 1)
        self.samples += 1
        if self.method == "sparsegpt":
            x = (2 / self.samples) ** 0.5 * x
            self.value += x.T @ x
        else:
            self.value += x.pow(2).sum(dim=0) / self.samples


def _mask(method: str, weight: torch.Tensor, stats: _Statistics | None, sparsity, pattern) -> torch.Tensor:
    score = weight.abs().float() if method == "magnitude" else wanda_score(weight, stats.value)
    if pattern is not None:
        return nm_mask(score, *pattern)
    return unstructured_mask(score, sparsity, per_row=method == "wanda")


# ---- the transform ----


@torch.no_grad()
def prune_(model: nn.Module, method: str, *, sparsity: float | None = None, pattern: tuple[int, int] | None = None,
           batches: list[torch.Tensor] | None = None, targets=DEFAULT_TARGETS, progress: bool = False) -> list[str]:
    """Zero weights of the targeted linear layers in place (`method` in METHODS, at `sparsity` or an N:M
    `pattern`); wanda and sparsegpt measure inputs on `batches` ((1, T) token ids). Returns the pruned names."""
    check_request(method, sparsity, pattern)
    if model.quantization:
        raise PruningError(f"the model is quantized ({model.quantization['method']}); prune the float model, then "
                           "quantize")
    if model.applied("prune"):
        raise PruningError(f"the model is already pruned ({model.applied('prune')['method']}); prune the unpruned "
                           "model with the settings you want")
    if method != "magnitude" and not batches:
        raise PruningError(f"{method} needs calibration text (--calib): it weighs each weight by its inputs")
    layers = target_linears(model, targets, PruningError)
    if pattern is not None:
        bad = [n for n, m in layers.items() if m.in_features % pattern[1]]
        if bad:
            raise PruningError(f"pattern {pattern[0]}:{pattern[1]} does not divide the inputs of {bad[0]} "
                               f"({layers[bad[0]].in_features}); pick an M that divides every layer's inputs")
    from tqdm import tqdm

    if method == "magnitude":
        for m in layers.values():
            m.weight.mul_(_mask(method, m.weight, None, sparsity, pattern).to(m.weight.dtype))
    else:
        hidden = [model.inputs(idx) for idx in batches]  # each block's inputs, one tensor per window
        for i, block in enumerate(tqdm(model.layers, desc=f"{method}", disable=not progress)):
            mine = target_linears(block, targets)
            stats = {n: _Statistics(m.in_features, method) for n, m in mine.items()}
            hooks = [m.register_forward_pre_hook(lambda mod, args, s=stats[n]: s.add(args[0])) for n, m in mine.items()]
            try:
                for x in hidden:
                    run_block(model, block, x)
            finally:
                for h in hooks:
                    h.remove()
            for n, m in mine.items():
                if method == "sparsegpt":
                    m.weight.copy_(sparsegpt_prune(m.weight, stats[n].value, sparsity, pattern).to(m.weight.dtype))
                else:
                    m.weight.mul_(_mask(method, m.weight, stats[n], sparsity, pattern).to(m.weight.dtype))
            hidden = [run_block(model, block, x) for x in hidden]  # the pruned block feeds the next
    names = sorted(layers)
    model.record_transform("prune", method=method, sparsity=sparsity,
                           pattern=f"{pattern[0]}:{pattern[1]}" if pattern else None, modules=names)
    return names


def run_block(model: nn.Module, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One block over a fresh, unpadded sequence x (B, T, dim), as the trunk runs it."""
    cos, sin, mask = model.fresh_sequence(x.shape[1], x.device, x.dtype)
    return block(x, cos, sin, mask, None, 0)


def sparsity_of(model: nn.Module, names) -> float:
    """The fraction of zeros over the named layers' weights."""
    zeros = total = 0
    for name in names:
        w = model.get_submodule(name).weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)


def keep_pruned_(model: nn.Module) -> int:
    """Keep a pruned model's zeros through training: each pruned weight's gradient is masked where the weight is
    zero, so AdamW (whose update of a weight with zero gradient and zero moments is zero, and whose decay of zero
    is zero), SGD and LOMO leave them at zero. Pruned models inside a wrapper are found too. Returns the number of
    masked layers (0 for an unpruned model)."""
    masked = 0
    for _, inner in model.named_modules():
        record = inner.applied("prune") if hasattr(inner, "transforms") else None
        for name in (record or {}).get("modules", []):
            weight = inner.get_submodule(name).weight
            if getattr(weight, "_prune_hook", None) is None and weight.requires_grad:
                keep = (weight != 0).to(weight.dtype)
                weight._prune_hook = weight.register_hook(lambda g, k=keep: g * k)
            masked += 1
    return masked


@torch.no_grad()
def reapply_mask_(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero again what `masks` (name -> True where kept, from `pruned_masks` before a merge) says was pruned."""
    for name, keep in masks.items():
        w = model.get_submodule(name).weight
        w.mul_(keep.to(w.dtype))


def pruned_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> True where kept, for each layer a `prune` record lists (empty for an unpruned model)."""
    record = model.applied("prune")
    return {} if not record else {n: model.get_submodule(n).weight != 0 for n in record["modules"]}
