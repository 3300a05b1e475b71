"""Knowledge distillation as a `loss_fn` for the one training loop: `fit(student, data, ..., loss_fn=Distiller(teacher))`.

The student learns the teacher's next-token distribution p (softer and richer than the one-hot label) as well as the
labels. With q the student's distribution, both at temperature T (softmax(z / T)), the divergences per token:

    fkl   KL(p || q)                                   forward KL (Hinton et al. 2015; mode-covering)
    rkl   KL(q || p)                                   reverse KL, token-level (MiniLLM, Gu et al. 2024; mode-seeking)
    skl   KL(p || s p + (1 - s) q)                     skew forward KL (DistiLLM, Ko et al. 2024), s = `skew` (0.1)
    srkl  KL(q || s q + (1 - s) p)                     skew reverse KL (DistiLLM)
    jsd   b KL(p || m) + (1 - b) KL(q || m),  m = b p + (1 - b) q      generalised JSD (GKD, Agarwal et al. 2024),
          b = `beta`: 0 is fkl, 1 is rkl; the definition TRL's `generalized_jsd_loss` computes

averaged over the labelled tokens and multiplied by T^2 (Hinton's scaling, which keeps the gradients' size as T
changes), then mixed: loss = (1 - kd_ratio) * CE + kd_ratio * KD. CE and KD are logged separately.

Memory: the (tokens, vocab) logits are never held whole. The student's trunk runs once; its hidden states and the
teacher's go through the heads a chunk of rows at a time (SmolLM2's 49,152-token vocabulary times 4 x 256 tokens
would be 200 MB per copy). With a plain linear head, CE and KD share each chunk's logits and their gradients are
taken in the same pass (`_HeadLoss`, as `model.linear_cross_entropy` does for CE); a replaced head (LoRA on it)
computes CE apart and the KD chunks under activation checkpointing.

Teachers: a frozen model run under no_grad (optionally quantized to int8 or NF4 first to save memory), or an
offline top-k cache (teacher_cache.py) with no teacher in memory. With top_k the teacher's distribution is
restricted to its k most likely tokens (renormalised), and the student's log-probabilities (over the whole vocabulary)
are read at those tokens: the usual sparse distillation target, the same whether the teacher runs now or was cached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mightylm.errors import MightyError
from mightylm.model import IGNORE_INDEX

LOSSES = ("fkl", "rkl", "skl", "srkl", "jsd")


class DistillationError(MightyError, ValueError):
    """A distillation request that cannot work; the message says what and why."""


# Log-probabilities are floored here: a probability that underflowed to 0 (log -inf) would make 0 * -inf = NaN in
# a KL term and its gradient; e^-10000 is 0 all the same.
_FLOOR = -1e4


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row, from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w a + (1 - w) b)."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def divergence(log_q: torch.Tensor, log_p: torch.Tensor, loss: str, *, beta: float = 0.5,
               skew: float = 0.1) -> torch.Tensor:
    """Per-row divergence of the student log-probabilities `log_q` from the teacher's `log_p` (rows, vocab)."""
    log_q, log_p = log_q.clamp(min=_FLOOR), log_p.clamp(min=_FLOOR)
    if loss == "fkl" or (loss == "jsd" and beta == 0):
        return _kl(log_p, log_q)
    if loss == "rkl" or (loss == "jsd" and beta == 1):
        return _kl(log_q, log_p)
    if loss == "skl":
        return _kl(log_p, _log_mix(log_p, log_q, skew))
    if loss == "srkl":
        return _kl(log_q, _log_mix(log_q, log_p, skew))
    if loss == "jsd":
        m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, m) + (1 - beta) * _kl(log_q, m)
    raise DistillationError(f"unknown distillation loss {loss!r}; choose one of {', '.join(LOSSES)}")


