"""`mighty finetune <method>`: supervised fine-tuning on instruction or chat JSONL, of every weight (full) or of
an adapter (lora, qlora, prompt, ptuning, adapter). Each verb states its options; the body is one `_finetune`."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from mightylm.errors import UsageError
from mightylm.options import PositiveInt
from mightylm.recipes.groups import LoRA, NF4, Router, SFTData, SoftPrompt
from mightylm.recipes.rundir import (RunDirError, distributed, prepare_out, read_run_args, samples, save_final,
                                     write_run_args)
from mightylm.config import TrainConfig


def finetune_full(
    model: str,
    data: str,
    out: str = "runs/finetune",
    sft: SFTData = SFTData(),
    train: TrainConfig = TrainConfig(steps=200, lr=2e-5, min_lr=2e-6, warmup=20, batch_size=4, eval_every=50,
                                     save_every=100),
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    optimizer: Literal["adamw", "lomo"] = "adamw",
    router: Router = Router(),
    rope_scaling: str | None = None,
) -> dict:
    """Supervised fine-tuning of every weight of a model on instruction or chat JSONL.

    Args:
        model: A Hugging Face directory, a .gguf file, or an embedded model name (smollm2-135m-instruct).
        data: JSONL, one example per line: {"instruction", "input"?, "output"} or {"messages": [{"role", "content"}]}.
        out: The run directory; it ends up as a Hugging Face checkpoint of the fine-tuned model.
        sft: How the JSONL becomes training and validation sequences (--sft.max_len, --sft.val_data, ...).
        train: Optimisation settings (--train.steps, --train.lr, --train.batch_size, ...).
        resume: Continue the run in `out` from its last checkpoint (with none yet, start it from step 0).
        overwrite: Delete what `out` holds and start afresh (otherwise a directory that is not this verb's run is
            refused, and a run with a checkpoint needs --resume).
        device: Where to train (cpu, cuda).
        optimizer: adamw, or lomo (Lv et al. 2023: SGD fused into backward, no gradients or optimizer
            state kept; --train.grad_clip becomes its two-pass clipping; lr is an SGD learning rate).
        router: A mixture-of-experts model's router losses (--router.balance, --router.aux_coef, --router.z_coef).
        rope_scaling: Context extension: train under another RoPE scaling, TYPE:FACTOR with linear, dynamic or
            yarn (e.g. yarn:4 for four times the trained length; raise --sft.max_len to use it); the checkpoint
            keeps the scaling.
    """
    return _finetune(model, data, out, sft, train, resume, overwrite, device,
                     "finetune full",
                     optimizer=optimizer, router=router, rope_scaling=rope_scaling)


def finetune_lora(
    model: str,
    data: str,
    out: str = "runs/lora",
    lora: LoRA = LoRA(),
    sft: SFTData = SFTData(),
    train: TrainConfig = TrainConfig(steps=200, lr=2e-4, min_lr=2e-5, warmup=20, batch_size=4, eval_every=50,
                                     save_every=100, weight_decay=0.0),
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    rope_scaling: str | None = None,
) -> dict:
    """LoRA fine-tuning on instruction or chat JSONL: only low-rank adapters are trained.

    The run directory holds the adapter in PEFT's format (adapter_config.json +
    adapter_model.safetensors): use it with `mighty generate --adapter`, `mighty merge`, or peft.

    Args:
        model: A Hugging Face directory, a .gguf file, or an embedded model name (smollm2-135m-instruct).
        data: JSONL, one example per line: {"instruction", "input"?, "output"} or {"messages": [{"role", "content"}]}.
        out: The run directory; it ends up holding the adapter, the report and the metrics.
        lora: The low-rank update (--lora.r, --lora.alpha, --lora.targets, ...).
        sft: How the JSONL becomes training and validation sequences (--sft.max_len, --sft.val_data, ...).
        train: Optimisation settings (--train.steps, --train.lr, --train.batch_size, ...).
        resume: Continue the run in `out` from its last checkpoint (with none yet, start it from step 0).
        overwrite: Delete what `out` holds and start afresh (otherwise a directory that is not this verb's run is
            refused, and a run with a checkpoint needs --resume).
        device: Where to train (cpu, cuda).
        rope_scaling: Context extension: train under another RoPE scaling, TYPE:FACTOR with linear, dynamic or
            yarn (e.g. yarn:4; raise --sft.max_len to use it). Use the adapter with the same --rope_scaling.
    """
    from mightylm.adapters.lora import apply_lora

    return _finetune(model, data, out, sft, train, resume, overwrite, device, "finetune lora",
                     adapt=lambda net, tok: f"LoRA on {len(apply_lora(net, **lora.settings(net)))} layers",
                     settings=asdict(lora), rope_scaling=rope_scaling)


def finetune_qlora(
    model: str,
    data: str,
    out: str = "runs/qlora",
    lora: LoRA = LoRA(),
    nf4: NF4 = NF4(),
    sft: SFTData = SFTData(),
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
        lora: The low-rank update (--lora.r, ...); its targets are also the layers quantized to NF4.
        nf4: The frozen NF4 base (--nf4.block_size, --nf4.double_quant).
        sft: How the JSONL becomes training and validation sequences (--sft.max_len, --sft.val_data, ...).
        train: Optimisation settings (--train.steps, --train.lr, --train.batch_size, ...).
        resume: Continue the run in `out` from its last checkpoint (with none yet, start it from step 0).
        overwrite: Delete what `out` holds and start afresh (otherwise a directory that is not this verb's run is
            refused, and a run with a checkpoint needs --resume).
        device: Where to train (cpu, cuda).
    """
    from mightylm.adapters.lora import apply_lora
    from mightylm.compress.quantize import quantize_

    def adapt(net, tok):
        quantize_(net, "nf4", targets=tuple(lora.targets), block_size=nf4.block_size, double_quant=nf4.double_quant)
        return f"QLoRA (NF4 base) on {len(apply_lora(net, **lora.settings(net)))} layers"

    return _finetune(model, data, out, sft, train, resume, overwrite, device, "finetune qlora", adapt=adapt,
                     settings={**asdict(lora), **asdict(nf4)})


