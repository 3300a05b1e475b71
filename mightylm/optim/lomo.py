"""LOMO (Lv et al. 2023, "Full Parameter Fine-tuning for Large Language Models with Limited
Resources"): fuse the gradient computation and the parameter update into one step.

Each parameter gets a post-accumulate-grad hook: as soon as backward has produced its gradient,
the hook applies p <- p - lr * (g + wd * p) and frees g. So the full set of gradients never
exists at once, and (plain SGD) there is no optimizer state: memory is weights + activations.

How it hooks into the one training loop: `LOMO` is a torch Optimizer whose `step()` and
`zero_grad()` do nothing (the work happened in backward), and which owns `backward(loss)`:
- no clipping: one backward pass that updates as it goes;
- `clip_grad_norm` set: the paper's two passes (section 3.3): the first backward only sums the
  squared gradient norms (freeing each gradient), the second recomputes them and updates with
  the clip coefficient min(1, max_norm / norm);
- `loss_scale` set (half precision): the loss is multiplied by the scale, gradients divided by
  it; the first pass also checks for inf/NaN, and on overflow the update is skipped and the
  scale halved (dynamic loss scaling, as in mixed-precision training). Loss scaling implies the
  two-pass scheme.
With clipping and loss scaling off its trajectory is exactly plain SGD's (a test).
"""

from __future__ import annotations

import math

import torch


class LOMO(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, clip_grad_norm: float | None = None,
                 loss_scale: float | None = None, scale_window: int = 1000):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.clip_grad_norm, self.loss_scale, self.scale_window = clip_grad_norm, loss_scale, scale_window
        self._mode = "update"  # or "norm" during the first of two passes
        self._coef = 1.0
        self._sq_norm = None
        self._good_steps = 0
        self.skipped = 0  # updates skipped for overflow
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._hook(group))

    def _hook(self, group):
        @torch.no_grad()
        def hook(p: torch.Tensor) -> None:
            grad = p.grad
            p.grad = None  # freed as soon as it has been used
            if self.loss_scale is not None:
                grad = grad.float() / self.loss_scale
            if self._mode == "norm":
                self._sq_norm += grad.float().pow(2).sum()
                return
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(grad.to(p.dtype), alpha=-group["lr"] * self._coef)

        return hook

    def backward(self, loss: torch.Tensor) -> None:
        """Backward with the update fused in; see the module docstring for the passes."""
        if not torch.isfinite(loss.detach()).all():
            return  # no update from a non-finite loss; the training loop stops and reports it
        scaled = loss * self.loss_scale if self.loss_scale is not None else loss
        two_pass = self.clip_grad_norm is not None or self.loss_scale is not None
        self._coef = 1.0
        if two_pass:
            self._mode, self._sq_norm = "norm", torch.zeros((), device=loss.device)
            scaled.backward(retain_graph=True)
            norm = float(self._sq_norm.sqrt())
            self._mode = "update"
            if not math.isfinite(norm):
                if self.loss_scale is None:
                    return  # a non-finite loss: the training loop reports it
                self.loss_scale /= 2  # overflow: skip this update, try a smaller scale
                self.skipped += 1
                self._good_steps = 0
                return
            if self.clip_grad_norm is not None:
                self._coef = min(1.0, self.clip_grad_norm / (norm + 1e-6))
            if self.loss_scale is not None:
                self._good_steps += 1
                if self._good_steps % self.scale_window == 0:
                    self.loss_scale *= 2
        scaled.backward()

    def step(self, closure=None):  # the update already happened in backward
        return None

    def zero_grad(self, set_to_none: bool = True):  # gradients are freed in the hooks
        return None
