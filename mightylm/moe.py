"""Sparse mixture of experts: the feed-forward of Mixtral, Qwen2-MoE and OLMoE, its router losses, expert usage,
and sparse upcycling of a dense model.

`MoE` (what `model.make_mlp` builds for a sparse layer): a bias-free linear router scores each token against the
E experts; softmax over all E in float32, then the top k, whose weights are renormalised to sum to 1 when the
config says so (`norm_topk_prob`: Mixtral yes, Qwen2-MoE and OLMoE by default no). Each expert is a SwiGLU
feed-forward with Hugging Face's leaf names (`experts.{e}.gate_proj`, ...), so LoRA, quantization and the name maps
reach them like any projection. Dropless: every token goes to its k experts, whatever their load; only the experts
some token chose run, on exactly their tokens (a batch-1 decode step reads k experts' weights, not E). Qwen2-MoE
adds an always-on shared expert, scaled per token by sigmoid(shared_expert_gate(x)).

Router losses (each over one forward's router logits, which every MoE layer keeps in `router_logits`):
- `balancing_loss` (ours, the default in training): Switch Transformer's E * sum_e f_e P_e per layer, with f_e the
  fraction of the layer's k routings that went to expert e and P_e its mean router probability, averaged over the
  layers; 1.0 when balanced, E when collapsed. Per layer because balance is a property of each router.
- `hf_balancing_loss`: Hugging Face's `load_balancing_loss_func`, for parity. It pools the statistics of all layers
  before multiplying (transformers#31464), so a model balanced overall but skewed per layer looks balanced; its
  balanced value is k, not 1; and recent transformers add it to the loss only with `output_router_logits=True`
  (#44242), so a default config trains without any balancing.
- `z_loss`: ST-MoE's router z-loss, the mean over tokens of logsumexp(router logits)^2 (keeps logits small).
- `usage`: tokens per expert per layer and utilisation (load / ideal load: 1.0 fair, 0.0 dead).

This file imports only torch and `mightylm.config`; the expert class is handed in by model.py.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mightylm.config import ModelConfig


class MoE(nn.Module):
    """A dropless top-k mixture of SwiGLU experts (see the module docstring)."""

    def __init__(self, config: ModelConfig, expert: type[nn.Module]):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.experts_per_token, config.norm_topk_prob
        self.gate = nn.Linear(config.dim, config.n_experts, bias=False)  # the router
        self.experts = nn.ModuleList(expert(config, config.expert_ffn_dim) for _ in range(config.n_experts))
        if config.shared_expert_ffn_dim:
            self.shared_expert = expert(config, config.shared_expert_ffn_dim)
            self.shared_expert_gate = nn.Linear(config.dim, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None
        self.router_logits: torch.Tensor | None = None  # (tokens, E) of the last forward, for the losses
        # how training weighs the router losses (set_router_losses; read by router_losses)
        self.balance, self.aux_coef, self.z_coef = "per_layer", 0.01, 0.001

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits (N, E), the k experts of each token (N, k), their weights (N, k)) for x (N, dim)."""
        logits = self.gate(x)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, chosen, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, chosen, weights = self.route(flat)
        self.router_logits = logits
        if flat.shape[0] == 1:  # one token (batch-1 decoding): its k experts, no grouping needed
            out = sum(self.experts[e](flat) * w for e, w in zip(chosen[0].tolist(), weights[0]))
        else:
            out = self._grouped(flat, chosen, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.view(shape)

    def _grouped(self, flat, chosen, weights):
        """Tokens grouped by expert: each chosen expert runs once, on exactly the tokens that chose it."""
        out = torch.zeros_like(flat)
        for e in torch.unique(chosen).tolist():
            token, slot = torch.where(chosen == e)
            y = self.experts[e](flat[token]) * weights[token, slot, None]
            out = out.index_add(0, token, y.to(out.dtype))
        return out


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def router_logits(model: nn.Module, layers: list[MoE] | None = None) -> list[torch.Tensor]:
    """Each MoE layer's router logits from the model's last forward, in layer order (`layers`: moe_layers(model),
    when the caller has them)."""
    return [m.router_logits for m in (moe_layers(model) if layers is None else layers) if m.router_logits is not None]


def _flat_mask(mask: torch.Tensor | None, n: int, device) -> torch.Tensor:
    return (torch.ones(n, device=device) if mask is None else mask.reshape(-1).to(device=device, dtype=torch.float32))


def _routing(layer: torch.Tensor, top_k: int, mask: torch.Tensor | None):
    """One layer's (router probabilities (N, E), token mask (N,), routings per expert (E,), mask-weighted)."""
    m = _flat_mask(mask, layer.shape[0], layer.device)
    probs = torch.softmax(layer.float(), dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    counts = torch.zeros(layer.shape[-1], device=layer.device).scatter_add_(0, chosen.reshape(-1),
                                                                           m.repeat_interleave(top_k))
    return probs, m, counts


def balancing_loss(logits: list[torch.Tensor], top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-layer Switch balancing loss, averaged over layers: E * sum_e f_e P_e with f_e = the fraction of the
    layer's routings (k per counted token) sent to e, P_e = e's mean router probability; 1.0 when balanced.
    `mask` (B, T) or (N,): 1 for tokens to count (padding 0)."""
    losses = []
    for layer in logits:
        probs, m, counts = _routing(layer, top_k, mask)
        f = counts / (m.sum() * top_k)
        p = (probs * m[:, None]).sum(0) / m.sum()
        losses.append(layer.shape[-1] * (f * p).sum())
    return torch.stack(losses).mean()


def hf_balancing_loss(logits: list[torch.Tensor], n_experts: int, top_k: int,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hugging Face's `load_balancing_loss_func` (Mixtral, Qwen2-MoE, OLMoE): counts and probabilities pooled over
    all layers first, then E * sum_e (k routings per token) * P_e; balanced value k. For parity only."""
    counts = torch.zeros(n_experts, device=logits[0].device)
    prob_sum = torch.zeros(n_experts, device=logits[0].device)
    rows = 0.0
    for layer in logits:
        probs, m, layer_counts = _routing(layer, top_k, mask)
        counts = counts + layer_counts
        prob_sum = prob_sum + (probs * m[:, None]).sum(0)
        rows = rows + m.sum()
    return n_experts * ((counts / rows) * (prob_sum / rows)).sum()


def z_loss(logits: list[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's router z-loss, mean over counted tokens of logsumexp(logits)^2, averaged over layers."""
    losses = []
    for layer in logits:
        m = _flat_mask(mask, layer.shape[0], layer.device)
        z = torch.logsumexp(layer.float(), dim=-1) ** 2
        losses.append((z * m).sum() / m.sum())
    return torch.stack(losses).mean()


WATCH_STEPS = 50  # a dead or dominant expert is reported once it has been so for this many training steps


def _watch(layers: list[MoE], util: torch.Tensor) -> None:
    """Warn (once per kind and layer) when an expert has had no tokens, or one expert has taken more than half of
    a layer's routings, for WATCH_STEPS steps in a row; and when top-1 routing renormalises its one weight to 1.0,
    which leaves the router without any gradient."""
    import warnings

    for i, (layer, row) in enumerate(zip(layers, util)):
        if layer.top_k == 1 and layer.norm_topk_prob:
            warnings.warn("mightylm: top-1 routing with renormalised weights gives every token weight 1.0, so the "
                          "router gets no gradient from the language-model loss (only from the balancing loss); "
                          "use top-k >= 2 or norm_topk_prob=False", stacklevel=3)
        streak = getattr(layer, "_streak", None)
        if streak is None or streak.shape != (2, row.numel()):
            streak = layer._streak = torch.zeros(2, row.numel(), dtype=torch.long)
        dead, dominant = (row == 0).cpu(), (row > row.numel() / 2).cpu()
        streak[0] = (streak[0] + 1) * dead
        streak[1] = (streak[1] + 1) * dominant
        for kind, what in ((0, "received no tokens"), (1, "took over half of the layer's routings (router collapse)")):
            experts = (streak[kind] == WATCH_STEPS).nonzero().flatten().tolist()
            if experts:
                warnings.warn(f"mightylm: MoE layer {i}: expert(s) {experts} {what} for {WATCH_STEPS} training steps "
                              "in a row; raise the balancing coefficient or check the learning rate", stacklevel=3)


@torch.no_grad()
def usage(logits: list[torch.Tensor], top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(layers, E) utilisation: each expert's share of the layer's routings over the fair share 1/E (1.0 fair,
    0.0 dead, E all of them)."""
    rows = []
    for layer in logits:
        _, _, counts = _routing(layer, top_k, mask)
        rows.append(counts / counts.sum().clamp(min=1) * layer.shape[-1])
    return torch.stack(rows)


BALANCES = ("per_layer", "hf", "off")
UTIL_PREFIX = "moe_util.L"  # metrics.jsonl keys moe_util.L{layer}.E{expert}: the report's layer x expert heatmap


def set_router_losses(model: nn.Module, balance: str = "per_layer", aux_coef: float = 0.01,
                      z_coef: float = 0.001) -> None:
    """How training weighs the router losses of every MoE layer of `model` (a no-op for a dense model)."""
    if balance not in BALANCES:
        raise ValueError(f"balance must be per_layer, hf or off, got {balance!r}")
    for layer in moe_layers(model):
        layer.balance, layer.aux_coef, layer.z_coef = balance, aux_coef, z_coef


def router_losses(model: nn.Module, balance: str | None = None, aux_coef: float | None = None,
                  z_coef: float | None = None, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The router terms to add to the language-model loss after a forward of `model`, and the metrics to log:
    the balancing loss (`balance`: "per_layer", "hf" or "off") times `aux_coef`, the z-loss times `z_coef` (each
    defaulting to the layers' settings, see set_router_losses: per_layer, 0.01, 0.001), and the lowest and highest
    expert utilisation over the layers (0.0 is a dead expert; near E is collapse)."""
    layers = moe_layers(model)  # one walk over the modules per step
    first = layers[0]
    balance = first.balance if balance is None else balance
    aux_coef = first.aux_coef if aux_coef is None else aux_coef
    z_coef = first.z_coef if z_coef is None else z_coef
    if balance not in BALANCES:
        raise ValueError(f"balance must be per_layer, hf or off, got {balance!r}")
    logits = router_logits(model, layers)
    top_k = first.top_k
    if balance == "per_layer":
        aux = balancing_loss(logits, top_k, mask)
    elif balance == "hf":
        aux = hf_balancing_loss(logits, logits[0].shape[-1], top_k, mask)
    else:
        aux = torch.zeros((), device=logits[0].device)
    z = z_loss(logits, mask)
    util = usage(logits, top_k, mask)
    extra = aux_coef * aux + z_coef * z
    _watch(layers, util)
    cells = {f"{UTIL_PREFIX}{layer}.E{e}": float(u) for layer, row in enumerate(util) for e, u in enumerate(row)}
    return extra, {"moe_balance": float(aux.detach()), "moe_z": float(z.detach()), "moe_util_min": float(util.min()),
                   "moe_util_max": float(util.max()), **cells}


# the Hugging Face family an upcycled model is saved as: the dense family's blocks with experts
UPCYCLED_ARCH = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe"}


@torch.no_grad()
def upcycle_(model: nn.Module, n_experts: int, top_k: int, expert: type[nn.Module]) -> None:
    """Sparse upcycling (Komatsuzaki et al. 2023), in place: each dense feed-forward becomes `n_experts` copies of
    itself behind a fresh router (small random weights). With renormalised top-k weights (set here) the upcycled
    model computes the dense model's function at step 0: the k chosen copies are equal and their weights sum to 1."""
    config: ModelConfig = model.config
    if any(isinstance(m, MoE) for m in model.modules()):
        raise ValueError("the model already has experts")
    if config.arch not in UPCYCLED_ARCH:
        raise ValueError(f"cannot upcycle a {config.arch} model; dense types: {', '.join(UPCYCLED_ARCH)}")
    moe_config = dataclasses.replace(config, arch=UPCYCLED_ARCH[config.arch], n_experts=n_experts,
                                     experts_per_token=top_k, norm_topk_prob=True)  # validates k against E
    for block in model.layers:
        dense = block.mlp
        moe = MoE(moe_config, expert)
        for e in range(n_experts):
            moe.experts[e].load_state_dict(dense.state_dict())
        nn.init.normal_(moe.gate.weight, std=0.02)
        block.mlp = moe.to(device=dense.gate_proj.weight.device, dtype=dense.gate_proj.weight.dtype)
    model.config = moe_config