def finetune_prompt(
    model: str,
    data: str,
    out: str = "runs/prompt",
    prompt: SoftPrompt = SoftPrompt(),
    sft: SFTData = SFTData(),
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
        prompt: The virtual tokens (--prompt.n_tokens, --prompt.init_text).
        sft: How the JSONL becomes training and validation sequences (--sft.max_len, --sft.val_data, ...).
        train: Optimisation settings (--train.steps, --train.lr, --train.batch_size, ...).
        resume: Continue the run in `out` from its last checkpoint (with none yet, start it from step 0).
        overwrite: Delete what `out` holds and start afresh (otherwise a directory that is not this verb's run is
            refused, and a run with a checkpoint needs --resume).
        device: Where to train (cpu, cuda).
    """
    return _finetune(model, data, out, sft, train, resume, overwrite, device, "finetune prompt",
                     adapt=_soft_prompt(prompt, "none", 0, train.seed), settings=asdict(prompt),
                     init_text=prompt.init_text)


def finetune_ptuning(
    model: str,
    data: str,
    out: str = "runs/ptuning",
    prompt: SoftPrompt = SoftPrompt(),
    encoder: Literal["mlp", "lstm"] = "mlp",
    hidden: PositiveInt = 256,
    sft: SFTData = SFTData(),
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
        prompt: The virtual tokens (--prompt.n_tokens, --prompt.init_text).
        encoder: The prompt encoder: mlp (three layers) or lstm (bidirectional LSTM, then an MLP).
        hidden: Hidden size of the prompt encoder.
        sft: How the JSONL becomes training and validation sequences (--sft.max_len, --sft.val_data, ...).
        train: Optimisation settings (--train.steps, --train.lr, --train.batch_size, ...).
        resume: Continue the run in `out` from its last checkpoint (with none yet, start it from step 0).
        overwrite: Delete what `out` holds and start afresh (otherwise a directory that is not this verb's run is
            refused, and a run with a checkpoint needs --resume).
        device: Where to train (cpu, cuda).
    """
    return _finetune(model, data, out, sft, train, resume, overwrite, device, "finetune ptuning",
                     adapt=_soft_prompt(prompt, encoder, hidden, train.seed),
                     settings={**asdict(prompt), "encoder": encoder, "hidden": hidden})


def finetune_adapter(
    model: str,
    data: str,
    out: str = "runs/adapter",
    layers: PositiveInt | None = None,
    length: PositiveInt = 10,
    sft: SFTData = SFTData(),
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
        sft: How the JSONL becomes training and validation sequences (--sft.max_len, --sft.val_data, ...).
        train: Optimisation settings (--train.steps, --train.lr, --train.batch_size, ...).
        resume: Continue the run in `out` from its last checkpoint (with none yet, start it from step 0).
        overwrite: Delete what `out` holds and start afresh (otherwise a directory that is not this verb's run is
            refused, and a run with a checkpoint needs --resume).
        device: Where to train (cpu, cuda).
    """
    from mightylm.adapters.llama_adapter import apply_llama_adapter

    return _finetune(model, data, out, sft, train, resume, overwrite, device, "finetune adapter",
                     adapt=lambda net, tok: f"LLaMA-Adapter on {len(apply_llama_adapter(net, layers, length, train.seed))} "
                                            "layers", settings={"layers": layers, "length": length})


def _soft_prompt(prompt: SoftPrompt, encoder: str, hidden: int, seed: int):
    """The adapt step of prompt tuning and P-tuning: virtual tokens initialised from a text or the vocabulary."""
    from mightylm.adapters.prompt import apply_prompt_tuning

    def adapt(net, tok):
        text = prompt.init_text
        ids = tok.encode(text) if text else None
        apply_prompt_tuning(net, prompt.n_tokens, encoder=encoder, hidden=hidden, init_ids=ids, seed=seed)
        kind = "prompt tuning" if encoder == "none" else f"P-tuning ({encoder} encoder)"
        return f"{kind}: {prompt.n_tokens} virtual tokens" + (f" from {text!r}" if text else "")

    return adapt


def finetune_rmt(
    model: str,
    data: str,
    out: str = "runs/rmt",
    segment: PositiveInt = 128,
    memory: PositiveInt = 16,
    bptt: PositiveInt | None = 2,
    lora: LoRA = LoRA(),
    sft: SFTData = SFTData(max_len=1024),
    train: TrainConfig = TrainConfig(steps=200, lr=2e-4, min_lr=2e-5, warmup=20, batch_size=2, eval_every=50,
                                     save_every=100, weight_decay=0.0),
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
) -> dict:
    """Recurrent Memory Transformer (Bulatov et al.): LoRA on the decoder plus --memory learned memory slots, the
    input run in segments of --segment tokens, each reading the memory the one before wrote.

    The run directory holds the LoRA adapter (PEFT's format), rmt.json (segment, memory, bptt) and the memory;
    use it with `mighty generate --model MODEL --rmt DIR`. Conversations longer than one segment are what it
    is for (--sft.max_len sets how long they may be).

    Args:
        model: A Hugging Face directory, a .gguf file, or an embedded model name (smollm2-135m-instruct).
        data: JSONL, one example per line: {"instruction", "input"?, "output"} or {"messages": [{"role", "content"}]}.
        out: The run directory.
        segment: Tokens per segment.
        memory: Memory slots (read at each segment's start, written at its end).
        bptt: Segments a loss reaches back through (backpropagation through time); null for all.
        lora: The low-rank update on the decoder (--lora.r, --lora.alpha, --lora.targets, ...).
        sft: How the JSONL becomes training and validation sequences (--sft.max_len, --sft.val_data, ...).
        train: Optimisation settings (--train.steps, --train.lr, --train.batch_size, ...).
        resume: Continue the run in `out` from its last checkpoint.
        overwrite: Delete what `out` holds and start afresh.
        device: Where to train (cpu, cuda).
    """
    from mightylm.adapters.lora import apply_lora
    from mightylm.rmt import RecurrentMemory

    if sft.pack:
        raise UsageError("--sft.pack true cannot train a recurrent memory: a packed row's conversations would share "
                         "one memory; run finetune rmt without packing")
    return _finetune(model, data, out, sft, train, resume, overwrite, device, "finetune rmt",
                     adapt=lambda net, tok: f"LoRA on {len(apply_lora(net, **lora.settings(net)))} layers",
                     settings={**asdict(lora), "segment": segment, "memory": memory, "bptt": bptt},
                     wrap=lambda net: RecurrentMemory(net, segment, memory, bptt))


def _finetune(model: str, data: str, out: str, sft: SFTData, train: TrainConfig, resume: bool, overwrite: bool,
              device: str, verb: str, adapt=None, settings: dict | None = None, optimizer: str = "adamw",
              init_text: str | None = None, router: Router = Router(), rope_scaling: str | None = None,
              wrap=None) -> dict:
    """The body every fine-tuning verb shares. With `adapt(net, tokenizer) -> description`: transform the
    model first (then only the adapters train), train, and save only the adapter. With `wrap(net) -> module`
    (rmt): train the wrapper, saved beside the adapter."""
    import mightylm
    from mightylm.adapters import mark_trainable, save_adapter
    from mightylm.data import data_identity
    from mightylm.data.loader import Loader
    from mightylm.data.sft import SFTDataset, hold_out, read_conversations
    from mightylm.moe import set_router_losses
    from mightylm.report import write_report
    from mightylm.train import fit

    out = Path(out)
    rank, world = distributed(device)
    val_data = sft.val_data
    sources = [Path(d) for d in (data, val_data) if d]
    missing = [d for d in sources if not d.is_file()]
    if missing:
        raise RunDirError(f"{missing[0]}: no such file; --data and --val_data take JSONL files")
    rows = read_conversations(data)
    val_rows = read_conversations(val_data) if val_data else []
    resume = prepare_out(out, verb=verb, resume=resume, overwrite=overwrite, inputs=[model, *sources],
                         data=data_identity(sources), rank=rank)
    net, tok = mightylm.load(model, device=device)
    if rope_scaling:
        from mightylm.model import set_rope_scaling

        print(set_rope_scaling(net, rope_scaling))  # before the adapter, so that its wrappers see the new tables
    set_router_losses(net, **asdict(router))
    if tok is None or not tok.chat_template:
        raise RunDirError(f"{model}: fine-tuning needs a tokenizer with a chat template")
    if adapt is not None:
        what = adapt(net, tok)  # checks its settings (targets, rank, lengths) before any data is read
        if sft.pack and net.prefix_len:
            raise UsageError(f"--sft.pack true cannot train a soft prompt: its virtual tokens would start each packed "
                             f"row, not each conversation; run {verb} without packing")
        base = net
        if wrap is not None:
            net = wrap(net)
            what += f", {net.n_memory} memory slots over segments of {net.segment} tokens"
        trainable = mark_trainable(net)
        print(f"{what}: {trainable:,} trainable parameters ({100 * trainable / net.config.n_params:.2f}% of "
              f"{net.config.n_params:,})")
    if not val_data:
        rows, val_rows = hold_out(rows, sft.val_fraction, train.seed)
    train_set = SFTDataset.from_conversations(rows, tok, max_len=sft.max_len, pack=sft.pack)
    loader = Loader(train_set, train.batch_size, seed=train.seed, pad_id=tok.pad_id or 0, rank=rank, world_size=world)
    val = None
    if val_rows:
        val_set = SFTDataset.from_conversations(val_rows, tok, max_len=sft.max_len)
        val = Loader(val_set, train.batch_size, shuffle=False, pad_id=tok.pad_id or 0)
    if rank == 0:
        write_run_args(out, {**read_run_args(out), "model": model, "data": data, "max_len": sft.max_len,
                             "sft": asdict(sft), "adapter": settings, "optimizer": optimizer, "world_size": world,
                             "rope_scaling": rope_scaling, "train": asdict(train)})
    opt = None
    if optimizer == "lomo":
        from mightylm.optim.lomo import LOMO

        opt = LOMO(net.parameters(), lr=train.lr, weight_decay=train.weight_decay, clip_grad_norm=train.grad_clip)
        train = dataclasses.replace(train, grad_clip=None)  # LOMO clips inside its own two-pass backward
    summary = fit(net, loader, out, train, val=val, resume=resume, optimizer=opt)
    if adapt is not None:
        if rank != 0:
            return summary
        save_adapter(base, out, base_model=str(model), init_text=init_text)
        sampler = base
        if wrap is not None:
            from mightylm.rmt import save_rmt

            save_rmt(net, out)
    else:
        save_final(net, tok, out, rank, world)
        if rank != 0:
            return summary
        sampler, _ = mightylm.load(out)
    prompts = [tok.apply_chat_template([m for m in conv if m["role"] != "assistant"][:1]) for conv in (val_rows or rows)[:3]]
    source = None
    if wrap is not None:
        from mightylm.rmt import generate_rmt

        net.eval()
        source = lambda ids, s: generate_rmt(net, ids, s)  # noqa: E731  (the samples read the learned memory)
    report = write_report(out, samples(sampler, tok, prompts, max_new_tokens=48, source=source))
    use = f"--model {model} --adapter {out}" if adapt is not None else f"--model {out}"
    if wrap is not None:
        use = f"--model {model} --rmt {out}"
    if rope_scaling and adapt is not None:
        use += f" --rope_scaling {rope_scaling}"  # the base's checkpoint does not hold it; a full fine-tune's does
    what = "stopped by a signal; saved" if summary["interrupted"] else "done"
    print(f"{what}: {summary['step']} steps, {summary['tokens']:,} tokens, validation loss "
          f"{summary.get('val_loss', float('nan')):.3f}; report in {report}\n"
          f"{'the adapter' if adapt is not None else 'the model'} is in {out}; use it: "
          f"mighty generate {use} --chat true --prompt \"...\"")
    return summary
