"""`mighty distill`: train a student on a teacher's next-token distributions (compress/distill.py) with the one
training loop, on plain text (token windows, as `pretrain`) or instruction/chat JSONL (as `finetune`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from mightylm.config import TrainConfig
from mightylm.errors import UsageError
from mightylm.options import ClosedUnitInterval, Fraction, PositiveFloat, PositiveInt
from mightylm.recipes.groups import SFTData
from mightylm.recipes.rundir import (RunDirError, distributed, prepare_out, read_run_args, samples, save_final,
                                     write_run_args)


def distill(
    teacher: str,
    data: str,
    out: str = "runs/distill",
    student: str | None = None,
    student_config: str | None = None,
    loss: Literal["fkl", "rkl", "skl", "srkl", "jsd"] = "fkl",
    temperature: PositiveFloat = 1.0,
    kd_ratio: ClosedUnitInterval = 0.5,
    beta: ClosedUnitInterval = 0.5,
    skew: Fraction = 0.1,
    top_k: PositiveInt | None = None,
    teacher_cache: str | None = None,
    teacher_quantize: Literal["none", "int8", "nf4"] = "none",
    seq_len: PositiveInt = 256,
    val_fraction: Fraction = 0.02,
    sft: SFTData = SFTData(),
    train: TrainConfig = TrainConfig(steps=200, lr=3e-4, min_lr=3e-5, warmup=20, batch_size=4, eval_every=50,
                                     save_every=100),
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
) -> dict:
    """Knowledge distillation: train a student on a teacher's next-token distributions and the labels.

    The loss is (1 - kd_ratio) * CE + kd_ratio * T^2 * divergence(teacher, student), both logged; validation reports
    the student's CE (and perplexity). The student is a checkpoint (--student, e.g. a pruned one from `mighty prune`;
    a pruned model keeps its zeros) or a fresh model of a preset's shape with the teacher's tokenizer
    (--student_config). Both must share the teacher's tokenizer; for different tokenizers use sequence-level
    distillation (`mighty distill-data`, then `mighty finetune`).

    Args:
        teacher: The teacher: a Hugging Face directory, a .gguf file, or an embedded model name.
        data: Plain text (a file, a directory, JSONL with "text", or the embedded corpus shakespeare), cut into
            --seq_len windows; or instruction/chat JSONL ({"messages": [...]} or {"instruction", "output"}).
        out: The run directory; it ends up as a Hugging Face checkpoint of the student.
        student: The student checkpoint to start from.
        student_config: Instead of --student: a preset (see mightylm.config.PRESETS) trained from scratch.
        loss: fkl (forward KL), rkl (reverse KL), skl / srkl (skew forward / reverse KL, DistiLLM), or jsd
            (generalised Jensen-Shannon with --beta, GKD).
        temperature: Softmax temperature of both distributions (the divergence is scaled by its square).
        kd_ratio: Weight of the distillation term (0: labels only, 1: teacher only).
        beta: jsd: the mixture weight of the teacher (0 is fkl, 1 is rkl).
        skew: skl / srkl: the skew (0.1 in DistiLLM).
        top_k: Distil the teacher's k most likely tokens only (renormalised); what a teacher cache holds.
        teacher_cache: A directory for an offline teacher: its top-k (--top_k, default 32) is computed once for the
            training data and memory-mapped there (resumable), then the student trains without the teacher in
            memory. An existing complete cache is used as it is.
        teacher_quantize: Quantize the teacher's projections (int8 or nf4) to save memory while it runs.
        seq_len: Tokens per training window (plain text data).
        val_fraction: The share of plain-text windows held out for validation.
        sft: How JSONL data becomes sequences (--sft.max_len, --sft.pack, --sft.val_data, --sft.val_fraction).
        train: Optimisation settings (--train.steps, --train.lr, --train.batch_size, ...).
        resume: Continue the run in `out` from its last checkpoint.
        overwrite: Delete what `out` holds and start afresh.
        device: Where to train (cpu, cuda).
    """
    import torch

    import mightylm
    from mightylm.compress.distill import Distiller, check_settings, check_vocabularies
    from mightylm.data import data_identity
    from mightylm.data.loader import Loader
    from mightylm.report import write_report
    from mightylm.train import fit

    check_settings(loss, temperature, kd_ratio, beta, skew)
    if (student is None) == (student_config is None):
        raise UsageError("give exactly one of --student (a checkpoint to start from) or --student_config (a preset "
                         "trained from scratch)")
    if teacher_cache and top_k is None:
        top_k = 32
    out = Path(out)
    rank, world = distributed(device)
    if world > 1:
        raise UsageError("mighty distill runs in one process (the teacher and the student's chunked loss are not "
                         "wrapped for DDP); run it without torchrun")
    text_data = _is_text(data)
    if text_data:
        from mightylm.data.pretrain import collect_files

        sources = collect_files([data])
    else:
        sources = [Path(d) for d in (data, sft.val_data) if d]
        missing = [d for d in sources if not d.is_file()]
        if missing:
            raise RunDirError(f"{missing[0]}: no such file; --data and --sft.val_data take JSONL files")
    resume = prepare_out(out, verb="distill", resume=resume, overwrite=overwrite,
                         inputs=[teacher, student, data, teacher_cache], data=data_identity(sources),
                         rank=rank)
    teacher_net, tok = mightylm.load(teacher, device=device)
    if tok is None:
        raise RunDirError(f"{teacher}: distillation needs the teacher's tokenizer")
    if teacher_quantize != "none":
        from mightylm.compress.quantize import quantize_

        quantize_(teacher_net, teacher_quantize)
    if student is not None:
        net, student_tok = mightylm.load(student, device=device)
        check_vocabularies(tok, student_tok or tok, teacher, student, teacher_net.config.vocab_size,
                           net.config.vocab_size)
    else:
        from mightylm.config import ModelConfig
        from mightylm.model import Transformer

        config = ModelConfig.from_preset(student_config, vocab_size=tok.vocab_size,
                                         max_seq_len=max(seq_len, sft.max_len, 256))
        torch.manual_seed(train.seed)
        net = Transformer(config).to(device)
    train_set, val_set = _datasets(data, text_data, tok, out, seq_len, val_fraction, sft, train.seed)
    print(f"teacher {teacher}: {teacher_net.config.n_params / 1e6:.1f}M parameters; student: "
          f"{net.config.n_params / 1e6:.1f}M; {len(train_set)} training and {len(val_set or [])} validation sequences")
    distiller = Distiller(teacher_net, loss=loss, temperature=temperature, kd_ratio=kd_ratio, beta=beta, skew=skew,
                          top_k=top_k)
    if teacher_cache:
        from mightylm.compress.teacher_cache import TeacherCache, WithTeacher

        cache = TeacherCache.build(teacher_net, train_set, teacher_cache, k=top_k, vocab=net.config.vocab_size,
                                   progress=rank == 0)
        train_set = WithTeacher(train_set, cache)
        distiller.teacher = None  # the cache stands in for it from here on
        del teacher_net
    loader = Loader(train_set, train.batch_size, seed=train.seed, pad_id=tok.pad_id or 0)
    val = Loader(val_set, train.batch_size, shuffle=False, pad_id=tok.pad_id or 0) if val_set else None
    write_run_args(out, {**read_run_args(out), "teacher": teacher, "student": student, "student_config": student_config,
                         "data": data, "loss": loss, "temperature": temperature, "kd_ratio": kd_ratio, "beta": beta,
                         "skew": skew, "top_k": top_k, "teacher_cache": teacher_cache, "seq_len": seq_len,
                         "sft": asdict(sft), "train": asdict(train)})
    summary = fit(net, loader, out, train, val=val, loss_fn=distiller, resume=resume)
    save_final(net, tok, out, rank, world)
    prompts = ["The ", "And "] if text_data else [tok.apply_chat_template([{"role": "user", "content": "Hello!"}])]
    report = write_report(out, samples(mightylm.load(out)[0], tok, prompts))
    what = "stopped by a signal; saved" if summary["interrupted"] else "done"
    print(f"{what}: {summary['step']} steps, {summary['tokens']:,} tokens, validation loss (student CE) "
          f"{summary.get('val_loss', float('nan')):.3f}; report in {report}\nuse it: mighty generate --model {out} "
          "--prompt \"...\"")
    return summary


def _is_text(data: str) -> bool:
    """Plain text unless it is a JSONL file whose first record is an instruction or a conversation."""
    path = Path(data)
    if path.suffix != ".jsonl" or not path.is_file():
        return True
    with path.open() as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except ValueError:
                    raise UsageError(f"{path}:1: not valid JSON") from None
                return "text" in first and "messages" not in first and "instruction" not in first
    return True


def _datasets(data: str, text: bool, tok, out: Path, seq_len: int, val_fraction: float, sft: SFTData, seed: int):
    """(training set, validation set or None) from plain text windows (`text`) or SFT JSONL."""
    if text:
        from mightylm.data.pretrain import TokenStream, collect_files

        stream = TokenStream.build(collect_files([data]), tok, out / "data")  # cached: a resume re-reads it
        return stream.split(seq_len, val_fraction)
    from mightylm.data.sft import SFTDataset, hold_out, read_conversations

    rows = read_conversations(data)
    val_rows = read_conversations(sft.val_data) if sft.val_data else []
    if not sft.val_data:
        rows, val_rows = hold_out(rows, sft.val_fraction, seed)
    train_set = SFTDataset.from_conversations(rows, tok, max_len=sft.max_len, pack=sft.pack)
    return train_set, (SFTDataset.from_conversations(val_rows, tok, max_len=sft.max_len) if val_rows else None)
