"""Recurrent Memory Transformer (Bulatov et al. 2022, "Recurrent Memory Transformer"; 2023, "Scaling Transformer
to 1M tokens and beyond with RMT"), in its decoder form, wrapped around any of our decoders.

The input is cut into segments of `segment` tokens. Each segment runs through the unchanged decoder as

    [memory (M read slots), the segment's tokens, memory (M write slots)]

causally, so the segment's tokens read the memory and the trailing write slots see everything before them; the
decoder's final hidden states at the write slots become the memory the next segment reads. The first segment
reads `memory`, M learned vectors initialised at the scale of the token embeddings. The loss is the decoder's own
over every segment's tokens (labels as the data gives them, shifted), so the last token of a segment predicts the
first of the next from what the memory carried.

Positions: each segment's layout gets ordinary RoPE positions 0 .. 2M + S - 1, the same for every segment (the
"fixed position" option of the issue, rather than none): the pretrained decoder has only ever seen rotated keys,
and this keeps every position within the short range it was trained on however long the input grows; the
memory slots are told apart by their place in the layout.

Backpropagation through time: the memory a segment passes on is detached for all but the last `bptt` segment
transitions (None: full BPTT), so a loss reaches back at most `bptt` segments; the learned initial memory always
gets its gradient through the first segment.

Trained through `fit` like any model (it calls `rmt(input_ids, labels=...)`), e.g. with LoRA on the decoder plus
the memory. `generate_rmt` builds the memory over all but the last segment of the prompt and decodes after it,
rolling into a new segment (and a new memory) when one fills; the memory state can be saved and restored, so a
conversation continues later (`save_memory`, `load_memory`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from mightylm.errors import UsageError
from mightylm.generate import Sampling, sample
from mightylm.model import Transformer


class RecurrentMemory(nn.Module):
    """A decoder with M memory slots carried across segments of `segment` tokens."""

    def __init__(self, base: Transformer, segment: int, memory: int, bptt: int | None = 2):
        super().__init__()
        if memory < 0 or segment < 1:
            raise UsageError(f"need segment >= 1 and memory >= 0, got segment {segment}, memory {memory}")
        if memory and segment < memory:
            raise UsageError(f"a segment of {segment} tokens is shorter than its {memory} memory slots: each segment "
                             f"would be mostly memory; use --segment of at least {memory}")
        if bptt is not None and bptt < 1:
            raise UsageError(f"the BPTT window counts segments and must be at least 1 (or none for full BPTT), got {bptt}")
        if 2 * memory + segment > base.config.max_seq_len:
            raise UsageError(f"a segment's layout (2 x {memory} memory + {segment} tokens) exceeds the decoder's "
                             f"context of {base.config.max_seq_len}")
        self.base, self.segment, self.n_memory, self.bptt = base, segment, memory, bptt
        table = getattr(base.embed, "weight", None)  # (a table kept as GGUF blocks has none: looked up whole)
        if table is None:
            table = base.embed(torch.arange(base.config.vocab_size, device=base.device))
        scale = float(table.detach().float().std())
        self.memory = nn.Parameter(torch.randn(memory, base.config.dim) * scale)  # (M, dim)

    @property
    def config(self):
        return self.base.config

    def trains_with_adapters(self) -> list[nn.Parameter]:
        """With LoRA (or another adapter) on the decoder, the memory slots train too (adapters.mark_trainable)."""
        return [self.memory]

    def initial_memory(self, batch: int) -> torch.Tensor:
        return self.memory.to(self.base.dtype)[None].expand(batch, -1, -1)  # (B, M, dim)

    def segment_pass(self, tokens: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One segment: (hidden states of its tokens (B, S, dim), the memory it writes (B, M, dim))."""
        M, S = self.n_memory, tokens.shape[1]
        x = self.base.embed(tokens)
        if M:
            x = torch.cat([memory, x, memory], dim=1)  # (B, M + S + M, dim)
        h = self.base.trunk(x)
        return h[:, M:M + S], (h[:, M + S:] if M else memory)

    def run(self, idx: torch.Tensor, memory: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states of every token (B, L, dim), the memory after the last segment)."""
        memory = self.initial_memory(idx.shape[0]) if memory is None else memory
        segments = idx.split(self.segment, dim=1)
        n, hidden = len(segments), []
        for i, tokens in enumerate(segments):
            if i and self.bptt is not None and i <= n - self.bptt:
                memory = memory.detach()  # a loss reaches back at most `bptt` segments
            h, memory = self.segment_pass(tokens, memory)
            hidden.append(h)
        return torch.cat(hidden, dim=1), memory

    def forward(self, idx: torch.Tensor, *, labels: torch.Tensor | None = None, memory: torch.Tensor | None = None):
        """Logits (B, L, vocab) of every token, or the mean loss of `labels` (B, L, shifted; IGNORE_INDEX where
        unscored)."""
        h, _ = self.run(idx, memory)
        return self.base.head(h) if labels is None else self.base.loss(h, labels)


@torch.inference_mode()
def read(rmt: RecurrentMemory, ids: list[int], memory: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int]]:
    """The memory after every full segment of `ids` but the last, and the tokens left after them (at least one; a
    whole segment when `ids` fills its segments exactly). Only the memory is kept from segment to segment, so reading
    takes the same memory however long `ids` is (bench/longctx.py)."""
    whole = (len(ids) - 1) // rmt.segment * rmt.segment
    memory = rmt.initial_memory(1) if memory is None else memory
    for start in range(0, whole, rmt.segment):  # the segments' hidden states are dropped as soon as made
        _, memory = rmt.segment_pass(torch.tensor([ids[start:start + rmt.segment]]), memory)
    return memory, ids[whole:]


@torch.inference_mode()
def generate_rmt(rmt: RecurrentMemory, prompt: list[int], s: Sampling, memory: torch.Tensor | None = None,
                 state: dict | None = None) -> Iterator[int]:
    """Tokens after `prompt` as `rmt` computes them (greedy: the argmax of its own forward over prompt + tokens),
    the prompt read segment by segment into the memory; decoding continues in the last segment on a KV cache and,
    when the segment is full, its write slots make the next memory (fed on after it, as the forward does) and
    decoding goes on in a fresh segment. `state`, when given, ends holding {"memory", "tail"}: a later call
    continues with generate_rmt(rmt, tail + more, s, memory) (save_memory keeps both)."""
    if not prompt:
        raise UsageError("the prompt needs at least one token")
    generator = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
    memory, tail = read(rmt, prompt, memory)
    base, M, S = rmt.base, rmt.n_memory, rmt.segment
    stops = set(s.stop_token_ids)

    def step(x: torch.Tensor, cache, start: int) -> torch.Tensor:
        return base.trunk(x, cache=cache, start=start)

    cache = base.make_cache(1, 2 * M + S)
    x = base.embed(torch.tensor([tail]))
    h = step(torch.cat([memory, x], dim=1) if M else x, cache, 0)
    logits, pos = base.head(h[:, -1]), M + len(tail)  # pos: the next free slot of this segment's layout
    for _ in range(s.max_new_tokens):
        token = int(sample(logits, s, generator)[0])
        yield token
        if token in stops:
            break
        if len(tail) == S:  # the segment is full: its write slots make the memory the token's segment reads
            if M:
                memory = step(memory, cache, pos)
            cache, tail, pos = base.make_cache(1, 2 * M + S), [], M
            if M:
                step(memory, cache, 0)  # the new segment's read slots
        logits = base.head(step(base.embed(torch.tensor([[token]])), cache, pos)[:, -1])
        pos, tail = pos + 1, tail + [token]
    if state is not None:
        state.update(memory=memory, tail=tail)


def save_memory(memory: torch.Tensor, path: str | Path, tail: list[int] | None = None) -> None:
    """The memory state (and the tokens of the unfinished segment) as safetensors, to continue later."""
    from safetensors.torch import save_file

    tensors = {"memory": memory.detach().contiguous().cpu()}
    if tail:
        tensors["tail"] = torch.tensor(tail, dtype=torch.long)
    save_file(tensors, str(path))


def load_memory(path: str | Path) -> tuple[torch.Tensor, list[int]]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return tensors["memory"], tensors.get("tail", torch.zeros(0, dtype=torch.long)).tolist()


SETTINGS_FILE, MEMORY_FILE = "rmt.json", "rmt_memory.safetensors"


def save_rmt(rmt: RecurrentMemory, path: str | Path) -> None:
    """The wrapper's settings and learned memory beside an adapter in a run directory (`mighty finetune rmt`)."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / SETTINGS_FILE).write_text(json.dumps({"segment": rmt.segment, "memory": rmt.n_memory, "bptt": rmt.bptt},
                                                 indent=2) + "\n")
    save_file({"memory": rmt.memory.detach().contiguous().cpu()}, str(path / MEMORY_FILE))


def load_rmt(base: Transformer, path: str | Path, apply_adapter: bool = True) -> RecurrentMemory:
    """A RecurrentMemory around `base` from a `mighty finetune rmt` run directory (the adapter in it, if any, is
    applied to `base` first unless `apply_adapter` is false: the caller applied it)."""
    import json

    from safetensors.torch import load_file

    path = Path(path)
    if not (path / SETTINGS_FILE).is_file():
        raise UsageError(f"{path}: not a recurrent-memory run (no {SETTINGS_FILE}); make one with mighty finetune rmt")
    settings = json.loads((path / SETTINGS_FILE).read_text())
    if apply_adapter and (path / "adapter_config.json").is_file():
        from mightylm.adapters import load_adapter

        load_adapter(base, path)
    rmt = RecurrentMemory(base, settings["segment"], settings["memory"], settings["bptt"])
    memory = load_file(str(path / MEMORY_FILE))["memory"]
    if memory.shape != rmt.memory.shape:
        raise UsageError(f"{path / MEMORY_FILE}: memory of shape {tuple(memory.shape)}, this model needs "
                         f"{tuple(rmt.memory.shape)}: it was trained on another base")
    with torch.no_grad():
        rmt.memory.copy_(memory)
    return rmt.eval()
