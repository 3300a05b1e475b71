"""fit(): the one training loop. Read it top to bottom.

Every technique reaches it from outside: a transformed model (LoRA, QLoRA, prompt tuning, a pruned model whose
zeros stay zeros), a `loss_fn` (distillation), or an `optimizer` (LOMO updates inside backward, so its step() is a
no-op). There is no Trainer class and no callback list. `loss_fn(model, batch)` returns the loss or
(loss, {name: value}); the named parts are logged with it (those with a dot in the name, such as a mixture's
per-expert utilisation `moe_util.L0.E3`, go to metrics.jsonl only, not to the progress bar). Blocks are found
by type and tied heads are read from the model, so a wrapper around a Transformer trains here unchanged.

What a run directory holds while training:
    metrics.jsonl            one JSON object per log line (train) and per validation
    checkpoint/              model.safetensors, optimizer.safetensors + .json, rng.safetensors,
                             state.json (step, tokens, data position): everything `resume` needs
Checkpoints are written to checkpoint.tmp/ and then swapped in, so a crash mid-write leaves the
previous one whole. SIGINT/SIGTERM finish the current step, save, and return. A loss that is
not finite stops the run before the optimizer step, so the last checkpoint stays good.

Multi-process: under `torchrun --nproc_per_node N` the model is wrapped in DDP (or sharded with
FSDP2's `fully_shard` when `fsdp=True`), each rank reads its slice of every global batch, and
losses are averaged across ranks, so N processes follow one process with an N-times batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from mightylm import adapters, moe
from mightylm.compress.prune import keep_pruned_
from mightylm.config import TrainConfig  # noqa: F401  (re-exported: mightylm.train.TrainConfig)
from mightylm.data.loader import IGNORE, Loader
from mightylm.errors import MightyError
from mightylm.kernels.ops import rms_norm, softmax_cross_entropy_, swiglu
from mightylm.model import MLP, Block, RMSNorm, Transformer


class TrainingError(MightyError, RuntimeError):
    """A run that cannot go on; the message says why and what was kept."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `steps`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def cross_entropy(model, batch: dict) -> torch.Tensor | tuple[torch.Tensor, dict]:
    """Mean next-token loss over labelled positions (labels are already shifted by the data).

    The model computes it (`labels=`), so the full logits are never held (model.linear_cross_entropy). Packed
    rows carry `documents`, so that attention stays within each packed conversation. A model with experts adds,
    while training, its router losses (moe.router_losses: per-layer balancing by default) and logs them with the
    experts' lowest and highest utilisation."""
    if "documents" in batch:
        loss = model(batch["input_ids"], labels=batch["labels"], documents=batch["documents"])
    else:
        loss = model(batch["input_ids"], labels=batch["labels"])
    if model.training and moe.moe_layers(model):
        extra, parts = moe.router_losses(model)
        return loss + extra, {"ce": float(loss.detach()), **parts}
    return loss


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused=True: one vectorized kernel for all parameters (CPU and CUDA); measured on a 2-core AMD EPYC on 135M
    # parameters: 53 ms per step against 332 ms for the per-parameter loop. Same update up to rounding.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=all(p.device.type in ("cpu", "cuda") for p in model.parameters()))


