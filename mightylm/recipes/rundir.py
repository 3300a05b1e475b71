"""A training run's directory: what `pretrain` and the `finetune` verbs share around the one training loop.

It is the verb's own when it holds run_args.json (written at the start, so a run stopped at any point is
recognised); a rerun resumes from its checkpoint only when asked, never on other data; and processes started
by torchrun share the work (rank 0 writes, the others wait at a barrier).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


from mightylm.errors import MightyError


class RunDirError(MightyError, ValueError):
    """The output directory cannot be used as asked."""


def distributed(device: str) -> tuple[int, int]:
    """(rank, world size): joins the process group when started by torchrun, else (0, 1)."""
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def rank0_first(rank: int, world: int, work):
    """Run `work` on rank 0 first (tokenizer training, tokenization), then on the others, which
    find its results cached on disk."""
    import torch.distributed as dist

    if world > 1 and rank != 0:
        dist.barrier()
    result = work()
    if world > 1 and rank == 0:
        dist.barrier()
    return result


def save_final(model, tokenizer, out: Path, rank: int, world: int) -> None:
    """Write the run directory's Hugging Face checkpoint from rank 0 (full weights, also under FSDP)."""
    import torch

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


def prepare_out(out: Path, *, verb: str, resume: bool, overwrite: bool, inputs: list, data: dict,
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
    recorded = read_run_args(out)
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
    write_run_args(out, {**recorded, "verb": verb, "data_identity": data})
    return resume


def read_run_args(out: Path) -> dict:
    path = out / "run_args.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        return {}  # cut short by a kill before the first checkpoint: rewritten below


def write_run_args(out: Path, args: dict) -> None:
    tmp = out / "run_args.json.tmp"
    tmp.write_text(json.dumps(args, indent=1) + "\n")
    os.replace(tmp, out / "run_args.json")


def _describe(identity: dict) -> str:
    files = identity.get("files", [])
    return f"{len(files)} file(s): " + ", ".join(f"{f['name']} ({f['bytes']:,} bytes, sha256 {f['sha256'][:12]})"
                                                for f in files[:3])


def samples(model, tokenizer, prompts: list[str], max_new_tokens: int = 60, source=None) -> dict[str, str]:
    """Sampled replies for the run report; `source(ids, settings)` yields the tokens instead of plain decoding
    (generate.stream_text)."""
    from mightylm.generate import Sampling, stream_text

    model.eval()
    settings = Sampling(max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95, seed=0)
    return {p: "".join(stream_text(model, tokenizer, p, settings, source=source)) for p in prompts}