def check_settings(loss: str, temperature: float, kd_ratio: float, beta: float, skew: float) -> None:
    if loss not in LOSSES:
        raise DistillationError(f"unknown distillation loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if not temperature > 0:
        raise DistillationError(f"temperature must be above 0, got {temperature}")
    if not 0 <= kd_ratio <= 1:
        raise DistillationError(f"kd_ratio must be from 0 (labels only) to 1 (teacher only), got {kd_ratio}")
    if not 0 <= beta <= 1 or not 0 < skew < 1:
        raise DistillationError(f"beta must be in [0, 1] and skew in (0, 1); got beta {beta}, skew {skew}")


class Distiller:
    """loss_fn(student, batch) -> (loss, {"ce", "kd"}) for `fit`.

    teacher: a frozen Transformer (None when every batch carries `teacher_ids` / `teacher_logprobs` from a cache).
    top_k: restrict the teacher to its k most likely tokens (what a cache of k holds); None uses every token.
    vocab: the student's vocabulary size; a teacher with a larger, padded vocabulary is sliced to it.
    chunk_rows: tokens per head product (default: about 16M logits per chunk).
    In eval mode (validation) it returns the student's CE only, so that validation loss and perplexity mean the
    same in every run."""

    def __init__(self, teacher=None, *, loss: str = "fkl", temperature: float = 1.0, kd_ratio: float = 0.5,
                 beta: float = 0.5, skew: float = 0.1, top_k: int | None = None, chunk_rows: int | None = None):
        check_settings(loss, temperature, kd_ratio, beta, skew)
        self.teacher, self.loss, self.temperature, self.kd_ratio = teacher, loss, temperature, kd_ratio
        self.beta, self.skew, self.top_k, self.chunk_rows = beta, skew, top_k, chunk_rows
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    def __call__(self, model, batch: dict):
        ids, labels, documents = batch["input_ids"], batch["labels"], batch.get("documents")
        h = model.trunk(model.inputs(ids), documents=documents)
        if not model.training or self.kd_ratio == 0:
            return model.loss(h, labels)
        scored = labels != IGNORE_INDEX
        if "teacher_ids" in batch:
            target = (batch["teacher_ids"][scored], batch["teacher_logprobs"][scored])
        elif self.teacher is None:
            raise DistillationError("no teacher: pass one, or batches with teacher_ids / teacher_logprobs from a "
                                    "teacher cache")
        else:
            with torch.no_grad():
                target = self.teacher.trunk(self.teacher.inputs(ids), documents=documents)[scored]
        head = model.lm_head
        if type(head) is torch.nn.Linear and head.bias is None:  # one pass over the head for both terms
            parts = {}
            loss = _HeadLoss.apply(h[scored], head.weight, labels[scored], target, self, parts)
            return loss, parts
        ce = model.loss(h, labels)  # a replaced head (LoRA on it, quantized): CE, then the KD term apart
        kd = self.kd(model.head, h[scored], target, vocab=model.config.vocab_size)
        loss = (1 - self.kd_ratio) * ce + self.kd_ratio * kd
        return loss, {"ce": float(ce.detach()), "kd": float(kd.detach())}

    def rows(self, vocab: int) -> int:
        return self.chunk_rows or max(1, (1 << 24) // vocab)

    def kd(self, head, h: torch.Tensor, target, vocab: int) -> torch.Tensor:
        """Mean divergence (times T^2) over the rows of the student's hidden states h (N, dim), against the
        teacher's hidden states (N, dim_t) or a top-k target (ids (N, k), log-probabilities (N, k)); each chunk's
        logits are recomputed in backward (activation checkpointing) rather than kept."""
        n = h.shape[0]
        if n == 0:
            return h.sum() * 0
        total, step = h.new_zeros((), dtype=torch.float32), self.rows(vocab)
        for s in range(0, n, step):
            part = _rows(target, s, step)
            if torch.is_grad_enabled() and h.requires_grad:
                total = total + checkpoint(self._chunk, head, h[s:s + step], part, vocab, use_reentrant=False)
            else:
                total = total + self._chunk(head, h[s:s + step], part, vocab)
        return total / n * self.temperature ** 2

    def _chunk(self, head, h, target, vocab: int) -> torch.Tensor:
        return self.divergence_sum(head(h).float()[:, :vocab], target, vocab)

    def divergence_sum(self, logits: torch.Tensor, target, vocab: int) -> torch.Tensor:
        """The summed divergence of the student's logits (rows, vocab) from the teacher's part for those rows."""
        log_q = F.log_softmax(logits / self.temperature, dim=-1)
        if torch.is_tensor(target):  # the teacher's hidden states: its logits now, sliced to the student's vocabulary
            with torch.no_grad():
                logits_p = self.teacher.head(target).float()[:, :vocab]
                if self.top_k is not None:
                    top = F.log_softmax(logits_p, dim=-1).topk(self.top_k, dim=-1)
                    target = (top.indices, top.values)
                else:
                    log_p = F.log_softmax(logits_p / self.temperature, dim=-1)
        if not torch.is_tensor(target):  # top-k: the teacher renormalised over its k tokens, the student read there
            ids, logprobs = target
            log_p = F.log_softmax(logprobs.float() / self.temperature, dim=-1)
            log_q = log_q.gather(-1, ids.long())
        return divergence(log_q, log_p, self.loss, beta=self.beta, skew=self.skew).sum()


def _rows(target, start: int, n: int):
    """Rows start..start+n of the teacher's part: hidden states, or a top-k pair."""
    return target[start:start + n] if torch.is_tensor(target) else (target[0][start:start + n],
                                                                     target[1][start:start + n])


class _HeadLoss(torch.autograd.Function):
    """(1 - a) CE + a T^2 KD over a plain linear head, for the labelled rows h (N, dim), a chunk of rows at a time,
    with d loss / d logits taken in the same pass (the loss is the graph's end, as in model.linear_cross_entropy):
    backward only scales the stored grad_h (N, dim) and grad_weight (vocab, dim). One head product per chunk for
    both terms, no logits kept or recomputed. `parts` receives the CE and KD means for the log."""

    @staticmethod
    def forward(ctx, h, weight, labels, target, distiller, parts):
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, vocab, a, t2 = h.shape[0], weight.shape[0], distiller.kd_ratio, distiller.temperature ** 2
        ce_total = kd_total = 0.0
        with torch.autocast(device, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            grad_h = torch.zeros_like(h) if need_h else None
            grad_w = torch.zeros_like(weight) if need_w else None
            step = distiller.rows(vocab)
            for s in range(0, n, step):
                x = hc[s:s + step]
                logits = (x @ wc.T).float().requires_grad_()
                with torch.enable_grad():
                    ce = F.cross_entropy(logits, labels[s:s + step], reduction="sum")
                    kd = distiller.divergence_sum(logits, _rows(target, s, step), vocab)
                    (g,) = torch.autograd.grad(((1 - a) * ce + a * t2 * kd) / n, logits)
                ce_total, kd_total = ce_total + float(ce), kd_total + float(kd)
                g = g.to(dtype)
                if need_h:
                    grad_h[s:s + step] = (g @ wc).to(h.dtype)
                if need_w:
                    grad_w += (g.T @ x).to(grad_w.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        n = max(n, 1)
        parts.update(ce=ce_total / n, kd=kd_total / n * t2)
        return torch.tensor((1 - a) * ce_total / n + a * t2 * kd_total / n, device=h.device)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss if grad_h is not None else None,
                grad_w * grad_loss if grad_w is not None else None, None, None, None, None)


def teacher_top_k(teacher, ids: torch.Tensor, k: int, vocab: int, documents: torch.Tensor | None = None):
    """The teacher's k most likely next tokens at every position of ids (B, T) and their log-probabilities at
    temperature 1 over the first `vocab` tokens: ((B, T, k) int32, (B, T, k) float32). What a teacher cache
    stores."""
    with torch.no_grad():
        h = teacher.trunk(teacher.inputs(ids), documents=documents)
        step = max(1, (1 << 24) // (vocab * ids.shape[0]))  # positions per head product: ~16M logits
        parts = [F.log_softmax(teacher.head(h[:, s:s + step]).float()[..., :vocab], dim=-1).topk(k, dim=-1)
                 for s in range(0, ids.shape[1], step)]
        return torch.cat([p.indices for p in parts], 1).to(torch.int32), torch.cat([p.values for p in parts], 1)


def check_vocabularies(teacher_tok, student_tok, teacher_name: str, student_name: str, teacher_vocab: int,
                       student_vocab: int) -> None:
    """Token-level distillation compares distributions id by id: the tokenizers must agree on every student id. A
    teacher with a larger (padded) vocabulary over the same tokens is fine (its logits are sliced)."""
    if teacher_vocab < student_vocab:
        raise DistillationError(f"the teacher {teacher_name} has {teacher_vocab} tokens, fewer than the student "
                                f"{student_name}'s {student_vocab}: token-level distillation needs the teacher to "
                                "cover every student token")
    t, s = teacher_tok.backend.get_vocab(with_added_tokens=True), student_tok.backend.get_vocab(with_added_tokens=True)
    differ = [tok for tok, i in s.items() if t.get(tok) != i]
    if differ:
        raise DistillationError(
            f"the teacher {teacher_name} and the student {student_name} tokenize differently ({len(differ)} of the "
            f"student's {len(s)} tokens have other ids or none in the teacher, e.g. {differ[0]!r}): token-level "
            "distillation needs one tokenizer. Use sequence-level distillation instead: `mighty distill-data` has "
            "the teacher write answers, then `mighty finetune` trains the student on them")