def fit(model, train: Loader, run_dir: str | Path, cfg: TrainConfig, *, val: Loader | None = None,
        loss_fn=cross_entropy, optimizer=None, resume: bool = False, progress: bool = True) -> dict:
    """Train `model` for `cfg.steps` optimizer steps. Returns a summary of the run. A model that carries adapters
    trains those only (`adapters.mark_trainable`); any other trains what requires grad."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(cfg.seed)
    if adapters.present(model):  # after the last transform: the adapters train, the base does not
        adapters.mark_trainable(model)
    keep_pruned_(model)  # a pruned model's zeros stay zeros (their gradients are masked)
    _native_activations(model)
    net = _wrap(model, cfg, world)  # what forward/backward go through (DDP/FSDP wrapper or the model)
    optimizer = optimizer or make_optimizer(model, cfg)
    if hasattr(optimizer, "backward") and (cfg.grad_accum > 1 or cfg.grad_clip is not None or world > 1):
        raise TrainingError("an optimizer that updates inside backward (LOMO) needs grad_accum=1, grad_clip=None "
                            "(it clips itself: clip_grad_norm) and a single process")
    step, tokens = 0, 0
    if resume:
        step, tokens = load_checkpoint(run_dir, model, optimizer, train)
        _truncate_metrics(run_dir / "metrics.jsonl", step)
    stop = _StopSignal()
    metrics = (run_dir / "metrics.jsonl").open("a") if rank == 0 else None
    board = _tensorboard(run_dir) if rank == 0 else None
    from tqdm import tqdm

    if cfg.bf16 and _device(model).type == "cpu":
        _warn_if_bf16_is_emulated()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not progress or rank != 0, dynamic_ncols=True)
    autocast = torch.autocast("cuda" if _device(model).type == "cuda" else "cpu", dtype=torch.bfloat16) \
        if cfg.bf16 else nullcontext()
    started = log_start = time.perf_counter()
    log_tokens = 0  # tokens since the last metrics line, for tokens/s
    summary = {"interrupted": False}
    model.train()
    _keep_loss_buffers(model, True)  # dropped in `finally`
    try:
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=_device(model))
            parts: dict[str, float] = {}  # named parts of the loss (loss_fn's metrics), averaged over micro-batches
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(_device(model)) for k, v in train.next_batch().items()}
                sync = micro == cfg.grad_accum - 1 or world == 1
                with (nullcontext() if sync or not hasattr(net, "no_sync") else net.no_sync()), autocast:
                    loss, metrics_of_batch = _loss_and_metrics(loss_fn(net, batch))
                    loss = loss / cfg.grad_accum
                for key, value in metrics_of_batch.items():
                    parts[key] = parts.get(key, 0.0) + float(value) / cfg.grad_accum
                if hasattr(optimizer, "backward"):  # optimizers that update inside backward (LOMO)
                    optimizer.backward(loss)
                else:
                    loss.backward()
                loss_sum += loss.detach()
                log_tokens += batch["input_ids"].numel() * world
                tokens += batch["input_ids"].numel() * world
            if world > 1:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            if not torch.isfinite(loss_sum):
                raise TrainingError(f"loss became {loss_sum.item()} at step {step + 1}; stopping before the update. "
                                    f"The last good checkpoint is kept in {run_dir / 'checkpoint'} "
                                    "(try a lower learning rate or gradient clipping)")
            grad_norm = None
            if cfg.grad_clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                record = {"step": step, "tokens": tokens, "loss": loss_sum.item(), "lr": lr,
                          "tokens_per_s": log_tokens / max(now - log_start, 1e-9),
                          "grad_norm": float(grad_norm) if grad_norm is not None else None, "time": now - started,
                          **parts}
                _log(metrics, record, board)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                                **{k: f"{v:.3g}" for k, v in parts.items() if "." not in k})  # dotted: detail
                log_start, log_tokens = now, 0
            paused = time.perf_counter()  # validation and checkpoints do not count against tokens/s
            if val is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                val_loss = evaluate(net, val, loss_fn, cfg.eval_batches, autocast)
                _log(metrics, {"step": step, "tokens": tokens, "val_loss": val_loss,
                               "val_ppl": math.exp(min(val_loss, 50))}, board)
                summary["val_loss"] = val_loss
                model.train()
            if step % cfg.save_every == 0 or step == cfg.steps or stop.requested:
                save_checkpoint(run_dir, model, optimizer, train, step, tokens)
            log_start += time.perf_counter() - paused
            if stop.requested:
                summary.update(interrupted=True, signal=stop.signum)
                bar.write(f"stopped by signal at step {step}; checkpoint saved in {run_dir / 'checkpoint'}")
                break
    finally:
        _keep_loss_buffers(model, False)
        stop.restore()
        bar.close()
        if metrics:
            metrics.close()
        if board:
            board.close()
    model.eval()
    summary.update(step=step, tokens=tokens, seconds=time.perf_counter() - started, peak_memory_mb=_peak_memory_mb(model),
                   config=asdict(cfg), world_size=world, finished=step >= cfg.steps and not summary["interrupted"])
    if rank == 0:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


@torch.no_grad()
def evaluate(net, val: Loader, loss_fn=cross_entropy, max_batches: int | None = None, autocast=None) -> float:
    """Mean loss over the validation set (or its first `max_batches` batches), token-weighted."""
    net.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(val.first_pass()):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(_device(net)) for k, v in batch.items()}
        n = int((batch["labels"] != IGNORE).sum())
        with autocast or nullcontext():
            total += float(_loss_and_metrics(loss_fn(net, batch))[0]) * n
        count += n
    return total / max(count, 1)


# ---- checkpoints: safetensors and JSON only ----


def save_checkpoint(run_dir: Path, model, optimizer, loader: Loader, step: int, tokens: int) -> None:
    from safetensors.torch import save_file

    model_state = full_state_dict(model)
    optimizer_state = _full_optimizer_state(model, optimizer)  # collective under FSDP: every rank calls it
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    tmp, final, old = run_dir / "checkpoint.tmp", run_dir / "checkpoint", run_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(model_state, str(tmp / "model.safetensors"))
        tensors, meta = _flatten_optimizer(optimizer_state)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "tokens": tokens, "data": loader.state_dict()}))
    except (OSError, RuntimeError) as e:  # disk full, quota: the previous checkpoint is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the checkpoint of the last save in {final} is kept" if final.exists() else "no earlier checkpoint exists"
        raise TrainingError(f"{tmp}: writing the checkpoint of step {step} failed ({e}); {kept}. Free some space "
                            "and continue with --resume true") from None
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(run_dir: Path) -> Path | None:
    """The run's last complete checkpoint: checkpoint/, or checkpoint.old/ after a crash between the two renames
    of save_checkpoint; None when there is none (yet)."""
    for name in ("checkpoint", "checkpoint.old"):
        if (Path(run_dir) / name / "state.json").exists():
            return Path(run_dir) / name
    return None


def load_checkpoint(run_dir: Path, model, optimizer, loader: Loader) -> tuple[int, int]:
    from safetensors.torch import load_file

    path = checkpoint_dir(run_dir)
    if path is None:
        raise TrainingError(f"--resume: no checkpoint in {run_dir} (looked for {run_dir / 'checkpoint' / 'state.json'})")
    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "model.safetensors"))
    current = model.state_dict()
    expected = set(current) - _tied_head_keys(model)
    if set(weights) != expected:
        raise TrainingError(f"{path}: checkpoint does not fit the model (missing {sorted(expected - set(weights))[:3]}, "
                            f"unexpected {sorted(set(weights) - expected)[:3]}); was it made with other settings?")
    differ = [] if dist.is_initialized() else [  # FSDP shards have their own shapes; full tensors go in below
        f"{k} {tuple(weights[k].shape)} (checkpoint) vs {tuple(current[k].shape)} (now)" for k in sorted(weights)
        if weights[k].shape != current[k].shape]
    if differ:
        raise TrainingError(f"{path}: the checkpoint holds a model of another shape ({'; '.join(differ[:3])}"
                            f"{f' and {len(differ) - 3} more' if len(differ) > 3 else ''}); resume with the run's own "
                            "model options, or start a new --out")
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer_state = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta)
    if dist.is_initialized():  # full tensors in, each rank keeps its shard (FSDP) or a replica (DDP)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                              set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
    else:
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(optimizer_state)
    torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch"])
    loader.load_state_dict(state["data"])
    return state["step"], state["tokens"]


def _full_optimizer_state(model, optimizer) -> dict:
    """The optimizer's state with full tensors: keyed by parameter index in one process, by
    parameter name under torch.distributed (gathered from FSDP shards)."""
    if not dist.is_initialized():
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _flatten_optimizer(state: dict) -> tuple[dict, dict]:
    """Optimizer state as safetensors-able tensors ("<param>::<name>") plus JSON for the rest."""
    tensors, scalars = {}, {}
    for param, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{param}::{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{param}::{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        param, name = key.rsplit("::", 1)
        state.setdefault(int(param) if param.isdigit() else param, {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def full_state_dict(model) -> dict:
    """Every weight, whole and on the CPU (gathered from FSDP shards: a collective under
    torch.distributed, so every rank calls it); a tied head is left to the embedding."""
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    for key in _tied_head_keys(model):
        state.pop(key, None)  # shared with the embedding; safetensors stores it once
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (they will be logged again), and a last line cut
    short by a kill."""
    from mightylm.report import read_metrics_lines

    if path.exists():
        keep = [json.dumps(r) for r in read_metrics_lines(path) if r["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


# ---- small helpers ----


def _native_activations(model) -> None:
    """On the CPU, SwiGLU feed-forwards compute silu(gate) * up and its gradient through the native kernel, one pass
    each (kernels.ops.swiglu), RMSNorms the same (rms_norm), and the loss its softmax and gradient in one pass a row
    (softmax_cross_entropy_), where the model trains in float32 (PyTorch's ops elsewhere)."""
    if _device(model).type == "cpu":
        for module in model.modules():
            if isinstance(module, MLP):
                module.act_mul = swiglu
            elif isinstance(module, RMSNorm):
                module.normalize = rms_norm
            elif isinstance(module, Transformer):
                module.softmax_grad = softmax_cross_entropy_


def _keep_loss_buffers(model, keep: bool) -> None:
    """While training on the CPU the loss keeps its chunk buffers from one step to the next (a workspace on each
    Transformer inside `model`; model.linear_cross_entropy says what fresh ones cost); keep=False drops them. Not
    on a GPU, whose caching allocator already reuses that memory and lends it to other tensors between uses."""
    keep = keep and _device(model).type == "cpu"
    for module in model.modules():
        if isinstance(module, Transformer):
            module.loss_workspace = {} if keep else None


def _loss_and_metrics(out) -> tuple[torch.Tensor, dict]:
    """A loss_fn returns the loss, or (loss, {name: value}) with its named parts (distillation's CE and KL,
    MoE's balancing loss): those go to the progress bar, metrics.jsonl and the report."""
    return out if isinstance(out, tuple) else (out, {})


def _blocks(model) -> list:
    """The transformer blocks inside `model`, found by type, so that wrappers (recurrent memory, a
    vision-language model) train through the same loop: activation checkpointing and FSDP2 see them."""
    return [m for m in model.modules() if isinstance(m, Block)]


def _tied_head_keys(model) -> set[str]:
    """State-dict keys of LM heads that are the embedding table (stored once, as the embedding), read from
    the model (any Transformer inside a wrapper) rather than assumed at the top level."""
    return {f"{name}.lm_head.weight".lstrip(".") for name, m in model.named_modules()
            if isinstance(m, Transformer) and m.head_shares_embedding}


def _wrap(model, cfg: TrainConfig, world: int):
    if cfg.activation_checkpointing:
        _checkpoint_blocks(model)
    if world == 1:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def _checkpoint_blocks(model) -> None:
    from torch.utils.checkpoint import checkpoint

    for block in _blocks(model):
        if not getattr(block, "_checkpointed", False):
            forward = block.forward
            block.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)
            block._checkpointed = True


def _warn_if_bf16_is_emulated() -> None:
    """bfloat16 matrix products need AVX512-BF16 or AMX (x86) or BF16 (Arm); without them PyTorch emulates
    them: 1,404 ms against 10 ms in float32 for 1024x576 @ 576x1536 on an AVX2-only EPYC (bench/RESULTS.md)."""
    from mightylm.kernels import cpu_flags

    flags = cpu_flags()
    if flags and not flags & {"avx512_bf16", "amx_bf16", "bf16"}:
        import warnings

        warnings.warn("bf16=True on a CPU without bfloat16 instructions (no avx512_bf16, amx_bf16 or bf16 in "
                      "/proc/cpuinfo): its matrix products are emulated and can be ~100x slower than float32; "
                      "train in float32 here (bf16: false)", stacklevel=3)


def _peak_memory_mb(model) -> float:
    """Peak memory of this process: the accelerator's allocator on CUDA, resident set size on CPU."""
    if _device(model).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _log(file, record: dict, board=None) -> None:
    if file is not None:
        file.write(json.dumps(record) + "\n")
        file.flush()
    if board is not None:
        for key, value in record.items():
            if key not in ("step", "tokens") and isinstance(value, (int, float)):
                board.add_scalar(key, value, record["step"])


def _tensorboard(run_dir: Path):
    """A TensorBoard writer in run_dir/tensorboard when the tensorboard package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


class _StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (a second SIGINT kills)."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._previous = {}
        if _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
